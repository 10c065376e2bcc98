"""``python -m eval``: evaluate one or more predictors on a data file and write a report.

Examples::

    python -m eval --data ../shared/data/function/yeast_function.jsonl --split test \\
        --train ../shared/data/function/yeast_function.jsonl --train_split train \\
        --task function_text --predictor retrieval --predictor most_common --out outputs/eval_yeast
    python -m eval --data ../shared/data/ec/new392.jsonl --task ec,reaction \\
        --train ../shared/data/ec/clean_split10.jsonl --predictor retrieval --predictor most_common \\
        --out outputs/eval_new392
    python -m eval --data ../shared/data/go/fapm_val.jsonl --task go --holdout 0.2 --seed 0 \\
        --predictor retrieval --predictor most_common --out outputs/eval_go
    python -m eval --data test.jsonl --predictor path/to/model --shuffled_proteins --train train.jsonl \\
        --predictor retrieval --out outputs/eval_model

Predictors: a model folder (ProtLLM contract), ``most_common``, ``retrieval`` (MMseqs2 nearest
neighbour in ``--train``) or ``file:PRED.jsonl`` (score existing predictions ``{"id","prediction"}``).
torch/transformers are imported only when a model folder is evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="evaluation JSONL (raw ../shared/data schema or dataset rows)")
    ap.add_argument("--task", default="auto",
                    help="function_text | ec | reaction | go | function_mcqa | yes_no | protein_name | keywords | "
                         "auto, or a comma list (e.g. ec,reaction)")
    ap.add_argument("--split", default=None, help="keep rows with this split (e.g. test)")
    ap.add_argument("--predictor", action="append", required=True,
                    help="model folder | most_common | retrieval | file:PRED.jsonl (repeatable)")
    ap.add_argument("--train", default=None, help="training JSONL for retrieval / most_common / identity bins")
    ap.add_argument("--train_split", default=None,
                    help="split of --train to use (default: 'train' when --train is the same file as --data)")
    ap.add_argument("--holdout", type=float, default=None,
                    help="no separate training file: split --data itself, this fraction to test (seeded by id hash)")
    ap.add_argument("--holdout_by", choices=["id", "cluster"], default="id",
                    help="--holdout unit: each example (id hash) or each MMseqs2 cluster (30%% identity, 50%% coverage)")
    ap.add_argument("--seed", type=int, default=0, help="seed for --holdout, bootstrap, shuffling and sampling")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--limit", type=int, default=None, help="first N examples per task")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding (seeded)")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top_p", type=float, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16")
    ap.add_argument("--shuffled_proteins", action="store_true",
                    help="also run every model predictor with proteins deranged across examples")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    ap.add_argument("--bertscore_model", default=None, help="local encoder folder for BERTScore (else skipped)")
    ap.add_argument("--no_meteor", action="store_true")
    ap.add_argument("--no_identity", action="store_true", help="skip the MMseqs2 identity-bin breakdown")
    ap.add_argument("--threads", type=int, default=1, help="MMseqs2 threads")
    ap.add_argument("--sensitivity", type=float, default=None,
                    help="MMseqs2 -s for retrieval and identity bins (default: MMseqs2's 5.7; 7.5 finds more remote hits)")
    ap.add_argument("--examples", type=int, default=5, help="examples shown side by side in report.md")
    ap.add_argument("--no_progress", action="store_true")
    return ap


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import holdout_split, load_examples
    from .generate import FilePredictor, ModelPredictor, run_generation
    from .report import score_predictor, write_report

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_stats: dict = {}
    notes: list[str] = []
    train = None
    if args.holdout:
        allx = load_examples(args.data, args.task, split=args.split, stats=data_stats)
        if args.holdout_by == "cluster":
            from data.mmseqs import easy_cluster

            seqs = {ex["id"]: ex["proteins"][0]["sequence"] for ex in allx if ex["proteins"] and ex["proteins"][0].get("sequence")}
            clusters = easy_cluster(seqs, min_seq_id=0.3, coverage=0.5, threads=args.threads)
            for ex in allx:
                ex["meta"]["cluster"] = clusters.get(ex["id"], ex["id"])
        train, examples = holdout_split(allx, args.holdout, args.seed, key="cluster" if args.holdout_by == "cluster" else "id")
        unit = "<MMseqs2 cluster representative, 30% identity / 50% coverage>" if args.holdout_by == "cluster" else "<id>"
        notes.append(f"Seeded holdout of --data: an example is test when sha256('{args.seed}:{unit}') maps below "
                     f"{args.holdout} (train {len(train)}, test {len(examples)}).")
        if args.limit:
            examples = _limit(examples, args.limit)
    else:
        examples = load_examples(args.data, args.task, split=args.split, limit=args.limit, stats=data_stats)
        if args.train:
            tsplit = args.train_split or ("train" if _same_file(args.train, args.data) else None)
            tasks = sorted({ex["task"] for ex in examples}) or [args.task]
            train = load_examples(args.train, ",".join(tasks), split=tsplit)
            test_ids = {ex["id"] for ex in examples}
            overlap = sum(1 for ex in train if ex["id"] in test_ids)
            if overlap:
                notes.append(f"{overlap} training examples share an id with a test example (leakage check).")
    if not examples:
        print(f"no examples for task {args.task!r} in {args.data} (split {args.split})", file=sys.stderr)
        return 2
    by_task: dict[str, list] = {}
    for ex in examples:
        by_task.setdefault(ex["task"], []).append(ex)

    identities: dict[str, dict] = {}
    if train and not args.no_identity:
        from data.mmseqs import easy_search

        for task, exs in by_task.items():
            tr = [e for e in train if e["task"] == task]
            q = {e["id"]: e["proteins"][0]["sequence"] for e in exs if e["proteins"] and e["proteins"][0].get("sequence")}
            t = {e["id"]: e["proteins"][0]["sequence"] for e in tr if e["proteins"] and e["proteins"][0].get("sequence")}
            best: dict[str, float | None] = {k: None for k in q}
            for h in easy_search(q, t, threads=args.threads, sensitivity=args.sensitivity) if q and t else []:
                if h["target"] != h["query"] and (best[h["query"]] is None or h["identity"] > best[h["query"]]):
                    best[h["query"]] = h["identity"]
            identities[task] = best

    predictors = []
    names_seen: set = set()
    for spec in args.predictor:
        if spec == "most_common":
            from .baselines import MostCommon

            if not train:
                raise SystemExit("most_common needs --train or --holdout")
            p, bs = MostCommon(train), 10**9
        elif spec == "retrieval":
            from .baselines import Retrieval

            if not train:
                raise SystemExit("retrieval needs --train or --holdout")
            p, bs = Retrieval(train, threads=args.threads, sensitivity=args.sensitivity), 10**9
        elif spec.startswith("file:"):
            p, bs = FilePredictor(spec[5:]), 10**9
        elif Path(spec).is_dir():
            p = ModelPredictor(spec, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, seed=args.seed,
                               temperature=args.temperature, top_p=args.top_p, device=args.device, dtype=args.dtype)
            bs = args.batch_size
        else:
            raise SystemExit(f"unknown predictor {spec!r}: not a folder, most_common, retrieval or file:PATH")
        base = p.name
        k = 2
        while p.name in names_seen:
            p.name = f"{base}_{k}"
            k += 1
        names_seen.add(p.name)
        predictors.append((p, bs))
        if args.shuffled_proteins and isinstance(p, ModelPredictor):
            from .baselines import ShuffledProteins

            predictors.append((ShuffledProteins(p, seed=args.seed).fit(examples), bs))

    results: dict = {}
    predictions: dict = {}
    for task, exs in by_task.items():
        results[task] = {"predictors": {}}
        predictions[task] = {}
        for p, bs in predictors:
            path = out / "predictions" / task / f"{p.name}.jsonl"
            preds = run_generation(p, exs, path, batch_size=bs, progress=not args.no_progress)
            extra = {}
            if isinstance(p, FilePredictor):
                extra = {"extra_ids_in_file": p.extra_ids(examples), "missing_predictions_in_file": sum(
                    1 for e in exs if e["id"] not in p.preds), "invalid_lines": p.info["invalid_lines"],
                    "duplicate_ids_in_file": p.info["duplicate_ids"]}
            if getattr(p, "no_hit", None) is not None and p.name == "retrieval":
                extra["retrieval_no_hit"] = sum(1 for e in exs if p.neighbour.get(e["id"]) is None)
            res = score_predictor(task, exs, preds, identities.get(task), bootstrap=args.bootstrap, seed=args.seed,
                                  meteor=not args.no_meteor, bertscore_model=args.bertscore_model, extra_counts=extra)
            results[task]["predictors"][p.name] = res
            predictions[task][p.name] = preds
        results[task]["family"] = next(iter(results[task]["predictors"].values()))["family"]
        results[task]["n"] = len(exs)

    with open(out / "predictions.jsonl", "w") as fh:
        for task, exs in by_task.items():
            for ex in exs:
                fh.write(json.dumps({"task": task, "id": ex["id"], "reference": ex["reference"],
                                     "nearest_identity": identities.get(task, {}).get(ex["id"]),
                                     "predictions": {n: predictions[task][n].get(ex["id"]) for n in predictions[task]}})
                         + "\n")
    header = {
        "command": "python -m eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": str(args.data), "split": args.split, "train": args.train,
        "train_split": args.train_split or (("train" if args.train and _same_file(args.train, args.data) else None)),
        "holdout": args.holdout, "seed": args.seed, "bootstrap": args.bootstrap,
        "data_stats": data_stats, "n_train": len(train) if train else None,
        "identity": None if not identities else (f"max MMseqs2 identity (fident; easy-search, -s {args.sensitivity or 'default 5.7'}) "
                                                 "to any training protein of the task; no hit = nothing found at that sensitivity"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": None, "notes": notes,
    }
    header["seconds"] = round(time.time() - t0, 1)
    write_report(out, results, by_task, predictions, header, n_examples_shown=args.examples, identities=identities)
    print(f"wrote {out / 'report.md'}, {out / 'metrics.json'}, {out / 'predictions.jsonl'} "
          f"({header['seconds']} s)", file=sys.stderr)
    return 0


def _limit(examples, n):
    per: dict = {}
    kept = []
    for ex in examples:
        if per.get(ex["task"], 0) < n:
            per[ex["task"]] = per.get(ex["task"], 0) + 1
            kept.append(ex)
    return kept


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
