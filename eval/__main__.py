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

Predictors: a model folder (ProtLLM contract; it uses its own retrieval database when it has one),
``most_common``, ``retrieval`` (MMseqs2 top-k neighbours in ``--train``, ``-s 7.5``, combined: EC vote abstaining
to the family level, GO scored terms), ``retrieval_top1`` (the top hit's answer; for both a no-hit predicts the
most-common answer and is counted), ``retrieval_composition`` / ``retrieval_top1_composition`` (a no-hit copies the
training protein closest in amino-acid + dipeptide composition) or ``file:PRED.jsonl`` (score existing predictions ``{"id","prediction"}``).
torch/transformers are imported only when a model folder is evaluated. A thin wrapper over
:func:`eval.run.run_evaluation`, which scripts call directly.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="evaluation JSONL (raw ../shared/data schema or dataset rows)")
    ap.add_argument("--task", default="auto",
                    help="function_text | ec | reaction | go | function_mcqa | yes_no | protein_name | keywords | "
                         "auto, or a comma list (e.g. ec,reaction)")
    ap.add_argument("--split", default=None,
                    help="keep rows with this split (e.g. test); 'temporal': EC number and reaction tasks are evaluated on "
                         "New-392 (Swiss-Prot entries newer than CLEAN split10) against CLEAN split10 as train / "
                         "retrieval database (--temporal_test / --temporal_train to point elsewhere)")
    ap.add_argument("--temporal_test", default=None, help="--split temporal test set (default ../shared/data/ec/new392.jsonl)")
    ap.add_argument("--temporal_train", default=None,
                    help="--split temporal train set (default ../shared/data/ec/clean_split10.jsonl)")
    ap.add_argument("--predictor", action="append", required=True,
                    help="model folder | most_common | retrieval (top-k neighbours combined) | retrieval_top1 (top hit) | "
                         "retrieval_composition / retrieval_top1_composition (no hit: closest composition) | "
                         "file:PRED.jsonl (repeatable)")
    ap.add_argument("--retrieval_k", type=int, default=10, help="neighbours the retrieval predictor combines")
    ap.add_argument("--retrieval_text", choices=["top1", "medoid"], default="top1",
                    help="free-text answer of the retrieval predictor: the top hit's, or the medoid of the top-k")
    ap.add_argument("--retrieval_search", choices=["auto", "mmseqs2", "smith-waterman"], default="auto",
                    help="the retrieval predictors' search: auto = exhaustive Smith-Waterman (pyswrd, E <= 0.01) for "
                         "databases up to 50,000 proteins, MMseqs2 (--sensitivity) above")
    ap.add_argument("--go_obo", default=None,
                    help="GO ontology (OBO, e.g. go-basic.obo): propagate GO terms to ancestors before scoring")
    ap.add_argument("--train", default=None, help="training JSONL for retrieval / most_common / identity bins")
    ap.add_argument("--train_split", default=None,
                    help="split of --train to use (default: 'train' when --train is the same file as --data)")
    ap.add_argument("--holdout", type=float, default=None,
                    help="no separate training file: split --data itself, this fraction to test (seeded by id hash)")
    ap.add_argument("--holdout_by", choices=["id", "cluster"], default="id",
                    help="--holdout unit: each example (id hash) or each MMseqs2 cluster (30%% identity, 50%% coverage)")
    ap.add_argument("--seed", type=int, default=0, help="seed for --holdout, bootstrap, shuffling and sampling")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--limit", default=None,
                    help="first N examples per task, or N plus per-task numbers, e.g. 24,yes_no=72,protein_name=100")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", default="128",
                    help="generation limit: N, or N plus per-task limits, e.g. 32,yes_no=4,protein_name=16")
    ap.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding (seeded)")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top_p", type=float, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16")
    ap.add_argument("--shuffled_proteins", action="store_true",
                    help="also run every model predictor with proteins deranged across examples (before its retrieval)")
    ap.add_argument("--no_retrieval", action="store_true",
                    help="also run every model predictor without its retrieval database (the encoder path alone)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    ap.add_argument("--bertscore_model", default=None, help="local encoder folder for BERTScore (else skipped)")
    ap.add_argument("--no_meteor", action="store_true")
    ap.add_argument("--no_identity", action="store_true", help="skip the identity-bin breakdown")
    ap.add_argument("--threads", type=int, default=1, help="threads of the retrieval and identity searches")
    ap.add_argument("--sensitivity", type=float, default=7.5,
                    help="MMseqs2 -s for the retrieval baseline and identity bins (default 7.5, the most sensitive preset)")
    ap.add_argument("--examples", type=int, default=5, help="examples shown side by side in report.md")
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--on_bad_rows", choices=["stop", "skip"], default="stop",
                    help="rows whose protein cannot be read (empty, invalid residue): stop before predicting, listing "
                         "every one by id and line (default), or skip and count them")
    return ap


def main(argv=None) -> int:
    """Parse the flags and call :func:`eval.run.run_evaluation` (the same arguments, by name)."""
    args = build_parser().parse_args(argv)
    from .run import run_evaluation

    try:
        run_evaluation(
            args.data, args.predictor, args.out, task=args.task, split=args.split, train=args.train,
            train_split=args.train_split, holdout=args.holdout, holdout_by=args.holdout_by, seed=args.seed,
            limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
            temperature=args.temperature, top_p=args.top_p, device=args.device, dtype=args.dtype,
            shuffled_proteins=args.shuffled_proteins, no_retrieval=args.no_retrieval, bootstrap=args.bootstrap,
            bertscore_model=args.bertscore_model, meteor=not args.no_meteor, identity=not args.no_identity,
            threads=args.threads, sensitivity=args.sensitivity, examples_shown=args.examples,
            retrieval_k=args.retrieval_k, retrieval_text=args.retrieval_text, retrieval_search=args.retrieval_search,
            go_obo=args.go_obo,
            temporal_test=args.temporal_test, temporal_train=args.temporal_train,
            progress=not args.no_progress, on_bad_rows=args.on_bad_rows,
            command="python -m eval " + " ".join(sys.argv[1:] if argv is None else argv),
        )
    except ValueError as error:
        if str(error).startswith("no examples"):
            print(error, file=sys.stderr)
            return 2
        raise SystemExit(str(error)) from None
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
