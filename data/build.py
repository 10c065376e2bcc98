"""Build a protein instruction DatasetDict from real sources.

    OMP_NUM_THREADS=1 python -m data.build --out outputs/protllm_data \\
        --yeast ../shared/data/function/yeast_function.jsonl \\
        --clean ../shared/data/ec/clean_split10.jsonl --clean-test ../shared/data/ec/new392.jsonl \\
        --go ../shared/data/go/fapm_val.jsonl --split given

Inputs (any number of each): --yeast, --clean (EC train), --clean-test (EC, assigned to test),
--go, --swissprot (.dat/.dat.gz), --uniprot-tsv, --uniprot-json, --fasta, --instructions
(Alpaca/OPI JSON/JSONL, already instructions), --sepit (conversation JSONL; --sepit-coords DIR).
Splits: ``given`` (the inputs' own split field; CLEAN=train, New-392=test), ``cluster`` (MMseqs2,
--min-seq-id/--coverage, then --purge moves held-out proteins above the threshold to train),
``temporal`` (--cutoff YYYY-MM-DD on the entry date). Output: save_to_disk folder (written to a
temp dir and renamed) with README.md dataset card and build_summary.json; --push-to-hub REPO.

Large inputs (Swiss-Prot, 500k+ proteins): ``--num-proc N`` streams. The main process reads and validates the
proteins (one global duplicate check) and spills them to disk in shards of ``--shard-proteins`` proteins per
split, and hands each shard to a pool of N worker processes as soon as it is written (reading overlaps building);
a worker turns its shard into records and writes them to one Arrow file in columnar batches
(``ArrowWriter.write_batch``, ``--writer-batch-rows``); each split is the concatenation of its shards' files, in
order, saved in Arrow shards of at most ``--max-shard-size``. Memory stays bounded by one shard per process
(plus the set of accessions seen). The result does not depend on N: shard boundaries depend only on
``--shard-proteins``, and the multiple-choice / yes-no distractor pools are drawn within a shard (so a streaming
build differs from a non-streaming one by those pools, and is equal for every N). Needs ``--split given``
(cluster / temporal splits need every sequence at once).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from . import readers
from .builders import (
    TASKS,
    BuildStats,
    build_records,
    ec_and_go_mf_labels,
    validate_proteins,
    write_shard_arrow,
)
from .card import make_card, push_to_hub, save_atomic, to_dataset_dict
from .mmseqs import mmseqs_version
from .splits import cluster_split, identity_report, purge_leakage, temporal_split

SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}

SOURCE_TASKS = {
    "yeast": ("function_text", "function_mcqa", "protein_name", "ec_number", "reaction", "yes_no"),
    "clean": ("ec_number", "reaction", "yes_no"),
    "clean_test": ("ec_number", "reaction", "yes_no"),
    "go": ("go_terms", "yes_no"),
    "swissprot": TASKS,
    "uniprot_tsv": TASKS,
    "uniprot_json": TASKS,
    "fasta": ("protein_name",),
}

LICENCES = {
    "yeast": "UniProt UP000002311 + SGD descriptions, CC BY 4.0",
    "clean": "CLEAN benchmark (research use); ENZYME CC BY 4.0",
    "clean_test": "CLEAN New-392 (research use); ENZYME CC BY 4.0",
    "go": "UniProt/GO, CC BY 4.0",
    "swissprot": "UniProtKB/Swiss-Prot, CC BY 4.0",
    "uniprot_tsv": "UniProtKB, CC BY 4.0",
    "uniprot_json": "UniProtKB, CC BY 4.0",
    "fasta": "see source",
    "instructions": "see source",
    "sepit": "see source",
}


def load_sources(args, stats: BuildStats) -> list[tuple[str, str, list[dict]]]:
    """[(kind, path, validated proteins)]."""
    out = []
    spec = [("yeast", args.yeast, readers.read_yeast_function), ("clean", args.clean, readers.read_clean_ec),
            ("clean_test", args.clean_test, readers.read_clean_ec), ("go", args.go, readers.read_go_jsonl),
            ("swissprot", args.swissprot, readers.read_swissprot_dat),
            ("uniprot_tsv", args.uniprot_tsv, readers.read_uniprot_tsv),
            ("uniprot_json", args.uniprot_json, readers.read_uniprot_json), ("fasta", args.fasta, readers.read_fasta)]
    index = None
    if args.structures_dir or args.structure_map:
        index = readers.structure_index(args.structures_dir, args.structure_map)
    for kind, paths, fn in spec:
        for path in paths or []:
            s = BuildStats()
            it = fn(path, s)
            if index is not None:
                it = readers.attach_structures(it, index, s)
            prots = []
            for p in it:
                p["source"] = p.get("source") or kind
                if kind == "clean":
                    p["split"] = p.get("split") or "train"
                if kind == "clean_test":
                    p["split"] = "test"
                if p.get("split"):
                    p["split"] = SPLIT_ALIASES.get(p["split"], p["split"])
                if kind == "yeast" and re.search(r"unknown function", p.get("description") or "", re.I):
                    s.add("function_unknown_text")
                    if args.drop_unknown_function:
                        s.add("dropped_unknown_function")
                        p["description"] = None
                prots.append(p)
            prots = validate_proteins(prots, s, max_length=args.max_length, crop=args.crop)
            stats.merge(BuildStats())
            for k, v in s.counts.items():
                stats.add(f"{kind}:{k}", n=v)
            out.append((kind, str(path), prots))
    return out


def assign_splits(args, sources, stats: BuildStats) -> tuple[dict[str, str], str, dict | None]:
    seqs: dict[str, str] = {}
    given: dict[str, str] = {}
    for kind, _, prots in sources:
        for p in prots:
            if p["accession"] in seqs:
                stats.add("accession_in_several_sources", p["accession"])
            seqs.setdefault(p["accession"], p["sequence"])
            if p.get("split"):
                if p["accession"] in given and given[p["accession"]] != p["split"]:
                    stats.add("conflicting_given_split", p["accession"])
                    if p["split"] == "train":
                        given[p["accession"]] = "train"
                    continue
                given[p["accession"]] = p["split"]
    plist = [{"accession": a, "sequence": s} for a, s in seqs.items()]
    if args.split == "given":
        assign = {a: given.get(a, "train") for a in seqs}
        for a in seqs:
            if a not in given:
                stats.add("no_given_split_assigned_train", a)
        method = ("Splits as given by the sources (yeast: its MMseqs2 30%/50% split; CLEAN split10 = train; "
                  "New-392 = test; GO: its own split). Accessions in several sources with conflicting splits go to train.")
    elif args.split == "cluster":
        fr = {"train": 1 - args.valid_frac - args.test_frac, "validation": args.valid_frac, "test": args.test_frac}
        assign, clusters = cluster_split(plist, fr, seed=args.seed, min_seq_id=args.min_seq_id,
                                         coverage=args.coverage, threads=args.threads)
        method = (f"MMseqs2 easy-cluster --min-seq-id {args.min_seq_id} -c {args.coverage} --cov-mode 0 "
                  f"({len(set(clusters.values()))} clusters); whole clusters to splits {fr}, seed {args.seed}.")
        if args.purge:
            assign, moved = purge_leakage(plist, assign, threshold=args.min_seq_id, threads=args.threads)
            for s, n in moved.items():
                stats.add(f"moved_to_train_identity>{args.min_seq_id}:{s}", n=n)
            method += f" Held-out proteins with a train hit above {args.min_seq_id} identity moved to train: {moved}."
    else:
        dates = {}
        for _, _, prots in sources:
            for p in prots:
                dates.setdefault(p["accession"], p.get("date"))
        assign = temporal_split([{"accession": a, "date": dates.get(a)} for a in seqs], args.cutoff)
        stats.add("undated", n=sum(v == "undated" for v in assign.values()))
        method = f"Temporal: entry date < {args.cutoff} -> train, later -> test; undated proteins kept as split 'undated'."
    ident = None
    if args.identity_report:
        tr = {a: seqs[a] for a, s in assign.items() if s == "train"}
        te = {a: seqs[a] for a, s in assign.items() if s == "test"}
        ident = identity_report(tr, te, threshold=args.min_seq_id, threads=args.threads)
    return assign, method, ident


def build(args) -> dict:
    t0 = time.time()
    stats = BuildStats()
    sources = load_sources(args, stats)
    assign, method, ident = assign_splits(args, sources, stats)
    records: dict[str, list[dict]] = {}
    wanted = set(args.tasks.split(",")) if args.tasks else None
    for kind, path, prots in sources:
        tasks = [t for t in SOURCE_TASKS[kind] if wanted is None or t in wanted]
        by_split: dict[str, list[dict]] = {}
        for p in prots:
            by_split.setdefault(assign[p["accession"]], []).append(p)
        for split, ps in sorted(by_split.items()):
            rows = build_records(ps, split, tasks, seed=args.seed, source=kind, stats=stats,
                                 mcqa_permutations=args.mcqa_permutations, yes_no_label_fn=ec_and_go_mf_labels)
            records.setdefault(split, []).extend(rows)
    for path in args.instructions or []:
        for r in readers.read_instruction_file(path, stats):
            records.setdefault(r["split"], []).append(r)
    for path in args.sepit or []:
        for r in readers.read_sepit_jsonl(path, args.sepit_coords, stats):
            records.setdefault(r["split"], []).append(r)
    dd = to_dataset_dict(records)
    summary = {"rows": {s: len(d) for s, d in dd.items()}, "stats": stats.as_dict(), "split_method": method,
               "seconds": round(time.time() - t0, 2), "seed": args.seed}
    try:
        summary["mmseqs_version"] = mmseqs_version()
    except Exception as e:  # version only matters for the card when mmseqs was used
        summary["mmseqs_version"] = f"unavailable ({e.__class__.__name__})"
    if ident:
        summary["identity"] = {k: v for k, v in ident.items() if k != "per_protein"}
    srcs = [{"name": f"{k}: {Path(p).name}", "version": "", "licence": LICENCES.get(k, "")} for k, p, _ in sources]
    srcs += [{"name": f"instructions: {Path(p).name}", "licence": "see source"} for p in args.instructions or []]
    srcs += [{"name": f"sepit: {Path(p).name}", "licence": "see source"} for p in args.sepit or []]
    card = make_card(dd, pretty_name=args.name, sources=srcs, split_method=method,
                     mmseqs_version=summary["mmseqs_version"], summary=stats.as_dict(), identity=ident,
                     command="python -m data.build " + " ".join(sys.argv[1:]) if args.record_command else None,
                     licence=args.licence)
    if args.out:
        save_atomic(dd, args.out, {"README.md": str(card),
                                   "build_summary.json": json.dumps(summary, indent=1, sort_keys=True) + "\n"})
        if args.push_to_hub:
            push_to_hub(args.out, args.push_to_hub, private=not args.public)
    summary["_dataset"] = dd
    summary["_card"] = card
    return summary


def build_streaming(args) -> dict:
    """`build` for inputs too large for memory (see the module docstring): `--num-proc`, `--shard-proteins`.

    The main process reads and validates while the workers build: each protein shard is handed to a pool of
    ``--num-proc`` worker processes as soon as it is spilled, and each worker writes its shard's records to one
    Arrow file. A split is the concatenation of its shards' Arrow files in spill order (memory-mapped), saved with
    `save_to_disk(num_proc=..., max_shard_size=...)`, so neither the proteins nor the rows are ever all in memory.
    """
    import multiprocessing
    import shutil
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    import datasets

    if args.split != "given":
        raise SystemExit(f"--num-proc streams with --split given only (got --split {args.split}): "
                         "cluster and temporal splits need every sequence at once")
    if args.instructions or args.sepit or args.structures_dir or args.structure_map:
        raise SystemExit("--num-proc streams protein sources only (not --instructions, --sepit or structures)")
    t0 = time.time()
    stats = BuildStats()
    wanted = set(args.tasks.split(",")) if args.tasks else None
    tasks_by_kind = {kind: [t for t in SOURCE_TASKS[kind] if wanted is None or t in wanted] for kind in SOURCE_TASKS}
    work = Path(tempfile.mkdtemp(prefix=".protllm-build-", dir=Path(args.out).resolve().parent if args.out else None))
    # split -> [(Arrow file, future of (rows, stats))] in spill order: the order of the rows does not depend on N.
    shards: dict[str, list] = {}
    # spawn, not fork: the main process holds the set of accessions (and pyarrow's threads) when workers start.
    pool = ProcessPoolExecutor(max_workers=args.num_proc, mp_context=multiprocessing.get_context("spawn"))
    try:
        seen: set[str] = set()  # the one global structure: the accessions kept so far (first one wins, as in `build`)
        spec = [("yeast", args.yeast, readers.read_yeast_function), ("clean", args.clean, readers.read_clean_ec),
                ("clean_test", args.clean_test, readers.read_clean_ec), ("go", args.go, readers.read_go_jsonl),
                ("swissprot", args.swissprot, readers.read_swissprot_dat),
                ("uniprot_tsv", args.uniprot_tsv, readers.read_uniprot_tsv),
                ("uniprot_json", args.uniprot_json, readers.read_uniprot_json), ("fasta", args.fasta, readers.read_fasta)]
        sources = []

        def spill(kind: str, split: str, proteins: list[dict]) -> None:
            name = work / f"{sum(len(f) for f in shards.values()):06d}.{kind}.{split}"
            Path(f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in proteins))
            future = pool.submit(write_shard_arrow, f"{name}.jsonl", f"{name}.arrow", split, kind,
                                 tasks_by_kind[kind], args.seed, args.mcqa_permutations, args.writer_batch_rows)
            shards.setdefault(split, []).append((f"{name}.arrow", future))

        for kind, paths, read in spec:
            for path in paths or []:
                sources.append((kind, str(path)))
                source_stats = BuildStats()
                pending: dict[str, list[dict]] = {}

                for protein in read(path, source_stats):
                    protein["source"] = protein.get("source") or kind
                    split = "test" if kind == "clean_test" else protein.get("split") or "train"
                    split = SPLIT_ALIASES.get(split, split)
                    kept = validate_proteins([protein], source_stats, max_length=args.max_length, crop=args.crop)
                    if not kept:
                        continue
                    if kept[0]["accession"] in seen:
                        source_stats.add("duplicate_accession", kept[0]["accession"])
                        continue
                    seen.add(kept[0]["accession"])
                    pending.setdefault(split, []).append(kept[0])
                    if len(pending[split]) >= args.shard_proteins:
                        spill(kind, split, pending.pop(split))
                for split in sorted(pending):
                    spill(kind, split, pending.pop(split))
                for key, value in source_stats.counts.items():
                    stats.add(f"{kind}:{key}", n=value)
        splits = {}
        for split, files in sorted(shards.items()):
            for _, future in files:
                _, shard_stats = future.result()  # a worker's exception is raised here
                for key, value in shard_stats["counts"].items():
                    stats.add(key, n=value)
            parts = [datasets.Dataset.from_file(arrow) for arrow, _ in files]
            splits[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        pool.shutdown()
        dd = datasets.DatasetDict(splits)
        method = (f"Splits as given by the sources; streaming build in shards of {args.shard_proteins} proteins "
                  "(multiple-choice and yes/no distractors drawn within a shard).")
        summary = {"rows": {s: len(d) for s, d in dd.items()}, "stats": stats.as_dict(), "split_method": method,
                   "seconds": round(time.time() - t0, 2), "seed": args.seed,
                   "streaming": {"num_proc": args.num_proc, "shard_proteins": args.shard_proteins,
                                 "protein_shards": sum(len(f) for f in shards.values()),
                                 "max_shard_size": args.max_shard_size}}
        srcs = [{"name": f"{k}: {Path(p).name}", "version": "", "licence": LICENCES.get(k, "")} for k, p in sources]
        card = make_card(dd, pretty_name=args.name, sources=srcs, split_method=method, mmseqs_version="not used",
                         summary=stats.as_dict(), identity=None,
                         command="python -m data.build " + " ".join(sys.argv[1:]) if args.record_command else None,
                         licence=args.licence)
        if args.out:
            save_atomic(dd, args.out, {"README.md": str(card),
                                       "build_summary.json": json.dumps(summary, indent=1, sort_keys=True) + "\n"},
                        num_proc=args.num_proc, max_shard_size=args.max_shard_size)
            if args.push_to_hub:
                push_to_hub(args.out, args.push_to_hub, private=not args.public)
            # The saved copy, memory-mapped: the working files below are about to go.
            dd = datasets.load_from_disk(str(args.out))
        summary["_dataset"] = dd
        summary["_card"] = card
        return summary
    finally:
        pool.shutdown(cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k in ("yeast", "clean", "clean-test", "go", "swissprot", "uniprot-tsv", "uniprot-json", "fasta",
              "instructions", "sepit"):
        ap.add_argument(f"--{k}", action="append", type=Path)
    ap.add_argument("--sepit-coords", type=Path)
    ap.add_argument("--structures-dir", type=Path, help="directory of AF-<acc>-F1-model_v*.pdb|cif")
    ap.add_argument("--structure-map", type=Path, help="TSV accession<TAB>path[<TAB>chain]")
    ap.add_argument("--tasks", help=f"comma list from {','.join(TASKS)} (default: all a source supports)")
    ap.add_argument("--split", choices=("given", "cluster", "temporal"), default="given")
    ap.add_argument("--min-seq-id", type=float, default=0.3)
    ap.add_argument("--coverage", type=float, default=0.5)
    ap.add_argument("--valid-frac", type=float, default=0.1)
    ap.add_argument("--test-frac", type=float, default=0.1)
    ap.add_argument("--purge", action="store_true", help="after clustering, move held-out proteins above --min-seq-id to train")
    ap.add_argument("--cutoff", default="2022-01-01")
    ap.add_argument("--identity-report", action="store_true", help="MMseqs2 max identity of each test protein to train")
    ap.add_argument("--mcqa-permutations", type=int, default=1, choices=(1, 4))
    ap.add_argument("--max-length", type=int)
    ap.add_argument("--crop", action="store_true")
    ap.add_argument("--drop-unknown-function", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="ProtLLM protein instructions")
    ap.add_argument("--licence", default="cc-by-4.0")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--push-to-hub", metavar="REPO_ID")
    ap.add_argument("--public", action="store_true")
    ap.add_argument("--no-record-command", dest="record_command", action="store_false")
    ap.add_argument("--num-proc", type=int, default=None,
                    help="stream large inputs: build records in this many processes (see the module docstring)")
    ap.add_argument("--shard-proteins", type=int, default=10000, help="proteins per shard of a streaming build")
    ap.add_argument("--max-shard-size", default="500MB", help="largest Arrow file of the saved dataset")
    ap.add_argument("--writer-batch-rows", type=int, default=1000,
                    help="rows per Arrow write of a streaming build (memory per worker: one shard's rows)")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.num_proc is not None and args.num_proc < 1:
        raise SystemExit(f"--num-proc must be >= 1, got {args.num_proc}")
    if args.writer_batch_rows < 1:
        raise SystemExit(f"--writer-batch-rows must be >= 1, got {args.writer_batch_rows}")
    summary = build_streaming(args) if args.num_proc else build(args)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
