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
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets

from .builders import BuildStats, build_records, protein_name, yes_no
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


def build(out_dir: Path = DEMO_DIR, examples_dir: Path = EXAMPLES_DIR, seed: int = SEED) -> dict:
    t0 = time.time()
    stats = BuildStats()
    prots = load_demo_proteins(examples_dir, stats)
    assign, clusters = cluster_split(prots, {"train": 0.86, "validation": 0.05, "test": 0.09}, seed=seed,
                                     min_seq_id=0.3, coverage=0.5)
    assign, moved = purge_leakage(prots, assign, threshold=0.3)
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
    ident = identity_report(seqs["train"], seqs["test"], threshold=0.3)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEMO_DIR)
    ap.add_argument("--examples-dir", type=Path, default=EXAMPLES_DIR)
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args(argv)
    summary = build(a.out, a.examples_dir, a.seed)
    print(json.dumps({k: v for k, v in summary.items() if k != "stats"}, indent=1))
    print(json.dumps(summary["stats"]["counts"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
