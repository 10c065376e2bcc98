"""SFT steps per second with the frozen-encoder feature cache vs recomputing the encoder every step.

Same run, same model, same batches: a tiny LLM (so the encoder's share is visible, as with a large frozen encoder
and LoRA) and an ESM-2 35M-shaped encoder (12 layers, width 480, random weights), on demo proteins.

    OMP_NUM_THREADS=1 python bench/bench_feature_cache.py [--steps 12] [--batch 8]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from protllm.testing import build_tiny_protllm, tiny_protein_config  # noqa: E402
from protllm.training.collator import ProtLLMDataCollator  # noqa: E402
from protllm.training.feature_cache import FeatureCache  # noqa: E402
from protllm.training.trainers import make_sft_trainer  # noqa: E402


def steps_per_second(model, processor, rows, collator, steps, batch, output_dir):
    from trl import SFTConfig

    args = SFTConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                     report_to="none", save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, logging_steps=steps,
                     disable_tqdm=True, seed=0, data_seed=0)
    trainer = make_sft_trainer(model, processor, args, rows, collator)
    started = time.perf_counter()
    trainer.train()
    return steps / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from data import load_demo_dataset

    rows = load_demo_dataset()["train"].filter(lambda r: r["task"] == "protein_name").select(range(args.steps * args.batch))
    protein = tiny_protein_config(hidden_size=480, layers=12, heads=20)
    protein["intermediate_size"] = 1920
    model, processor = build_tiny_protllm("llama", protein_config=protein, projector_type="linear", max_protein_length=256)
    for name, param in model.named_parameters():
        param.requires_grad_("projector" in name or "language_model" in name)
    with tempfile.TemporaryDirectory() as tmp:
        recompute = steps_per_second(model, processor, rows, ProtLLMDataCollator(processor), args.steps, args.batch, tmp)
        cache = FeatureCache(Path(tmp) / "cache", model)
        collator = ProtLLMDataCollator(processor, feature_cache=cache)
        started = time.perf_counter()
        written = cache.precompute(rows, collator)
        fill_seconds = time.perf_counter() - started
        cached = steps_per_second(model, processor, rows, collator, args.steps, args.batch, tmp)
    print(f"encoder: 12 layers x 480 (ESM-2 35M shape), LLM: tiny llama; {args.steps} steps x batch {args.batch}")
    print(f"recompute encoder every step: {recompute:.3f} steps/s")
    print(f"from the feature cache:       {cached:.3f} steps/s  (cache filled once: {written} proteins in {fill_seconds:.1f} s)")
    print(f"speed-up with cache: {cached / recompute:.2f}x  (cache hits {cache.hits}, misses {cache.misses})")


if __name__ == "__main__":
    main()
