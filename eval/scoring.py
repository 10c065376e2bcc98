"""Plain metric functions used by the ``evaluate`` modules in ``eval/metrics`` and by the report.

Every function is deterministic, offline and tolerant of bad input: ``None`` or empty predictions
are scored as wrong (empty string / empty set / unparseable), never raise.

Conventions (see ``eval/README`` section of the project README and ``docs``):

* Text is compared in [0, 1] units (multiply by 100 for the papers' percent tables).
* BLEU (NLTK, the SEPIT/MolT5 convention): corpus BLEU over lower-cased word tokens, no smoothing,
  weights (1/2, 1/2) for BLEU-2 and (1/4,)*4 for BLEU-4, closest-reference brevity penalty.
  Tokeniser: ``word_tokens`` = regex sentence split on ``[.!?]`` + whitespace, then NLTK's
  ``NLTKWordTokenizer`` (the word tokenizer behind ``nltk.word_tokenize``, used without Punkt data
  so no download is needed).
* sacreBLEU: ``sacrebleu.BLEU()`` defaults (13a tokenisation, case-sensitive, exp smoothing off),
  corpus level, reported /100.
* ROUGE-1/2/L: ``rouge_score`` with Porter stemmer, F-measure, mean over examples.
* METEOR: ``nltk.translate.meteor_score`` per example on the same word tokens (needs WordNet,
  see :func:`load_wordnet`), mean over examples.
* EC: CLEAN averaging = support-weighted P/R/F1 over EC labels (sklearn ``average='weighted'``
  on binarised label sets, zero_division=0); OPI averaging = micro P/R/F1 over label sets.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# text normalisation and tokenisation


def as_text(x) -> str:
    """``None`` -> ``""``; anything else -> ``str`` (predictions may be missing)."""
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return ""
    return str(x)


def normalize_text(x) -> str:
    """Lower-case, collapse whitespace, strip surrounding spaces and a final period (exact match)."""
    s = re.sub(r"\s+", " ", as_text(x)).strip().lower()
    return s.rstrip(" .")


_SENT_SPLIT = re.compile(r"(?<=[.!?;])\s+")


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text, lower: bool = True) -> list[str]:
    """NLTK word tokens (sentence split by regex, then ``NLTKWordTokenizer``), lower-cased."""
    s = as_text(text)
    return list(_tokens_cached(s.lower() if lower else s))


@lru_cache(maxsize=100_000)
def _tokens_cached(s: str) -> tuple:
    tok = _word_tokenizer()
    out: list[str] = []
    for sent in _SENT_SPLIT.split(s.strip()):
        if sent:
            out.extend(tok.tokenize(sent))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# BLEU from per-example sufficient statistics (so bootstrap resampling is a cheap sum)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(pred_tokens: Sequence[str], ref_tokens: Sequence[str], max_n: int = 4) -> np.ndarray:
    """``[hyp_len, ref_len, match_1..max_n, total_1..max_n]`` for one example (single reference)."""
    row = np.zeros(2 + 2 * max_n, dtype=np.float64)
    row[0] = len(pred_tokens)
    row[1] = len(ref_tokens)
    for n in range(1, max_n + 1):
        hyp = _ngrams(pred_tokens, n)
        ref = _ngrams(ref_tokens, n)
        row[1 + n] = sum(min(c, ref[g]) for g, c in hyp.items())
        row[1 + max_n + n] = max(len(pred_tokens) - n + 1, 0)
    return row


def bleu_from_stats(stats: np.ndarray, n: int, max_n: int = 4) -> np.ndarray | float:
    """Corpus BLEU-n (uniform weights 1/n, no smoothing; NLTK ``corpus_bleu`` semantics).

    ``stats`` is the sum of :func:`bleu_stats` rows, shape ``(2+2*max_n,)`` or ``(B, 2+2*max_n)``.
    A zero n-gram match count gives BLEU 0 (NLTK returns 0 and warns).
    """
    s = np.atleast_2d(np.asarray(stats, dtype=np.float64))
    hyp, ref = s[:, 0], s[:, 1]
    logp = np.zeros(len(s))
    zero = np.zeros(len(s), dtype=bool)
    for k in range(1, n + 1):
        m, t = s[:, 1 + k], s[:, 1 + max_n + k]
        zero |= (m <= 0) | (t <= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            logp += np.where((m > 0) & (t > 0), np.log(np.maximum(m, 1e-300) / np.maximum(t, 1e-300)), 0.0) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(hyp >= ref, 1.0, np.exp(1.0 - ref / np.maximum(hyp, 1e-300)))
    out = np.where(zero | (hyp == 0), 0.0, bp * np.exp(logp))
    return out if np.ndim(stats) == 2 else float(out[0])


def sacrebleu_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-example sacreBLEU statistics (13a tokenisation), rows ``[hyp_len, ref_len, c1..c4, t1..t4]``."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    preds = [as_text(p) for p in predictions]
    refs = [[as_text(r) for r in references]]
    return np.asarray(bleu._extract_corpus_statistics(preds, refs), dtype=np.float64)


def sacrebleu_from_stats(stats: np.ndarray) -> np.ndarray | float:
    """sacreBLEU score / 100 from summed statistics (1-D or 2-D as in :func:`bleu_from_stats`)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    s = np.atleast_2d(np.asarray(stats))
    out = np.array([bleu._compute_score_from_stats(list(map(int, row))).score / 100.0 for row in s])
    return out if np.ndim(stats) == 2 else float(out[0])


# ----------------------------------------------------------------------------------------------
# ROUGE, METEOR, BERTScore


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_per_example(predictions: Sequence, references: Sequence) -> dict[str, np.ndarray]:
    """ROUGE-1/2/L F-measure per example (rouge-score, Porter stemmer; its default tokeniser)."""
    sc = _rouge_scorer()
    out = {"rouge1": [], "rouge2": [], "rougeL": []}
    for p, r in zip(predictions, references):
        p, r = as_text(p), as_text(r)
        if not p.strip() or not r.strip():
            for k in out:
                out[k].append(0.0)
            continue
        s = sc.score(r, p)  # score(target, prediction)
        for k in out:
            out[k].append(s[k].fmeasure)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


WORDNET_DIRS = ("/usr/share/wordnet",)  # Debian/Ubuntu package ``wordnet-base``
# WordNet 3.0 lexicographer file list (lexnames(5WN)); Debian's wordnet-base omits this file.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_CODE = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

METEOR_UNAVAILABLE = (
    "METEOR unavailable: NLTK needs the WordNet database. Install it offline with "
    "`apt-get install wordnet-base` (Debian/Ubuntu; files in /usr/share/wordnet), or "
    "`python -m nltk.downloader wordnet` where the internet is reachable, or set "
    "PROTLLM_WORDNET_DIR to a WordNet 3.0 dict/ folder."
)


def _wordnet_candidates() -> list[Path]:
    cands = []
    if os.environ.get("PROTLLM_WORDNET_DIR"):
        cands.append(Path(os.environ["PROTLLM_WORDNET_DIR"]))
    cands += [Path(d) for d in WORDNET_DIRS]
    return cands


@lru_cache(maxsize=1)
def load_wordnet():
    """Return an NLTK ``WordNetCorpusReader`` or raise ``RuntimeError(METEOR_UNAVAILABLE)``.

    Order: NLTK's own ``corpora/wordnet`` if installed; else a WordNet 3.0 ``dict`` folder
    (``$PROTLLM_WORDNET_DIR``, then Debian's ``/usr/share/wordnet``). A system folder is mirrored
    into ``~/.cache/protllm/wordnet`` with the missing ``lexnames`` file written from the fixed
    WordNet 3.0 list, because NLTK (>=3.9) only reads corpora under its data roots.
    """
    import nltk

    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except Exception:
        pass
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    for src in _wordnet_candidates():
        if not (src / "data.noun").is_file() or not (src / "index.noun").is_file():
            continue
        cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "protllm"
        dst = cache_root / "wordnet"
        try:
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file() and not (dst / f.name).exists():
                    shutil.copyfile(f, dst / f.name)
            if not (dst / "lexnames").exists():
                with open(dst / "lexnames", "w") as fh:
                    for i, name in enumerate(_LEXNAMES):
                        fh.write(f"{i:02d}\t{name}\t{_POS_CODE[name.split('.')[0]]}\n")
            if str(cache_root) not in nltk.data.path:
                nltk.data.path.append(str(cache_root))
            class _LocalWordNet(WordNetCorpusReader):
                def map_wn(self, version="wordnet"):  # no mapping to NLTK's own (absent) copy
                    return None

            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available"
                wn = _LocalWordNet(str(dst), None)
            wn.synsets("protein")
            return wn
        except Exception as exc:  # pragma: no cover - depends on the machine
            last = exc
            continue
    raise RuntimeError(METEOR_UNAVAILABLE)


def meteor_available() -> tuple[bool, str]:
    try:
        load_wordnet()
        return True, "WordNet found"
    except RuntimeError as exc:
        return False, str(exc)


def meteor_per_example(predictions: Sequence, references: Sequence) -> np.ndarray:
    """NLTK METEOR (alpha=0.9, beta=3, gamma=0.5) per example on :func:`word_tokens`."""
    from nltk.translate.meteor_score import meteor_score

    wn = load_wordnet()
    out = []
    for p, r in zip(predictions, references):
        pt, rt = word_tokens(p), word_tokens(r)
        out.append(meteor_score([rt], pt, wordnet=wn) if pt and rt else 0.0)
    return np.asarray(out, dtype=np.float64)


def bertscore_per_example(
    predictions: Sequence,
    references: Sequence,
    model_path: str,
    layer: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """BERTScore P/R/F1 per example with a LOCAL encoder (no IDF, no baseline rescaling).

    Greedy cosine matching of contextual token embeddings from ``layer`` (default: last hidden
    layer) excluding special tokens, as in Zhang et al. 2020. SEPIT uses PubMedBERT, STELLA does
    not state its model: report the model path with the number.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    if not model_path or not Path(model_path).exists():
        raise RuntimeError(f"BERTScore skipped: no local scoring model at {model_path!r}")
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).to(device).eval()

    def embed(texts):
        enc = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt",
                  return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        h = out.hidden_states[layer if layer is not None else -1]
        h = torch.nn.functional.normalize(h, dim=-1)
        mask = enc["attention_mask"].bool() & ~special.to(device)
        return h, mask

    P, R, F = [], [], []
    preds = [as_text(p) for p in predictions]
    refs = [as_text(r) for r in references]
    for i in range(0, len(preds), batch_size):
        hp, mp = embed(preds[i : i + batch_size])
        hr, mr = embed(refs[i : i + batch_size])
        sim = torch.bmm(hp, hr.transpose(1, 2))
        sim = sim.masked_fill(~mr[:, None, :], -2.0).masked_fill(~mp[:, :, None], -2.0)
        p_best = sim.max(dim=2).values
        r_best = sim.max(dim=1).values
        for b in range(sim.shape[0]):
            if mp[b].sum() == 0 or mr[b].sum() == 0:
                P.append(0.0); R.append(0.0); F.append(0.0)  # noqa: E702
                continue
            p = p_best[b][mp[b]].mean().item()
            r = r_best[b][mr[b]].mean().item()
            P.append(p); R.append(r); F.append(2 * p * r / (p + r) if p + r > 0 else 0.0)  # noqa: E702
    return {"bertscore_precision": np.asarray(P), "bertscore_recall": np.asarray(R),
            "bertscore_f1": np.asarray(F)}


def text_metrics(
    predictions: Sequence,
    references: Sequence,
    meteor: bool = True,
    bertscore_model: str | None = None,
) -> dict:
    """All free-text metrics at corpus level. Returns values plus ``notes`` for skipped metrics."""
    preds = [as_text(p) for p in predictions]
    refs = [as_text(r) for r in references]
    res: dict = {"n": len(preds), "notes": []}
    stats = np.array([bleu_stats(word_tokens(p), word_tokens(r)) for p, r in zip(preds, refs)]).reshape(-1, 10)
    tot = stats.sum(0)
    res["bleu2"] = bleu_from_stats(tot, 2)
    res["bleu4"] = bleu_from_stats(tot, 4)
    res["sacrebleu"] = sacrebleu_from_stats(sacrebleu_stats(preds, refs).sum(0)) if preds else 0.0
    for k, v in rouge_per_example(preds, refs).items():
        res[k] = float(v.mean()) if len(v) else 0.0
    if meteor:
        ok, msg = meteor_available()
        if ok:
            res["meteor"] = float(meteor_per_example(preds, refs).mean()) if preds else 0.0
        else:
            res["notes"].append(msg)
    if bertscore_model:
        try:
            for k, v in bertscore_per_example(preds, refs, bertscore_model).items():
                res[k] = float(v.mean())
        except RuntimeError as exc:
            res["notes"].append(str(exc))
    else:
        res["notes"].append("BERTScore skipped: no local scoring model given (--bertscore_model PATH)")
    res["exact_match"] = float(np.mean([normalize_text(p) == normalize_text(r) for p, r in zip(preds, refs)])) if preds else 0.0
    return res


# ----------------------------------------------------------------------------------------------
# EC numbers

# 4-field EC numbers; the last fields may be '-' (incomplete) or 'nN' (preliminary, e.g. 3.5.1.n3)
EC_RE = re.compile(r"(?<![\d.])(\d{1,2})\.(\d{1,2}|-)\.(\d{1,3}|-)\.(n?\d{1,4}|-)(?!\.?\d)")


def parse_ec(text) -> list[str]:
    """All EC numbers in a free answer, in order, de-duplicated (``"EC 1.1.1.1; 2.7.-.-"``)."""
    if isinstance(text, (list, tuple, set)):
        text = "; ".join(as_text(t) for t in text)
    seen, out = set(), []
    for m in EC_RE.finditer(as_text(text)):
        ec = ".".join(m.groups())
        if ec not in seen:
            seen.add(ec)
            out.append(ec)
    return out


def ec_prefix(ec: str, level: int) -> str | None:
    """First ``level`` fields of an EC number, or ``None`` when that prefix is incomplete ('-')."""
    parts = ec.split(".")[:level]
    if len(parts) < level or "-" in parts:
        return None
    return ".".join(parts)


def _binarize(pred_sets, true_sets):
    labels = sorted(set().union(*pred_sets, *true_sets)) if (pred_sets or true_sets) else []
    idx = {l: i for i, l in enumerate(labels)}
    P = np.zeros((len(pred_sets), len(labels)), dtype=bool)
    T = np.zeros((len(true_sets), len(labels)), dtype=bool)
    for i, s in enumerate(pred_sets):
        for l in s:
            P[i, idx[l]] = True
    for i, s in enumerate(true_sets):
        for l in s:
            T[i, idx[l]] = True
    return P, T, labels


def weighted_prf(P: np.ndarray, T: np.ndarray) -> dict[str, float]:
    """sklearn ``precision_recall_fscore_support(average='weighted', zero_division=0)`` on label
    indicator matrices (CLEAN's ``get_eval_metrics``): per-label P/R/F1 weighted by true support."""
    tp = (P & T).sum(0).astype(float)
    npred = P.sum(0).astype(float)
    ntrue = T.sum(0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(npred > 0, tp / npred, 0.0)
        r = np.where(ntrue > 0, tp / ntrue, 0.0)
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    w = ntrue.sum()
    if w == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return {"precision": float((p * ntrue).sum() / w), "recall": float((r * ntrue).sum() / w),
            "f1": float((f * ntrue).sum() / w)}


class WeightedPRF:
    """Fast :func:`weighted_prf` for many resamples: per-label counts by ``np.bincount`` over the
    examples' label indices, weighted by how often each example was drawn."""

    def __init__(self, pred_sets, true_sets):
        labels = sorted(set().union(*map(set, pred_sets), *map(set, true_sets))) if (pred_sets or true_sets) else []
        idx = {l: i for i, l in enumerate(labels)}
        self.L = len(labels)
        ex_p, lab_p, ex_t, lab_t, ex_tp, lab_tp = [], [], [], [], [], []
        for i, (p, t) in enumerate(zip(pred_sets, true_sets)):
            p, t = set(p), set(t)
            for l in p:
                ex_p.append(i); lab_p.append(idx[l])  # noqa: E702
            for l in t:
                ex_t.append(i); lab_t.append(idx[l])  # noqa: E702
            for l in p & t:
                ex_tp.append(i); lab_tp.append(idx[l])  # noqa: E702
        arr = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        self.ex_p, self.lab_p, self.ex_t, self.lab_t = arr(ex_p), arr(lab_p), arr(ex_t), arr(lab_t)
        self.ex_tp, self.lab_tp = arr(ex_tp), arr(lab_tp)
        self.n = len(pred_sets)

    def __call__(self, idx=None) -> dict[str, float]:
        w = np.ones(self.n) if idx is None else np.bincount(np.asarray(idx), minlength=self.n).astype(float)
        tp = np.bincount(self.lab_tp, weights=w[self.ex_tp], minlength=self.L)
        npred = np.bincount(self.lab_p, weights=w[self.ex_p], minlength=self.L)
        ntrue = np.bincount(self.lab_t, weights=w[self.ex_t], minlength=self.L)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(npred > 0, tp / np.maximum(npred, 1e-300), 0.0)
            r = np.where(ntrue > 0, tp / np.maximum(ntrue, 1e-300), 0.0)
            f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
        tot = ntrue.sum()
        if tot == 0:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        return {"precision": float((p * ntrue).sum() / tot), "recall": float((r * ntrue).sum() / tot),
                "f1": float((f * ntrue).sum() / tot)}


def micro_prf_counts(pred_sets, true_sets) -> np.ndarray:
    """Per-example ``[tp, n_pred, n_true]`` (sum them for micro P/R/F1)."""
    return np.array([[len(set(p) & set(t)), len(set(p)), len(set(t))] for p, t in zip(pred_sets, true_sets)],
                    dtype=np.float64).reshape(-1, 3)


def micro_prf_from_counts(c: np.ndarray) -> dict[str, np.ndarray | float]:
    """Micro P/R/F1 from summed ``[tp, n_pred, n_true]`` (1-D or ``(B, 3)``). 0 when undefined."""
    c2 = np.atleast_2d(c)
    tp, npred, ntrue = c2[:, 0], c2[:, 1], c2[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(npred > 0, tp / np.maximum(npred, 1), 0.0)
        r = np.where(ntrue > 0, tp / np.maximum(ntrue, 1), 0.0)
        f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    if np.ndim(c) == 1:
        return {"precision": float(p[0]), "recall": float(r[0]), "f1": float(f[0])}
    return {"precision": p, "recall": r, "f1": f}


def ec_metrics(predictions: Sequence, references: Sequence) -> dict:
    """EC scores from free-text predictions and references (strings or lists of EC numbers).

    * ``clean_*``: support-weighted P/R/F1 over full EC labels (CLEAN).
    * ``micro_*``: micro P/R/F1 over EC label sets (OPI).
    * ``exact_match``: predicted EC set == reference EC set.
    * ``level{k}_accuracy``: set of k-digit prefixes (complete ones) equal to the reference's.
    * ``unparseable``: predictions with no EC number in them (scored as empty sets: wrong).
    """
    pred_sets = [parse_ec(p) for p in predictions]
    true_sets = [parse_ec(r) for r in references]
    res: dict = {"n": len(pred_sets)}
    P, T, _ = _binarize([set(s) for s in pred_sets], [set(s) for s in true_sets])
    for k, v in weighted_prf(P, T).items():
        res[f"clean_{k}"] = v
    for k, v in micro_prf_from_counts(micro_prf_counts(pred_sets, true_sets).sum(0)).items():
        res[f"micro_{k}"] = v
    n = max(len(pred_sets), 1)
    res["exact_match"] = sum(set(p) == set(t) for p, t in zip(pred_sets, true_sets)) / n if pred_sets else 0.0
    for lvl in range(1, 5):
        res[f"level{lvl}_accuracy"] = (
            sum(ec_level_correct(p, t, lvl) for p, t in zip(pred_sets, true_sets)) / n if pred_sets else 0.0
        )
    res["unparseable"] = sum(1 for p in pred_sets if not p)
    return res


def ec_level_correct(pred: Iterable[str], true: Iterable[str], level: int) -> bool:
    tp = {x for x in (ec_prefix(e, level) for e in pred) if x}
    tt = {x for x in (ec_prefix(e, level) for e in true) if x}
    return bool(tt) and tp == tt


# ----------------------------------------------------------------------------------------------
# label sets (GO terms, keywords)


def split_labels(text, sep: str = ";") -> list[str]:
    """``'a; B ;a'`` -> ``['a', 'b']``: split on ``;`` (and newlines), strip, lower-case, de-dup."""
    if isinstance(text, (list, tuple, set)):
        items = [as_text(t) for t in text]
    else:
        items = re.split(r"[;\n]", as_text(text)) if sep == ";" else as_text(text).split(sep)
    seen, out = set(), []
    for it in items:
        it = re.sub(r"\s+", " ", it).strip().strip(".").strip().lower()
        if it and it not in seen:
            seen.add(it)
            out.append(it)
    return out


def label_set_metrics(predictions: Sequence, references: Sequence) -> dict:
    """OPI convention: micro P/R/F1 over '; '-separated label sets; plus per-example exact match."""
    ps = [split_labels(p) for p in predictions]
    ts = [split_labels(r) for r in references]
    res: dict = {"n": len(ps)}
    res.update(micro_prf_from_counts(micro_prf_counts(ps, ts).sum(0)))
    res["exact_match"] = float(np.mean([set(p) == set(t) for p, t in zip(ps, ts)])) if ps else 0.0
    res["empty_predictions"] = sum(1 for p in ps if not p)
    return res


# ----------------------------------------------------------------------------------------------
# multiple choice and yes/no

LETTERS = "ABCDEFGHIJ"


def parse_choice(text, n_options: int = 4, options: Sequence[str] | None = None) -> str | None:
    """Letter chosen in a free answer, or ``None`` (unparseable).

    Order of rules (first that fires wins):
    1. explicit statements: "answer is (B)", "Answer: B", "option B", "choice B", "correct ... is B";
       the LAST such statement counts (models often restate after reasoning);
    2. the answer starts with a letter token: "B", "(B)", "B)", "B.", "B:", "[B]" (not "A protein");
    3. exactly one distinct stand-alone letter in parentheses/brackets, e.g. "... (C) ...";
    4. exactly one option text (``options``) appears in the answer (case-insensitive);
    otherwise ``None``. Letters are limited to the first ``n_options``.
    """
    s = as_text(text).strip()
    if not s:
        return None
    valid = LETTERS[:n_options]
    up, low = f"[{valid}]", f"[{valid.lower()}]"
    explicit = re.compile(
        r"(?i:answer(?:\s+is)?|option|choice|correct(?:\s+\w+){0,3}\s+is)\s*[:\-]?\s*"
        rf"(?:[\(\[]({up}|{low})[\)\]]|({up})(?![A-Za-z])|({low})(?=[\.\):,;]|\s*$))"
    )
    hits = [next(g for g in m.groups() if g) for m in explicit.finditer(s)]
    if hits:
        return hits[-1].upper()
    m = re.match(rf"^[\(\[]?({up})(?:[\)\]\.:,]|\s*$)", s) or re.match(rf"^[\(\[]({low})[\)\]]", s) \
        or re.match(rf"^({low})\s*$", s)
    if m:
        return m.group(1).upper()
    paren = {x.upper() for x in re.findall(rf"[\(\[]({up}|{low})[\)\]]", s)}
    if len(paren) == 1:
        return paren.pop()
    if options:
        lowered = s.lower()
        found = [LETTERS[i] for i, o in enumerate(options[:n_options])
                 if as_text(o).strip() and as_text(o).strip().lower() in lowered]
        if len(found) == 1:
            return found[0]
    return None


_YESNO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text) -> str | None:
    """SEPIT's closed-set rule: the LAST stand-alone 'yes' or 'no' in the answer; ``None`` if none.

    ("not" / "none" / "know" do not count: word boundaries.)
    """
    hits = _YESNO.findall(as_text(text))
    return hits[-1].lower() if hits else None


def choice_accuracy(
    predictions: Sequence,
    references: Sequence,
    kind: str = "mcqa",
    options: Sequence[Sequence[str] | None] | None = None,
    groups: Sequence | None = None,
) -> dict:
    """Accuracy with unparseable answers counted (and scored wrong).

    ``kind='mcqa'``: references are letters (or free text parsed the same way); ``'yes_no'``:
    references are yes/no. ``groups`` (e.g. the question id shared by the 4 option permutations)
    adds ``perm_all_accuracy`` (a question counts only when every permutation is right, STELLA's
    4x) and ``perm_mean_accuracy`` (mean over questions of their permutation accuracy).
    """
    correct, unparse, noref = [], 0, 0
    for i, (p, r) in enumerate(zip(predictions, references)):
        if kind == "yes_no":
            gp, gr = parse_yes_no(p), parse_yes_no(r)
        else:
            opts = options[i] if options else None
            n = len(opts) if opts else 4
            gp = parse_choice(p, n, opts)
            gr = parse_choice(r, max(n, 4), opts) if as_text(r).strip() else None
        if gp is None:
            unparse += 1
        if gr is None:
            noref += 1
        correct.append(bool(gp is not None and gp == gr))
    res = {"n": len(correct), "accuracy": float(np.mean(correct)) if correct else 0.0,
           "unparseable": unparse, "unparseable_references": noref}
    if groups is not None:
        by: dict = {}
        for g, c in zip(groups, correct):
            by.setdefault(g, []).append(c)
        res["n_groups"] = len(by)
        res["perm_all_accuracy"] = float(np.mean([all(v) for v in by.values()])) if by else 0.0
        res["perm_mean_accuracy"] = float(np.mean([np.mean(v) for v in by.values()])) if by else 0.0
    res["per_example"] = correct
    return res
