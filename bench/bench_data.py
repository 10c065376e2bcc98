"""Data-pipeline benchmark (one core): build speed for the yeast + EC datasets, and peak memory when
streaming a Swiss-Prot flat file of >= 100k records.

    OMP_NUM_THREADS=1 python bench/bench_data.py [--records 100000] [--shared ../shared/data]

The flat file is SYNTHETIC IN SIZE, REAL IN CONTENT: the 5,927 real yeast records of
shared/data/function/yeast_function.jsonl written as UniProtKB flat-file entries
(data.readers.format_swissprot_record) and repeated with suffixed accessions until --records.
MMseqs2 clustering is not part of the build timing (the given splits are used); its cost is printed
separately for the yeast set when --cluster is passed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import readers  # noqa: E402
from data.build import build, parser  # noqa: E402


def bench_build(shared: Path, out_dir: Path) -> dict:
    args = parser().parse_args([
        "--yeast", str(shared / "function/yeast_function.jsonl"),
        "--clean", str(shared / "ec/clean_split10.jsonl"),
        "--clean-test", str(shared / "ec/new392.jsonl"),
        "--out", str(out_dir), "--no-record-command",
    ])
    t = time.perf_counter()
    summary = build(args)
    dt = time.perf_counter() - t
    dd = summary["_dataset"]
    rows = sum(len(d) for d in dd.values())
    prots = sum(v for k, v in summary["stats"]["counts"].items() if k.endswith(":proteins_kept"))
    per_task: dict[str, int] = {}
    for d in dd.values():
        for task in d["task"]:
            per_task[task] = per_task.get(task, 0) + 1
    return {"proteins": prots, "rows": rows, "seconds": round(dt, 2), "rows_per_s": round(rows / dt),
            "proteins_per_s": round(prots / dt), "rows_per_split": summary["rows"], "rows_per_task": per_task}


def write_flat(shared: Path, path: Path, n: int) -> int:
    base = list(readers.read_yeast_function(shared / "function/yeast_function.jsonl"))
    written = 0
    with open(path, "w") as fh:
        rep = 0
        while written < n:
            for p in base:
                if written >= n:
                    break
                q = dict(p, accession=p["accession"] if rep == 0 else f"{p['accession']}{rep}")
                fh.write(readers.format_swissprot_record(q))
                written += 1
            rep += 1
    return written


def bench_stream(path: Path) -> dict:
    t = time.perf_counter()
    n = sum(1 for _ in readers.read_swissprot_dat(path))
    dt = time.perf_counter() - t
    tracemalloc.start()
    m = 0
    for _ in readers.read_swissprot_dat(path):
        m += 1
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"records": n, "file_mb": round(path.stat().st_size / 1e6, 1), "seconds": round(dt, 2),
            "records_per_s": round(n / dt), "tracemalloc_peak_mb": round(peak / 1e6, 2),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--cluster", action="store_true", help="also time MMseqs2 clustering of the yeast set")
    a = ap.parse_args(argv)
    res = {"threads": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as tmp:
        res["build_yeast_ec"] = bench_build(a.shared, Path(tmp) / "ds")
        flat = Path(tmp) / "sprot_repeated.dat"
        t = time.perf_counter()
        write_flat(a.shared, flat, a.records)
        res["flat_write_seconds"] = round(time.perf_counter() - t, 1)
        res["stream_swissprot"] = bench_stream(flat)
        if a.cluster:
            from data.mmseqs import easy_cluster, mmseqs_version

            seqs = {p["accession"]: p["sequence"] for p in readers.read_yeast_function(a.shared / "function/yeast_function.jsonl")}
            t = time.perf_counter()
            cl = easy_cluster(seqs, 0.3, 0.5)
            res["mmseqs_cluster_yeast"] = {"proteins": len(seqs), "clusters": len(set(cl.values())),
                                           "seconds": round(time.perf_counter() - t, 1), "version": mmseqs_version()}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
