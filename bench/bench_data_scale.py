"""`python -m data.build` at Swiss-Prot scale: build throughput and peak memory, 500k records against 14k.

    nice -n 10 .venv/bin/python bench/bench_data_scale.py [--records 500000] [--num-proc 2]

Inputs (written to a temp dir, never into the repo): the real proteins of ../shared/data (yeast function, 5,927
proteins, and CLEAN split10, 7,757) written as UniProtKB flat-file entries (`data.readers.format_swissprot_record`),
repeated with NEW accessions (`X` + a running number) until the file holds `--records` entries. The 14k input is the
same real records once (13,684 entries). Both are built with the streaming path (`--num-proc`); the peak resident
memory of the build's whole process tree (main + workers, from /proc, sampled every 0.2 s) is reported beside the
throughput, and the ratios 500k / 14k are printed (bounded memory: the peak should barely grow while the input
grows 37x).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from data import SHARED_DATA as SHARED  # noqa: E402


def real_proteins() -> list[dict]:
    from data.readers import read_clean_ec, read_yeast_function

    proteins = list(read_yeast_function(SHARED / "function" / "yeast_function.jsonl"))
    proteins += list(read_clean_ec(SHARED / "ec" / "clean_split10.jsonl"))
    for p in proteins:
        p["name"] = p.get("name") or p.get("protein_name")
    return proteins


def write_flat_file(path: Path, proteins: list[dict], records: int) -> int:
    from data.readers import format_swissprot_record

    written = 0
    with open(path, "w") as handle:
        while written < records:
            for p in proteins:
                if written >= records:
                    break
                copy = dict(p, accession=p["accession"] if records <= len(proteins) else f"X{written:09d}")
                handle.write(format_swissprot_record(copy))
                written += 1
    return written


def tree_rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of `pid` and all its descendants, summed. VmRSS includes the pages of memory-mapped Arrow
    files that were read (file-backed, reclaimable, counted once per process that maps them); RssAnon is the
    processes' own heap, the part that must stay bounded."""
    totals, stack = [0, 0], [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS:", "RssAnon:")))
            totals[0] += int(fields["VmRSS"].split()[0]) * 1024
            totals[1] += int(fields["RssAnon"].split()[0]) * 1024
            with open(f"/proc/{current}/task/{current}/children") as children:
                stack.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, KeyError, ProcessLookupError):
            continue
    return totals[0], totals[1]


def run_build(flat: Path, out: Path, num_proc: int) -> dict:
    command = [sys.executable, "-m", "data.build", "--swissprot", str(flat), "--out", str(out), "--num-proc",
               str(num_proc), "--no-record-command"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = peak_anon = 0
    while process.poll() is None:
        rss, anon = tree_rss_bytes(process.pid)
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"build failed:\n{stderr[-4000:]}")
    seconds = time.time() - started
    summary = json.loads(stdout)
    rows = sum(summary["rows"].values())
    arrow_files = sum(1 for _ in out.rglob("*.arrow"))
    return {"seconds": round(seconds, 1), "rows": rows, "peak_rss_mb": round(peak / 2**20), "peak_anon_rss_mb": round(peak_anon / 2**20), "arrow_files": arrow_files,
            "rows_per_second": round(rows / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args()
    proteins = real_proteins()
    print(f"inputs: {len(proteins):,} real proteins (yeast function + CLEAN split10) as UniProtKB flat-file entries; "
          f"the {args.records:,}-entry input repeats them with NEW accessions (X + running number), so its proteins "
          f"are real but {args.records / len(proteins):.0f}x duplicated sequences. --num-proc {args.num_proc}.", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-scale-") as tmp:
        tmp = Path(tmp)
        for label, records in (("14k", len(proteins)), (f"{args.records // 1000}k", args.records)):
            flat = tmp / f"{label}.dat"
            entries = write_flat_file(flat, proteins, records)
            result = run_build(flat, tmp / f"out-{label}", args.num_proc)
            result.update(entries=entries, input_mb=round(flat.stat().st_size / 2**20))
            results[label] = result
            print(label, json.dumps(result), flush=True)
            flat.unlink()
    small, large = results["14k"], results[f"{args.records // 1000}k"]
    print(f"\nentries x{large['entries'] / small['entries']:.1f} | rows x{large['rows'] / small['rows']:.1f} | "
          f"time x{large['seconds'] / small['seconds']:.1f} | throughput ratio (rows/s) "
          f"{large['rows_per_second'] / small['rows_per_second']:.2f} | peak memory x{large['peak_rss_mb'] / small['peak_rss_mb']:.2f} "
          f"(anonymous x{large['peak_anon_rss_mb'] / small['peak_anon_rss_mb']:.2f})")
    if large["entries"] < 500_000:  # a smaller large run (--records) on a busy machine: say what 500k would take
        print(f"NOT measured at 500k: extrapolated linearly from {large['entries']:,} entries, 500k would take "
              f"{large['seconds'] * 500_000 / large['entries'] / 60:.1f} min")


if __name__ == "__main__":
    main()
