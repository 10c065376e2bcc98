"""Turn annotated proteins into chat-style instruction records (one schema for every task).

A *protein* is a plain dict produced by :mod:`data.readers`::

    {"accession", "sequence", "name", "description", "ec": [..], "reactions": {ec: [..]},
     "go": {"MF"|"BP"|"CC": [{"id", "name"}]}, "keywords": [..], "structure": path|None,
     "chain": id|None, "date": "YYYY-MM-DD"|None, "organism": str|None, "source": str}

A *record* (one dataset row) has the exact keys of :data:`RECORD_KEYS`; see :func:`make_record`.
Instruction templates are paraphrased per task and picked deterministically from ``seed`` and the
protein accession, so a rebuild with the same seed gives byte-identical rows.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from typing import Callable, Iterable

TASKS = (
    "function_text",
    "function_mcqa",
    "ec_number",
    "reaction",
    "protein_name",
    "yes_no",
    "go_terms",
    "keywords",
)

RECORD_KEYS = ("id", "task", "source", "split", "messages", "proteins", "answer", "meta")

TEMPLATES: dict[str, list[str]] = {
    "function_text": [
        "Describe the function of this protein.",
        "What is the biological function of the protein with this sequence?",
        "Give a short description of what this protein does.",
        "Summarise the known function of this protein.",
        "Predict the function of the given protein.",
    ],
    "function_mcqa": [
        "Which of the following best describes the function of this protein?\n{options}\nAnswer with the letter of the correct option.",
        "Choose the correct function for this protein.\n{options}\nReply with a single letter.",
        "Select the description that matches this protein.\n{options}\nAnswer with A, B, C or D.",
    ],
    "ec_number": [
        "What is the EC number of this enzyme?",
        "Predict the Enzyme Commission (EC) number(s) of this protein.",
        "Which EC number(s) does this enzyme carry?",
        "Assign the EC classification of this protein.",
    ],
    "reaction": [
        "What reaction does this enzyme catalyse?",
        "Describe the chemical reaction catalysed by this protein.",
        "Which reaction is catalysed by this enzyme?",
        "Give the catalytic activity of this protein as a reaction.",
    ],
    "protein_name": [
        "What is the name of this protein?",
        "Give the recommended name of the protein with this sequence.",
        "Name this protein.",
        "What protein is this?",
        "Predict the UniProt protein name for this sequence.",
    ],
    "yes_no": [
        "Is this protein {label}? Answer yes or no.",
        "Answer yes or no: is the given protein {label}?",
        "Based on its sequence, is this protein {label}? Reply yes or no.",
    ],
    "go_terms": [
        "Which Gene Ontology terms describe this protein?",
        "List the GO annotations of this protein.",
        "Predict the Gene Ontology terms (molecular function, biological process, cellular component) of this protein.",
    ],
    "keywords": [
        "Which UniProt keywords apply to this protein?",
        "List the keywords that describe this protein.",
        "Predict the UniProtKB keywords of this protein.",
    ],
}

LETTERS = "ABCDEFGH"
AMINO = set("ACDEFGHIKLMNPQRSTVWYBXZUO")
STANDARD = set("ACDEFGHIKLMNPQRSTVWY")


def _rng(seed: int, *parts) -> random.Random:
    key = ":".join(str(p) for p in (seed, *parts))
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def pick_template(task: str, seed: int, key: str) -> str:
    tpl = TEMPLATES[task]
    return tpl[_rng(seed, "tpl", task, key).randrange(len(tpl))]


def _block(type_, text=None, sequence=None, structure=None, chain=None) -> dict:
    return {"type": type_, "text": text, "sequence": sequence, "structure": structure, "chain": chain}


def make_record(
    *,
    id: str,
    task: str,
    source: str,
    split: str,
    protein: dict,
    instruction: str,
    answer: str,
    meta: dict | None = None,
) -> dict:
    """One dataset row in the shared schema (collator and eval harness depend on these keys)."""
    structure = protein.get("structure")
    structure = str(structure) if structure else None
    user = [
        _block("protein", sequence=protein["sequence"], structure=structure, chain=protein.get("chain")),
        _block("text", text=instruction),
    ]
    return {
        "id": id,
        "task": task,
        "source": source,
        "split": split,
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [_block("text", text=answer)]},
        ],
        "proteins": [{"accession": protein["accession"], "sequence": protein["sequence"], "structure": structure}],
        "answer": answer,
        "meta": json.dumps(meta or {}, sort_keys=True),
    }


# --------------------------------------------------------------------------- validation


class BuildStats:
    """Counters for everything that is skipped or odd (reported in the build summary)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, what: str, example: str | None = None, n: int = 1):
        self.counts[what] += n
        if example is not None:
            ex = self.examples.setdefault(what, [])
            if len(ex) < 5:
                ex.append(str(example)[:120])

    def merge(self, other: "BuildStats"):
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            ex = self.examples.setdefault(k, [])
            ex.extend(v[: max(0, 5 - len(ex))])

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


def clean_sequence(seq: str) -> str:
    return re.sub(r"[\s\d*]", "", str(seq or "")).upper()


def validate_proteins(
    proteins: Iterable[dict],
    stats: BuildStats,
    max_length: int | None = None,
    crop: bool = False,
    allow_nonstandard: bool = True,
) -> list[dict]:
    """Keep well-formed proteins; count (never silently drop) every rejection.

    Rejections: ``missing_accession``, ``empty_sequence``, ``invalid_letters`` (characters outside
    the IUPAC protein alphabet), ``duplicate_accession`` (first one kept), ``too_long`` (when
    ``max_length`` and not ``crop``). ``cropped`` and ``nonstandard_letters`` (B/X/Z/U/O) are counted
    but kept.
    """
    seen: set[str] = set()
    out = []
    for p in proteins:
        acc = (p.get("accession") or "").strip()
        seq = clean_sequence(p.get("sequence"))
        if not acc:
            stats.add("missing_accession", seq[:20])
            continue
        if not seq:
            stats.add("empty_sequence", acc)
            continue
        bad = set(seq) - AMINO
        if bad:
            stats.add("invalid_letters", f"{acc}: {''.join(sorted(bad))}")
            continue
        if set(seq) - STANDARD:
            if not allow_nonstandard:
                stats.add("nonstandard_letters_dropped", acc)
                continue
            stats.add("nonstandard_letters", acc)
        if acc in seen:
            stats.add("duplicate_accession", acc)
            continue
        if max_length and len(seq) > max_length:
            if crop:
                seq = seq[:max_length]
                stats.add("cropped", acc)
            else:
                stats.add("too_long", acc)
                continue
        seen.add(acc)
        q = dict(p)
        q["accession"] = acc
        q["sequence"] = seq
        out.append(q)
    stats.add("proteins_kept", n=len(out))
    return out


# --------------------------------------------------------------------------- single-protein tasks


def _rid(p, task, suffix=""):
    return f"{p['accession']}|{task}{suffix}"


def function_text(p: dict, split: str, seed: int, source: str, stats: BuildStats) -> list[dict]:
    desc = (p.get("description") or "").strip()
    if not desc:
        stats.add("empty_annotation:function_text", p["accession"])
        return []
    return [make_record(id=_rid(p, "function_text"), task="function_text", source=source, split=split, protein=p,
                        instruction=pick_template("function_text", seed, p["accession"]), answer=desc)]


def protein_name(p: dict, split: str, seed: int, source: str, stats: BuildStats) -> list[dict]:
    name = (p.get("name") or "").strip()
    if not name:
        stats.add("empty_annotation:protein_name", p["accession"])
        return []
    return [make_record(id=_rid(p, "protein_name"), task="protein_name", source=source, split=split, protein=p,
                        instruction=pick_template("protein_name", seed, p["accession"]), answer=name,
                        meta={"organism": p.get("organism")})]


def ec_number(p: dict, split: str, seed: int, source: str, stats: BuildStats) -> list[dict]:
    ecs = [e for e in (p.get("ec") or []) if e]
    if not ecs:
        stats.add("empty_annotation:ec_number", p["accession"])
        return []
    ans = "; ".join(ecs)
    return [make_record(id=_rid(p, "ec_number"), task="ec_number", source=source, split=split, protein=p,
                        instruction=pick_template("ec_number", seed, p["accession"]), answer=ans, meta={"ec": ecs})]


def reaction(p: dict, split: str, seed: int, source: str, stats: BuildStats) -> list[dict]:
    rx = p.get("reactions") or {}
    texts = []
    for ec in p.get("ec") or []:
        for t in rx.get(ec, []) or []:
            if t and t not in texts:
                texts.append(t)
    if not texts:
        stats.add("empty_annotation:reaction", p["accession"])
        return []
    return [make_record(id=_rid(p, "reaction"), task="reaction", source=source, split=split, protein=p,
                        instruction=pick_template("reaction", seed, p["accession"]), answer="\n".join(texts),
                        meta={"ec": list(p.get("ec") or []), "reactions": texts})]


def go_terms(p: dict, split: str, seed: int, source: str, stats: BuildStats) -> list[dict]:
    go = p.get("go") or {}
    terms = [(a, t) for a in ("MF", "BP", "CC") for t in go.get(a, []) or []]
    if not terms:
        stats.add("empty_annotation:go_terms", p["accession"])
        return []
    names = [t.get("name") or t.get("id") for _, t in terms]
    return [make_record(id=_rid(p, "go_terms"), task="go_terms", source=source, split=split, protein=p,
                        instruction=pick_template("go_terms", seed, p["accession"]), answer="; ".join(names),
                        meta={"go_ids": [t.get("id") for _, t in terms], "aspects": [a for a, _ in terms]})]


def keywords(p: dict, split: str, seed: int, source: str, stats: BuildStats) -> list[dict]:
    kws = [k for k in (p.get("keywords") or []) if k]
    if not kws:
        stats.add("empty_annotation:keywords", p["accession"])
        return []
    return [make_record(id=_rid(p, "keywords"), task="keywords", source=source, split=split, protein=p,
                        instruction=pick_template("keywords", seed, p["accession"]), answer="; ".join(kws),
                        meta={"keywords": kws})]


SINGLE_BUILDERS: dict[str, Callable] = {
    "function_text": function_text,
    "protein_name": protein_name,
    "ec_number": ec_number,
    "reaction": reaction,
    "go_terms": go_terms,
    "keywords": keywords,
}


# --------------------------------------------------------------------------- pool tasks


def function_mcqa(
    proteins: list[dict], split: str, seed: int, source: str, stats: BuildStats,
    n_options: int = 4, permutations: int = 1,
) -> list[dict]:
    """FP multiple choice: distractors are other proteins' descriptions (same split).

    ``permutations=1``: the answer position is shuffled (seeded). ``permutations=4``: the STELLA
    4x variant, four rows per protein with the correct answer at each of A-D once (same distractors);
    a model is credited only if it answers all four (group by ``meta.group``).
    """
    with_desc = [p for p in proteins if (p.get("description") or "").strip()]
    descs = sorted({p["description"].strip() for p in with_desc})
    if len(descs) < n_options:
        stats.add("mcqa_pool_too_small", split, n=len(with_desc))
        return []
    out = []
    for p in with_desc:
        correct = p["description"].strip()
        rng = _rng(seed, "mcqa", p["accession"])
        distract = []
        while len(distract) < n_options - 1:
            d = descs[rng.randrange(len(descs))]
            if d != correct and d not in distract:
                distract.append(d)
        if permutations == 1:
            positions = [rng.randrange(n_options)]
        else:
            positions = list(range(min(permutations, n_options)))
        tpl = pick_template("function_mcqa", seed, p["accession"])
        for k, pos in enumerate(positions):
            opts = list(distract)
            opts.insert(pos, correct)
            letter = LETTERS[pos]
            text = tpl.format(options="\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts)))
            suffix = f"#p{k}" if permutations > 1 else ""
            out.append(make_record(
                id=_rid(p, "function_mcqa", suffix), task="function_mcqa", source=p.get("source") or source, split=split, protein=p,
                instruction=text, answer=letter,
                meta={"options": opts, "correct": letter, "correct_text": correct, "group": p["accession"],
                      "permutation": k, "n_permutations": len(positions)}))
    return out


EC_CLASSES = {
    "1": "an oxidoreductase", "2": "a transferase", "3": "a hydrolase", "4": "a lyase",
    "5": "an isomerase", "6": "a ligase", "7": "a translocase",
}


def ec_class_labels(p: dict) -> set[str]:
    """Yes/no labels from EC numbers: first EC digit -> 'a hydrolase (EC 3)' etc."""
    out = set()
    for ec in p.get("ec") or []:
        c = ec.split(".")[0]
        if c in EC_CLASSES:
            out.add(f"{EC_CLASSES[c]} (EC {c})")
    return out


def go_mf_labels(p: dict) -> set[str]:
    """Yes/no labels from GO molecular-function names: 'an enzyme/protein with <term>'."""
    return {f"a protein with {t['name']}" for t in (p.get("go") or {}).get("MF", []) or [] if t.get("name")}


def ec_and_go_mf_labels(p: dict) -> set[str]:
    """The yes/no labels of `python -m data.build`: EC classes and GO molecular functions."""
    return ec_class_labels(p) | go_mf_labels(p)


def yes_no(
    proteins: list[dict], split: str, seed: int, source: str, stats: BuildStats,
    label_fn: Callable[[dict], set[str]] = ec_class_labels, max_pos_per_protein: int = 1,
    universe: Iterable[str] | None = None,
) -> list[dict]:
    """Closed yes/no questions (SEPIT style), balanced per label.

    For each protein and (up to ``max_pos_per_protein``) of its labels L: one "yes" row; and for
    the same L one "no" row on another protein of the split that does not carry L. Every question
    text therefore appears equally often with both answers, so the question alone gives no hint.
    Labels with no possible negative are counted (``yes_no_no_negative``).
    """
    labelled = [(p, sorted(label_fn(p))) for p in proteins]
    if universe is not None:
        uni = set(universe)
        labelled = [(p, [l for l in ls if l in uni]) for p, ls in labelled]
    out = []
    n = len(labelled)
    for p, labels in labelled:
        if not labels:
            continue
        rng = _rng(seed, "yesno", p["accession"])
        chosen = labels if len(labels) <= max_pos_per_protein else rng.sample(labels, max_pos_per_protein)
        for lab in chosen:
            neg = None
            for _ in range(50):
                q, qlabels = labelled[rng.randrange(n)]
                if lab not in qlabels and q["accession"] != p["accession"]:
                    neg = q
                    break
            if neg is None:
                stats.add("yes_no_no_negative", f"{p['accession']}: {lab}")
                continue
            for prot, ans in ((p, "yes"), (neg, "no")):
                tpl = pick_template("yes_no", seed, f"{p['accession']}|{lab}|{ans}")
                out.append(make_record(
                    id=f"{prot['accession']}|yes_no|{lab}|{ans}|{p['accession']}", task="yes_no", source=prot.get("source") or source,
                    split=split, protein=prot, instruction=tpl.format(label=lab), answer=ans,
                    meta={"label": lab, "answer": ans, "positive_of": p["accession"]}))
    return out


def build_records(
    proteins: list[dict], split: str, tasks: Iterable[str], seed: int = 0, source: str = "unknown",
    stats: BuildStats | None = None, mcqa_permutations: int = 1,
    yes_no_label_fn: Callable[[dict], set[str]] = ec_class_labels,
) -> list[dict]:
    """All requested tasks for the proteins of one split, in a deterministic order."""
    stats = stats if stats is not None else BuildStats()
    out: list[dict] = []
    for task in tasks:
        if task in SINGLE_BUILDERS:
            fn = SINGLE_BUILDERS[task]
            for p in proteins:
                out.extend(fn(p, split, seed, p.get("source") or source, stats))
        elif task == "function_mcqa":
            out.extend(function_mcqa(proteins, split, seed, source, stats, permutations=mcqa_permutations))
        elif task == "yes_no":
            out.extend(yes_no(proteins, split, seed, source, stats, label_fn=yes_no_label_fn))
        else:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    seen = set()
    for r in out:
        if r["id"] in seen:
            stats.add("duplicate_record_id", r["id"])
        seen.add(r["id"])
    stats.add(f"records:{split}", n=len(out))
    return out


def write_shard_arrow(
    shard: str, arrow_path: str, split: str, source: str, tasks: list[str], seed: int = 0,
    mcqa_permutations: int = 1, batch_rows: int = 1000,
) -> tuple[int, dict]:
    """One protein shard (JSONL, one protein per line) -> its records in one Arrow file (a streaming build's worker).

    The records (:func:`build_records` with :func:`ec_and_go_mf_labels` yes/no labels) are written in columnar
    batches of ``batch_rows`` rows with ``datasets``' ``ArrowWriter.write_batch``: one Arrow conversion per batch
    and column, instead of ``Features.encode_example`` + ``write`` per row (two thirds of the build's time). Records
    are plain str/None/list/dict, for which encoding is the identity, so the Arrow table is the same. The JSONL
    shard is deleted once written. Returns (rows written, the shard's ``BuildStats.as_dict()``).
    """
    from pathlib import Path

    from datasets.arrow_writer import ArrowWriter

    from .card import FEATURES

    with open(shard) as handle:
        proteins = [json.loads(line) for line in handle]
    stats = BuildStats()
    records = build_records(proteins, split, tasks, seed=seed, source=source, stats=stats,
                            mcqa_permutations=mcqa_permutations, yes_no_label_fn=ec_and_go_mf_labels)
    del proteins
    writer = ArrowWriter(features=FEATURES, path=arrow_path)
    try:
        for start in range(0, len(records), batch_rows):
            batch = records[start:start + batch_rows]
            writer.write_batch({column: [record[column] for record in batch] for column in FEATURES})
        rows, _ = writer.finalize()
    finally:
        writer.close()
    Path(shard).unlink()  # the spilled proteins are no longer needed: disk holds about one copy of the input
    return rows, stats.as_dict()
