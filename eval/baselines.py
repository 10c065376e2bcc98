"""Baselines that answer through the same :class:`eval.generate.Predictor` interface.

* :class:`MostCommon`: the most frequent reference string of the training examples of the same
  task (ties broken by first appearance), the same answer for every test example.
* :class:`Retrieval`: MMseqs2 nearest neighbour (``data.mmseqs.easy_search``, the real binary,
  best bit score) of the test protein among the training proteins of the same task; the
  neighbour's reference is copied. No hit -> the most-common answer (counted as ``no_hit``).
  Examples with several proteins use the first one.
* :class:`ShuffledProteins`: wraps any predictor and gives each example another example's
  proteins (a seeded derangement over the whole evaluation set): does the model use the protein?
"""

from __future__ import annotations

import random
from collections import Counter


def _first_seq(ex) -> str | None:
    for p in ex.get("proteins") or []:
        if p.get("sequence"):
            return str(p["sequence"]).strip().upper()
    return None


class MostCommon:
    name = "most_common"

    def __init__(self, train_examples: list[dict]):
        by_task: dict[str, Counter] = {}
        for ex in train_examples:
            ref = ex.get("reference")
            if ref is None or str(ref).strip() == "":
                continue
            by_task.setdefault(ex["task"], Counter())[str(ref)] += 1
        self.answers = {t: c.most_common(1)[0][0] for t, c in by_task.items()}
        self.counts = {t: c.most_common(1)[0][1] for t, c in by_task.items()}

    def predict(self, examples):
        return [self.answers.get(ex["task"], "") for ex in examples]

    def settings(self):
        return {"answers": self.answers}


class Retrieval:
    """MMseqs2 nearest-neighbour retrieval; ``identity`` keeps the nearest identity per test id."""

    name = "retrieval"

    def __init__(self, train_examples: list[dict], threads: int = 1, sensitivity: float | None = None,
                 exclude_same_id: bool = True):
        self.train = {}
        for ex in train_examples:
            seq = _first_seq(ex)
            ref = ex.get("reference")
            if seq and ref is not None and str(ref).strip():
                self.train.setdefault(ex["task"], {})[ex["id"]] = (seq, str(ref))
        self.fallback = MostCommon(train_examples)
        self.threads = threads
        self.sensitivity = sensitivity
        self.exclude_same_id = exclude_same_id
        self.identity: dict[str, float] = {}
        self.neighbour: dict[str, str | None] = {}
        self.no_hit = 0

    def settings(self):
        from data.mmseqs import mmseqs_version

        return {"tool": "mmseqs easy-search", "mmseqs_version": mmseqs_version(), "sensitivity": self.sensitivity,
                "rank": "best bit score", "fallback": "most_common", "exclude_same_id": self.exclude_same_id}

    def predict(self, examples):
        from data.mmseqs import easy_search

        out = {}
        by_task: dict[str, list] = {}
        for ex in examples:
            by_task.setdefault(ex["task"], []).append(ex)
        from structure_protllm import clean_sequence

        for ex in examples:  # a query MMseqs2 cannot search must not quietly get the most-common answer
            sequence = next((p.get("sequence") for p in ex.get("proteins") or [] if p.get("sequence") is not None), None)
            try:
                clean_sequence(sequence, f"retrieval: example {ex['id']}", ValueError)
            except ValueError as error:
                raise ValueError(f"{error} (python -m eval refuses such rows before predicting)") from None
        for task, exs in by_task.items():
            targets = self.train.get(task, {})
            queries = {ex["id"]: s for ex in exs if (s := _first_seq(ex))}
            best: dict[str, dict] = {}
            if queries and targets:
                hits = easy_search(queries, {k: v[0] for k, v in targets.items()}, threads=self.threads,
                                   sensitivity=self.sensitivity)
                for h in hits:  # best-first per query
                    if self.exclude_same_id and h["target"] == h["query"]:
                        continue
                    best.setdefault(h["query"], h)
            fb = self.fallback.answers.get(task, "")
            for ex in exs:
                h = best.get(ex["id"])
                if h is None:
                    self.no_hit += 1
                    self.identity[ex["id"]] = 0.0
                    self.neighbour[ex["id"]] = None
                    out[ex["id"]] = fb
                else:
                    self.identity[ex["id"]] = h["identity"]
                    self.neighbour[ex["id"]] = h["target"]
                    out[ex["id"]] = targets[h["target"]][1]
        return [out[ex["id"]] for ex in examples]


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation with no fixed point (Sattolo's algorithm: one n-cycle); n<2 -> identity."""
    perm = list(range(n))
    if n < 2:
        return perm
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: Sattolo
        perm[i], perm[j] = perm[j], perm[i]
    return perm


class ShuffledProteins:
    """``predictor`` run with proteins permuted across the evaluation set (seeded derangement).

    Call :meth:`fit` with all evaluation examples first (the CLI does) so the permutation does not
    depend on batching; otherwise each call deranges within its own batch.
    """

    def __init__(self, predictor, seed: int = 0):
        self.inner = predictor
        self.seed = seed
        self.name = f"{getattr(predictor, 'name', type(predictor).__name__)}+shuffled_proteins"
        self.mapping: dict[str, list] | None = None

    def fit(self, examples):
        perm = derangement(len(examples), self.seed)
        self.mapping = {ex["id"]: examples[perm[i]].get("proteins") for i, ex in enumerate(examples)}
        return self

    def settings(self):
        inner = self.inner.settings() if hasattr(self.inner, "settings") else {}
        return {"inner": inner, "shuffle_seed": self.seed, "shuffle": "derangement over the evaluation set"}

    def predict(self, examples):
        if self.mapping is None:
            perm = derangement(len(examples), self.seed)
            swapped = [{**ex, "proteins": examples[perm[i]].get("proteins")} for i, ex in enumerate(examples)]
        else:
            swapped = [{**ex, "proteins": self.mapping.get(ex["id"], ex.get("proteins"))} for ex in examples]
        return self.inner.predict(swapped)
