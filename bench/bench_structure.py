"""Benchmark the structure featuriser on the 206 real CSA enzyme structures (452 labelled chains).

For each file: parse once (read + gunzip + PDB records -> chains), then for each labelled chain of that
file: align to the label sequence (fast path or BLOSUM62 DP) and compute Foldseek 3Di tokens + the SaProt
string. Prints proteins (chains) per second on one core and the share of time per stage, then the peak
Python memory (tracemalloc) of featurising one ~1000-residue chain.

Two ratios measured in the same run (best of ``--repeats``, runs interleaved so machine load hits both alike):
* reader: ``_parse_chains`` on every file (read + gunzip + gemmi + residues) against the hand-written PDB
  parser it replaced, taken from ``git show <baseline>:structure_protllm.py`` (default ``--baseline``
  cf3f9d8, the last commit with that parser) and loaded as a temporary module;
* 3Di: the vendored numpy.ma-free geometry against mini3di's public ``Encoder.encode_atoms`` +
  ``build_sequence`` on every labelled chain.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_structure.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import saprot_protllm as saprot  # noqa: E402
import structure_protllm as sp  # noqa: E402


def featurise_file(path: Path, chains: list[tuple[str, str]], timers: dict) -> list:
    t0 = time.perf_counter()
    parsed, name, hint = sp._parse_chains(path, None)
    t1 = time.perf_counter()
    timers["parse"] += t1 - t0
    by_id = {c.chain_id: c for c in parsed}
    out = []
    for chain_id, seq in chains:
        t1 = time.perf_counter()
        s = sp._from_chain(by_id[chain_id], name, seq, None, hint)
        t2 = time.perf_counter()
        tdi = saprot.three_di_tokens(s)
        sa = saprot.saprot_sequence(s.sequence, tdi, s.plddt)
        t3 = time.perf_counter()
        timers["align"] += t2 - t1
        timers["3di"] += t3 - t2
        out.append((s, sa))
    return out


def load_baseline(commit: str):
    """structure_protllm.py as of ``commit``, imported as the module ``structure_baseline``."""
    source = subprocess.run(["git", "show", f"{commit}:structure_protllm.py"], cwd=ROOT, capture_output=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench_structure_")) / "structure_baseline.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("structure_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["structure_baseline"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def best_times(functions: dict, repeats: int) -> dict:
    """Best wall time of each function over ``repeats`` interleaved rounds."""
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for key, function in functions.items():
            t0 = time.perf_counter()
            function()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def compare_reader_and_3di(files: list[Path], baseline, repeats: int) -> None:
    def read_all(module):
        return lambda: [module._parse_chains(f, None) for f in files]

    chains_new = sum(len(c) for c, _, _ in read_all(sp)())
    chains_old = sum(len(c) for c, _, _ in read_all(baseline)())
    t = best_times({"new": read_all(sp), "old": read_all(baseline)}, repeats)
    print(f"\nreader, {len(files)} files ({chains_new} protein chains; baseline {chains_old}), best of {repeats}:")
    print(f"  gemmi reader     {t['new']:6.2f} s  ({len(files) / t['new']:.0f} files/s)")
    print(f"  old PDB parser   {t['old']:6.2f} s  ({len(files) / t['old']:.0f} files/s)")
    print(f"  ratio new/old time: {t['new'] / t['old']:.2f} (below 1: the new reader is faster)")

    import mini3di

    encoder = mini3di.Encoder()
    structures = [sp.load_structure(f, chain=c) for f in files for c in sp.parse_structure_chains(f)]
    inputs = []
    for s in structures:
        x = s.coords[s.coord_mask].astype(np.float64)
        inputs.append((x[:, 1], s.cb[s.coord_mask].astype(np.float64), x[:, 0], x[:, 2]))
    public = lambda: [encoder.build_sequence(encoder.encode_atoms(ca=a, cb=b, n=n, c=c)) for a, b, n, c in inputs]  # noqa: E731
    vendored = lambda: [saprot.three_di_tokens(s) for s in structures]  # noqa: E731
    same = sum(v.replace("#", "") == p.lower() for v, p in zip(vendored(), public()))
    t = best_times({"vendored": vendored, "public": public}, repeats)
    print(f"\n3Di on {len(structures)} chains: identical letters on {same}/{len(structures)}; best of {repeats}:")
    print(f"  vendored geometry + mini3di weights  {t['vendored']:6.2f} s")
    print(f"  mini3di public Encoder.encode_atoms  {t['public']:6.2f} s")
    print(f"  ratio vendored/public time: {t['vendored'] / t['public']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("PROTLLM_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", default="cf3f9d8", help="git commit whose structure_protllm.py is the reader baseline")
    args = ap.parse_args()
    d = Path(args.data) / "structures" / "csa_enzymes"
    with open(d / "labels.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    per_file = defaultdict(list)
    for r in rows:
        pdb_id, chain = r["pdb_chain"].split("-", 1)
        per_file[pdb_id].append((chain, r["sequence"]))
    files = sorted(d.glob("*.pdb.gz"))
    n_res = sum(len(r["sequence"]) for r in rows)
    print(f"data: {len(files)} files, {len(rows)} labelled chains, mean chain length {n_res / len(rows):.0f} residues")
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, numpy {np.__version__}")

    # warm-up: load the 3Di weights, alignment matrix, residue tables
    featurise_file(files[0], per_file[files[0].name.split(".")[0]], defaultdict(float))

    best = None
    for rep in range(args.repeats):
        timers = defaultdict(float)
        n = 0
        t0 = time.perf_counter()
        for f in files:
            n += len(featurise_file(f, per_file[f.name.split(".")[0]], timers))
        wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, dict(timers), n)
    wall, timers, n = best
    total = sum(timers.values())
    print(f"\nbest of {args.repeats}: {n} proteins in {wall:.2f} s -> {n / wall:.1f} proteins/s on one core "
          f"({n_res / wall:,.0f} residues/s); target >= 100 proteins/s")
    for k in ("parse", "align", "3di"):
        print(f"  {k:>6}: {timers[k]:6.2f} s  {100 * timers[k] / total:5.1f} %")

    # a 1000-residue chain: the longest labelled chain padded/cropped to ~1000 by tiling its own coordinates
    longest = max(rows, key=lambda r: len(r["sequence"]))
    pdb_id, chain = longest["pdb_chain"].split("-", 1)
    base = sp.load_structure(d / f"{pdb_id}.pdb.gz", chain=chain)
    reps = int(np.ceil(1000 / len(base)))
    coords = np.concatenate([base.coords + i * np.array([60.0, 0, 0], np.float32) for i in range(reps)])[:1000]
    seq = (base.sequence * reps)[:1000]
    tracemalloc.start()
    s = sp.load_structure({"coords": coords, "sequence": seq})
    sa = saprot.saprot_sequence(s.sequence, saprot.three_di_tokens(s))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(sa) == 2000
    tracemalloc.start()
    sp.load_structure(d / f"{pdb_id}.pdb.gz", chain=chain, sequence=longest["sequence"])
    _, peak_file = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\npeak traced memory, featurising a 1000-residue chain (coords -> 3Di + SaProt): {peak / 2**20:.1f} MiB")
    print(f"peak traced memory, parse + align {pdb_id}-{chain} from its file ({len(longest['sequence'])} residues): "
          f"{peak_file / 2**20:.1f} MiB")

    compare_reader_and_3di(files, load_baseline(args.baseline), args.repeats)

if __name__ == "__main__":
    main()
