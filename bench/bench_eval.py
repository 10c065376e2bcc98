"""Evaluation speed: batched vs one-prompt-at-a-time generation, and metric time for 10k predictions.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/bench_eval.py [--model_dir DIR] [--n 64]
        [--batch_size 16] [--max_new_tokens 32] [--metric_n 10000] [--skip_generation]

Generation: the same model (a tiny random ProtLLM from ``tiny_protllm`` unless ``--model_dir``) and
the same 64 prompts (yeast test proteins, cropped to ``--max_residues``), greedy, KV cache on;
one-at-a-time is what OPI's and ProteinChat's scripts do. ``min_new_tokens = max_new_tokens`` so both
modes generate the same number of tokens (a random model would otherwise stop at random EOS).
Metrics: 10k (prediction, reference) pairs built from real yeast descriptions (each reference
paired with another protein's description), timed per metric family, plus 1000 bootstrap resamples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(os.environ.get("PROTLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def bench_generation(args):
    import torch

    from eval.data import load_examples
    from eval.generate import ModelPredictor

    torch.manual_seed(0)
    exs = load_examples(DATA / "function" / "yeast_function.jsonl", "function_text", split="test")[: args.n]
    for e in exs:
        e["proteins"][0]["sequence"] = e["proteins"][0]["sequence"][: args.max_residues]
    if args.model_dir:
        pred = ModelPredictor(args.model_dir, max_new_tokens=args.max_new_tokens, device=args.device)
        pred._load()
        model, proc = pred._model, pred._proc
    else:
        from protllm.testing import build_tiny_protllm

        model, proc = build_tiny_protllm("llama", seed=0)
    p = ModelPredictor("bench", model=model, processor=proc, max_new_tokens=args.max_new_tokens)
    orig = p.generation_kwargs
    p.generation_kwargs = lambda: {**orig(), "min_new_tokens": args.max_new_tokens}
    exs_sorted = sorted(exs, key=lambda e: -len(e["proteins"][0]["sequence"]))
    p.predict(exs_sorted[:2])  # warm-up
    t = time.perf_counter()
    batched = []
    for i in range(0, len(exs_sorted), args.batch_size):
        batched += p.predict(exs_sorted[i : i + args.batch_size])
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = [p.predict([e])[0] for e in exs_sorted]
    t_single = time.perf_counter() - t
    agree = sum(a == b for a, b in zip(batched, single)) / len(single)
    res = {"prompts": len(exs), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
           "max_residues": args.max_residues, "device": str(getattr(model, "device", "cpu")),
           "threads": torch.get_num_threads(), "batched_s": round(t_batched, 3), "one_at_a_time_s": round(t_single, 3),
           "speedup": round(t_single / t_batched, 2), "identical_outputs": agree,
           "model": args.model_dir or "tiny random ProtLLM (llama text model, ESM-style encoder)"}
    print(f"generation: {len(exs)} prompts, batch {args.batch_size}: batched {t_batched:.2f} s, "
          f"one-at-a-time {t_single:.2f} s -> {res['speedup']}x faster batched; identical outputs {agree:.0%}")
    return res


def bench_metrics(args):
    import numpy as np

    from eval import scoring as S
    from eval.data import read_jsonl
    from eval.report import TaskScorer

    rows, _ = read_jsonl(DATA / "function" / "yeast_function.jsonl")
    refs_all = [r["description"] for r in rows]
    n = args.metric_n
    refs = [refs_all[i % len(refs_all)] for i in range(n)]
    preds = [refs_all[(i * 7 + 3) % len(refs_all)] if i % 5 else refs[i] for i in range(n)]
    res = {"n": n}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        res[name] = round(time.perf_counter() - t, 3)
        print(f"{name}: {res[name]:.2f} s for {n} predictions")
        return out

    timed("tokenize+bleu_nltk", lambda: np.array([S.bleu_stats(S.word_tokens(p), S.word_tokens(r)) for p, r in zip(preds, refs)]))
    timed("sacrebleu", lambda: S.sacrebleu_from_stats(S.sacrebleu_stats(preds, refs).sum(0)))
    timed("rouge", lambda: S.rouge_per_example(preds, refs))
    if S.meteor_available()[0]:
        timed("meteor", lambda: S.meteor_per_example(preds, refs))
    sc = timed("text_all_scorer", lambda: TaskScorer("text", preds, refs))
    timed("text_bootstrap_1000", lambda: sc.bootstrap(1000))
    ecs = [r.get("ec") for r in rows if r.get("ec")]
    ec_refs = ["; ".join(ecs[i % len(ecs)]) for i in range(n)]
    ec_preds = ["EC " + "; ".join(ecs[(i * 3) % len(ecs)]) for i in range(n)]
    timed("ec_metrics", lambda: S.ec_metrics(ec_preds, ec_refs))
    ecs_sc = timed("ec_scorer", lambda: TaskScorer("ec", ec_preds, ec_refs))
    timed("ec_bootstrap_1000", lambda: ecs_sc.bootstrap(1000))
    timed("label_set_f1", lambda: S.label_set_metrics(ec_preds, ec_refs))
    timed("choice_accuracy", lambda: S.choice_accuracy(["The answer is (B)."] * n, ["B"] * n))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--max_residues", type=int, default=256)
    ap.add_argument("--metric_n", type=int, default=10000)
    ap.add_argument("--skip_generation", action="store_true")
    ap.add_argument("--skip_metrics", action="store_true")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()
    out = {}
    if not args.skip_generation:
        out["generation"] = bench_generation(args)
    if not args.skip_metrics:
        out["metrics"] = bench_metrics(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
