"""Padding in the demo's instruct batches: random batches against `train_sampling_strategy: group_by_length`.

    OMP_NUM_THREADS=1 python bench/bench_length_grouping.py [--model outputs/demo/model --train outputs/demo/data/train.jsonl]

Prepares the rows as `train_sft.py --config configs/demo.yaml` does (the retrieval database, its neighbours, the
seeded `train_rows` sample), then collates the first `--steps` batches with each sampler: a seeded random order,
and the SFT trainer's `ShuffledBatchesLengthGroupedSampler` on the collator's row lengths. Prints the tokens each
computes (padding included) and their ratio, measured in the same run. Needs `make demo` first (its data and its
model folder's processor).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo/model")
    parser.add_argument("--train", default="outputs/demo/data/train.jsonl")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    if not Path(args.train).is_file() or not (Path(args.model) / "processor_config.json").is_file():
        print(f"skip: {args.train} or {args.model} missing (run `make demo` first)")
        return 0
    import torch
    import yaml
    from datasets import load_dataset

    from processing_protllm import ProtLLMProcessor
    from protllm.training.collator import ProtLLMDataCollator
    from protllm.training.retrieval import add_neighbours, build_database
    from protllm.training.trainers import ShuffledBatchesLengthGroupedSampler

    recipe = yaml.safe_load(Path(args.config).read_text())
    spec = recipe["model"]["retrieval"]
    rows = load_dataset("json", data_files=args.train, split="train")
    database = build_database(rows, spec, [args.train])
    sample = rows.shuffle(seed=recipe.get("seed", 0)).select(range(min(spec.get("train_rows", len(rows)), len(rows))))
    sample, _ = add_neighbours(sample, database, spec)
    collator = ProtLLMDataCollator(ProtLLMProcessor.from_pretrained(args.model), max_length=recipe["data"].get("max_length"))
    started = time.time()
    lengths = [collator.row_length(row) for row in sample]
    seconds_lengths = time.time() - started
    orders = {
        "random": torch.randperm(len(sample), generator=torch.Generator().manual_seed(0)).tolist(),
        "group_by_length": list(ShuffledBatchesLengthGroupedSampler(args.batch_size, lengths=lengths,
                                                                    generator=torch.Generator().manual_seed(0))),
    }
    computed = {}
    for name, order in orders.items():
        tokens = padding = 0
        for step in range(args.steps):
            batch = collator([sample[i] for i in order[step * args.batch_size: (step + 1) * args.batch_size]])
            tokens += batch["input_ids"].numel()
            padding += int((batch["attention_mask"] == 0).sum())
        computed[name] = tokens
        print(f"{name:>16}: {tokens:>7} tokens computed in {args.steps} batches of {args.batch_size}, "
              f"{padding / tokens:.1%} of them padding")
    print(f"group_by_length / random, tokens computed: {computed['group_by_length'] / computed['random']:.2f} "
          f"(row lengths for {len(sample)} rows: {seconds_lengths:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
