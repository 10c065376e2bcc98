"""EC number prediction metrics, offline.

Predictions and references are free texts (or '; '-joined lists); EC numbers are parsed with
``eval.scoring.parse_ec`` (4 fields, '-' and 'nN' allowed). Reports CLEAN's support-weighted
precision/recall/F1 over EC labels (sklearn average='weighted'), OPI's micro precision/recall/F1
over label sets, exact set match, per-level accuracy (k-digit prefix sets equal, k=1..4) and the
number of predictions without any EC number (``unparseable``, scored as empty sets).
"""

import datasets
import evaluate

try:
    from eval.scoring import ec_metrics
except ImportError as exc:  # pragma: no cover
    raise ImportError("ec_metrics needs the ProtLLM repository on sys.path: use eval.metrics.load('ec_metrics')") from exc

_CITATION = "CLEAN (Yu et al., Science 2023); OPI (Xiao et al. 2024)"
_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of answers ("EC 1.1.1.1; 2.7.11.1").
    references: list of reference EC numbers ('; '-separated).
Returns: clean_precision, clean_recall, clean_f1, micro_precision, micro_recall, micro_f1,
    exact_match, level1_accuracy .. level4_accuracy, unparseable, n.
"""


class EcMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return ec_metrics(predictions, references)
