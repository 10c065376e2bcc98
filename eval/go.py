"""GO term scoring by the field's convention: per ontology (BP / MF / CC), by term id, CAFA's protein-centric Fmax
next to micro F1, with propagation to ancestors when an ontology file (OBO) is given.

Parsing an answer (model text, a baseline's output or a predictions file) into terms:

* items are separated by ``;`` or new lines (GO names contain commas, so commas do not separate);
* an item may end with a confidence in parentheses with a decimal point, ``"GO:0005634 (0.83)"`` or
  ``"nucleus (0.83)"``, in [0, 1]; an item without one has score 1.0 (a set predictor). ``(1)`` is not a score:
  names such as "... catalytic core F(1)" end that way;
* every ``GO:NNNNNNN`` in an item is a term (alternative ids map to their primary id when the OBO is given);
* an item without an id is a term name: lower-cased, whitespace collapsed, final period dropped, and looked up in
  the term dictionary. The dictionary holds every (id, name, ontology) of the GO annotations in ``--data`` and
  ``--train`` (term names, not which protein has which term: no label leaks) plus, with ``--go_obo``, every name
  and EXACT synonym of the ontology. A name found nowhere stays a label of its own (``name:<text>``): it counts as
  a false positive in the pooled scores and, having no known ontology, in none of the per-ontology ones (counted).

Scores (``metrics.json`` keys; ``<o>`` is ``bp``, ``mf`` or ``cc``):

* ``precision``, ``recall``, ``f1``, ``exact_match``: micro over all labels of all ontologies pooled, by id,
  every term the predictor named (whatever its score);
* ``<o>_micro_precision``, ``<o>_micro_recall``, ``<o>_micro_f1``: the same restricted to ontology ``<o>``, over
  the proteins with a true term in ``<o>``;
* ``<o>_fmax`` (CAFA protein-centric, Radivojac et al. 2013; Zhou et al. 2019): over the proteins with a true term
  in ``<o>`` (n_e), for each threshold t in 0.01, 0.02, ..., 1.00,
  ``pr(t)`` = mean over the m(t) proteins with at least one term scored >= t of |P(t) & T| / |P(t)|,
  ``rc(t)`` = mean over all n_e proteins of |P(t) & T| / |T|, ``F(t) = 2 pr rc / (pr + rc)``; Fmax = max_t F(t)
  (``<o>_fmax_threshold`` the argmax, ``<o>_coverage`` = m(t*) / n_e). For a predictor that gives a set with no
  scores every term has score 1.0, so every threshold gives the same set and Fmax is F at that single threshold.

Propagation (only with an OBO file): true terms gain all their ancestors along ``is_a`` and ``part_of``; a
predicted ancestor gets the highest score of its predicted descendants (CAFA); the three roots are then removed
(they are always true). Without an OBO nothing is propagated and the report says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ASPECTS = ("bp", "mf", "cc")
ASPECT_OF_KEY = {"BP": "bp", "MF": "mf", "CC": "cc", "P": "bp", "F": "mf", "C": "cc", "biological_process": "bp",
                 "molecular_function": "mf", "cellular_component": "cc"}
ROOTS = {"GO:0008150", "GO:0003674", "GO:0005575"}
THRESHOLDS = np.round(np.arange(1, 101) / 100.0, 2)  # CAFA's grid, shape (100,)
GO_ID = re.compile(r"GO[:_](\d{7})", re.IGNORECASE)
_SCORE = re.compile(r"\(\s*((?:0|1)?\.\d+)\s*\)\s*$")
NOT_PROPAGATED = "GO terms not propagated: no ontology file (pass --go_obo go-basic.obo to propagate to ancestors)."


def normalize_name(name) -> str:
    return re.sub(r"\s+", " ", str(name or "")).strip().strip(".").strip().lower()


class GeneOntology:
    """The terms of an OBO file: ``aspect`` and ``name`` per id, parents along ``is_a`` and ``part_of``."""

    def __init__(self, path):
        self.path = str(path)
        self.aspect: dict[str, str] = {}
        self.name: dict[str, str] = {}
        self.synonyms: dict[str, list[str]] = {}
        self.parents: dict[str, set] = {}
        self.alt_id: dict[str, str] = {}
        self.obsolete: set = set()
        self._ancestors: dict[str, frozenset] = {}
        term = None
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, 1):
                line = raw.split(" ! ")[0].strip()
                if line.startswith("["):
                    term = None
                    if line == "[Term]":
                        term = {}
                    continue
                if term is None or ":" not in line:
                    continue
                key, value = (part.strip() for part in line.split(":", 1))
                if key == "id":
                    term["id"] = value
                    self.parents.setdefault(value, set())
                    continue
                if "id" not in term:
                    raise ValueError(f"{path}:{number}: '{key}' before the term's id line")
                tid = term["id"]
                if key == "name":
                    self.name[tid] = value
                elif key == "namespace":
                    if value not in ASPECT_OF_KEY:
                        raise ValueError(f"{path}:{number}: unknown namespace {value!r} of {tid}")
                    self.aspect[tid] = ASPECT_OF_KEY[value]
                elif key == "is_a":
                    self.parents[tid].add(value.split()[0])
                elif key == "relationship" and value.split()[0] == "part_of":
                    self.parents[tid].add(value.split()[1])
                elif key == "alt_id":
                    self.alt_id[value] = tid
                elif key == "is_obsolete" and value == "true":
                    self.obsolete.add(tid)
                elif key == "synonym" and " EXACT" in value and value.startswith('"'):
                    self.synonyms.setdefault(tid, []).append(value[1:].split('"')[0])
        if not self.parents:
            raise ValueError(f"{path}: no [Term] stanza with an id: not an OBO file")

    def primary(self, term: str) -> str:
        return self.alt_id.get(term, term)

    def ancestors(self, term: str) -> frozenset:
        """``term`` and every ancestor along is_a / part_of (an unknown id: itself only); memoised per term."""
        if term not in self._ancestors:
            seen, stack = {term}, [term]
            while stack:
                for parent in self.parents.get(stack.pop(), ()):
                    if parent not in seen:
                        seen.add(parent)
                        stack.append(parent)
            self._ancestors[term] = frozenset(seen)
        return self._ancestors[term]


class GOVocabulary:
    """Term dictionary for parsing and the ontology of each term; optional ontology for propagation."""

    def __init__(self, ontology: GeneOntology | None = None):
        self.ontology = ontology
        self.aspect: dict[str, str] = dict(ontology.aspect) if ontology else {}
        self.by_name: dict[str, str] = {}
        if ontology:
            for tid, name in ontology.name.items():
                if tid not in ontology.obsolete:
                    self.by_name.setdefault(normalize_name(name), tid)
            for tid, names in ontology.synonyms.items():
                for name in names:
                    self.by_name.setdefault(normalize_name(name), tid)

    def add(self, term_id, name=None, aspect=None):
        if not term_id:
            return
        term_id = self.canonical(term_id)
        if aspect in ASPECT_OF_KEY:
            self.aspect.setdefault(term_id, ASPECT_OF_KEY[aspect])
        if name:
            self.by_name.setdefault(normalize_name(name), term_id)

    def add_examples(self, examples):
        """Learn (id, name, ontology) from go_terms examples whose meta has ``go_ids`` (and ``aspects``)."""
        for ex in examples:
            meta = ex.get("meta") or {}
            ids = meta.get("go_ids") or []
            if ex.get("task") != "go_terms" or not ids:
                continue
            aspects = meta.get("aspects") or [None] * len(ids)
            names = meta.get("go_names") or [None] * len(ids)
            for tid, aspect, name in zip(ids, aspects, names):
                self.add(tid, name, aspect)
        return self

    def canonical(self, term_id: str) -> str:
        m = GO_ID.fullmatch(str(term_id).strip())
        term = f"GO:{m.group(1)}" if m else str(term_id).strip()
        return self.ontology.primary(term) if self.ontology else term

    def parse(self, text) -> tuple[dict[str, float], int]:
        """``{label: score}`` of an answer (module docstring) and the number of items that matched no known term."""
        from .scoring import as_text

        if isinstance(text, (list, tuple)):
            text = "; ".join(as_text(t) for t in text)
        terms: dict[str, float] = {}
        unknown = 0
        for item in re.split(r"[;\n]", as_text(text)):
            item = item.strip()
            if not item:
                continue
            score = 1.0
            m = _SCORE.search(item)
            if m and float(m.group(1)) <= 1.0:
                score, item = float(m.group(1)), item[: m.start()].strip()
            ids = [self.canonical(f"GO:{d}") for d in GO_ID.findall(item)]
            if not ids:
                name = normalize_name(item)
                if not name:
                    continue
                if name in self.by_name:
                    ids = [self.by_name[name]]
                else:
                    ids, unknown = [f"name:{name}"], unknown + 1
            for tid in ids:
                terms[tid] = max(score, terms.get(tid, 0.0))
        return terms, unknown

    def reference(self, example) -> set:
        """True labels of an example: ``meta['go_ids']`` when present, else its reference text parsed."""
        ids = (example.get("meta") or {}).get("go_ids")
        if ids:
            return {self.canonical(t) for t in ids if t}
        return set(self.parse(example.get("reference"))[0])

    def propagate(self, terms: dict[str, float]) -> dict[str, float]:
        """Ancestors get the highest score of their descendants; roots dropped. Identity without an ontology."""
        if not self.ontology:
            return terms
        out: dict[str, float] = {}
        for tid, score in terms.items():
            for anc in (self.ontology.ancestors(tid) if tid.startswith("GO:") else (tid,)):
                if anc not in ROOTS and score > out.get(anc, -1.0):
                    out[anc] = score
        return out

    def aspect_of(self, term: str) -> str | None:
        return self.aspect.get(term)

    def note(self) -> str:
        if self.ontology:
            return (f"GO terms propagated to ancestors (is_a, part_of) with {self.ontology.path}; the three roots "
                    "are excluded.")
        return NOT_PROPAGATED


class GOScores:
    """Per-example statistics of one predictor on go_terms; ``values(idx)`` scores any subset (bootstrap-ready).

    Arrays: ``micro[o]`` (n, 3) = [tp, n_pred, n_true] per example; ``prec[o]``, ``has[o]``, ``rec[o]`` (n, T) the
    per-threshold precision term, has-a-prediction flag and recall term; ``bench[o]`` (n,) whether the example has a
    true term in ontology ``o``.
    """

    def __init__(self, predictions, examples, vocabulary: GOVocabulary):
        self.vocabulary = vocabulary
        self.n = len(examples)
        T = len(THRESHOLDS)
        self.pooled = np.zeros((self.n, 3))
        self.exact = np.zeros(self.n)
        self.micro = {o: np.zeros((self.n, 3)) for o in ASPECTS}
        self.prec = {o: np.zeros((self.n, T)) for o in ASPECTS}
        self.has = {o: np.zeros((self.n, T)) for o in ASPECTS}
        self.rec = {o: np.zeros((self.n, T)) for o in ASPECTS}
        self.bench = {o: np.zeros(self.n) for o in ASPECTS}
        self.counts = {"go_unknown_names": 0, "go_terms_without_ontology": 0, "go_predictions_with_scores": 0}
        for i, (pred, ex) in enumerate(zip(predictions, examples)):
            terms, unknown = vocabulary.parse(pred)
            self.counts["go_unknown_names"] += unknown
            self.counts["go_predictions_with_scores"] += any(s < 1.0 for s in terms.values())
            terms = vocabulary.propagate(terms)
            truth = set(vocabulary.propagate({t: 1.0 for t in vocabulary.reference(ex)}))
            predicted = set(terms)
            self.pooled[i] = (len(predicted & truth), len(predicted), len(truth))
            self.exact[i] = float(predicted == truth)
            self.counts["go_terms_without_ontology"] += sum(1 for t in predicted if vocabulary.aspect_of(t) is None)
            for o in ASPECTS:
                true_o = {t for t in truth if vocabulary.aspect_of(t) == o}
                if not true_o:
                    continue  # CAFA: a protein counts for an ontology only when it has a true term there
                self.bench[o][i] = 1.0
                pred_o = {t: s for t, s in terms.items() if vocabulary.aspect_of(t) == o}
                self.micro[o][i] = (len(set(pred_o) & true_o), len(pred_o), len(true_o))
                if not pred_o:
                    continue
                names = list(pred_o)
                scores = np.array([pred_o[t] for t in names])  # (P,)
                hit = np.array([t in true_o for t in names], dtype=float)  # (P,)
                kept = scores[None, :] >= THRESHOLDS[:, None] - 1e-9  # (T, P)
                n_kept = kept.sum(1)  # (T,)
                tp = (kept * hit[None, :]).sum(1)  # (T,)
                self.has[o][i] = n_kept > 0
                self.prec[o][i] = np.where(n_kept > 0, tp / np.maximum(n_kept, 1), 0.0)
                self.rec[o][i] = tp / len(true_o)
        for o in ASPECTS:
            self.counts[f"{o}_benchmark_proteins"] = int(self.bench[o].sum())

    def notes(self) -> list[str]:
        no_scores = ("GO: a predictor whose go_predictions_with_scores count is 0 gives a set per protein with no "
                     "scores; its Fmax is F at the single threshold.")
        return [self.vocabulary.note(), no_scores]

    @staticmethod
    def _micro(c):  # c (..., 3) summed [tp, n_pred, n_true]
        tp, npred, ntrue = c[..., 0], c[..., 1], c[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(npred > 0, tp / np.maximum(npred, 1e-300), 0.0)
            r = np.where(ntrue > 0, tp / np.maximum(ntrue, 1e-300), 0.0)
            f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
        return p, r, f

    def weighted(self, W: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics for example weights ``W`` (B, n) (how often each example is drawn); each value has shape (B,)."""
        out: dict[str, np.ndarray] = {}
        p, r, f = self._micro(W @ self.pooled)
        out.update(precision=p, recall=r, f1=f, exact_match=(W @ self.exact) / np.maximum(W.sum(1), 1e-300))
        for o in ASPECTS:
            n_e = W @ self.bench[o]  # (B,)
            if not self.bench[o].any():
                continue
            p, r, f = self._micro(W @ self.micro[o])
            out[f"{o}_micro_precision"], out[f"{o}_micro_recall"], out[f"{o}_micro_f1"] = p, r, f
            m = W @ self.has[o]  # (B, T)
            with np.errstate(divide="ignore", invalid="ignore"):
                pr = np.where(m > 0, (W @ self.prec[o]) / np.maximum(m, 1e-300), 0.0)
                rc = np.where(n_e[:, None] > 0, (W @ self.rec[o]) / np.maximum(n_e[:, None], 1e-300), 0.0)
                F = np.where(pr + rc > 0, 2 * pr * rc / np.maximum(pr + rc, 1e-300), 0.0)  # (B, T)
            best = F.argmax(1)
            rows = np.arange(len(best))
            out[f"{o}_fmax"] = F[rows, best]
            out[f"{o}_fmax_threshold"] = THRESHOLDS[best]
            out[f"{o}_coverage"] = np.where(n_e > 0, m[rows, best] / np.maximum(n_e, 1e-300), 0.0)
        return out


def load_vocabulary(examples, go_obo=None) -> GOVocabulary:
    """The term dictionary of the examples (``--data`` and ``--train``), with the ontology of ``go_obo`` if given."""
    if go_obo is not None and not Path(go_obo).is_file():
        raise ValueError(f"--go_obo {go_obo}: no such file")
    return GOVocabulary(GeneOntology(go_obo) if go_obo else None).add_examples(examples)
