"""The demo table: a recipe's evaluation run through the eval harness, summarised per task and printed."""

from __future__ import annotations

import json
from pathlib import Path


def evaluate_model(recipe, model_dir: Path, output_dir: Path) -> dict | None:
    """Run the recipe's `evaluate:` block through :func:`eval.run.run_evaluation`; write and print eval.json.

    Predictors: the model, the same model fed shuffled proteins (shuffled before its retrieval), the model without
    retrieval (when it has a database and `evaluate.no_retrieval` is not false), and the recipe's baselines.
    """
    spec = recipe.get("evaluate")
    if not spec:
        return None
    from eval.run import run_evaluation

    eval_dir = output_dir / "eval"
    flags = list(spec.get("flags", []))
    unknown = [f for f in flags if f not in ("--no_identity", "--no_meteor")]
    if unknown:
        raise ValueError(f"evaluate.flags: {unknown} are not supported (use --no_identity, --no_meteor)")
    has_database = (Path(model_dir) / "retrieval").is_dir()
    metrics = run_evaluation(
        spec["data"], [str(model_dir), *spec.get("baselines", ["most_common"])], eval_dir,
        train=spec.get("train"), seed=recipe.get("seed", 0), limit=spec.get("limit"),
        batch_size=spec.get("batch_size", 16), max_new_tokens=spec.get("max_new_tokens", 32),
        bootstrap=spec.get("bootstrap", 200), shuffled_proteins=spec.get("shuffled_proteins", True),
        no_retrieval=has_database and spec.get("no_retrieval", True),
        identity="--no_identity" not in flags, meteor="--no_meteor" not in flags,
        task=",".join(spec["tasks"]) if spec.get("tasks") else "auto", progress=True, split=spec.get("split"),
        command=f"eval.run.run_evaluation (recipe {recipe.get('recipe')})",
    )
    table = summarise_metrics(metrics, model_name=Path(model_dir).name)
    (output_dir / "eval.json").write_text(json.dumps(table, indent=1))
    print_table(table)
    print_examples(eval_dir / "predictions.jsonl", Path(model_dir).name, spec.get("examples", 4))
    return table


# metrics.json predictor names -> eval.json column names (the contract of outputs/demo/eval.json)
CONTROL_SUFFIXES = {"+shuffled_proteins": "model_shuffled_proteins", "+no_retrieval": "model_no_retrieval"}
COLUMNS = ["model", "model_shuffled_proteins", "model_no_retrieval", "retrieval", "most_common"]


def summarise_metrics(metrics: dict, model_name: str) -> dict:
    """The demo table: per task, the primary metric of the model, its controls and each baseline, with 95% CIs."""
    tasks = {}
    for task, task_result in metrics.get("tasks", {}).items():
        predictors = task_result.get("predictors", {})
        row = {}
        for predictor, result in predictors.items():
            primary = result.get("primary")
            value = result.get("metrics", {}).get(primary, {})
            row[_column(predictor, model_name)] = {"metric": primary, "value": value.get("value"), "ci_low": value.get("ci_low"),
                          "ci_high": value.get("ci_high"), "n": result.get("counts", {}).get("n_examples")}
        tasks[task] = row
    splits = {task: result.get("split") for task, result in metrics.get("tasks", {}).items() if result.get("split")}
    # model minus each other column on the same rows, with the paired bootstrap 95% CI (eval.report.paired_difference)
    paired = {}
    for task, task_result in metrics.get("tasks", {}).items():
        against = (task_result.get("paired_differences") or {}).get(model_name) or {}
        paired[task] = {_column(other, model_name): d for other, d in against.items() if d}
    return {"tasks": tasks, "paired_differences": paired, "splits": splits,
            "split": (metrics.get("header") or {}).get("split"), "report": "eval/report.md",
            "metrics": "eval/metrics.json"}


def _column(predictor: str, model_name: str) -> str:
    """The eval.json column of a metrics.json predictor name."""
    if predictor == model_name:
        return "model"
    for suffix, column in CONTROL_SUFFIXES.items():
        if predictor == model_name + suffix:
            return column
    return predictor


def print_table(table: dict):
    print("\n=== held-out evaluation (test proteins <=30% identity to training) ===")
    present = [c for c in COLUMNS if any(c in row for row in table["tasks"].values())]
    present += sorted({c for row in table["tasks"].values() for c in row} - set(COLUMNS))  # extra baselines last
    print(f"{'task':<14} {'metric':<14} {'rows':>5} " + " ".join(f"{c:>24}" for c in present))
    for task, row in table["tasks"].items():
        first = next(iter(row.values()))
        metric, rows = first["metric"], first.get("n")  # tasks may have their own row counts (evaluate.limit)
        cells = []
        for column in present:
            cell = row.get(column)
            cells.append(f"{cell['value']:.3f} [{cell['ci_low']:.2f},{cell['ci_high']:.2f}]" if cell and cell["value"] is not None
                         and cell.get("ci_low") is not None else (f"{cell['value']:.3f}" if cell and cell["value"] is not None else "-"))
        print(f"{task:<14} {metric:<14} {rows if rows is not None else '-':>5} " + " ".join(f"{c:>24}" for c in cells))
    paired = table.get("paired_differences") or {}
    if any(paired.values()):
        print("\nmodel minus each column, same rows (paired bootstrap 95% CI):")
        for task, against in paired.items():
            cells = [f"{column} {d['difference']:+.3f}" + (f" [{d['ci_low']:+.2f},{d['ci_high']:+.2f}]"
                                                          if d.get("ci_low") is not None else "")
                     for column, d in against.items()]
            print(f"{task:<14} " + "  ".join(cells))
    by_split: dict[str, list[str]] = {}
    for task, split in (table.get("splits") or {}).items():
        by_split.setdefault(split, []).append(task)
    for split, tasks in by_split.items():
        print(f"split of {', '.join(tasks)}: {split}")


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
