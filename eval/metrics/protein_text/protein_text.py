"""Free-text protein function metrics (STELLA / SEPIT / Prot2Text conventions), offline.

BLEU-2/4: NLTK corpus BLEU on lower-cased NLTK word tokens (no smoothing); sacreBLEU (13a) too;
ROUGE-1/2/L F-measure (rouge-score, Porter stemmer, mean); METEOR (NLTK + local WordNet, mean;
reported unavailable in ``notes`` otherwise); BERTScore F1 only with ``bertscore_model=<local path>``.
All values in [0, 1]. Implementation: ``eval.scoring.text_metrics``.
"""

import datasets
import evaluate

try:
    from eval.scoring import text_metrics
except ImportError as exc:  # pragma: no cover
    raise ImportError("protein_text needs the ProtLLM repository on sys.path: use eval.metrics.load('protein_text') "
                      "or run from the repository root") from exc

_CITATION = "STELLA (arXiv 2506.03800); SEPIT (arXiv 2410.03553); Papineni et al. 2002; Lin 2004; Banerjee & Lavie 2005"
_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts (None/empty allowed: scored as wrong).
    references: list of reference texts.
    meteor: compute METEOR (default True).
    bertscore_model: local encoder folder for BERTScore (default None: skipped).
Returns: dict with bleu2, bleu4, sacrebleu, rouge1, rouge2, rougeL, meteor, exact_match, n, notes.
Examples:
    >>> m = evaluate.load("eval/metrics/protein_text")
    >>> m.compute(predictions=["binds zinc"], references=["binds zinc"])["rougeL"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ProteinText(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, meteor=True, bertscore_model=None):
        return text_metrics(predictions, references, meteor=meteor, bertscore_model=bertscore_model)
