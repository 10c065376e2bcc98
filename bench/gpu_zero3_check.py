"""DeepSpeed ZeRO-3 check for a machine with GPUs (and `pip install deepspeed`): one short run of the SEPIT stages
that touch ZeRO-3-partitioned parameters, launched as a user would, then checks on the saved folder.

    python bench/gpu_zero3_check.py [--num-processes 2] [--tiny llama] [--steps 2]
    DS_ACCELERATOR=cpu python bench/gpu_zero3_check.py --config configs/accelerate/deepspeed_zero3_cpu_2proc.yaml  # CPU

It writes a recipe (real yeast function rows from ../shared/data; a tiny random LLM by default, `--tiny ""` for the
demo's SmolLM2) with `instruct` (projector + LLM in full) then `moe` (upcycled to 2 experts: the dense blocks are
copied under `deepspeed.zero.GatheredParameters`, see protllm.building.upcycle_to_moe; the router loss goes
through re-entrant activation checkpointing when `--gradient-checkpointing`), launches
`accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes N train_sft.py`, and
checks that: the run ended, every weight of the instruct and final folders is whole (not one of ZeRO-3's empty
placeholders) and finite, the experts of each MoE block started as copies of the dense block (the instruct stage's
`mlp`: they moved at most the optimizer's few steps away from it), and the folder loads through the Auto classes in
a fresh process. Prints one JSON line per check and exits non-zero on the first failure.
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
LEARNING_RATE = 1e-3


def check(name: str, ok: bool, detail="") -> None:
    print(json.dumps({"check": name, "ok": bool(ok), "detail": str(detail)[-2000:]}), flush=True)
    if not ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--tiny", default="llama", help='a tiny random LLM family; "" for the demo recipe\'s model')
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="re-entrant checkpointing in `moe`")
    parser.add_argument("--config", default=str(REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import deepspeed  # noqa: F401  (fails here, clearly, when DeepSpeed is not installed)

    from data.builders import BuildStats, function_text
    from data.readers import read_yeast_function

    with tempfile.TemporaryDirectory(prefix="gpu-zero3-") as tmp:
        tmp = Path(tmp)
        stats, rows = BuildStats(), []
        for protein in read_yeast_function(SHARED / "function" / "yeast_function.jsonl", stats):
            if protein.get("split") == "train" and protein.get("description") and len(protein["sequence"]) <= 200:
                rows.extend(function_text(protein, "train", 0, "yeast_function", stats))
            if len(rows) >= 64:
                break
        (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if args.tiny:
            model = {"tiny": args.tiny, "config": {"projector_type": "mlp2x_gelu", "max_protein_length": 200}}
        else:
            model = {k: v for k, v in yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["model"].items()
                     if k != "retrieval"}
        moe_training = {"max_steps": args.steps}
        if args.gradient_checkpointing:
            moe_training.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
        recipe = {"output_dir": str(tmp / "out"), "seed": 0, "model": model,
                  "data": {"train": str(tmp / "rows.jsonl"), "max_length": 320},
                  "training": {"per_device_train_batch_size": 2, "logging_steps": 1, "learning_rate": LEARNING_RATE, "bf16": True},
                  "stages": [{"name": "instruct", "training": {"max_steps": args.steps}},
                             {"name": "moe", "training": moe_training, "moe": {"num_experts": 2, "top_k": 1}}]}
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.config, "--num_processes",
                   str(args.num_processes), str(REPO / "train_sft.py"), "--config", str(tmp / "recipe.yaml"), "--no_eval"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True)
        check("run", result.returncode == 0, result.stderr)

        import torch
        from safetensors.torch import load_file

        out = tmp / "out"
        weights = load_file(out / "model" / "model.safetensors")
        dense = load_file(out / "stages" / "instruct" / "model" / "model.safetensors")
        for name, folder in (("instruct", dense), ("final", weights)):  # an empty tensor is trivially finite
            bad = [k for k, w in folder.items() if w.numel() == 0 or not torch.isfinite(w.float()).all()]
            check(f"{name} weights whole and finite", not bad, bad[:5])
        # Adam moves a weight about one learning rate per step: an expert copied from nothing would be far off.
        expert = weights["model.language_model.layers.0.mlp.experts.0.up_proj.weight"].float()
        source = dense["model.language_model.layers.0.mlp.up_proj.weight"].float()
        drift = (expert - source).abs().max().item() if expert.shape == source.shape else float("inf")
        check("experts copied from the dense block", drift <= 1.5 * args.steps * LEARNING_RATE + 1e-2, f"max drift {drift}")
        loaded = subprocess.run([sys.executable, "-I", "-c", (
            "from transformers import AutoModelForCausalLM; import sys; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r}, trust_remote_code=True); "
            "print('experts', m.config.moe_num_experts)")], check=False, cwd=tmp, capture_output=True, text=True,
            env={**env, "PYTHONPATH": ""})
        check("loads through the Auto classes", "experts 2" in loaded.stdout, loaded.stderr)


if __name__ == "__main__":
    main()
