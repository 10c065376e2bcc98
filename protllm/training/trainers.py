"""Trainers of the SFT stages: TRL's SFTTrainer with per-part learning rates, and callbacks."""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..building import cast_floating_parameters
from ..parameter_groups import part_of, protllm_core

logger = logging.getLogger("protllm.train")


def upcast_trainable_parameters(model, args) -> torch.dtype | None:
    """The mixed-precision policy: under AMP (`bf16: true` / `fp16: true`) the trained parameters are fp32 master
    weights, while frozen ones stay in the model's dtype and autocast runs the matmuls in half precision. A bf16
    parameter updated in place at LR 2e-5 loses most updates to rounding (bf16 has 8 significant bits).

    Without AMP, half-precision trainable parameters train as they are (pure bf16): logged as a warning.
    Returns the dtype the trained parameters had (to cast back after training, see `restore_model_dtype`), or None.
    """
    if getattr(args, "deepspeed_plugin", None) is not None and (args.bf16 or args.fp16):
        return _deepspeed_half_parameters(model, torch.bfloat16 if args.bf16 else torch.float16)
    trainable = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    half = [p for p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return None
    original = half[0].dtype
    if args.bf16 or args.fp16:
        cast_floating_parameters(model, torch.float32, trainable_only=True)
        # A trained encoder goes to fp32 whole: parameters it keeps frozen (contact head, layers past the feature
        # layer) still run on its fp32 activations, and LayerNorm on CPU refuses fp32 inputs with bf16 weights.
        from ..parameter_groups import protllm_core

        encoder = protllm_core(model).protein_encoder
        if any(p.requires_grad for p in encoder.parameters()):
            cast_floating_parameters(encoder, torch.float32)
        logger.info("mixed precision: %d trained parameter tensors (%.1fM values) upcast from %s to fp32 master weights; "
                    "frozen parameters stay %s, autocast computes in %s", len(half), sum(p.numel() for p in half) / 1e6,
                    original, original, "bf16" if args.bf16 else "fp16")
    else:
        logger.warning("training %d parameter tensors in pure %s (no AMP: bf16/fp16 are off): small updates round away",
                       len(half), original)
    return original


def _deepspeed_half_parameters(model, half: torch.dtype) -> torch.dtype | None:
    """DeepSpeed's mixed precision: the engine keeps the fp32 master weights of the trained parameters itself and
    runs the module in `half` without autocast, so every parameter must be `half`. Under ZeRO-3 the LLM that
    `zero.Init` built already is; modules built outside it (projector, encoder, LM head) are converted to ZeRO-3
    parameters without a cast, and a bf16 activation would then meet an fp32 weight. Cast those here.
    Returns the dtype they had (restored after training, see `restore_model_dtype`), or None."""
    plain = [p for p in model.parameters() if p.is_floating_point() and not hasattr(p, "ds_id") and p.dtype != half]
    if not plain:
        return None
    original = plain[0].dtype
    for param in plain:
        param.data = param.data.to(half)
    logger.info("DeepSpeed mixed precision: %d parameter tensors cast from %s to %s (DeepSpeed holds the fp32 master "
                "weights)", len(plain), original, half)
    return original


def restore_model_dtype(model, dtype: torch.dtype | None) -> None:
    """After training, parameters upcast by `upcast_trainable_parameters` go back to the model's `dtype`, so a saved
    folder has one dtype (the one `config.dtype` records)."""
    if dtype is not None:
        cast_floating_parameters(model, dtype)


def build_optimizer(model, args, part_learning_rates: dict[str, float]):
    """AdamW with one parameter group per part (encoder / projector / LLM), each with its learning rate."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((part_of(name), decay), []).append(param)
    param_groups = [
        {"params": params, "lr": part_learning_rates.get(part, args.learning_rate),
         "weight_decay": args.weight_decay if decay else 0.0}
        for (part, decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def fsdp_layer_classes(model) -> list[str]:
    """The module classes that become their own FSDP unit: the LLM's decoder layer (its `_no_split_modules`, e.g.
    `LlamaDecoderLayer`; MoE-upcycled layers keep that class) and the whole protein encoder.

    Why the encoder is one unit of its own: it runs once per step, before the LLM, and is usually frozen (no
    gradients to reduce-scatter); as its own unit it is gathered for its forward and freed right after, instead of
    staying gathered for the whole step as part of the root unit. The projector (a few M parameters) stays in the
    root unit with the token embeddings and the LM head: a unit of its own would add two collectives per step to
    save almost no memory.
    """
    core = protllm_core(model)
    names = list(getattr(core.language_model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(core.language_model).__name__} declares no _no_split_modules: set "
                         "fsdp_transformer_layer_cls_to_wrap in the accelerate config to its decoder layer class")
    return names + [type(core.protein_encoder).__name__]


def enable_fsdp_on_cpu(accelerator) -> bool:
    """accelerate 1.15 turns `distributed_type: FSDP` into FSDP only on accelerators (MULTI_GPU, XPU, ...); with
    CPU processes it silently falls back to DDP. torch's FSDP2 (`fully_shard`) runs on CPU over gloo, so when the
    launcher asked for FSDP (`ACCELERATE_USE_FSDP=true`) and the state is MULTI_CPU, switch the state to FSDP with
    the plugin read from the launcher's FSDP_* variables, as accelerate does on GPUs. Returns True when switched."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    logger.info("FSDP%d on %d CPU processes (gloo); units: %s", plugin.fsdp_version, state.num_processes,
                os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"))
    return True


def unsharded_copy(trainer, trained_model, rebuild):
    """After an FSDP or DeepSpeed ZeRO-3 run: the trained weights in a fresh, unsharded module. FSDP2 turned
    `trained_model`'s parameters into DTensor shards in place, and ZeRO-3 into empty placeholders (each rank keeps
    its partition inside DeepSpeed); saving, LoRA merging and the next stage need plain tensors.

    `rebuild()` returns an unsharded module of the same structure (a ProtLLM, or a PEFT model around one). Every
    rank gathers the full tensors one at a time (a collective: all ranks call this in the same order), so peak extra
    device memory is one tensor; the copy lives on the CPU. Returns `trained_model` itself when it is not sharded.
    """
    zero3 = getattr(trainer, "is_deepspeed_enabled", False) and any(hasattr(p, "ds_id") for p in trained_model.parameters())
    if not getattr(trainer, "is_fsdp_enabled", False) and not zero3:
        return trained_model
    from contextlib import nullcontext

    from torch.distributed.tensor import DTensor
    from transformers.initialization import no_init_weights

    partitioned = {name: param for name, param in trained_model.named_parameters(remove_duplicate=False) if hasattr(param, "ds_id")}
    full = {}
    for name, tensor in trained_model.state_dict().items():
        if name in partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters([partitioned[name]]):
                full[name] = partitioned[name].data.detach().clone().cpu()
        else:
            full[name] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()
    # Under ZeRO-3, transformers would build the copy's LLM inside `zero.Init` (partitioned again); its own guard
    # against nested `zero.Init` keeps the copy whole (the next trainer partitions it when it wraps it).
    if zero3:
        from transformers.modeling_utils import set_zero3_state

        whole = set_zero3_state()
        logger.info("DeepSpeed ZeRO-3: %d parameter tensors gathered from their partitions into an unsharded copy", len(partitioned))
    else:
        whole = nullcontext()
    with no_init_weights(), whole:  # every weight is overwritten below
        copy = rebuild()
    # assign: the gathered tensors keep their dtypes (fp32 master weights beside bf16 frozen ones, restored by the
    # caller); state_dict() lists tied weights under both names, so the tie is remade after.
    copy.load_state_dict(full, strict=True, assign=True)
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    return copy


def make_sft_trainer(model, processor, args, train_dataset, collator, part_learning_rates=None, eval_dataset=None,
                     callbacks=None, fused_lm_head: bool | None = None):
    """TRL's SFTTrainer with our collator and per-part learning rates.

    `fused_lm_head` (default: on when training on a GPU) keeps TRL's own loss: its chunked LM-head kernel, with the
    MoE router loss added from the router logits our model exposes. Off the GPU that kernel scores every position in
    Python tiles and was 4x slower than plain logits here (tiny model, 49k vocabulary: 11.1 s vs 2.9 s per step), so
    on CPU the model's own forward computes the loss (LM loss + router loss, the same functions) via
    `Trainer.compute_loss`; TRL's entropy / token-accuracy metrics are then not logged.
    """
    from transformers import Trainer as HFTrainer
    from trl import SFTTrainer

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        # The accelerate plugin reads this when the Trainer builds it; the ProtLLM's own `_no_split_modules` names
        # only the encoder, which would leave the decoder layers unsharded inside the root unit.
        os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(fsdp_layer_classes(model))

    class ProtLLMSFTTrainer(RemoveFailedCheckpoint, SFTTrainer):
        use_fused_lm_head = fused_lm_head

        def create_accelerator_and_postprocess(self):
            from accelerate.state import AcceleratorState

            if AcceleratorState._shared_state and getattr(AcceleratorState(), "deepspeed_plugins", None):
                # One trainer per stage: accelerate refuses a second Accelerator given a DeepSpeed plugin while the
                # first one's state lives. The previous stage is finished; forget its state (the process group stays).
                AcceleratorState._reset_state()
            super().create_accelerator_and_postprocess()
            if enable_fsdp_on_cpu(self.accelerator):
                self.is_fsdp_enabled = True

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = build_optimizer(self.model, self.args, part_learning_rates or {})
            return self.optimizer

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:  # `train_sampling_strategy: group_by_length`
                sampler = ShuffledBatchesLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths,
                                                              generator=sampler.generator)
            return sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fused = self.use_fused_lm_head
            if fused is None:
                fused = self.args.device.type == "cuda"
            if fused:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            return HFTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return ProtLLMSFTTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=collator,
        processing_class=processor.tokenizer, callbacks=callbacks,
    )


class ShuffledBatchesLengthGroupedSampler(LengthGroupedSampler):
    """transformers' `LengthGroupedSampler` (batches of rows of similar length, so little padding), with the batches in
    random order.

    The parent puts each "megabatch" (up to 50 batches) longest first. A short run then trains on the long rows (function
    descriptions) at the top of its learning-rate schedule and on the short ones (yes/no answers) at its bottom.
    """

    def __iter__(self):
        indices = list(super().__iter__())
        batches = [indices[i: i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        return iter([index for b in order for index in batches[b]])


class CollatorStatsCallback(TrainerCallback):
    """Logs the collator's truncation counts (what was dropped, shortened or cropped) with the training loss."""

    def __init__(self, collator):
        self.collator = collator

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            for key in ("truncated_examples", "truncated_answer_tokens", "dropped_examples", "cropped_proteins"):
                logs[f"collator/{key}"] = self.collator.stats.get(key, 0)


class RemoveFailedCheckpoint:
    """Trainer mixin: a checkpoint save that raises (safetensors refusing a tensor, a full disk) removes the
    `checkpoint-N` folder it was writing, so `--resume_from_checkpoint` never picks up a half-written one; and
    `trainer_state.json`, the file that marks a checkpoint complete, is written only once every rank has written its
    own files."""

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        # transformers writes each rank's `rng_state_<rank>.pth`, then rank 0 writes trainer_state.json with no
        # barrier in between: a run killed in that gap left a checkpoint that looked complete, and its resume crashed
        # on the other rank's half-written RNG file.
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial):
        import shutil
        from pathlib import Path

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        existed = folder.exists()
        try:
            return super()._save_checkpoint(model, trial)
        except BaseException:
            if not existed and self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise


def last_complete_checkpoint(folder) -> str | None:
    """The newest `checkpoint-N` under `folder` that a save finished (its `trainer_state.json`, written last, exists).

    Newer folders without it were left by a save that was killed or failed: they are removed (with a warning), since
    transformers' `get_last_checkpoint` would pick them and the resume would fail on them.
    """
    import re
    import shutil
    from pathlib import Path

    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), path) for path in folder.iterdir()
                   if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name)))
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        logger.warning("removing %s: an incomplete checkpoint (no trainer_state.json; its save was killed or failed)", path)
        shutil.rmtree(path, ignore_errors=True)
    return None
