"""Retrieval search: pyswrd (pip, used by retrieval_protllm.py) against MMseqs2 easy-search (-s 7.5), same run.

    OMP_NUM_THREADS=1 python bench/bench_retrieval.py [--train outputs/demo/data/train.jsonl --test outputs/demo/data/test.jsonl]

Default data: 200 test and 2,000 train proteins of ../shared/data/function/yeast_function.jsonl (its own 30%
split). Prints wall seconds of each tool on one thread, their ratio, and how many queries each finds a hit for
(E <= 0.01 for pyswrd; MMseqs2's default E <= 1e-3), and how often their top hits agree.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def proteins(path, split=None, limit=None):
    out = {}
    for line in open(path):
        row = json.loads(line)
        if split and row.get("split") != split:
            continue
        if "proteins" in row:
            for p in row["proteins"]:
                out.setdefault(p["accession"], p["sequence"])
        else:
            out.setdefault(row["accession"], row["sequence"])
        if limit and len(out) >= limit:
            break
    return out


def main():
    ap = argparse.ArgumentParser()
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "function" / "yeast_function.jsonl"
    ap.add_argument("--train", default=None)
    ap.add_argument("--test", default=None)
    a = ap.parse_args()
    if a.train:
        train, test = proteins(a.train), proteins(a.test)
    else:
        train, test = proteins(shared, "train", 2000), proteins(shared, "test", 200)
    from data.mmseqs import easy_search
    from retrieval_protllm import RetrievalDatabase

    database = RetrievalDatabase([{"id": k, "sequence": v, "annotations": {}} for k, v in train.items()], {"k": 1, "threads": 1})
    start = time.perf_counter()
    found = database.search(list(test.values()))
    pyswrd_seconds = time.perf_counter() - start
    start = time.perf_counter()
    hits = easy_search(test, train, threads=1, sensitivity=7.5)
    mmseqs_seconds = time.perf_counter() - start
    mmseqs_top = {}
    for h in hits:
        mmseqs_top.setdefault(h["query"], h["target"])
    pyswrd_top = {q: f[0]["id"] for q, f in zip(test, found) if f}
    agree = sum(1 for q in pyswrd_top if mmseqs_top.get(q) == pyswrd_top[q])
    print(json.dumps({"queries": len(test), "targets": len(train), "pyswrd_seconds": round(pyswrd_seconds, 2),
                      "mmseqs_seconds": round(mmseqs_seconds, 2), "pyswrd_over_mmseqs_time": round(pyswrd_seconds / mmseqs_seconds, 2),
                      "queries_with_hit": {"pyswrd": len(pyswrd_top), "mmseqs": len(mmseqs_top)},
                      "top_hit_agrees_when_both_hit": agree, "both_hit": len(set(pyswrd_top) & set(mmseqs_top))}, indent=1))


if __name__ == "__main__":
    main()
