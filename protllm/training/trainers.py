"""Trainers of the SFT stages: TRL's SFTTrainer with per-part learning rates, and callbacks."""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from ..building import cast_floating_parameters
from ..parameter_groups import part_of

logger = logging.getLogger("protllm.train")


def upcast_trainable_parameters(model, args) -> torch.dtype | None:
    """The mixed-precision policy: under AMP (`bf16: true` / `fp16: true`) the trained parameters are fp32 master
    weights, while frozen ones stay in the model's dtype and autocast runs the matmuls in half precision. A bf16
    parameter updated in place at LR 2e-5 loses most updates to rounding (bf16 has 8 significant bits).

    Without AMP, half-precision trainable parameters train as they are (pure bf16): logged as a warning.
    Returns the dtype the trained parameters had (to cast back after training, see `restore_model_dtype`), or None.
    """
    trainable = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    half = [p for p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
    if not half:
        return None
    original = half[0].dtype
    if args.bf16 or args.fp16:
        cast_floating_parameters(model, torch.float32, trainable_only=True)
        logger.info("mixed precision: %d trained parameter tensors (%.1fM values) upcast from %s to fp32 master weights; "
                    "frozen parameters stay %s, autocast computes in %s", len(half), sum(p.numel() for p in half) / 1e6,
                    original, original, "bf16" if args.bf16 else "fp16")
    else:
        logger.warning("training %d parameter tensors in pure %s (no AMP: bf16/fp16 are off): small updates round away",
                       len(half), original)
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

    class ProtLLMSFTTrainer(SFTTrainer):
        use_fused_lm_head = fused_lm_head

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = build_optimizer(self.model, self.args, part_learning_rates or {})
            return self.optimizer

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


class CollatorStatsCallback(TrainerCallback):
    """Logs the collator's truncation counts (what was dropped or shortened) with the training loss."""

    def __init__(self, collator):
        self.collator = collator

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            for key in ("truncated_examples", "truncated_answer_tokens", "dropped_examples"):
                logs[f"collator/{key}"] = self.collator.stats.get(key, 0)
