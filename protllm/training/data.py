"""Training rows: load them (demo, JSONL, saved datasets) and turn them into chat messages."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

logger = logging.getLogger("protllm.training")

def rows_to_messages(row: dict) -> list[dict]:
    """A training row -> chat messages with protein content blocks.

    Accepts dataset rows with `messages` (the data package's schema) and Alpaca / OPI records
    (`instruction`, `input` holding the sequence, `output`).
    """
    if row.get("messages"):
        return row["messages"]
    if "instruction" in row and "output" in row:
        from data.readers import extract_sequence

        sequence, rest = extract_sequence(row.get("input") or "")
        if not sequence:
            raise ValueError(f"record {row.get('id', '?')}: no protein sequence found in its `input` field")
        question = "\n".join(part for part in (row["instruction"], rest) if part)
        return [
            {"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["output"]}]},
        ]
    raise ValueError(f"record {row.get('id', '?')}: expected `messages` or Alpaca fields instruction/input/output")


def load_rows(source: str, split: str | None = None, limit: int | None = None, tasks: list[str] | None = None):
    """Training rows as a `datasets.Dataset`: `demo`, a JSONL/JSON file (rows or Alpaca records) or a saved dataset."""
    import datasets

    if source == "demo":
        from data import load_demo_dataset

        dataset = load_demo_dataset()[split or "train"]
    elif Path(source).is_dir():
        loaded = datasets.load_from_disk(source)
        dataset = loaded[split or "train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        dataset = datasets.load_dataset("json", data_files=str(source), split="train")
        if split and "split" in dataset.column_names:
            dataset = dataset.filter(lambda row: row["split"] == split)
    if tasks and "task" in dataset.column_names:
        dataset = dataset.filter(lambda row: row["task"] in tasks)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset

