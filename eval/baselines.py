"""Baselines that answer through the same :class:`eval.generate.Predictor` interface.

* :class:`MostCommon`: the most frequent reference string of the training examples of the same
  task (ties broken by first appearance), the same answer for every test example.
* :class:`Retrieval`: neighbours of the test protein among the training proteins of the same task, best
  first: an exhaustive Smith-Waterman search (pyswrd, E <= 0.01) for databases up to 50,000 proteins, else
  MMseqs2 (``data.mmseqs.easy_search``, the real binary, ``-s 7.5``); ``search=`` forces either. ``retrieval``
  combines the top-k (EC: identity-weighted vote abstaining to the family level; GO: CAFA's BLAST
  baseline with scores), ``retrieval_top1`` copies the top hit's answer. No hit -> the most-common
  answer (counted as ``no_hit``); ``retrieval_composition`` instead copies the answer of the training protein
  closest in amino-acid + dipeptide composition (the fallback a model's own database can use,
  ``retrieval_protllm.composition_profiles``). Examples with several proteins use the first one.
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


# Databases up to this many proteins are searched exhaustively (`search="auto"`): every query against every target.
EXHAUSTIVE_MAX_TARGETS = 50_000
SEARCH_TOOLS = ("auto", "mmseqs2", "smith-waterman")
SMITH_WATERMAN_MAX_EVALUE = 0.01  # as the model's own retrieval database (model.retrieval.max_evalue)


def search_tool(search: str, n_targets: int) -> str:
    """The tool `search` ("auto", "mmseqs2" or "smith-waterman") means for a database of `n_targets` proteins.

    "auto" is an exhaustive Smith-Waterman search (pyswrd) up to `EXHAUSTIVE_MAX_TARGETS` proteins, MMseqs2 above:
    MMseqs2's k-mer prefilter misses most distant homologs. On the demo's test proteins (<=30% identity to
    training), at the same E <= 0.01, it found a hit for 4 to 7 proteins per task where Smith-Waterman found 17 to 23.
    """
    if search not in SEARCH_TOOLS:
        raise ValueError(f"retrieval search must be one of {SEARCH_TOOLS}, got {search!r}")
    if search == "auto":
        import importlib.util

        exhaustive = importlib.util.find_spec("pyswrd") is not None and n_targets <= EXHAUSTIVE_MAX_TARGETS
        return "smith-waterman" if exhaustive else "mmseqs2"
    return search


def describe_search(tool: str, sensitivity: float | None = None) -> str:
    """How a `search_tool` result searches, for reports and settings."""
    if tool == "mmseqs2":
        return f"MMseqs2 easy-search -s {sensitivity or 'default 5.7'}"
    return f"exhaustive Smith-Waterman, pyswrd BLOSUM62 gap 10/1, E <= {SMITH_WATERMAN_MAX_EVALUE}"


def smith_waterman_search(queries: dict[str, str], targets: dict[str, str], threads: int = 1,
                          max_evalue: float = SMITH_WATERMAN_MAX_EVALUE, max_hits: int = 300) -> list[dict]:
    """Exhaustive Smith-Waterman (pyswrd: BLOSUM62, gap 10/1) of every query against every target.

    Returns hits in `data.mmseqs.easy_search`'s shape, `{"query", "target", "identity", "evalue", "bits", "alnlen"}`,
    grouped by query in input order, best first; `bits` is the raw alignment score here (only its ratios are used).
    """
    import pyswrd

    query_ids, target_ids = list(queries), list(targets)
    found = pyswrd.search([queries[q] for q in query_ids], pyswrd.Sequences([targets[t] for t in target_ids]),
                          max_alignments=max_hits, max_evalue=max_evalue, threads=threads)
    hits = [{"query": query_ids[h.query_index], "target": target_ids[h.target_index],
             "identity": float(h.result.identity()), "evalue": float(h.evalue), "bits": float(h.score),
             "alnlen": len(h.result.alignment)}
            for h in found]
    order = {q: i for i, q in enumerate(query_ids)}
    return sorted(hits, key=lambda h: (order[h["query"]], -h["bits"], h["evalue"]))


def _search(queries: dict[str, str], targets: dict[str, str], threads: int, sensitivity, tool: str = "mmseqs2") -> list[dict]:
    """MMseqs2 or Smith-Waterman hits, memoised per (queries, targets, settings): `retrieval` and `retrieval_top1`
    in one run share one search."""
    import hashlib

    from data.mmseqs import easy_search

    key = hashlib.sha256(repr((sorted(queries.items()), sorted(targets.items()), sensitivity, tool)).encode()).hexdigest()
    if key not in _SEARCHES:
        _SEARCHES.clear()  # one search kept: enough for several retrieval predictors over the same examples
        _SEARCHES[key] = (smith_waterman_search(queries, targets, threads=threads) if tool == "smith-waterman"
                          else easy_search(queries, targets, threads=threads, sensitivity=sensitivity))
    return _SEARCHES[key]


_SEARCHES: dict[str, list] = {}


def vote_ec(neighbours: list[tuple[list[str], float]], share: float = 0.5) -> list[str]:
    """Similarity-weighted EC vote over neighbours ``[(EC numbers, weight)]``, best first.

    At the full (4-digit) level, every EC number whose neighbours hold at least ``share`` of the total weight is
    predicted. When none does (the neighbours disagree), the vote is repeated on 3-, 2- and 1-digit prefixes and the
    first level with a winner is predicted as a family (``3.1.1.-``). No winner at any level: the top hit's EC.
    """
    from .scoring import ec_prefix

    total = sum(w for _, w in neighbours)
    if not neighbours:
        return []
    if total <= 0:
        return list(neighbours[0][0])
    for level in (4, 3, 2, 1):
        votes: dict[str, float] = {}
        for labels, w in neighbours:
            for prefix in {ec_prefix(e, level) for e in labels} - {None}:
                votes[prefix] = votes.get(prefix, 0.0) + w
        won = sorted((p for p, v in votes.items() if v >= share * total - 1e-12), key=lambda p: -votes[p])
        if won:
            return [p + ".-" * (4 - level) for p in won]
    return list(neighbours[0][0])


def medoid_text(neighbours: list[tuple[str, float]]) -> str:
    """The neighbour text with the highest similarity-weighted ROUGE-L to all neighbour texts (itself included, so
    a description several neighbours share wins): the centroid description of the top-k."""
    from .scoring import rouge_per_example

    texts = [t for t, _ in neighbours]
    if len(set(texts)) == 1:
        return texts[0]
    best, best_score = texts[0], -1.0
    for candidate in dict.fromkeys(texts):
        sims = rouge_per_example([candidate] * len(texts), texts)["rougeL"]
        score = float(sum(w * s for (_, w), s in zip(neighbours, sims)))
        if score > best_score + 1e-12:
            best, best_score = candidate, score
    return best


class Retrieval:
    """Retrieval from the training examples of the same task (`search`: see :func:`search_tool`).

    ``combine=False`` (name ``retrieval_top1``): the best-bit-score hit's answer is copied.
    ``combine=True`` (name ``retrieval``): the top ``k`` hits (best bit score first, the test protein's own id
    excluded) are combined, each weighted by its identity:

    * ``ec_number``: :func:`vote_ec` over the hits whose bit score is at least ``ec_min_bits`` x the top hit's,
      weighted by bit score (abstaining to the family level when they disagree);
    * ``go_terms``: CAFA's BLAST baseline: every GO id of a neighbour, scored by the highest identity of a
      neighbour that carries it (``"GO:0005634 (0.83); ..."``, so Fmax sweeps a real threshold);
    * ``yes_no`` / ``function_mcqa``: the answer with the most weight. A yes/no question that names its label
      (``meta.label``, e.g. "a transferase", as `data.build_demo` writes) is answered from the training rows that
      ask about the same label only: a neighbour's yes/no to another question says nothing about this one
      (question-blind, the demo's yes/no retrieval scored 0.43; same-label, 0.69 with the composition fallback);
    * free text (``function_text``, ``protein_name``, ``reaction``, ``keywords``): ``text_combine='top1'`` (default:
      the top hit, which the centroid did not beat on the yeast valid split, see eval/README.md) or ``'medoid'``
      (:func:`medoid_text`).

    A test protein with no hit predicts the most-common training answer of the task (counted in ``no_hit``), or with
    ``fallback="composition"`` (name ``retrieval_composition``) the answer of the training protein of the task
    closest in composition (cosine of ``retrieval_protllm.composition_profiles``).
    ``identity`` / ``neighbour`` keep the top hit per test id.
    """

    def __init__(self, train_examples: list[dict], threads: int = 1, sensitivity: float | None = None,
                 exclude_same_id: bool = True, combine: bool = True, k: int = 10, share: float = 0.5,
                 text_combine: str = "top1", ec_min_bits: float = 0.9, search: str = "auto",
                 fallback: str = "most_common"):
        if text_combine not in ("top1", "medoid"):
            raise ValueError(f"text_combine must be 'top1' or 'medoid', got {text_combine!r}")
        if fallback not in ("most_common", "composition"):
            raise ValueError(f"fallback must be 'most_common' or 'composition', got {fallback!r}")
        self.no_hit_fallback = fallback
        search_tool(search, 0)  # a bad name fails here, before any search
        self.search = search
        self.tools: dict[str, str] = {}  # task -> the tool its search used
        self.name = ("retrieval" if combine else "retrieval_top1") + ("_composition" if fallback == "composition" else "")
        self.train = {}
        for ex in train_examples:
            seq = _first_seq(ex)
            ref = ex.get("reference")
            if seq and ref is not None and str(ref).strip():
                self.train.setdefault(ex["task"], {})[ex["id"]] = (seq, str(ref), ex.get("meta") or {})
        self.fallback = MostCommon(train_examples)
        self.threads = threads
        self.sensitivity = sensitivity
        self.exclude_same_id = exclude_same_id
        self.combine, self.k, self.share, self.text_combine = combine, (k if combine else 1), share, text_combine
        self.ec_min_bits = ec_min_bits
        self.identity: dict[str, float] = {}
        self.neighbour: dict[str, str | None] = {}
        self.no_hit = 0

    def settings(self):
        from data.mmseqs import mmseqs_version

        tools = {task: search_tool(self.search, len(targets)) for task, targets in self.train.items()}
        used = set(tools.values())
        return {"tool": "mmseqs easy-search" if used == {"mmseqs2"} else "by task",
                "search": self.search, "tool_by_task": tools,
                "smith_waterman": f"pyswrd exhaustive, BLOSUM62 gap 10/1, E <= {SMITH_WATERMAN_MAX_EVALUE}, rank by score"
                if "smith-waterman" in used else None,
                "mmseqs_version": mmseqs_version() if "mmseqs2" in used else None, "sensitivity": self.sensitivity,
                "rank": "best bit score", "fallback": self.no_hit_fallback, "exclude_same_id": self.exclude_same_id,
                "combine": self.combine, "k": self.k, "weight": "identity (EC: bit score)", "ec_share": self.share,
                "ec_min_bits": self.ec_min_bits, "text_combine": self.text_combine,
                "yes_no": "training rows with the question's label (meta.label) when they carry labels"}

    def _answer(self, task: str, hits: list[dict], targets: dict) -> str:
        """Answer from the best-first hits of one test protein (at least one)."""
        top = targets[hits[0]["target"]]
        if not self.combine or len(hits) == 1 and task != "go_terms":
            return top[1]
        weighted = [(targets[h["target"]], max(h["identity"], 1e-6)) for h in hits]
        if task == "ec_number":
            from .scoring import parse_ec

            # chosen on CLEAN split10 leave-one-out (eval/README.md): bit-score weights, hits within 90% of the top bits
            close = [(parse_ec(targets[h["target"]][1]), h["bits"]) for h in hits if h["bits"] >= self.ec_min_bits * hits[0]["bits"]]
            return "; ".join(vote_ec(close, self.share))
        if task == "go_terms":
            from .scoring import split_labels

            scores: dict[str, float] = {}
            for (_, ref, meta), w in weighted:
                for term in meta.get("go_ids") or split_labels(ref):
                    scores[term] = max(scores.get(term, 0.0), min(w, 1.0))
            return "; ".join(f"{t} ({s:.3f})" for t, s in sorted(scores.items(), key=lambda x: (-x[1], x[0])))
        if task in ("yes_no", "function_mcqa"):
            votes: dict[str, float] = {}
            for (_, ref, _), w in weighted:
                votes[ref] = votes.get(ref, 0.0) + w
            return max(votes, key=lambda r: votes[r])  # ties: the first (best) neighbour's answer
        if self.text_combine == "medoid":
            return medoid_text([(ref, w) for (_, ref, _), w in weighted])
        return top[1]

    def predict(self, examples):
        out = {}
        from processing_protllm import clean_residues

        for ex in examples:  # a query MMseqs2 cannot search must not quietly get the most-common answer
            sequence = next((p.get("sequence") for p in ex.get("proteins") or [] if p.get("sequence") is not None), None)
            try:
                clean_residues(sequence, f"retrieval: example {ex['id']}")
            except ValueError as error:
                raise ValueError(f"{error} (python -m eval refuses such rows before predicting)") from None
        for (task, label), exs in self._groups(examples).items():
            targets = self.train.get(task, {})
            if label is not None:
                targets = {t: v for t, v in targets.items() if _yes_no_label(v[2]) == label}
            queries = {ex["id"]: s for ex in exs if (s := _first_seq(ex))}
            kept: dict[str, list] = {}
            self.tools[task] = search_tool(self.search, len(targets))
            if queries and targets:
                for h in _search(queries, {k: v[0] for k, v in targets.items()}, self.threads, self.sensitivity,
                                 self.tools[task]):
                    if self.exclude_same_id and h["target"] == h["query"]:
                        continue  # best-first per query
                    if len(kept.setdefault(h["query"], [])) < self.k:
                        kept[h["query"]].append(h)
            fb = self.fallback.answers.get(task, "") if label is None else _most_common([v[1] for v in targets.values()])
            closest = self._closest_in_composition(targets, [ex for ex in exs if not kept.get(ex["id"]) and ex["id"] in queries],
                                                   queries) if self.no_hit_fallback == "composition" else {}
            for ex in exs:
                hits = kept.get(ex["id"])
                if not hits:
                    self.no_hit += 1
                    self.identity[ex["id"]] = 0.0
                    self.neighbour[ex["id"]] = None
                    out[ex["id"]] = targets[closest[ex["id"]]][1] if ex["id"] in closest else fb
                else:
                    self.identity[ex["id"]] = hits[0]["identity"]
                    self.neighbour[ex["id"]] = hits[0]["target"]
                    out[ex["id"]] = self._answer(task, hits, targets)
        return [out[ex["id"]] for ex in examples]

    def _groups(self, examples: list[dict]) -> dict[tuple[str, str | None], list[dict]]:
        """Examples by `(task, label)`: the label of a yes/no question whose training rows carry labels, else None."""
        groups: dict[tuple[str, str | None], list[dict]] = {}
        trained = {_yes_no_label(meta) for _, _, meta in self.train.get("yes_no", {}).values()}
        for ex in examples:
            label = _yes_no_label(ex.get("meta")) if ex["task"] == "yes_no" else None
            if label not in trained:
                label = None  # no training row asks about it: every yes/no row is all there is
            groups.setdefault((ex["task"], label), []).append(ex)
        return groups

    def _closest_in_composition(self, targets: dict, exs: list[dict], queries: dict[str, str]) -> dict[str, str]:
        """`{test id: training id}`: the training protein of `targets` most similar in composition (itself excluded)."""
        import numpy as np

        from retrieval_protllm import composition_profiles

        if not exs or not targets:
            return {}
        target_ids = list(targets)
        similarity = composition_profiles([queries[ex["id"]] for ex in exs]) @ composition_profiles(
            [targets[t][0] for t in target_ids]).T
        if self.exclude_same_id:
            column = {t: j for j, t in enumerate(target_ids)}
            for row, ex in enumerate(exs):
                if ex["id"] in column:
                    similarity[row, column[ex["id"]]] = -np.inf
        return {ex["id"]: target_ids[int(np.argmax(similarity[row]))] for row, ex in enumerate(exs)}


def _yes_no_label(meta) -> str | None:
    """The label a yes/no row asks about (`meta.label`, lower case), or None."""
    label = meta.get("label") if isinstance(meta, dict) else None
    return str(label).strip().lower() if label else None


def _most_common(answers: list[str]) -> str:
    """The most frequent answer; ties go to the one seen first."""
    return Counter(answers).most_common(1)[0][0] if answers else ""


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
