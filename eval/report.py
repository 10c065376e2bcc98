"""Scores with bootstrap confidence intervals, identity-bin breakdowns, ``report.md``, plots and
``metrics.json``.

Scoring of bad input: a missing or empty prediction is scored as the empty string (wrong); an
example without a reference cannot be scored and is left out of the numbers (counted as
``missing_references``). Bootstrap: ``B`` resamples of the scored examples with replacement
(seeded), percentile 95% interval; corpus-level metrics (BLEU, CLEAN-weighted and micro F1) are
recomputed on every resample from per-example sufficient statistics.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from . import scoring as S
from .data import FAMILY, INSTRUCTIONS

IDENTITY_BINS = [(0.0, 0.3, "<30%"), (0.3, 0.5, "30-50%"), (0.5, 0.7, "50-70%"), (0.7, 0.9, "70-90%"),
                 (0.9, 1.0001, ">=90%")]
NO_HIT = "no hit"

PRIMARY = {"text": "rougeL", "short_text": "rougeL", "ec": "micro_f1", "label_set": "f1", "go": "f1",
           "mcqa": "accuracy", "yes_no": "accuracy"}
# metrics shown in the main table, in order
SHOWN = {
    "text": ["bleu2", "bleu4", "sacrebleu", "rouge1", "rouge2", "rougeL", "meteor", "bertscore_f1", "exact_match"],
    "short_text": ["exact_match", "rougeL", "bleu4"],
    "ec": ["micro_precision", "micro_recall", "micro_f1", "clean_precision", "clean_recall", "clean_f1",
           "exact_match", "level1_accuracy", "level2_accuracy", "level3_accuracy", "level4_accuracy"],
    "label_set": ["precision", "recall", "f1", "exact_match"],
    # go_terms (eval/go.py): pooled micro by id, then per ontology CAFA Fmax and micro F1
    "go": ["precision", "recall", "f1", "exact_match", "bp_fmax", "bp_micro_f1", "mf_fmax", "mf_micro_f1", "cc_fmax",
           "cc_micro_f1"],
    "mcqa": ["accuracy", "perm_all_accuracy", "perm_mean_accuracy"],
    "yes_no": ["accuracy"],
}


class TaskScorer:
    """Per-example statistics for one task and one predictor; ``values(idx)`` scores any subset."""

    def __init__(self, family: str, predictions, references, metas=None, meteor: bool = True,
                 bertscore_model: str | None = None, go_vocabulary=None):
        self.family = family
        self.preds = [S.as_text(p) for p in predictions]
        self.refs = [S.as_text(r) for r in references]
        self.metas = metas or [{} for _ in self.preds]
        self.n = len(self.preds)
        self.notes: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}  # per-example means
        self.sums: dict[str, np.ndarray] = {}  # per-example sufficient statistics
        self.counts: dict[str, int] = {"empty_predictions": sum(1 for p in self.preds if not p.strip())}
        self.go_vocabulary = go_vocabulary
        getattr(self, f"_prep_{family}")(meteor, bertscore_model)

    # ---- preparation per family
    def _prep_text(self, meteor, bertscore_model, short=False):
        toks = [(S.word_tokens(p), S.word_tokens(r)) for p, r in zip(self.preds, self.refs)]
        self.sums["bleu"] = np.array([S.bleu_stats(p, r) for p, r in toks]).reshape(-1, 10)
        if not short:
            self.sums["sacrebleu"] = S.sacrebleu_stats(self.preds, self.refs).reshape(-1, 10) if self.n else np.zeros((0, 10))
        self.arrays.update(S.rouge_per_example(self.preds, self.refs))
        self.arrays["exact_match"] = np.array([S.normalize_text(p) == S.normalize_text(r) for p, r in
                                               zip(self.preds, self.refs)], dtype=float)
        if short:
            return
        if meteor:
            ok, msg = S.meteor_available()
            if ok:
                self.arrays["meteor"] = S.meteor_per_example(self.preds, self.refs)
            else:
                self.notes.append(msg)
        if bertscore_model:
            try:
                self.arrays.update(S.bertscore_per_example(self.preds, self.refs, bertscore_model))
            except RuntimeError as exc:
                self.notes.append(str(exc))
        else:
            self.notes.append("BERTScore skipped: no local scoring model given (--bertscore_model PATH).")

    def _prep_short_text(self, meteor, bertscore_model):
        self._prep_text(meteor, bertscore_model, short=True)

    def _prep_ec(self, meteor, bertscore_model):
        ps = [S.parse_ec(p) for p in self.preds]
        ts = [S.parse_ec(r) for r in self.refs]
        self.counts["unparseable"] = sum(1 for p in ps if not p)
        self.sums["micro"] = S.micro_prf_counts(ps, ts)
        self.arrays["exact_match"] = np.array([set(p) == set(t) for p, t in zip(ps, ts)], dtype=float)
        for lvl in range(1, 5):
            self.arrays[f"level{lvl}_accuracy"] = np.array([S.ec_level_correct(p, t, lvl) for p, t in zip(ps, ts)],
                                                           dtype=float)
        self._wprf = S.WeightedPRF(ps, ts)

    def _prep_label_set(self, meteor, bertscore_model):
        ps = [S.split_labels(p) for p in self.preds]
        ts = [S.split_labels(r) for r in self.refs]
        self.sums["micro"] = S.micro_prf_counts(ps, ts)
        self.arrays["exact_match"] = np.array([set(p) == set(t) for p, t in zip(ps, ts)], dtype=float)

    def _prep_go(self, meteor, bertscore_model):
        from .go import GOScores, load_vocabulary

        examples = [{"task": "go_terms", "reference": r, "meta": m} for r, m in zip(self.refs, self.metas)]
        vocabulary = self.go_vocabulary or load_vocabulary(examples)
        self._go = GOScores(self.preds, examples, vocabulary)
        self.counts.update(self._go.counts)
        self.notes.extend(self._go.notes())

    def _prep_choice(self, kind):
        opts = [m.get("options") for m in self.metas]
        opts = [o if isinstance(o, (list, tuple)) else (list(o.values()) if isinstance(o, dict) else None) for o in opts]
        refs = []
        for r, m in zip(self.refs, self.metas):
            if kind == "yes_no":
                # meta["label"] of yes/no rows is the property asked about ("a transferase"), not the answer
                refs.append(m.get("answer") or r)
            else:
                refs.append(m.get("correct") or m.get("answer_letter") or r)
        groups = [m.get("group") or m.get("question_id") or None for m in self.metas]
        res = S.choice_accuracy(self.preds, refs, kind=kind, options=opts if any(opts) else None,
                                groups=groups if all(g is not None for g in groups) and groups else None)
        self.counts["unparseable"] = res["unparseable"]
        self.arrays["accuracy"] = np.array(res["per_example"], dtype=float)
        self.fixed = {k: res[k] for k in ("perm_all_accuracy", "perm_mean_accuracy") if k in res}

    def _prep_mcqa(self, meteor, bertscore_model):
        self._prep_choice("mcqa")

    def _prep_yes_no(self, meteor, bertscore_model):
        self._prep_choice("yes_no")

    # ---- scoring
    def values(self, idx=None) -> dict[str, float]:
        idx = np.arange(self.n) if idx is None else np.asarray(idx, dtype=int)
        if len(idx) == 0:
            return {}
        out = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in self.resampled(idx[None, :]).items()}
        if len(idx) == self.n and getattr(self, "fixed", None):
            out.update(self.fixed)
        return out

    def bootstrap(self, B: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
        if self.n == 0 or B <= 0:
            return {}
        draws: dict[str, list] = {}
        for I in resample_indices(self.n, B, seed):
            for k, v in self.resampled(I).items():
                draws.setdefault(k, []).append(np.asarray(v))
        out = {}
        for k, parts in draws.items():
            v = np.concatenate(parts)
            out[k] = (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2)))
        return out

    def resampled(self, I: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric on each resample: `I` is `(b, m)` example indices (a bootstrap draws m = n); returns
        `{metric: (b,) values}`. `values` is the case of one row."""
        b = I.shape[0]
        res: dict[str, np.ndarray] = {}
        for k, a in self.arrays.items():
            res[k] = a[I].mean(1)
        if "bleu" in self.sums:
            tot = self.sums["bleu"][I].sum(1)
            res["bleu2"], res["bleu4"] = S.bleu_from_stats(tot, 2), S.bleu_from_stats(tot, 4)
        if "sacrebleu" in self.sums:
            res["sacrebleu"] = S.sacrebleu_from_stats(self.sums["sacrebleu"][I].sum(1))
        if "micro" in self.sums:
            m = S.micro_prf_from_counts(self.sums["micro"][I].sum(1))
            pre = "micro_" if self.family == "ec" else ""
            for k, v in m.items():
                res[pre + k] = v
        if self.family == "go":
            W = np.zeros((b, self.n))  # (b, n): how often each example is drawn
            np.add.at(W, (np.repeat(np.arange(b), I.shape[1]), I.ravel()), 1.0)
            res.update(self._go.weighted(W))
        if self.family == "ec":
            w = [self._wprf(row) for row in I]
            for k in ("precision", "recall", "f1"):
                res["clean_" + k] = np.array([x[k] for x in w])
        return res


def resample_indices(n: int, B: int, seed: int = 0):
    """`B` bootstrap resamples of `n` examples (seeded), yielded as `(b, n)` index chunks that fit in memory."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(B, 2_000_000 // max(n, 1)))
    done = 0
    while done < B:
        b = min(chunk, B - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def paired_difference(a: TaskScorer, b: TaskScorer, bootstrap: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> dict | None:
    """The primary metric of predictor A minus predictor B, with a paired bootstrap 95% CI.

    `a` and `b` score the same examples in the same order (:func:`task_scorer`). Both are scored on each resample
    (Koehn 2004), so the interval is of the difference itself: far tighter than two separate intervals, which
    overlap long before a difference is in doubt. Returns `{"metric", "difference", "ci_low", "ci_high", "n"}`, or
    None without scorable examples.
    """
    if a.n != b.n or a.refs != b.refs:
        raise ValueError("paired_difference needs two scorers of the same examples")
    if a.n == 0:
        return None
    metric = PRIMARY[a.family]
    difference = a.values()[metric] - b.values()[metric]
    low = high = None
    if bootstrap > 0:
        draws = np.concatenate([a.resampled(I)[metric] - b.resampled(I)[metric]
                                for I in resample_indices(a.n, bootstrap, seed)])
        low, high = float(np.quantile(draws, alpha / 2)), float(np.quantile(draws, 1 - alpha / 2))
    return {"metric": metric, "difference": float(difference), "ci_low": low, "ci_high": high, "n": a.n}


def identity_bin(identity: float | None) -> str:
    if identity is None:
        return NO_HIT
    for lo, hi, label in IDENTITY_BINS:
        if lo <= identity < hi:
            return label
    return IDENTITY_BINS[-1][2]


def _scored(examples: list[dict]) -> list[dict]:
    """The examples that have a reference (the others cannot be scored)."""
    return [ex for ex in examples if ex.get("reference") is not None and str(ex["reference"]).strip()]


def task_scorer(task: str, examples: list[dict], predictions: dict[str, str], meteor: bool = True,
                bertscore_model: str | None = None, go_vocabulary=None) -> TaskScorer:
    """The :class:`TaskScorer` of `predictions` (`{id: text}`) on the examples of `examples` that have a reference."""
    scored = _scored(examples)
    return TaskScorer(FAMILY[task], [predictions.get(ex["id"]) for ex in scored], [ex["reference"] for ex in scored],
                      [ex.get("meta") or {} for ex in scored], meteor=meteor, bertscore_model=bertscore_model,
                      go_vocabulary=go_vocabulary)


def score_predictor(task: str, examples: list[dict], predictions: dict[str, str], identities: dict | None = None,
                    bootstrap: int = 1000, seed: int = 0, meteor: bool = True, bertscore_model: str | None = None,
                    extra_counts: dict | None = None, go_vocabulary=None, scorer: TaskScorer | None = None) -> dict:
    """Everything the report needs for one (task, predictor): values, CIs, counts, identity bins.

    ``go_vocabulary`` (:class:`eval.go.GOVocabulary`, go_terms only): the term dictionary and optional ontology;
    default: the dictionary of ``examples`` alone, not propagated. ``scorer``: the :func:`task_scorer` of these
    arguments when the caller already built it (to compare predictors with :func:`paired_difference`)."""
    family = FAMILY[task]
    scored = _scored(examples)
    missing_refs = len(examples) - len(scored)
    sc = scorer or task_scorer(task, examples, predictions, meteor=meteor, bertscore_model=bertscore_model,
                               go_vocabulary=go_vocabulary)
    vals = sc.values()
    cis = sc.bootstrap(bootstrap, seed)
    metrics = {k: {"value": v, "ci_low": cis.get(k, (None, None))[0], "ci_high": cis.get(k, (None, None))[1]}
               for k, v in vals.items()}
    counts = {"n_examples": len(examples), "n_scored": len(scored), "missing_references": missing_refs,
              "missing_predictions": sum(1 for ex in scored if ex["id"] not in predictions), **sc.counts,
              **(extra_counts or {})}
    bins = {}
    if identities:
        labels = [identity_bin(identities.get(ex["id"])) for ex in scored]
        for label in [b[2] for b in IDENTITY_BINS] + [NO_HIT]:
            idx = [i for i, l in enumerate(labels) if l == label]
            if idx:
                v = sc.values(idx)
                bins[label] = {"n": len(idx), **{k: v[k] for k in SHOWN[family] if k in v}}
    return {"family": family, "primary": PRIMARY[family], "metrics": metrics, "counts": counts,
            "by_identity_bin": bins, "notes": sorted(set(sc.notes))}


# ---------------------------------------------------------------------------------------------- writing


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    v = m["value"]
    if m.get("ci_low") is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def _signed(d: dict) -> str:
    """`+0.040 [+0.010, +0.070]` for a paired difference."""
    if d.get("ci_low") is None:
        return f"{d['difference']:+.3f}"
    return f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def _cell(text, width: int = 160) -> str:
    s = re.sub(r"\s+", " ", S.as_text(text)).strip()
    if len(s) > width:
        s = s[: width - 1] + "…"
    return s.replace("|", "\\|") or "*(empty)*"


def plot_identity(task: str, task_res: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds = task_res["predictors"]
    labels = [b[2] for b in IDENTITY_BINS] + [NO_HIT]
    used = [l for l in labels if any(l in p["by_identity_bin"] for p in preds.values())]
    if not used:
        return None
    primary = next(iter(preds.values()))["primary"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(preds), 1)
    for j, (name, res) in enumerate(preds.items()):
        ys = [res["by_identity_bin"].get(l, {}).get(primary, np.nan) for l in used]
        ax.bar(np.arange(len(used)) + j * width - 0.4 + width / 2, ys, width, label=name)
    ns = [next((p["by_identity_bin"][l]["n"] for p in preds.values() if l in p["by_identity_bin"]), 0) for l in used]
    ax.set_xticks(np.arange(len(used)), [f"{l}\n(n={n})" for l, n in zip(used, ns)])
    ax.set_xlabel("identity of the test protein to its nearest training protein (MMseqs2)")
    ax.set_ylabel(primary)
    ax.set_title(f"{task}: {primary} by identity bin")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir, results: dict, examples_by_task: dict, predictions: dict, header: dict,
                 n_examples_shown: int = 5, identities: dict | None = None) -> dict:
    """Write ``report.md``, ``metrics.json`` and one PNG per task into ``out_dir``.

    ``results[task]['predictors'][name]`` comes from :func:`score_predictor`; ``predictions[task][name]``
    maps ids to texts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Evaluation report", ""]
    for k, v in header.items():
        if v is not None and k != "notes":
            lines.append(f"- **{k}**: `{v}`" if isinstance(v, str) and len(v) < 300 else f"- **{k}**: {v}")
    lines.append("")
    for note in header.get("notes") or []:
        lines.append(f"> {note}")
    lines.append("")
    for task, tres in results.items():
        preds = tres["predictors"]
        fam = tres["family"]
        n = len(examples_by_task[task])
        lines += [f"## {task} (n = {n})", ""]
        if tres.get("split"):
            lines += [f"Split: {tres['split']}", ""]
        if task in INSTRUCTIONS:
            lines += [f"Instruction used for raw-data rows: *{INSTRUCTIONS[task]}*", ""]
        shown = [m for m in SHOWN[fam] if any(m in p["metrics"] for p in preds.values())]
        lines.append("| predictor | " + " | ".join(shown) + " |")
        lines.append("|---|" + "---|" * len(shown))
        for name, res in preds.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(res["metrics"].get(m)) for m in shown) + " |")
        lines += ["", "Values in [0, 1] with bootstrap 95% CIs in brackets.", ""]
        for model, against in (tres.get("paired_differences") or {}).items():
            rows = [(other, d) for other, d in against.items() if d]
            if rows:
                lines += [f"Paired differences ({rows[0][1]['metric']} of {model} minus each other predictor, paired "
                          "bootstrap 95% CI over the same rows):", "", "| minus | difference |", "|---|---|"]
                lines += [f"| {other} | {_signed(d)} |" for other, d in rows]
                lines.append("")
        ckeys = sorted({k for p in preds.values() for k in p["counts"]})
        lines.append("| predictor | " + " | ".join(ckeys) + " |")
        lines.append("|---|" + "---|" * len(ckeys))
        for name, res in preds.items():
            lines.append(f"| {name} | " + " | ".join(str(res["counts"].get(k, "")) for k in ckeys) + " |")
        lines.append("")
        notes = sorted({x for p in preds.values() for x in p["notes"]})
        for x in notes:
            lines.append(f"> {x}")
        if notes:
            lines.append("")
        if any(p["by_identity_bin"] for p in preds.values()):
            primary = PRIMARY[fam]
            labels = [b[2] for b in IDENTITY_BINS] + [NO_HIT]
            used = [l for l in labels if any(l in p["by_identity_bin"] for p in preds.values())]
            lines += [f"### {primary} by identity to the nearest training protein", ""]
            lines.append("| identity bin | n | " + " | ".join(preds) + " |")
            lines.append("|---|---|" + "---|" * len(preds))
            for l in used:
                nb = next(p["by_identity_bin"][l]["n"] for p in preds.values() if l in p["by_identity_bin"])
                row = [f"{p['by_identity_bin'].get(l, {}).get(primary, float('nan')):.3f}" for p in preds.values()]
                lines.append(f"| {l} | {nb} | " + " | ".join(row) + " |")
            png = plot_identity(task, tres, out / f"{task}_by_identity.png")
            if png:
                lines += ["", f"![{task} by identity]({png.name})"]
            lines.append("")
        exs = _pick_examples(examples_by_task[task], (identities or {}).get(task, {}), n_examples_shown)
        if exs:
            lines += ["### Examples", "", "| id | identity | reference | " + " | ".join(preds) + " |",
                      "|---|---|---|" + "---|" * len(preds)]
            for ex in exs:
                ident = (identities or {}).get(task, {}).get(ex["id"])
                ident_s = "" if ident is None else f"{ident:.2f}"
                row = [_cell(predictions[task][p].get(ex["id"])) for p in preds]
                lines.append(f"| {_cell(ex['id'], 40)} | {ident_s} | {_cell(ex['reference'])} | " + " | ".join(row) + " |")
            lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    payload = {"header": header, "tasks": results}
    (out / "metrics.json").write_text(json.dumps(_clean(payload), indent=2, sort_keys=False) + "\n")
    return payload


def _pick_examples(exs, ident, k):
    """``k`` examples spread over the identity range (highest first), else the first ``k``."""
    if not ident or k <= 0:
        return exs[:k]
    order = sorted(exs, key=lambda e: -(ident.get(e["id"]) or 0.0))
    if len(order) <= k:
        return order
    step = (len(order) - 1) / max(k - 1, 1)
    return [order[round(i * step)] for i in range(k)]


def _clean(x):
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
