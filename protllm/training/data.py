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


def load_rows(source: str, split: str | None = None, limit: int | None = None, tasks: list[str] | None = None,
              on_bad_rows: str = "stop", report: dict | None = None):
    """Training rows as a `datasets.Dataset`: `demo`, a JSONL/JSON file (rows or Alpaca records) or a saved dataset.

    Every row kept is checked first (`data.validation`): with `on_bad_rows="stop"` one `BadRowsError` lists every bad
    row by id, line and reason; with `"skip"` they are dropped. `report` (a dict, filled in) gets `skipped_rows` and
    `bad_rows` (their descriptions).
    """
    import datasets

    from data.validation import apply_policy, find_bad_rows, jsonl_line_numbers

    if source == "demo":
        from data import load_demo_dataset

        dataset = load_demo_dataset()[split or "train"]
    elif Path(source).is_dir():
        loaded = datasets.load_from_disk(source)
        dataset = loaded[split or "train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        dataset = datasets.load_dataset("json", data_files=str(source), split="train")
        lines = jsonl_line_numbers(source)
        if lines is not None and len(lines) == len(dataset):  # the file line of each row, kept through the filters
            dataset = dataset.add_column("_source_line", lines)
        if split and "split" in dataset.column_names:
            dataset = dataset.filter(lambda row: row["split"] == split)
    if tasks and "task" in dataset.column_names:
        dataset = dataset.filter(lambda row: row["task"] in tasks)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    lines = dataset["_source_line"] if "_source_line" in dataset.column_names else None
    bad = find_bad_rows(dataset, lines)
    apply_policy([row for _, row in bad], on_bad_rows, source)
    if bad:
        skipped = {index for index, _ in bad}
        dataset = dataset.select([i for i in range(len(dataset)) if i not in skipped])
        logger.warning("skipped %d bad training rows (on_bad_rows: skip): %s", len(bad), "; ".join(str(r) for _, r in bad[:20]))
    if report is not None:
        report.update(skipped_rows=len(bad), bad_rows=[str(row) for _, row in bad])
    if "_source_line" in dataset.column_names:
        dataset = dataset.remove_columns("_source_line")
    return dataset

