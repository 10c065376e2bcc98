"""What copying retrieved neighbours scores on the demo test set: the reference a retrieval model is read against.

    OMP_NUM_THREADS=1 python bench/bench_retrieval_copy.py [--train outputs/demo/data/train.jsonl --test outputs/demo/data/test.jsonl]

Builds the model's retrieval database from the training rows exactly as `train_sft.py` does
(`protllm.training.retrieval.build_database`), searches every test protein with pyswrd (E <= 0.01, no identity
cap: test proteins are already <=30% identity to training by MMseqs2), and per task answers the top neighbour's
annotation of that task (no neighbour with one: the most common training answer). Prints, per task, the eval
primary metric of that copy and of the most common answer, and how many test rows had a neighbour to copy; the
same metric code as `python -m eval` (no bootstrap). Needs `python -m data.build_demo --tasks outputs/demo/data`.
"""

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default="outputs/demo/data/train.jsonl")
    parser.add_argument("--test", default="outputs/demo/data/test.jsonl")
    parser.add_argument("--max_evalue", type=float, default=0.01)
    args = parser.parse_args()
    if not Path(args.train).is_file():
        print(f"skip: {args.train} missing (python -m data.build_demo --tasks outputs/demo/data)")
        return 0
    from eval.baselines import MostCommon
    from eval.data import load_examples
    from eval.report import score_predictor
    from protllm.training.retrieval import build_database

    rows = [json.loads(line) for line in open(args.train)]
    database = build_database(rows, {"max_evalue": args.max_evalue,
                                     "fields": ["protein_name", "function_text", "ec_number", "reaction"]}, [args.train])
    test, train = load_examples(args.test), load_examples(args.train)
    most_common = MostCommon(train)
    sequences = sorted({ex["proteins"][0]["sequence"].strip().upper() for ex in test})
    started = time.perf_counter()
    found = dict(zip(sequences, database.search(sequences, k=1)))
    print(f"pyswrd: {len(sequences)} test proteins x {len(database)} database proteins in "
          f"{time.perf_counter() - started:.1f} s; with a neighbour: {sum(1 for v in found.values() if v)}")
    by_task = collections.defaultdict(list)
    for ex in test:
        by_task[ex["task"]].append(ex)
    print(f"{'task':<14} {'metric':<10} {'copy top-1':>10} {'most common':>12} {'rows copied':>12}")
    for task, examples in by_task.items():
        copied, predictions = 0, {}
        for ex in examples:
            neighbours = found[ex["proteins"][0]["sequence"].strip().upper()]
            text = neighbours[0]["annotations"].get(task) if neighbours else None
            copied += text is not None
            predictions[ex["id"]] = text if text is not None else most_common.answers[task]
        copy = score_predictor(task, examples, predictions, None, bootstrap=20, meteor=False)
        common = score_predictor(task, examples, {e["id"]: most_common.answers[task] for e in examples}, None,
                                 bootstrap=20, meteor=False)
        metric = copy["primary"]
        print(f"{task:<14} {metric:<10} {copy['metrics'][metric]['value']:>10.3f} "
              f"{common['metrics'][metric]['value']:>12.3f} {copied:>6}/{len(examples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
