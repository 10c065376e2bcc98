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
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger("protllm.train")


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


def stage_training_args(recipe: dict, stage: dict, output_dir: Path, overrides: list[str]):
    """SFTConfig for one stage: recipe `training:` < stage `training:` < command line."""
    import torch
    from transformers import HfArgumentParser
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    defaults = {
        "output_dir": str(output_dir / "stages" / stage["name"] / "trainer"),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 5,
        "seed": recipe.get("seed", 0),
        "data_seed": recipe.get("seed", 0),
        "use_cpu": not on_gpu,
        "bf16": on_gpu,
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        "gradient_checkpointing": False,  # SFTConfig turns it on by default: recompute costs ~30% on CPU
    }
    defaults.update(recipe.get("training") or {})
    defaults.update(stage.get("training") or {})
    parser = HfArgumentParser(SFTConfig)
    parser.set_defaults(**defaults)
    (args,) = parser.parse_args_into_dataclasses(args=overrides)
    return args


def check_overrides(overrides: list[str]) -> None:
    """Refuse command-line values that would silently train something else (`--max_steps 0` trains one step,
    `--max_steps -5` means "use the epochs"), before anything is built."""
    values = {}
    for index, token in enumerate(overrides):
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            if not value and index + 1 < len(overrides):
                value = overrides[index + 1]
            values[key] = value
    for key in ("max_steps", "learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if key not in values:
            continue
        try:
            number = float(values[key])
        except ValueError:
            raise SystemExit(f"error: --{key} must be a number, got {values[key]!r}") from None
        if number <= 0:
            raise SystemExit(f"error: --{key} must be positive, got {values[key]}")


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.INFO)
    args, overrides = parse_args(argv)
    check_overrides(overrides)
    from protllm.training.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.config)
    except RecipeError as error:
        raise SystemExit(f"error: {error}") from None
    output_dir = Path(args.output_dir or recipe.get("output_dir", "outputs/run"))
    stages = recipe["stages"]
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",")]
        unknown = [w for w in wanted if w not in [s["name"] for s in stages]]
        if unknown:
            raise SystemExit(f"stages {unknown} are not in {args.config} (it has {[s['name'] for s in stages]})")
        stages = [s for s in stages if s["name"] in wanted]
    # Every stage's SFTConfig is parsed before anything is built: a wrong value fails in seconds, not after loading.
    stage_args = {stage["name"]: stage_training_args(recipe, stage, output_dir, overrides) for stage in stages}
    output_dir.mkdir(parents=True, exist_ok=True)

    from accelerate import PartialState
    from transformers import set_seed

    from protllm.building import build_from_recipe
    from protllm.local_weights import hub_name
    from protllm.model_classes import causal_lm_class
    from protllm.model_folder import load_model_folder, save_model_folder
    from protllm.training.data import load_rows
    from protllm.training.plots import plot_loss_curves
    from protllm.training.stages import COMPLETE_MARKER, run_stage

    set_seed(recipe.get("seed", 0))
    started = time.time()
    # Wall and CPU seconds per part, printed at the end: on a shared machine CPU / cores bounds the idle wall time.
    parts: list[tuple[str, float, float]] = []
    mark = [time.time(), time.process_time()]

    def part_done(name: str) -> None:
        now = [time.time(), time.process_time()]
        parts.append((name, now[0] - mark[0], now[1] - mark[1]))
        mark[:] = now
    spec = recipe.get("model") or {}
    if args.model_name_or_path:  # the auto_map check, then this process's classes: no prompt, no folder code
        model, processor = load_model_folder(args.model_name_or_path)
    else:
        model, processor = build_from_recipe(spec, seed=recipe.get("seed", 0), tiny=args.tiny)
    data = recipe.get("data") or {}
    from data.validation import BadRowsError

    data_checks: dict = {}  # every row is checked before training: all bad rows listed at once, or skipped
    try:
        train_dataset = load_rows(data.get("train", "demo"), split=data.get("train_split"), limit=data.get("limit"),
                                  tasks=data.get("tasks"), on_bad_rows=data.get("on_bad_rows", "stop"), report=data_checks)
    except BadRowsError as error:
        raise SystemExit(f"error: {error}") from None
    logger.info("training rows: %d (%s)", len(train_dataset), data.get("train", "demo"))
    part_done("build model + load data")
    if spec.get("retrieval"):  # the model's database: every training protein; training rows get leave-one-out neighbours
        from protllm.training.retrieval import attach_retrieval

        train_dataset, _ = attach_retrieval(processor, train_dataset, spec["retrieval"], sources=[str(data.get("train", "demo"))],
                                            seed=recipe.get("seed", 0))
        part_done("retrieval database + training neighbours")

    freeze_after = (spec.get("config") or {}).get("freeze_protein_encoder", True)
    histories, summaries = {}, []
    for stage in stages:
        stage_dir = output_dir / "stages" / stage["name"]
        if args.resume_from_checkpoint and (stage_dir / COMPLETE_MARKER).is_file():
            logger.info("[%s] already complete: loading %s", stage["name"], stage_dir / "model")
            model = causal_lm_class(model.config).from_pretrained(stage_dir / "model")  # same encoder as the built model
            histories[stage["name"]] = json.loads((stage_dir / "log_history.json").read_text())
            summaries.append(json.loads((stage_dir / COMPLETE_MARKER).read_text()))
            continue
        training_args = stage_args[stage["name"]]
        resume = None
        if args.resume_from_checkpoint:
            from protllm.training.trainers import last_complete_checkpoint

            if args.resume_from_checkpoint == "true":
                # the newest checkpoint whose save finished; a half-written one (killed or failed save) is removed
                resume = last_complete_checkpoint(training_args.output_dir)
            else:
                resume = args.resume_from_checkpoint
            logger.info("[%s] resuming from %s", stage["name"], resume or "the start (no checkpoint yet)")
        model, history, summary = run_stage(model, processor, stage, train_dataset, training_args, output_dir,
                                            max_length=data.get("max_length"), resume=resume, freeze_encoder_after=freeze_after)
        histories[stage["name"]] = history
        summaries.append(summary)
        part_done(f"stage {stage['name']}")
        logger.info("[%s] done: %s", stage["name"], json.dumps({k: summary.get(k) for k in ("steps", "seconds", "steps_per_second", "first_loss", "last_loss")}))

    if not PartialState().is_main_process:
        return 0
    final = output_dir / "model"
    training_record = {"recipe": recipe.get("recipe", Path(args.config).stem), "config_file": str(args.config),
                       "language_model": hub_name(spec.get("language_model")),
                       "protein_encoder": spec.get("protein_encoder"),
                       "datasets": [data.get("train", "demo")], "seed": recipe.get("seed", 0),
                       "stages": [{**{k: v for k, v in s.items() if k != "training"}, **(s.get("training") or {})} for s in stages],
                       "summaries": summaries, "command_line_overrides": overrides,
                       "data_checks": data_checks}
    plot = plot_loss_curves(histories, output_dir / "loss_curves.png")

    def write_record(folder: Path) -> None:
        (folder / "training_args.json").write_text(json.dumps(training_record, indent=1, default=str))
        if plot:
            shutil.copy(plot, folder / "loss_curves.png")

    # Written aside and swapped in: a kill leaves the previous complete folder (or none), never a half.
    save_model_folder(model, processor, final, write_extras=write_record)
    logger.info("saved %s (training %.0f s); loss curves: %s", final, time.time() - started, plot)
    part_done("save model folder")

    if not args.no_eval and recipe.get("evaluate"):
        from eval.summary import evaluate_model

        table = evaluate_model(recipe, final, output_dir)
        if table:
            shutil.copy(output_dir / "eval" / "metrics.json", final / "metrics.json")
        part_done("evaluation")
    from protllm.sharing import prepare_model_folder, push_model_folder

    # The pipeline file and our model card (it reads training_args.json and metrics.json from the folder).
    prepare_model_folder(final, repo_id=args.hub_model_id)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise SystemExit("--push_to_hub needs --hub_model_id ORG/NAME")
        push_model_folder(final, args.hub_model_id)
    part_done("model card")
    print("\n=== time per part (wall s | CPU s of this process, all threads) ===")
    for name, wall, cpu in parts:
        print(f"{name:<44} {wall:8.1f} | {cpu:8.1f}")
    print(f"\nmodel folder: {final}  |  total wall time {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
