"""The training stages of STELLA and SEPIT, each declared once.

A `Stage` says what it trains, with which learning rate per part, on which trainer, and whether it uses LoRA or
the frozen-encoder feature cache. `run_stage` runs any of them the same way and saves a complete model folder:

    warmup    SEPIT stage 0: the encoder (+ new modules) on contrastive + coordinate denoising + masked LM
    align     STELLA stage 1 / SEPIT captions: the projector (+ the encoder at its own LR when asked)
    instruct  STELLA stage 2: projector + LLM, in full or with LoRA
    moe       SEPIT stage 2: the LLM upcycled to a mixture of experts, trained like instruct
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import set_seed

from modeling_protllm import ProtLLMForConditionalGeneration

from ..building import model_parameter_counts, upcycle_to_moe
from ..model_classes import causal_lm_class
from ..model_folder import save_model_folder
from ..parameter_groups import numel, protllm_core, set_trainable
from .collator import ProtLLMDataCollator
from .feature_cache import FeatureCache
from .trainers import (CollatorStatsCallback, make_sft_trainer, restore_model_dtype, unsharded_copy,
                       upcast_trainable_parameters)
from .warmup import WarmupCollator, WarmupHeads, WarmupModel, load_pretrained_mlm_head, make_warmup_trainer

logger = logging.getLogger("protllm.train")

COMPLETE_MARKER = "stage_complete.json"


@dataclass(frozen=True)
class Stage:
    """One training stage. `spec` below is the stage's block of the recipe (`stages: [- name: ...]`)."""

    name: str
    parts: frozenset[str]  # the model parts trained in full, before the recipe's options
    trainer: str  # "sft" (TRL SFTTrainer on chat rows) or "warmup" (encoder losses)
    upcycles_to_moe: bool = False
    lora_allowed: bool = False

    def trained_parts(self, spec: dict) -> set[str]:
        parts = set(self.parts)
        if spec.get("train_protein_encoder"):
            parts.add("protein_encoder")
        if self.lora_allowed and spec.get("lora"):
            parts.discard("language_model")  # the adapters train instead
        return parts

    def learning_rates(self, spec: dict, base: float) -> dict[str, float]:
        """Per-part learning rates; parts not named use the stage's `training.learning_rate`."""
        return {
            "projector": spec.get("projector_learning_rate", base),
            "protein_encoder": spec.get("encoder_learning_rate", base),
        }

    def uses_lora(self, spec: dict) -> bool:
        return self.lora_allowed and bool(spec.get("lora"))

    def uses_feature_cache(self, spec: dict, model) -> bool:
        return self.trainer == "sft" and bool(spec.get("feature_cache")) and "protein_encoder" not in self.trained_parts(spec)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("warmup", frozenset({"protein_encoder"}), trainer="warmup"),
        Stage("align", frozenset({"projector"}), trainer="sft"),
        Stage("instruct", frozenset({"projector", "language_model"}), trainer="sft", lora_allowed=True),
        Stage("moe", frozenset({"projector", "language_model"}), trainer="sft", upcycles_to_moe=True, lora_allowed=True),
    )
}


def _lora_model(model, spec: dict):
    from peft import LoraConfig, get_peft_model

    lora = spec["lora"]
    modules_to_save = ["projector"] + (["protein_encoder"] if spec.get("train_protein_encoder") else [])
    if spec.get("name") == "moe":
        # SEPIT trains the mixture: the new routers train in full beside the LoRA adapters (and so are saved in the
        # adapter checkpoints, which a resumed run restores), the experts through the adapters on q/v/... modules.
        modules_to_save.append("router")
    return get_peft_model(model, LoraConfig(
        r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora.get("target_modules", ["q_proj", "v_proj"]), modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    ))


def _fresh_protllm(config, generation_config) -> ProtLLMForConditionalGeneration:
    """An unsharded ProtLLM of `config` for `unsharded_copy` to fill with the trained weights."""
    fresh = causal_lm_class(config)(config)
    fresh.generation_config = generation_config
    return fresh


def run_stage(model, processor, stage_spec: dict, train_dataset, training_args, output_dir: Path, *, max_length=None,
              resume=None, freeze_encoder_after: bool = True):
    """Train one stage and save `<output_dir>/stages/<name>/model`. Returns `(model, log_history, summary)`."""
    stage = STAGES[stage_spec["name"]]
    stage_dir = Path(output_dir) / "stages" / stage.name
    started = time.time()
    # A stage's new weights (routers, LoRA adapters, warm-up heads) depend on the seed only, not on what ran before:
    # a resumed run loads its finished stages instead of training them, and must build the same stage.
    set_seed(training_args.seed)
    if stage.upcycles_to_moe:
        # Routers seeded from the recipe seed: identical on every rank, and in a run resumed after earlier stages.
        upcycle_to_moe(model, **{"seed": training_args.seed, **(stage_spec.get("moe") or {})})
    parts = stage.trained_parts(stage_spec)
    set_trainable(model, parts)
    counts = model_parameter_counts(model)
    counts["trainable"] = sum(numel(p) for p in model.parameters() if p.requires_grad)
    lora_parts = ["language_model (LoRA)"] + (["routers"] if stage.upcycles_to_moe else []) if stage.uses_lora(stage_spec) else []
    logger.info("[%s] trains %s | parameters: %s", stage.name, sorted(parts) + lora_parts,
                ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    summary = {"stage": stage.name, "trained_parts": sorted(parts) + lora_parts, "parameters": counts}

    if stage.trainer == "warmup":
        config = model.config
        heads = WarmupHeads(config.protein_config, config.text_config.hidden_size)
        pretrained_head = load_pretrained_mlm_head(heads, config.protein_config)
        weights = {"contrastive": 1.0, "mlm": 1.0, "denoise": 1.0, **(stage_spec.get("loss_weights") or {})}
        wrapper = WarmupModel(model, heads, weights, noise_std=stage_spec.get("noise_std", 0.2),
                              mask_ratio=stage_spec.get("mask_ratio", 0.15))
        wrapper.pretrained_mlm_head = pretrained_head
        summary["mlm_head"] = "ESM pretrained" if pretrained_head else "ESM-initialised, decoder tied to the embeddings"
        model_dtype = upcast_trainable_parameters(wrapper, training_args)
        warmup_rows, held_out = train_dataset, []
        max_length = getattr(processor, "max_protein_length", None)
        window = stage_spec.get("mlm_window") or max_length  # residues per sequence-only warm-up protein
        if stage_spec.get("mlm_sequences"):  # every sequence we have, beside the captioned training rows
            from .warmup import mix_captioned_rows, mlm_corpus, mlm_perplexity

            corpus, held_out = mlm_corpus(stage_spec["mlm_sequences"], stage_spec.get("mlm_exclude") or (),
                                          max_length=window, seed=training_args.seed)
            warmup_rows = mix_captioned_rows([dict(row) for row in train_dataset], corpus,
                                             stage_spec.get("caption_share"), seed=training_args.seed)
            held_out = held_out[: stage_spec.get("mlm_eval_sequences", 256)]
            summary["mlm_corpus"] = {"sequences": len(corpus), "captioned_rows": len(train_dataset),
                                     "captioned_share": round(1 - len(corpus) / max(len(warmup_rows), 1), 3),
                                     "window": window,
                                     "files": list(stage_spec["mlm_sequences"]), "held_out_files": list(stage_spec.get("mlm_exclude") or [])}
            if held_out:
                from .warmup import unigram_perplexity

                summary["mlm_perplexity"] = {
                    "before": mlm_perplexity(wrapper, processor, held_out, max_length=max_length),
                    # context-free residue frequencies: the level a masked LM must beat to use context at all
                    "unigram_reference": unigram_perplexity((r["sequence"] for r in corpus), [s[:max_length] for s in held_out]),
                }
        warmup_collator = WarmupCollator(processor, max_residues=window)
        if getattr(training_args, "train_sampling_strategy", None) == "group_by_length":
            # Batches sorted by length would undo `caption_share`'s mix of captioned and MLM-only rows in each batch.
            logger.info("[warmup] train_sampling_strategy group_by_length applies to the SFT stages; warm-up batches are random")
            training_args = replace(training_args, train_sampling_strategy="random")
        trainer = make_warmup_trainer(wrapper, training_args, warmup_rows, warmup_collator,
                                      new_module_lr_multiplier=stage_spec.get("new_module_lr_multiplier", 10.0))
        trainer.train(resume_from_checkpoint=resume)
        steps = max(trainer.state.global_step, 1)
        summary["warmup_losses"] = {k: v / steps for k, v in wrapper.loss_parts.items()}
        if wrapper.contrastive_record:  # the last quarter of the batches against chance (ln of each batch's pairs)
            last = wrapper.contrastive_record[-max(len(wrapper.contrastive_record) // 4, 1):]
            summary["contrastive_last_quarter"] = {"loss": round(sum(x for x, _ in last) / len(last), 4),
                                                   "chance": round(sum(c for _, c in last) / len(last), 4),
                                                   "batches": len(last)}
        summary["cropped_proteins"] = warmup_collator.cropped
        if held_out:
            summary["mlm_perplexity"]["after"] = mlm_perplexity(wrapper, processor, held_out, max_length=max_length)
            logger.info("[warmup] encoder MLM perplexity on %d held-out sequences: %.2f before -> %.2f after "
                        "(residue frequencies alone: %.2f)", len(held_out), summary["mlm_perplexity"]["before"]["perplexity"],
                        summary["mlm_perplexity"]["after"]["perplexity"], summary["mlm_perplexity"]["unigram_reference"])
        # FSDP / ZeRO-3 sharded the ProtLLM inside the warm-up wrapper in place: go on with an unsharded copy (a
        # no-op otherwise), or the saved folder would hold shards (ZeRO-3: empty tensors).
        model = unsharded_copy(trainer, model, functools.partial(_fresh_protllm, model.config, model.generation_config))
    else:
        feature_cache = None
        if stage.uses_feature_cache(stage_spec, model):
            feature_cache = FeatureCache(Path(output_dir) / "feature_cache", model)
        collator = ProtLLMDataCollator(processor, max_length=max_length, feature_cache=feature_cache,
                                       padding_free=bool(getattr(training_args, "padding_free", False)))
        if feature_cache is not None:
            # On the training device, batched by length, sharded over processes, resumable (see FeatureCache).
            protllm_core(model).protein_encoder.to(training_args.device)
            written = feature_cache.precompute(train_dataset, collator, batch_size=training_args.per_device_train_batch_size)
            summary["feature_cache"] = {"directory": str(feature_cache.directory), "written": written}
        if getattr(training_args, "train_sampling_strategy", None) == "group_by_length" \
                and training_args.length_column_name not in train_dataset.column_names:
            # The Trainer's LengthGroupedSampler batches rows of similar length (less padding); it reads their lengths
            # from this column, since rows here are chats, not `input_ids`.
            train_dataset = train_dataset.map(lambda row: {training_args.length_column_name: collator.row_length(row)},
                                              desc="row lengths for group_by_length",
                                              new_fingerprint=f"{train_dataset._fingerprint}-lengths")
        train_model = _lora_model(model, stage_spec) if stage.uses_lora(stage_spec) else model
        if train_model is not model:  # the LoRA adapters exist only now: count them with the trainable parameters
            counts["trainable"] = sum(numel(p) for p in train_model.parameters() if p.requires_grad)
            logger.info("[%s] trainable with the LoRA adapters: %.2fM", stage.name, counts["trainable"] / 1e6)
        model_dtype = upcast_trainable_parameters(train_model, training_args)
        trainer = make_sft_trainer(train_model, processor, training_args, train_dataset, collator,
                                   stage.learning_rates(stage_spec, training_args.learning_rate),
                                   callbacks=[CollatorStatsCallback(collator)])
        trainer.train(resume_from_checkpoint=resume)
        summary["collator"] = dict(collator.stats)
        if feature_cache is not None:
            summary["feature_cache"].update(hits=feature_cache.hits, misses=feature_cache.misses)
        # FSDP sharded the parameters in place: go on with an unsharded copy (a no-op without FSDP).
        def rebuild(config=model.config, generation_config=model.generation_config):
            fresh = _fresh_protllm(config, generation_config)
            return _lora_model(fresh, stage_spec) if stage.uses_lora(stage_spec) else fresh

        train_model = unsharded_copy(trainer, train_model, rebuild)
        if stage.uses_lora(stage_spec):
            if trainer.is_world_process_zero():
                train_model.save_pretrained(stage_dir / "adapter")
            model = train_model.merge_and_unload()
        else:
            model = train_model

    history = list(trainer.state.log_history)
    seconds = time.time() - started
    steps = trainer.state.global_step
    summary.update(steps=steps, seconds=round(seconds, 1), steps_per_second=round(steps / seconds, 3) if seconds else None)
    losses = [h["loss"] for h in history if "loss" in h]
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
    restore_model_dtype(model, model_dtype)  # one dtype in the saved folder, as built
    protllm_core(model).protein_encoder.set_frozen(freeze_encoder_after)
    model.eval()
    if trainer.is_world_process_zero():
        save_model_folder(model, processor, stage_dir / "model")
        (stage_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        (stage_dir / COMPLETE_MARKER).write_text(json.dumps(summary, indent=1, default=str))
    torch.manual_seed(training_args.seed)
    return model, history, summary
