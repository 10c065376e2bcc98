"""Train a ProtLLM through the stages of STELLA and SEPIT from a YAML recipe, on TRL's SFTTrainer.

    python train_sft.py --config configs/demo.yaml                       # the README's main job
    python train_sft.py --config configs/stella.yaml --stages align      # one stage
    python train_sft.py --config configs/sepit.yaml --stages moe --model_name_or_path outputs/sepit/stages/instruct/model
    python train_sft.py --config configs/demo.yaml --max_steps 5 --learning_rate 1e-4   # SFTConfig overrides, every stage
    python train_sft.py --config configs/demo.yaml --resume_from_checkpoint             # after a kill: go on

A recipe names the model to build (`model:`), the data (`data:`), SFTConfig defaults (`training:`), the stages in
order (`stages:`, each with its own `training:` overrides) and an optional evaluation (`evaluate:`). Every stage
saves a model folder `<output_dir>/stages/<stage>/model` that the next stage (or a later run) starts from; the last
one is also saved as `<output_dir>/model`. Command-line `--key value` pairs that are not options of this script
are SFTConfig fields (HfArgumentParser-style) and override the recipe for every stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger("protllm.train")

COMPLETE_MARKER = "stage_complete.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("--stages", default=None, help="comma list of stages to run (default: all in the recipe)")
    parser.add_argument("--output_dir", default=None, help="override the recipe's output_dir")
    parser.add_argument("--model_name_or_path", default=None, help="start from this saved ProtLLM folder instead of building")
    parser.add_argument("--resume_from_checkpoint", nargs="?", const="true", default=None,
                        help="continue a killed run: finished stages are skipped, the running one resumes from its last checkpoint")
    parser.add_argument("--push_to_hub", action="store_true", help="push the final model folder (with card) to the Hub")
    parser.add_argument("--hub_model_id", default=None)
    parser.add_argument("--no_eval", action="store_true", help="skip the recipe's evaluation")
    parser.add_argument("--tiny", default=None, help="build a tiny random LLM of this family (llama, qwen2): for tests")
    args, training_overrides = parser.parse_known_args(argv)
    return args, training_overrides


def load_recipe(path) -> dict:
    import yaml

    with open(path) as handle:
        recipe = yaml.safe_load(handle)
    if not isinstance(recipe, dict) or "stages" not in recipe:
        raise ValueError(f"{path}: a recipe needs at least `stages:` (and usually model:, data:, training:)")
    from training import STAGES

    for stage in recipe["stages"]:
        if stage.get("name") not in STAGES:
            raise ValueError(f"{path}: unknown stage {stage.get('name')!r}; stages are {STAGES}")
    return recipe


def stage_training_args(recipe: dict, stage: dict, output_dir: Path, overrides: list[str]):
    """SFTConfig for one stage: recipe `training:` < stage `training:` < command line."""
    from transformers import HfArgumentParser
    from trl import SFTConfig

    defaults = {
        "output_dir": str(output_dir / "stages" / stage["name"] / "trainer"),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 5,
        "seed": recipe.get("seed", 0),
        "data_seed": recipe.get("seed", 0),
        "use_cpu": not _cuda_available(),
        "bf16": _cuda_available(),
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        "gradient_checkpointing": False,  # SFTConfig turns it on by default: recompute costs ~30% on CPU
    }
    defaults.update(recipe.get("training") or {})
    defaults.update(stage.get("training") or {})
    import dataclasses

    unknown = sorted(set(defaults) - {field.name for field in dataclasses.fields(SFTConfig)})
    if unknown:
        raise ValueError(f"stage {stage['name']!r}: {unknown} are not SFTConfig fields (check the recipe's training: blocks)")
    parser = HfArgumentParser(SFTConfig)
    parser.set_defaults(**defaults)
    (args,) = parser.parse_args_into_dataclasses(args=overrides)
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----- model -----------------------------------------------------------------------------------------------

def resolve_language_model(name: str) -> str:
    if name == "smollm2-local":
        from local_weights import smollm2_path

        return str(smollm2_path())
    return name


def _hub_name(name):
    """The Hub id a local alias stands for (its provenance on cards), else the name as given."""
    from local_weights import LOCAL_ALIASES

    return LOCAL_ALIASES.get(name, name)


def build_model(recipe: dict, args):
    """Build (or load) the ProtLLM and its processor named by the recipe."""
    from modeling_protllm import ProtLLMForConditionalGeneration
    from processing_protllm import ProtLLMProcessor

    spec = recipe.get("model") or {}
    if args.model_name_or_path:
        model = ProtLLMForConditionalGeneration.from_pretrained(args.model_name_or_path)
        processor = ProtLLMProcessor.from_pretrained(args.model_name_or_path)
        return model, processor
    config_kwargs = dict(spec.get("config") or {})
    tiny = args.tiny or spec.get("tiny")
    if tiny:
        from tiny_protllm import build_tiny_protllm, tiny_protein_config

        protein_config = None
        if spec.get("protein_config"):
            protein_config = {**tiny_protein_config(), **spec["protein_config"]}
            if config_kwargs.get("protein_encoder_input") == "saprot":
                protein_config.update(vocab_size=446, mask_token_id=4)
        model, processor = build_tiny_protllm(tiny, seed=recipe.get("seed", 0), protein_config=protein_config,
                                              processor_kwargs=spec.get("processor"), **config_kwargs)
        return model, processor
    protein_config = None
    if spec.get("protein_encoder") is None:
        from tiny_protllm import tiny_protein_config

        protein_config = {**tiny_protein_config(), **(spec.get("protein_config") or {})}
        if config_kwargs.get("protein_encoder_input") == "saprot":
            protein_config.update(vocab_size=446, mask_token_id=4)
    import torch

    torch.manual_seed(recipe.get("seed", 0))
    model, processor = ProtLLMForConditionalGeneration.from_pretrained_components(
        resolve_language_model(spec["language_model"]),
        protein_encoder=spec.get("protein_encoder"),
        protein_config=protein_config,
        processor_kwargs=spec.get("processor"),
        **config_kwargs,
    )
    return model, processor


def set_trainable(model, stage: dict):
    """Freeze / unfreeze the parts a stage trains. Returns the names of the trained parts."""
    encoder = model.model.protein_encoder
    name = stage["name"]
    train_encoder = name == "warmup" or bool(stage.get("train_protein_encoder", False))
    encoder.set_frozen(not train_encoder)
    for param in model.model.projector.parameters():
        param.requires_grad_(name != "warmup")
    train_llm = name in ("instruct", "moe") and not stage.get("lora")
    for param in model.model.language_model.parameters():
        param.requires_grad_(train_llm)
    model.lm_head.weight.requires_grad_(train_llm)
    parts = [p for p, on in (("protein_encoder", train_encoder), ("projector", name != "warmup"), ("language_model", train_llm)) if on]
    if stage.get("lora"):
        parts.append("language_model (LoRA)")
    return parts


def log_parameter_counts(model, stage_name):
    counts = model.parameter_counts()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "[%s] parameters: total %.2fM | LLM %.2fM, active per token %.2fM | projector %.3fM | encoder %.2fM | trainable %.2fM",
        stage_name, counts["total"] / 1e6, counts["language_model"] / 1e6, counts["language_model_active_per_token"] / 1e6,
        counts["projector"] / 1e6, counts["protein_encoder"] / 1e6, trainable / 1e6,
    )
    return {**counts, "trainable": trainable}


# ----- stages ----------------------------------------------------------------------------------------------

def run_stage(model, processor, recipe, stage, train_dataset, training_args, output_dir: Path, resume):
    """Train one stage and save its model folder. Returns (model, log_history, summary)."""
    import torch

    from model_folder import save_model_folder
    from training import (CollatorStatsCallback, FeatureCache, ProtLLMDataCollator, WarmupCollator, WarmupHeads,
                          WarmupModel, make_sft_trainer, make_warmup_trainer)

    name = stage["name"]
    stage_dir = output_dir / "stages" / name
    started = time.time()
    if name == "moe":
        moe = stage.get("moe") or {}
        model.upcycle_to_moe(**moe)
    trained_parts = set_trainable(model, stage)
    counts = log_parameter_counts(model, name)
    data = recipe.get("data") or {}
    summary = {"stage": name, "trained_parts": trained_parts, "parameters": counts}

    if name == "warmup":
        heads = WarmupHeads(model.config.protein_config.hidden_size, model.config.text_config.hidden_size,
                            model.config.protein_config.vocab_size)
        weights = {"contrastive": 1.0, "mlm": 1.0, "denoise": 1.0, **(stage.get("loss_weights") or {})}
        wrapper = WarmupModel(model, heads, weights, noise_std=stage.get("noise_std", 0.2))
        trainer = make_warmup_trainer(wrapper, training_args, train_dataset, WarmupCollator(processor),
                                      new_module_lr_multiplier=stage.get("new_module_lr_multiplier", 10.0))
        trainer.train(resume_from_checkpoint=resume)
        steps = max(trainer.state.global_step, 1)
        summary["warmup_losses"] = {k: v / steps for k, v in wrapper.loss_parts.items()}
    else:
        feature_cache = None
        if stage.get("feature_cache") and model.model.protein_encoder.frozen:
            feature_cache = FeatureCache(output_dir / "feature_cache", model)
        collator = ProtLLMDataCollator(processor, max_length=data.get("max_length"), feature_cache=feature_cache)
        if feature_cache is not None:
            written = feature_cache.precompute(train_dataset, collator)
            summary["feature_cache"] = {"directory": str(feature_cache.directory), "written": written}
        part_lrs = {
            "projector": stage.get("projector_learning_rate", training_args.learning_rate),
            "protein_encoder": stage.get("encoder_learning_rate", training_args.learning_rate),
        }
        train_model = model
        if stage.get("lora"):
            from peft import LoraConfig, get_peft_model

            lora = stage["lora"]
            modules_to_save = ["projector"] + (["protein_encoder"] if stage.get("train_protein_encoder") else [])
            train_model = get_peft_model(model, LoraConfig(
                r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.0),
                target_modules=lora.get("target_modules", ["q_proj", "v_proj"]), modules_to_save=modules_to_save,
                task_type="CAUSAL_LM",
            ))
        trainer = make_sft_trainer(train_model, processor, training_args, train_dataset, collator, part_lrs,
                                   callbacks=[CollatorStatsCallback(collator)])
        trainer.train(resume_from_checkpoint=resume)
        summary["collator"] = dict(collator.stats)
        if feature_cache is not None:
            summary["feature_cache"].update(hits=feature_cache.hits, misses=feature_cache.misses)
        if stage.get("lora"):
            train_model.save_pretrained(stage_dir / "adapter")
            model = train_model.merge_and_unload()
    history = list(trainer.state.log_history)
    seconds = time.time() - started
    steps = trainer.state.global_step
    summary.update(steps=steps, seconds=round(seconds, 1), steps_per_second=round(steps / seconds, 3) if seconds else None)
    losses = [h["loss"] for h in history if "loss" in h]
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
    model.model.protein_encoder.set_frozen(recipe.get("model", {}).get("config", {}).get("freeze_protein_encoder", True))
    model.eval()
    if trainer.is_world_process_zero():
        folder = stage_dir / "model"
        save_model_folder(model, processor, folder)
        (stage_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        (stage_dir / COMPLETE_MARKER).write_text(json.dumps(summary, indent=1, default=str))
    torch.manual_seed(training_args.seed)
    return model, history, summary


def evaluate_model(recipe, model_dir: Path, output_dir: Path) -> dict | None:
    """Run the recipe's evaluation (eval harness: model vs most-common vs shuffled proteins); write eval.json."""
    spec = recipe.get("evaluate")
    if not spec:
        return None
    from eval.__main__ import main as eval_main

    eval_dir = output_dir / "eval"
    argv = ["--data", spec["data"], "--out", str(eval_dir), "--predictor", str(model_dir),
            "--batch_size", str(spec.get("batch_size", 16)), "--max_new_tokens", str(spec.get("max_new_tokens", 32)),
            "--bootstrap", str(spec.get("bootstrap", 200)), "--seed", str(recipe.get("seed", 0))]
    for baseline in spec.get("baselines", ["most_common"]):
        argv += ["--predictor", baseline]
    if spec.get("train"):
        argv += ["--train", spec["train"]]
    if spec.get("shuffled_proteins", True):
        argv.append("--shuffled_proteins")
    if spec.get("limit"):
        argv += ["--limit", str(spec["limit"])]
    for flag in spec.get("flags", []):
        argv.append(flag)
    if eval_main(argv) != 0:
        raise RuntimeError(f"evaluation failed (python -m eval {' '.join(argv)})")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    table = summarise_metrics(metrics, model_name=model_dir.name)
    (output_dir / "eval.json").write_text(json.dumps(table, indent=1))
    print_table(table)
    print_examples(eval_dir / "predictions.jsonl", model_dir.name, spec.get("examples", 4))
    return table


def summarise_metrics(metrics: dict, model_name: str) -> dict:
    """The demo table: per task, the primary metric of the model, each baseline and the shuffled-protein control."""
    tasks = {}
    for task, task_result in metrics.get("tasks", {}).items():
        predictors = task_result.get("predictors", {})
        row = {}
        for predictor, result in predictors.items():
            primary = result.get("primary")
            value = result.get("metrics", {}).get(primary, {})
            label = "model" if predictor == model_name else ("model_shuffled_proteins" if predictor.startswith(model_name) else predictor)
            row[label] = {"metric": primary, "value": value.get("value"), "ci_low": value.get("ci_low"),
                          "ci_high": value.get("ci_high"), "n": result.get("counts", {}).get("n_examples")}
        tasks[task] = row
    return {"tasks": tasks, "report": "eval/report.md", "metrics": "eval/metrics.json"}


def print_table(table: dict):
    print("\n=== held-out evaluation (test proteins <30% identity to training) ===")
    columns = ["model", "most_common", "model_shuffled_proteins", "retrieval"]
    print(f"{'task':<14} {'metric':<14} " + " ".join(f"{c:>24}" for c in columns))
    for task, row in table["tasks"].items():
        metric = next(iter(row.values()))["metric"]
        cells = []
        for column in columns:
            cell = row.get(column)
            cells.append(f"{cell['value']:.3f} [{cell['ci_low']:.2f},{cell['ci_high']:.2f}]" if cell and cell["value"] is not None
                         and cell.get("ci_low") is not None else (f"{cell['value']:.3f}" if cell and cell["value"] is not None else "-"))
        print(f"{task:<14} {metric:<14} " + " ".join(f"{c:>24}" for c in cells))


def print_examples(predictions_path: Path, model_name: str, count: int):
    """A few answers per task beside the truth, the first `count` rows of each task."""
    if not predictions_path.is_file() or count <= 0:
        return
    print("\n=== examples (model answer | reference) ===")
    shown = {}
    for line in predictions_path.read_text().splitlines():
        row = json.loads(line)
        answer = (row.get("predictions") or {}).get(model_name)
        if answer is None or shown.get(row["task"], 0) >= count:
            continue
        shown[row["task"]] = shown.get(row["task"], 0) + 1
        print(f"[{row['task']}] {answer!r:50.50} | {row['reference']!r:50.50}")


# ----- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.INFO)
    args, overrides = parse_args(argv)
    recipe = load_recipe(args.config)
    output_dir = Path(args.output_dir or recipe.get("output_dir", "outputs/run"))
    output_dir.mkdir(parents=True, exist_ok=True)
    stages = recipe["stages"]
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",")]
        unknown = [w for w in wanted if w not in [s["name"] for s in stages]]
        if unknown:
            raise SystemExit(f"stages {unknown} are not in {args.config} (it has {[s['name'] for s in stages]})")
        stages = [s for s in stages if s["name"] in wanted]

    from transformers import set_seed

    import training

    set_seed(recipe.get("seed", 0))
    started = time.time()
    model, processor = build_model(recipe, args)
    data = recipe.get("data") or {}
    train_dataset = training.load_rows(data.get("train", "demo"), split=data.get("train_split"), limit=data.get("limit"),
                                       tasks=data.get("tasks"))
    logger.info("training rows: %d (%s)", len(train_dataset), data.get("train", "demo"))

    histories, summaries = {}, []
    for stage in stages:
        stage_dir = output_dir / "stages" / stage["name"]
        if args.resume_from_checkpoint and (stage_dir / COMPLETE_MARKER).is_file():
            from modeling_protllm import ProtLLMForConditionalGeneration

            logger.info("[%s] already complete: loading %s", stage["name"], stage_dir / "model")
            model = ProtLLMForConditionalGeneration.from_pretrained(stage_dir / "model")
            histories[stage["name"]] = json.loads((stage_dir / "log_history.json").read_text())
            summaries.append(json.loads((stage_dir / COMPLETE_MARKER).read_text()))
            continue
        training_args = stage_training_args(recipe, stage, output_dir, overrides)
        resume = None
        if args.resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            if args.resume_from_checkpoint == "true":
                resume = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
            else:
                resume = args.resume_from_checkpoint
            logger.info("[%s] resuming from %s", stage["name"], resume or "the start (no checkpoint yet)")
        model, history, summary = run_stage(model, processor, recipe, stage, train_dataset, training_args, output_dir, resume)
        histories[stage["name"]] = history
        summaries.append(summary)
        logger.info("[%s] done: %s", stage["name"], json.dumps({k: summary.get(k) for k in ("steps", "seconds", "steps_per_second", "first_loss", "last_loss")}))

    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    from model_folder import save_model_folder
    from training import plot_loss_curves

    final = output_dir / "model"
    if final.exists():
        shutil.rmtree(final)
    save_model_folder(model, processor, final)
    training_record = {"recipe": recipe.get("recipe", Path(args.config).stem), "config_file": str(args.config),
                       "language_model": _hub_name((recipe.get("model") or {}).get("language_model")),
                       "protein_encoder": (recipe.get("model") or {}).get("protein_encoder"),
                       "datasets": [data.get("train", "demo")], "seed": recipe.get("seed", 0),
                       "stages": [{**{k: v for k, v in s.items() if k != "training"}, **(s.get("training") or {})} for s in stages],
                       "summaries": summaries, "command_line_overrides": overrides}
    (final / "training_args.json").write_text(json.dumps(training_record, indent=1, default=str))
    plot = plot_loss_curves(histories, output_dir / "loss_curves.png")
    if plot:
        shutil.copy(plot, final / "loss_curves.png")
    logger.info("saved %s (training %.0f s); loss curves: %s", final, time.time() - started, plot)

    if not args.no_eval:
        table = evaluate_model(recipe, final, output_dir)
        if table:
            shutil.copy(output_dir / "eval" / "metrics.json", final / "metrics.json")
    from sharing import prepare_model_folder

    # The pipeline file and our model card (it reads training_args.json and metrics.json from the folder).
    prepare_model_folder(final, repo_id=args.hub_model_id)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise SystemExit("--push_to_hub needs --hub_model_id ORG/NAME")
        from sharing import push_model_folder

        push_model_folder(final, args.hub_model_id)
    print(f"\nmodel folder: {final}  |  total wall time {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
