"""Rows checked before a run: every bad row named by id, line and reason, then stop or skip (`on_bad_rows`).

A row is bad when one of its proteins cannot be read: an empty sequence, a residue outside the one residue rule
(`processing_protllm.clean_residues`: 20 amino acids and B, Z, U, O, X), a protein with neither sequence nor
structure, or a row with no recognisable protein at all. Training (`data.on_bad_rows` in a recipe) and evaluation
(`python -m eval --on_bad_rows`) use the same check, so a row is refused the same way in both, before any model is
loaded:

    bad = find_bad_rows(rows_with_lines)          # [BadRow(id, line, reason), ...]
    keep = apply_policy(bad, "stop", "train.jsonl")   # BadRowsError listing every bad row, or the ids to skip
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ON_BAD_ROWS = ("stop", "skip")
MAX_LISTED = 50  # rows listed in one error message; the count says how many more


class BadRowsError(ValueError):
    """The data holds rows that cannot be used; the message lists each one by id, line and reason."""


@dataclass(frozen=True)
class BadRow:
    id: str
    line: int | None  # 1-based line in the file; None for rows that do not come from a line (saved datasets)
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "no line"
        return f"row {self.id} ({where}): {self.reason}"


def row_proteins(row: dict) -> list[dict] | None:
    """The proteins of a row in any schema this repository reads (dataset rows with `proteins` / `messages`,
    eval examples, raw `sequence` rows, Alpaca `input`), or None when the row has no protein field at all."""
    if isinstance(row.get("proteins"), list) and row["proteins"]:
        return [p if isinstance(p, dict) else {"sequence": p} for p in row["proteins"]]
    blocks = []
    for message in row.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "protein":
                blocks.append(block)
    if blocks:
        return blocks
    if "sequence" in row:
        return [{"sequence": row["sequence"], "structure": row.get("structure")}]
    if "instruction" in row and "output" in row:
        from data.readers import extract_sequence

        sequence, _ = extract_sequence(str(row.get("input") or ""))
        return [{"sequence": sequence or ""}]
    return None


def row_problem(row: dict) -> str | None:
    """Why `row` cannot be used (the first problem found), or None."""
    from processing_protllm import clean_residues

    proteins = row_proteins(row)
    if proteins is None:
        return None  # a text-only row: nothing here to check
    for index, protein in enumerate(proteins):
        sequence, structure = protein.get("sequence"), protein.get("structure")
        if structure and not sequence:
            continue  # the sequence comes from the structure (checked when it is read)
        if sequence is None:
            return f"protein {index}: no sequence and no structure"
        try:
            clean_residues(sequence, f"protein {index}")
        except ValueError as error:
            return str(error)
    return None


def row_id(row: dict, index: int) -> str:
    for key in ("id", "accession", "entry", "pdb_chain", "primaryAccession"):
        if row.get(key):
            return str(row[key])
    return f"row{index}"


def jsonl_line_numbers(path) -> list[int] | None:
    """1-based line number of each JSON object row of a JSONL file, in reading order (blank and torn lines are not
    rows); None for a file that is not JSONL (a JSON array, a saved dataset folder)."""
    from data.readers import open_text

    path = Path(path)
    if not path.is_file() or path.suffix == ".json":
        return None
    lines = []
    with open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                if isinstance(json.loads(line), dict):
                    lines.append(number)
            except json.JSONDecodeError:
                continue
    return lines


def find_bad_rows(rows, lines: list[int] | None = None, ids: list[str] | None = None) -> list[tuple[int, BadRow]]:
    """`[(index, BadRow)]` for every bad row of `rows` (an iterable of dicts); `lines[i]` is row i's line."""
    bad = []
    for index, row in enumerate(rows):
        reason = row_problem(row) if isinstance(row, dict) else f"not a JSON object: {type(row).__name__}"
        if reason is not None:
            line = lines[index] if lines is not None and index < len(lines) else None
            bad.append((index, BadRow(ids[index] if ids else row_id(row, index), line, reason)))
    return bad


def apply_policy(bad: list[BadRow], on_bad_rows: str, source) -> None:
    """`stop`: raise BadRowsError listing every bad row (the run has not started); `skip`: return (the caller drops
    them and records the count)."""
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {', '.join(ON_BAD_ROWS)}, got {on_bad_rows!r}")
    if not bad or on_bad_rows == "skip":
        return
    listed = "\n".join(f"  {row}" for row in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    raise BadRowsError(f"{source}: {len(bad)} bad row(s), nothing was run:\n{listed}{more}\n"
                       "Fix them, or skip them with on_bad_rows: skip (recipe `data.on_bad_rows`, "
                       "`python -m eval --on_bad_rows skip`).")
