"""Retrieval during training: build the model's database from its training rows and add honest neighbours.

Recipe switch (`model.retrieval:`; keys checked by `recipe.py`):

    model:
      retrieval:
        k: 3                      # neighbours per protein
        max_identity: 0.3         # training neighbours above this identity are dropped (test proteins are <=30%)
        exclusion: leave_one_out  # or `cluster`: also drop proteins of the query's cluster (row meta `cluster`)
        max_evalue: 0.01
        max_annotation_chars: 160
        fallback: composition     # optional: a protein with no homolog gets its closest proteins in composition
        per_field: true           # optional: the k closest proteins for each field, each showing that field
        task_fields:              # optional: questions of a task see the closest proteins carrying this field
          ec_number: ec_number
          yes_no: protein_name
        fields: [protein_name, function_text, ec_number, reaction]   # the tasks whose answers annotate a protein
        train_rows: 800           # optional: train on a seeded sample of this many rows (the database keeps all)

The search is an exhaustive Smith-Waterman against the whole database (pyswrd), so its cost grows with the number
of training rows searched. A short run sees only `max_steps x batch` rows: `train_rows` searches (and trains on) a
seeded sample of that size while the database still holds every training protein.

Every training protein is searched against the database of all training proteins, excluding itself (and its
cluster), and every neighbour above `max_identity`: the model learns to use distant homologs, not to copy an
identical one. Each user message gets a neighbours block after each protein, empty ("none found") when nothing
passes, so training prompts look exactly like inference prompts. With `fallback: composition`, a protein left without
neighbours gets its closest database proteins in composition instead, under the same exclusions: never itself, its
cluster, or any homolog the search found (E <= max_evalue) above `max_identity`. With `per_field: true` all of this
runs for each field's view of the database (`RetrievalDatabase.field_views`), with the exclusions of the whole one.
With `task_fields`, a row whose task is listed is searched in the view of its field alone (same exclusions), so a
protein asked two kinds of question is searched once per kind; the mapping is saved with the database, and evaluation
asks each task's questions the same way.
"""

from __future__ import annotations

import json
import logging

from retrieval_protllm import RetrievalDatabase, RetrievalError, merge_field_neighbours

logger = logging.getLogger("protllm.train")

DEFAULT_FIELDS = ("protein_name", "function_text", "ec_number", "reaction", "keywords")
EXCLUSIONS = ("leave_one_out", "cluster")


def _meta(row) -> dict:
    meta = row.get("meta")
    if isinstance(meta, str):
        try:
            return json.loads(meta) or {}
        except json.JSONDecodeError:
            return {}
    return meta or {}


def _answer(row) -> str | None:
    if row.get("answer") is not None:
        return row["answer"]
    for message in row.get("messages") or []:
        if message.get("role") == "assistant":
            content = message.get("content")
            return content if isinstance(content, str) else " ".join(b.get("text") or "" for b in content or [])
    return None


def protein_key(protein: dict) -> str:
    """The database id of a row's protein: its accession, else its sequence (two rows of one protein share it)."""
    return str(protein.get("accession") or protein.get("id") or protein["sequence"])


def database_records(rows, fields=DEFAULT_FIELDS):
    """`database_from_records` input from dataset rows: one record per (protein, task in `fields`)."""
    for row in rows:
        proteins = row.get("proteins") or []
        if len(proteins) != 1 or not proteins[0].get("sequence"):
            continue  # multi-protein or protein-less rows annotate no single protein
        meta = _meta(row)
        field = row.get("task")
        yield {"id": protein_key(proteins[0]), "sequence": proteins[0]["sequence"], "cluster": meta.get("cluster"),
               "field": field, "text": _answer(row) if field in fields else None}


def database_from_records(records, config: dict | None = None) -> RetrievalDatabase:
    """Merge `{"id", "sequence", "field", "text", "cluster"?}` records (one per annotation) into one database entry per
    protein id. A protein met twice with different sequences is an error naming it; the first text of a field wins."""
    by_id: dict[str, dict] = {}
    for record in records:
        key, sequence = record["id"], str(record["sequence"]).strip().upper()
        entry = by_id.setdefault(key, {"id": key, "sequence": sequence, "annotations": {}})
        if entry["sequence"] != sequence:
            raise RetrievalError(f"protein {key!r} appears with two different sequences")
        if record.get("cluster") is not None:
            entry["cluster"] = record["cluster"]
        text = record.get("text")
        if text is not None and str(text).strip():
            entry["annotations"].setdefault(record["field"], str(text).strip())
    return RetrievalDatabase(list(by_id.values()), config)


def search_excluding(database: RetrievalDatabase, sequences: list[str], exclude: list, k: int | None = None,
                     max_identity: float | None = None, exclude_same_cluster: bool = False,
                     field: str | None = None) -> list[list[dict]]:
    """`database.search` for training proteins: the top-`k` neighbours of each query that are not excluded.

    exclude: per query, an id or a collection of ids never returned (leave-one-out: the query's own id).
    exclude_same_cluster: also exclude every database protein sharing the `cluster` of an excluded id.
    max_identity: drop neighbours above this identity (0-1), so the model learns to use distant homologs instead of
        copying a near-identical one (test proteins have none above the split's identity).
    field: search only the proteins carrying this annotation field (`RetrievalDatabase.field_view`).
    """
    if len(exclude) != len(sequences):
        raise RetrievalError(f"exclude has {len(exclude)} entries for {len(sequences)} queries")
    k = database.config["k"] if k is None else k
    cluster_of = {entry["id"]: entry.get("cluster") for entry in database.entries}
    excluded = []
    for item in exclude:
        ids = {item} if isinstance(item, str) else set(item or ())
        clusters = {cluster_of.get(i) for i in ids} - {None} if exclude_same_cluster else set()
        excluded.append(ids | {i for i, c in cluster_of.items() if c in clusters})
    if field is not None:
        return _search_without(database.field_view(field), sequences, excluded, k, max_identity)
    if database.config.get("per_field"):
        return merge_field_neighbours([_search_without(view, sequences, excluded, k, max_identity)
                                       for view in database.field_views().values()], len(sequences))
    return _search_without(database, sequences, excluded, k, max_identity)


def _search_without(database: RetrievalDatabase, sequences: list[str], excluded: list[set], k: int,
                    max_identity: float | None) -> list[list[dict]]:
    """`search_excluding` once the excluded ids of each query are known (cluster mates included)."""
    # Over-fetch, so that k remain after the exclusions and the identity cap.
    fetch = k + max((len(ids) for ids in excluded), default=0) + (50 if max_identity is not None else 0)
    found = database.search(sequences, k=fetch)
    kept = [[n for n in neighbours if n["id"] not in ids and (max_identity is None or n["identity"] <= max_identity)][:k]
            for neighbours, ids in zip(found, excluded)]
    if database.config.get("fallback") == "composition":
        empty = [i for i, neighbours in enumerate(kept) if not neighbours]
        # Every homolog of these queries (E <= max_evalue) was excluded or above the cap, and none may come back by
        # composition: block them all. A query whose search hit the over-fetch limit is searched again without it.
        truncated = [i for i in empty if len(found[i]) >= fetch]
        for i, neighbours in zip(truncated, database.search([sequences[i] for i in truncated], k=len(database))):
            found[i] = neighbours
        blocked = [excluded[i] | {n["id"] for n in found[i]} for i in empty]
        for i, neighbours in zip(empty, database.composition_neighbours([sequences[i] for i in empty], k=k,
                                                                        exclude=blocked)):
            kept[i] = neighbours
    return kept


def build_database(rows, spec: dict, sources: list[str]) -> RetrievalDatabase:
    """The retrieval database of every training protein, with the answers of `spec['fields']` as annotations."""
    fields = tuple(spec.get("fields") or DEFAULT_FIELDS)
    config = {"k": spec.get("k", 3), "max_evalue": spec.get("max_evalue", 0.01),
              "max_annotation_chars": spec.get("max_annotation_chars", 160), "fallback": spec.get("fallback"),
              "per_field": bool(spec.get("per_field", False)),
              **({"task_fields": dict(spec["task_fields"])} if spec.get("task_fields") else {}),
              "sources": list(sources),
              "training": {"max_identity": spec.get("max_identity", 0.3),
                           "exclusion": spec.get("exclusion", "leave_one_out")}}
    database = database_from_records(database_records(rows, fields), config)
    # Proteins without any annotation of `fields` (yes/no only) stay: they count as neighbours of nothing useful.
    database.entries = [e for e in database.entries if e["annotations"]]
    return database


def training_neighbours(database: RetrievalDatabase, proteins: dict[str, str], spec: dict,
                        field: str | None = None) -> dict[str, list[dict]]:
    """`{protein id: neighbours}` for training proteins `{id: sequence}`, leave-one-out and identity-capped; with
    `field`, among the proteins carrying that field."""
    ids = list(proteins)
    exclusion = spec.get("exclusion", "leave_one_out")
    if exclusion not in EXCLUSIONS:
        raise ValueError(f"model.retrieval.exclusion must be one of {EXCLUSIONS}, got {exclusion!r}")
    found = search_excluding(database, [proteins[i] for i in ids], exclude=[[i] for i in ids],
                             max_identity=spec.get("max_identity", 0.3), exclude_same_cluster=exclusion == "cluster",
                             field=field)
    return dict(zip(ids, found))


def add_neighbours(dataset, database: RetrievalDatabase, spec: dict):
    """`dataset` with a neighbours block after every protein of every user message; returns `(dataset, stats)`.

    With `task_fields` in the database config, a row's proteins are searched among the carriers of its task's field;
    the stats then count (protein, field) searches.
    """
    proteins: dict[str | None, dict[str, str]] = {}  # asked field (None: any) -> {protein id: sequence}
    for row in dataset:
        field = database.field_for_task(row.get("task"))
        for protein in row.get("proteins") or []:
            if protein.get("sequence"):
                proteins.setdefault(field, {}).setdefault(protein_key(protein), protein["sequence"])
    by_sequence, neighbours = {}, {}  # (field, sequence) -> neighbours; (field, protein id) -> neighbours
    for field, group in proteins.items():
        found = training_neighbours(database, group, spec, field=field)
        for key, sequence in group.items():
            by_sequence.setdefault((field, sequence), found[key])
            neighbours[(field, key)] = found[key]

    def with_blocks(row):
        field = database.field_for_task(row.get("task"))
        messages = []
        for message in row["messages"]:
            content = message["content"]
            if message["role"] != "user" or isinstance(content, str) or any(b.get("type") == "neighbours" for b in content):
                messages.append(message)
                continue
            blocks = []
            for block in content:
                blocks.append(block)
                if block.get("type") == "protein" and block.get("sequence"):
                    found = by_sequence.get((field, block["sequence"].strip().upper()),
                                            by_sequence.get((field, block["sequence"]), []))
                    rendered = database.neighbours_block(found)["text"]
                    # Same keys as the other blocks, so the Arrow schema of `messages` is unchanged.
                    blocks.append({**{k: None for k in block}, "type": "neighbours", "text": rendered})
            messages.append({**message, "content": blocks})
        return {"messages": messages}

    dataset = dataset.map(with_blocks, desc="adding retrieved neighbours")
    counts = [len(v) for v in neighbours.values()]
    # Searches that fell back to composition for some neighbour (with per_field: for some field, not only the first).
    by_composition = sum(1 for v in neighbours.values() if any(n.get("method") == "composition" for n in v))
    stats = {"proteins": len(counts), "with_neighbours": sum(1 for c in counts if c),
             **({"with_composition_neighbours": by_composition} if database.config.get("fallback") else {}),
             "mean_neighbours": round(sum(counts) / max(len(counts), 1), 2),
             "max_identity": spec.get("max_identity", 0.3), "exclusion": spec.get("exclusion", "leave_one_out")}
    return dataset, stats


def attach_retrieval(processor, dataset, spec: dict, sources: list[str], seed: int = 0):
    """Build the database from `dataset`, give it to `processor` (saved with every model folder), add neighbours.

    With `spec["train_rows"]`, the returned dataset is a seeded sample of that many rows (neighbours are searched
    for those only); the database is built from every row either way.
    """
    database = build_database(dataset, spec, sources)
    train_rows = spec.get("train_rows")
    if train_rows is not None:
        if not isinstance(train_rows, int) or isinstance(train_rows, bool) or train_rows <= 0:
            raise ValueError(f"model.retrieval.train_rows must be a positive integer, got {train_rows!r}")
        if train_rows < len(dataset):
            dataset = dataset.shuffle(seed=seed).select(range(train_rows))
    dataset, stats = add_neighbours(dataset, database, spec)
    database.config["training"].update(stats)
    processor.retrieval_database = database
    logger.info("retrieval: database of %d proteins; training neighbours %s", len(database), stats)
    return dataset, stats
