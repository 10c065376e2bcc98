"""Micro precision/recall/F1 over '; '-separated label sets (OPI's GO terms / keywords / EC), offline.

Labels are split on ';' (and newlines), stripped, lower-cased and de-duplicated
(``eval.scoring.split_labels``); micro = summed true positives over summed predicted / reference
labels. Also per-example exact set match and the number of empty predictions (scored wrong).
"""

import datasets
import evaluate

try:
    from eval.scoring import label_set_metrics
except ImportError as exc:  # pragma: no cover
    raise ImportError("label_set_f1 needs the ProtLLM repository on sys.path") from exc

_CITATION = "OPI: Open Protein Instructions (Xiao et al. 2024)"
_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of '; '-separated label strings.
    references: list of '; '-separated label strings.
Returns: precision, recall, f1, exact_match, empty_predictions, n.
"""


class LabelSetF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return label_set_metrics(predictions, references)
