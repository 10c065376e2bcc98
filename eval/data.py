"""Load evaluation files into one common example format.

Example: ``{"id", "task", "question", "proteins": [{"sequence", "structure"}], "reference", "meta"}``.

Accepted inputs (auto-detected per row):

* the raw JSONL files of ``../shared/data`` (and any file in the same schema):
  - ``sequence`` + ``description`` -> ``function_text`` (reference = description);
  - ``sequence`` + ``ec`` (list) -> ``ec_number`` (reference = ``'; '.join(ec)``) and ``reaction``
    (reference = the ENZYME reaction texts of those EC numbers joined by ``'; '``); rows with no EC
    are skipped for these tasks (counted);
  - ``sequence`` + ``go`` ({aspect: [{id, name}]}) -> ``go_terms`` (reference = GO term names
    joined by ``'; '``, OPI style; ids in ``meta['go_ids']``);
* instruction dataset rows built by ``data/`` (``messages`` + ``proteins`` + ``answer`` + ``meta``),
  any of the task ids ``function_text, function_mcqa, ec_number, reaction, protein_name, yes_no,
  go_terms, keywords``.

For raw rows the instruction is the fixed text in :data:`INSTRUCTIONS` (stated in the report).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

TASK_ALIASES = {
    "ec": "ec_number",
    "go": "go_terms",
    "function": "function_text",
    "fp": "function_text",
    "mcqa": "function_mcqa",
    "yesno": "yes_no",
}
TASKS = ("function_text", "function_mcqa", "ec_number", "reaction", "protein_name", "yes_no", "go_terms", "keywords")

# metric family of each task
FAMILY = {
    "function_text": "text",
    "protein_name": "short_text",
    "reaction": "short_text",
    "ec_number": "ec",
    "function_mcqa": "mcqa",
    "yes_no": "yes_no",
    "go_terms": "go",
    "keywords": "label_set",
}

INSTRUCTIONS = {
    "function_text": "What is the function of this protein?",
    "ec_number": "What is the EC number of this enzyme? Answer with EC numbers separated by '; '.",
    "reaction": "What chemical reaction does this enzyme catalyse?",
    "go_terms": "Which Gene Ontology terms describe this protein? Answer with GO term names separated by '; '.",
}


def canonical_task(task: str) -> str:
    t = TASK_ALIASES.get(task, task)
    if t != "auto" and t not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)} or auto")
    return t


def read_jsonl(path) -> tuple[list[dict], int]:
    """Rows of a JSONL file (plain or .gz) and the number of lines that were not valid JSON objects (skipped)."""
    from data.builders import BuildStats
    from data.readers import read_jsonl as stream_jsonl

    stats = BuildStats()
    rows = list(stream_jsonl(path, stats, "eval"))
    return rows, sum(stats.counts.values())


def _meta(row) -> dict:
    m = row.get("meta")
    if isinstance(m, str):
        try:
            m = json.loads(m)
        except json.JSONDecodeError:
            m = {"raw": m}
    return dict(m or {})


def _row_id(row, n: int) -> str:
    for k in ("id", "accession", "entry", "pdb_chain"):
        if row.get(k):
            return str(row[k])
    return f"row{n}"


def _from_dataset_row(row, n) -> dict:
    msgs = [m for m in (row.get("messages") or []) if isinstance(m, dict)]
    question_parts, proteins_in_msgs, answer = [], [], None
    for msg in msgs:
        content = msg.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if msg.get("role") == "user":
            for block in content or []:
                if block.get("type") == "text":
                    question_parts.append(block.get("text", ""))
                elif block.get("type") == "protein":
                    proteins_in_msgs.append({"sequence": block.get("sequence"), "structure": block.get("structure")})
        elif msg.get("role") == "assistant" and answer is None:
            answer = " ".join(str(b.get("text") or "") for b in content if b.get("type") == "text").strip() or None
    proteins = [
        {"sequence": p.get("sequence"), "structure": p.get("structure"), "accession": p.get("accession")}
        for p in (row.get("proteins") or proteins_in_msgs)
    ]
    meta = _meta(row)
    meta.setdefault("source", row.get("source"))
    ref = row.get("answer", answer)
    return {
        "id": _row_id(row, n),
        "task": canonical_task(row.get("task") or "function_text"),
        "question": "\n".join(q for q in question_parts if q),
        "proteins": proteins,
        "reference": ref,
        "meta": meta,
        "split": row.get("split"),
    }


def _raw_tasks(row) -> list[str]:
    if "description" in row:
        return ["function_text"]
    if "go" in row:
        return ["go_terms"]
    if "ec" in row:
        return ["ec_number"]
    return []


def _from_raw_row(row, task: str, n) -> dict | None:
    seq = row.get("sequence")
    meta = {k: row[k] for k in ("accession", "protein_name", "gene", "orf_qualifier", "cluster", "organism_genus") if k in row}
    ref = None
    if task == "function_text":
        if "description" not in row:
            return None
        ref = row.get("description")
    elif task in ("ec_number", "reaction"):
        ecs = row.get("ec") or []
        if not ecs:
            return None
        meta["ec"] = list(ecs)
        if task == "ec_number":
            ref = "; ".join(ecs)
        else:
            rx = row.get("reactions") or {}
            texts = [t for e in ecs for t in (rx.get(e) or [])]
            if not texts:
                return None
            ref = "; ".join(texts)
    elif task == "go_terms":
        go = row.get("go") or {}
        if not go:
            return None
        names, ids, aspects = [], [], []
        for aspect in sorted(go):
            for term in go[aspect] or []:
                names.append(term.get("name") or term.get("id"))
                ids.append(term.get("id"))
                aspects.append(aspect)
        # ids, ontologies and names side by side: eval.go scores by id per ontology (BP / MF / CC)
        meta.update(go_ids=ids, aspects=aspects, go_names=names)
        ref = "; ".join(names)
    elif task == "protein_name":
        ref = row.get("protein_name")
    else:
        return None
    return {
        "id": _row_id(row, n),
        "task": task,
        "question": INSTRUCTIONS.get(task, INSTRUCTIONS["function_text"]),
        "proteins": [{"sequence": seq, "structure": row.get("structure"), "accession": row.get("accession")}],
        "reference": ref,
        "meta": meta,
        "split": row.get("split"),
    }


def _row_examples(row: dict, n: int, tasks: list[str], want_split: str | None, st: dict) -> list[dict]:
    """The examples of one row (none when it is of another split or task, or has no label; counted in `st`)."""
    if want_split is not None and {"val": "valid"}.get(row.get("split"), row.get("split")) != want_split:
        st["other_split"] += 1
        return []
    if "messages" in row or "answer" in row:
        ex = _from_dataset_row(row, n)
        if "auto" not in tasks and ex["task"] not in tasks:
            st["other_task"] += 1
            return []
        return [ex]
    cands = []
    for t in _raw_tasks(row) if "auto" in tasks else tasks:
        ex = _from_raw_row(row, t, n)
        if ex is None:
            st["skipped_no_label"] += 1
        else:
            cands.append(ex)
    return cands


def first_examples_per_task(examples: list[dict], limit: int | dict) -> list[dict]:
    """The first `limit` examples of every task; `limit` an int or `{"default": n or None, task: n}` (None: all)."""
    limits = limit if isinstance(limit, dict) else {"default": limit}
    per: Counter = Counter()
    kept = []
    for ex in examples:
        n = limits.get(ex["task"], limits.get("default"))
        if n is None or per[ex["task"]] < n:
            per[ex["task"]] += 1
            kept.append(ex)
    return kept


def load_examples(path, task: str | list[str] = "auto", split: str | None = None, limit: int | dict | None = None,
                  stats: dict | None = None) -> list[dict]:
    """Read ``path`` into examples for ``task`` (a task id, a list, a comma list or ``'auto'``).

    ``split`` keeps rows whose ``split`` equals it (``'val'`` and ``'valid'`` are the same). ``stats``
    (a dict, filled in) counts skipped and duplicate rows. Ids are unique: a repeated id is dropped.
    """
    if isinstance(task, str):
        tasks = [canonical_task(t.strip()) for t in task.split(",") if t.strip()]
    else:
        tasks = [canonical_task(t) for t in task]
    rows, bad = read_jsonl(path)
    st = stats if stats is not None else {}
    st.update({"rows": len(rows), "bad_json_lines": bad, "skipped_no_label": 0, "duplicate_ids": 0,
               "other_split": 0, "other_task": 0})
    want_split = {"val": "valid"}.get(split, split) if split else None
    out: list[dict] = []
    seen: set = set()
    st["malformed_rows"] = 0
    for n, row in enumerate(rows):
        try:
            cands = _row_examples(row, n, tasks, want_split, st)
            for ex in cands:
                if not isinstance(ex["id"], (str, int)):
                    raise TypeError(f"id must be a string, got {type(ex['id']).__name__}")
        except (TypeError, AttributeError, KeyError, ValueError, IndexError) as error:  # valid JSON, fields of a wrong type or value
            st["malformed_rows"] += 1
            st.setdefault("malformed_row_ids", []).append(f"{_row_id(row, n)}: {type(error).__name__}: {error}"[:200])
            continue
        for ex in cands:
            key = (ex["task"], ex["id"])
            if key in seen:
                st["duplicate_ids"] += 1
                continue
            seen.add(key)
            out.append(ex)
    if limit:
        out = first_examples_per_task(out, limit)
    st["examples"] = len(out)
    st["by_task"] = dict(Counter(ex["task"] for ex in out))
    return out


def holdout_split(examples: list[dict], frac: float = 0.2, seed: int = 0, key: str = "id") -> tuple[list[dict], list[dict]]:
    """Seeded, order-independent train/test split: an example goes to test when
    ``sha256(f"{seed}:{key}")`` mapped to [0, 1) is below ``frac``. ``key='cluster'`` hashes
    ``meta['cluster']`` (set it first, e.g. from ``data.mmseqs.easy_cluster``) so a cluster stays
    on one side."""

    def u(ex):
        k = ex["meta"].get("cluster", ex["id"]) if key == "cluster" else ex["id"]
        h = hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()
        return int(h[:12], 16) / float(16 ** 12)

    train, test = [], []
    for ex in examples:
        (test if u(ex) < frac else train).append(ex)
    return train, test


def example_length(ex: dict) -> int:
    """Length used to sort for batching: residues of all proteins + characters of the question."""
    return sum(len(p.get("sequence") or "") for p in ex.get("proteins") or []) + len(ex.get("question") or "")
