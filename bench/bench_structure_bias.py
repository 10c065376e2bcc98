"""Benchmark the SEPIT structure bias: forward time and peak memory of a small ESM-2 encoder with and without it.

Encoder: the shape of ESM-2 8M (esm2_t6_8M_UR50D: 6 layers, width 320, 20 heads, rotary), randomly initialised;
structure bias with SEPIT's 128 Gaussian kernels. One protein of L = 256, 512, 1000 residues (CA coordinates
from the real CSA enzyme 1PJ5, chains A + a in their crystal frame, cropped to L), eval mode, no autograd
(a frozen encoder, as in SEPIT's stage 1) and, with --train, forward + backward of an unfrozen encoder
(pair map checkpointed per chunk).

Every configuration runs in its own fresh subprocess (one CPU thread) and reports:
- time: median forward wall time over --repeats runs (after one warm-up run);
- peak torch: peak bytes of live CPU tensors during one forward, above what was live before it, from the
  allocator events of torch.profiler (profile_memory=True: the "Total Allocated" counter of its trace);
- peak RSS: growth of the process's max resident set (getrusage ru_maxrss) over that first forward;
- bias: the H x T x T float32 bias tensor itself (analytic), T = L + 2 tokens.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_structure_bias.py [--train] [--repeats 3]

Measured on the shared 2-core dev machine (other jobs running, so times are noisy), torch 2.13 CPU, eval:
L=1000, 20 heads: the bias alone is 20 x 1002 x 1002 x 4 B = 76.6 MB; peak live tensors of the whole forward
are 240 MB with chunk 64 (418 MB chunk 256, 1477 MB chunk 1024) vs 25 MB sequence-only, i.e. about
3 x bias + the chunk's c x T x K kernel features and their MLP temporaries. Forward+backward (unfrozen) at
L=1000, chunk 64: 866 MB peak torch vs 200 MB sequence-only. Time: 6-16x the sequence-only forward of this
8M-parameter encoder (the 128x128 pair MLP over 10^6 pairs is ~33 GFLOP, comparable to the whole 8M encoder;
next to ESM-2 650M's ~1.3 TFLOP per 1000 residues it is a few percent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"

ESM2_8M = dict(model_type="esm", vocab_size=33, hidden_size=320, num_hidden_layers=6, num_attention_heads=20,
               intermediate_size=1280, max_position_embeddings=1026, position_embedding_type="rotary",
               token_dropout=True, emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TINY_LLM = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
NUM_KERNELS = 128  # SEPIT


def real_ca(data: Path, length: int):
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import structure_protllm as sp

    path = data / "structures" / "csa_enzymes" / "1PJ5.pdb.gz"
    chains = [sp.load_structure(path, chain=c) for c in ("A", "a")]
    ca = np.concatenate([s.ca for s in chains])
    mask = np.concatenate([s.coord_mask for s in chains])
    if len(ca) < length:
        raise SystemExit(f"1PJ5 A+a has {len(ca)} residues, fewer than {length}")
    return ca[:length], mask[:length]


def one(length: int, chunk: int | None, train: bool, repeats: int, data: Path) -> dict:
    """Run in the child process: build, measure, return a result dict."""
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from configuration_protllm import ProtLLMConfig
    from sepit_protllm import ProtLLMSepitProteinEncoder

    config = ProtLLMConfig(protein_config=dict(ESM2_8M), text_config=dict(TINY_LLM), use_structure_bias=chunk is not None,
                           structure_num_kernels=NUM_KERNELS, structure_chunk_size=chunk or 256,
                           freeze_protein_encoder=not train, structure_dropout=0.0, max_protein_length=length)
    torch.manual_seed(0)
    encoder = ProtLLMSepitProteinEncoder(config)
    encoder.train(train)
    tokens = length + 2
    ids = torch.randint(4, 24, (1, tokens))
    ids[0, 0], ids[0, -1] = 0, 2
    attention = torch.ones_like(ids)
    ca, ca_mask = real_ca(data, length)
    coords = torch.zeros(1, length, 4, 3)
    coords[0, :, 1] = torch.from_numpy(np.nan_to_num(ca))
    coord_mask = torch.from_numpy(ca_mask)[None]
    kwargs = dict(protein_coords=coords, protein_coord_mask=coord_mask) if chunk is not None else {}

    def step():
        if train:
            encoder.zero_grad(set_to_none=True)
            states, _ = encoder(ids, attention, **kwargs)
            states.square().mean().backward()
        else:
            with torch.no_grad():
                encoder(ids, attention, **kwargs)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    # the counter is live bytes after each allocation/free; the first event's value minus its own size is the base
    first = next(e for e in events if e.get("name") == "[memory]")
    base = first["args"]["Total Allocated"] - first["args"]["Bytes"]
    peak_torch = max(totals) - base if totals else float("nan")

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    heads = ESM2_8M["num_attention_heads"]
    return {
        "L": length, "chunk": chunk, "train": train,
        "time_s": float(np.median(times)),
        "peak_torch_mb": peak_torch / 2**20,
        "peak_rss_mb": (rss_after - rss_before) / 1024,  # ru_maxrss is in KiB on Linux
        "bias_mb": heads * tokens * tokens * 4 / 2**20,
        "chunk_features_mb": (min(chunk, tokens) * tokens * NUM_KERNELS * 4 / 2**20) if chunk else 0.0,
    }


def run_child(length, chunk, train, repeats, data) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, __file__, "--child", json.dumps([length, chunk, train, repeats, str(data)])]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"child {length=} {chunk=} {train=} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1000])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="forward + backward of an unfrozen encoder instead of inference")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        length, chunk, train, repeats, data = json.loads(args.child)
        print(json.dumps(one(length, chunk, train, repeats, Path(data))))
        return

    mode = "forward+backward, unfrozen encoder (checkpointed chunks)" if args.train else "forward, eval, no autograd"
    print(f"ESM-2 8M shape (6 layers, width 320, 20 heads), {NUM_KERNELS} kernels, 1 protein, 1 CPU thread; {mode}")
    print(f"{'L':>5} {'chunk':>6} {'time s':>8} {'x seq':>6} {'peak torch MB':>14} {'x seq':>6} {'peak RSS MB':>12} "
          f"{'bias MB':>8} {'c*T*K MB':>9}")
    for length in args.lengths:
        base = run_child(length, None, args.train, args.repeats, args.data)
        rows = [base] + [run_child(length, chunk, args.train, args.repeats, args.data) for chunk in args.chunks]
        for row in rows:
            print(f"{row['L']:>5} {str(row['chunk'] or 'none'):>6} {row['time_s']:>8.3f} {row['time_s'] / base['time_s']:>6.2f} "
                  f"{row['peak_torch_mb']:>14.1f} {row['peak_torch_mb'] / base['peak_torch_mb']:>6.2f} "
                  f"{row['peak_rss_mb']:>12.1f} {row['bias_mb'] if row['chunk'] else 0.0:>8.1f} {row['chunk_features_mb']:>9.1f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
