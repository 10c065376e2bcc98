"""Build the committed demo dataset (data/demo/) from Debian's ``mmseqs2-examples`` package.

Source: the Swiss-Prot (``>sp|``) records of ``/usr/share/doc/mmseqs2/example-data/DB.fasta.gz`` and
``QUERY.fasta.gz`` shipped by ``apt-get install mmseqs2-examples`` (UniProtKB entries with their
curated recommended names in the FASTA headers; UniProt data is CC BY 4.0).

Tasks (small enough for a 135M LLM + tiny protein encoder trained for minutes on CPU):
  * ``protein_name``: "What is the name of this protein?" -> the UniProt recommended name.
  * ``yes_no``: "Is this protein a kinase?" style questions whose labels come from keywords in the
    names (ribosomal protein, toxin, kinase, ...); balanced per label (each question text appears
    as often with "yes" as with "no").
Sequences longer than 256 residues are filtered out (not cropped), so a sequence is always whole.
Split: MMseqs2 easy-cluster at 30% identity / 50% coverage; whole clusters go to train /
validation / test, so test proteins are novel at that threshold.

    apt-get install -y mmseqs2 mmseqs2-examples
    OMP_NUM_THREADS=1 python -m data.build_demo            # writes data/demo/
    OMP_NUM_THREADS=1 python -m data.build_demo --tasks outputs/demo/data   # + FP / EC / reaction from ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import datasets

from . import SHARED_DATA  # ../shared/data, or $PROTLLM_SHARED_DATA
from .builders import BuildStats, build_records, ec_number, function_text, protein_name, reaction, yes_no
from .card import FEATURES, make_card
from .mmseqs import mmseqs_version
from .readers import read_fasta
from .splits import cluster_split, identity_report, purge_leakage

EXAMPLES_DIR = Path("/usr/share/doc/mmseqs2/example-data")
DEMO_DIR = Path(__file__).resolve().parent / "demo"
SPLITS = ("train", "validation", "test")
MAX_LEN = 256
SEED = 0

NAME_LABELS: dict[str, str] = {
    "a ribosomal protein": r"\bribosomal protein\b",
    "a toxin": r"toxin",
    "a kinase": r"kinase\b",
    "a synthase": r"synthase\b",
    "a transferase": r"transferase\b",
    "a hydrolase": r"hydrolase\b",
    "a reductase": r"reductase\b",
    "a polymerase": r"polymerase\b",
    "an elongation factor": r"\belongation factor\b",
    "a ligase": r"ligase\b",
    "an isomerase": r"isomerase\b",
    "an uncharacterized protein": r"^uncharacterized\b",
}
_COMPILED = {k: re.compile(v, re.I) for k, v in NAME_LABELS.items()}


def name_labels(p: dict) -> set[str]:
    name = p.get("name") or ""
    return {lab for lab, rx in _COMPILED.items() if rx.search(name)}


def debian_version(package: str = "mmseqs2-examples") -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except FileNotFoundError:
        return "unknown"


def load_demo_proteins(examples_dir: Path, stats: BuildStats) -> list[dict]:
    from .builders import validate_proteins

    raw = []
    for fname in ("DB.fasta.gz", "QUERY.fasta.gz"):
        f = examples_dir / fname
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: apt-get install -y mmseqs2-examples (or pass --examples-dir)")
        for p in read_fasta(f, stats, source=f"mmseqs2-examples:{fname}"):
            if p.get("db") != "sp":
                stats.add("skipped_trembl_unreviewed")
                continue
            if p.get("fragment"):
                stats.add("fragment_kept")
            raw.append(p)
    return validate_proteins(raw, stats, max_length=MAX_LEN, crop=False, allow_nonstandard=False)


def build(out_dir: Path = DEMO_DIR, examples_dir: Path = EXAMPLES_DIR, seed: int = SEED, threads: int = 1) -> dict:
    t0 = time.time()
    stats = BuildStats()
    prots = load_demo_proteins(examples_dir, stats)
    assign, clusters = cluster_split(prots, {"train": 0.86, "validation": 0.05, "test": 0.09}, seed=seed,
                                     min_seq_id=0.3, coverage=0.5, threads=threads)
    assign, moved = purge_leakage(prots, assign, threshold=0.3, threads=threads)
    for s, n in moved.items():
        stats.add(f"moved_to_train_identity>0.3:{s}", n=n)
    by_split = {s: [p for p in prots if assign[p["accession"]] == s] for s in SPLITS}
    records = {}
    for s in SPLITS:
        rows = []
        for p in by_split[s]:
            rows.extend(protein_name(p, s, seed, p["source"], stats))
        rows.extend(yes_no(by_split[s], s, seed, "mmseqs2-examples", stats, label_fn=name_labels))
        records[s] = rows
        stats.add(f"records:{s}", n=len(rows))
    seqs = {s: {p["accession"]: p["sequence"] for p in by_split[s]} for s in SPLITS}
    ident = identity_report(seqs["train"], seqs["test"], threshold=0.3, threads=threads)
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(records[s], features=FEATURES) for s in SPLITS})
    version = debian_version()
    card = make_card(
        dd,
        pretty_name="ProtLLM demo: protein names and yes/no questions (Swiss-Prot via mmseqs2-examples)",
        sources=[{"name": "UniProtKB/Swiss-Prot records shipped in Debian package mmseqs2-examples "
                          "(/usr/share/doc/mmseqs2/example-data/{DB,QUERY}.fasta.gz)",
                  "version": f"mmseqs2-examples {version}", "licence": "UniProt: CC BY 4.0 (package: GPL-3)",
                  "url": "https://packages.debian.org/bookworm/mmseqs2-examples"}],
        split_method=(f"MMseqs2 easy-cluster --min-seq-id 0.3 -c 0.5 --cov-mode 0 on {len(prots)} proteins "
                      f"({len(set(clusters.values()))} clusters); whole clusters assigned to train/validation/test "
                      f"(target 0.86/0.05/0.09 of proteins) in seeded-hash order, seed {seed}; then held-out proteins whose best "
                      f"`mmseqs easy-search -s 7.5` hit in train exceeds 30% identity were moved to train ({moved}). "
                      f"Proteins: {', '.join(f'{s} {len(by_split[s])}' for s in SPLITS)}."),
        mmseqs_version=mmseqs_version(),
        summary=stats.as_dict(),
        identity=ident,
        command="apt-get install -y mmseqs2 mmseqs2-examples\nOMP_NUM_THREADS=1 python -m data.build_demo",
        extra=(
            "## Provenance and choices\n\n"
            "- Only reviewed Swiss-Prot (`>sp|`) records are used; TrEMBL (`>tr|`) records are counted and skipped.\n"
            f"- Sequences longer than {MAX_LEN} residues are filtered out (counted as `too_long`), not cropped; "
            "sequences with non-standard letters (B/X/Z/U/O) are dropped and counted.\n"
            "- `protein_name` answers are the UniProt recommended names from the FASTA headers "
            "(a trailing `(Fragment)` is removed; `meta.organism` keeps OS=).\n"
            "- `yes_no` labels are derived from keywords in the names: "
            + ", ".join(f"'{k}' (/{v}/)" for k, v in NAME_LABELS.items())
            + ". For every positive (protein, label) a negative question with the same label is asked about a "
            "random protein of the same split that does not carry it, so each question text is balanced.\n"
            "- Files: `{train,validation,test}.jsonl` (one row per line, row schema above); load with "
            "`from data import load_demo_dataset` or `datasets.load_dataset('json', data_dir='data/demo')`.\n"
            "- Licence: the derived rows contain UniProt data (CC BY 4.0, cite UniProt Consortium, "
            "Nucleic Acids Res. 2023); the MMseqs2 example data are distributed by Debian under GPL-3 "
            "with the MMseqs2 source."
        ),
    )
    card.data.configs = [{"config_name": "default",
                          "data_files": [{"split": s, "path": f"{s}.jsonl"} for s in SPLITS]}]
    card = type(card)(f"---\n{card.data.to_yaml()}\n---\n" + card.text)
    # write atomically: temp dir next to out_dir, then rename
    import os
    import shutil
    import tempfile

    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo.tmp-", dir=out_dir.parent))
    try:
        for s in SPLITS:
            with open(tmp / f"{s}.jsonl", "w") as fh:
                for r in records[s]:
                    fh.write(json.dumps(r, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(str(card))
        summary = {"proteins": {s: len(by_split[s]) for s in SPLITS},
                   "rows": {s: len(records[s]) for s in SPLITS}, "stats": stats.as_dict(),
                   "identity": {k: v for k, v in ident.items() if k != "per_protein"},
                   "mmseqs_version": mmseqs_version(), "source_package": f"mmseqs2-examples {version}",
                   "seed": seed, "seconds": round(time.time() - t0, 1)}
        (tmp / "build_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".demo.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def load_demo_dataset(path: str | Path = DEMO_DIR) -> datasets.DatasetDict:
    """The committed demo dataset as a DatasetDict (train / validation / test), no network needed."""
    path = Path(path)
    out = {}
    for s in SPLITS:
        with open(path / f"{s}.jsonl") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        out[s] = datasets.Dataset.from_list(rows, features=FEATURES)
    return datasets.DatasetDict(out)


TASK_SIZES = {"function_text": (600, 60), "ec_number": (600, 60)}  # (train, test) proteins per source
MAX_SHARED_LEN = 512


def _subsample(proteins: list[dict], n: int, seed: int) -> list[dict]:
    from .splits import _order_key

    return sorted(proteins, key=lambda p: _order_key(seed, p["accession"]))[:n]


def build_tasks(out_dir: Path, shared: Path = SHARED_DATA, demo_dir: Path = DEMO_DIR, seed: int = SEED,
                sizes: dict = TASK_SIZES, threads: int = 1) -> dict:
    """The demo's multi-task train/test files, read in place from ../shared/data and data/demo (not committed).

    - function_text: yeast proteins (Verified ORFs with an SGD description), the file's own 30%-identity split;
    - ec_number and reaction: CLEAN split10 enzymes (not in the yeast set), split here by MMseqs2 clusters at
      30% identity / 50% coverage;
    - protein_name and yes_no: data/demo as committed.
    Then one leakage pass over all proteins together: a test protein above 30% identity to any training protein
    (of any task) moves to train, and the identity of every test protein to train is reported. `threads`: MMseqs2's
    (its clusters and hits do not depend on it: the same files either way).
    """
    from .readers import read_clean_ec, read_yeast_function

    t0 = time.time()
    stats = BuildStats()
    yeast = [p for p in read_yeast_function(shared / "function" / "yeast_function.jsonl", stats)
             if p.get("orf_qualifier") == "Verified" and len(p["sequence"]) <= MAX_SHARED_LEN
             and (p.get("description") or "").strip() and p.get("split") in ("train", "test")]
    yeast_ids = {p["accession"] for p in yeast}
    n_train, n_test = sizes["function_text"]
    fp = {"train": _subsample([p for p in yeast if p["split"] == "train"], n_train, seed),
          "test": _subsample([p for p in yeast if p["split"] == "test"], n_test, seed)}
    clean = [p for p in read_clean_ec(shared / "ec" / "clean_split10.jsonl", stats)
             if p["accession"] not in yeast_ids and len(p["sequence"]) <= MAX_SHARED_LEN and p.get("ec")]
    n_train, n_test = sizes["ec_number"]
    clean = _subsample(clean, n_train + 3 * n_test, seed)
    assign, _ = cluster_split(clean, {"train": 0.8, "test": 0.2}, seed=seed, min_seq_id=0.3, coverage=0.5,
                              threads=threads)
    ec = {s: [p for p in clean if assign[p["accession"]] == s] for s in ("train", "test")}
    ec["test"] = _subsample(ec["test"], n_test, seed)
    ec["train"] = _subsample(ec["train"], n_train, seed)
    demo_rows = {s: [json.loads(line) for line in open(demo_dir / f"{s}.jsonl") if line.strip()] for s in ("train", "test")}
    # One leakage pass over every protein of every task.
    everything = {p["accession"]: p for s in ("train", "test") for p in fp[s] + ec[s]}
    split_of = {p["accession"]: s for s in ("train", "test") for p in fp[s] + ec[s]}
    for s, rows in demo_rows.items():
        for row in rows:
            protein = row["proteins"][0]
            everything.setdefault(protein["accession"], {"accession": protein["accession"], "sequence": protein["sequence"]})
            split_of.setdefault(protein["accession"], s)
    split_of, moved = purge_leakage(list(everything.values()), split_of, threshold=0.3, threads=threads)
    records = {"train": [], "test": []}
    for source, proteins, builders in (("yeast_function", fp, (function_text,)), ("clean_split10", ec, (ec_number, reaction))):
        for s in ("train", "test"):
            for p in proteins[s]:
                for builder in builders:
                    records[split_of[p["accession"]]].extend(builder(p, split_of[p["accession"]], seed, source, stats))
    for s, rows in demo_rows.items():
        for row in rows:
            target = split_of[row["proteins"][0]["accession"]]
            records[target].append({**row, "split": target})
    seqs = {s: {a: everything[a]["sequence"] for a, t in split_of.items() if t == s} for s in ("train", "test")}
    ident = identity_report(seqs["train"], seqs["test"], threshold=0.3, threads=threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in ("train", "test"):
        with open(out_dir / f"{s}.jsonl", "w") as fh:
            for r in records[s]:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
    tasks = {s: dict(sorted(Counter(r["task"] for r in records[s]).items())) for s in ("train", "test")}
    summary = {"rows_per_task": tasks, "proteins": {s: len(v) for s, v in seqs.items()},
               "moved_to_train_identity>0.3": moved, "identity": {k: v for k, v in ident.items() if k != "per_protein"},
               "sources": {"function_text": str(shared / "function" / "yeast_function.jsonl"),
                           "ec_number, reaction": str(shared / "ec" / "clean_split10.jsonl"),
                           "protein_name, yes_no": str(demo_dir)},
               "seed": seed, "seconds": round(time.time() - t0, 1)}
    (out_dir / "build_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--examples-dir", type=Path, default=EXAMPLES_DIR)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--tasks", type=Path, default=None,
                    help="instead: write the demo's multi-task train/test files (yeast FP, CLEAN EC/reaction, data/demo "
                         "names and yes/no; read in place from ../shared/data) into this folder")
    ap.add_argument("--shared", type=Path, default=SHARED_DATA)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="MMseqs2 threads (default: every core; the files do not depend on it)")
    a = ap.parse_args(argv)
    if a.threads < 1:
        ap.error(f"--threads must be at least 1, got {a.threads}")
    if a.tasks:
        summary = build_tasks(a.tasks, a.shared, seed=a.seed, threads=a.threads)
        print(json.dumps(summary, indent=1))
        return 0
    summary = build(a.out, a.examples_dir, a.seed, threads=a.threads)
    print(json.dumps({k: v for k, v in summary.items() if k != "stats"}, indent=1))
    print(json.dumps(summary["stats"]["counts"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
