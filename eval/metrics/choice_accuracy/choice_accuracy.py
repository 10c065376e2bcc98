"""Accuracy of multiple-choice (MCQA) and yes/no answers parsed from free text, offline.

``kind='mcqa'``: the chosen letter is parsed by ``eval.scoring.parse_choice`` (explicit
"answer is X" statements, last one wins; else a leading letter; else a single parenthesised letter;
else a unique option text). ``kind='yes_no'``: SEPIT's rule, the last stand-alone yes/no.
Unparseable answers are counted and scored wrong. With ``groups`` (the question id shared by the 4
option permutations) also ``perm_all_accuracy`` (all permutations right) and ``perm_mean_accuracy``.
"""

import datasets
import evaluate

try:
    from eval.scoring import choice_accuracy
except ImportError as exc:  # pragma: no cover
    raise ImportError("choice_accuracy needs the ProtLLM repository on sys.path") from exc

_CITATION = "STELLA (arXiv 2506.03800); SEPIT (arXiv 2410.03553)"
_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of free answers.
    references: list of correct letters (mcqa) or yes/no.
    kind: "mcqa" (default) or "yes_no".
    options: optional list (per example) of option texts, used for answers that quote an option.
    groups: optional list of permutation-group ids (4-permutation variant).
Returns: accuracy, unparseable, unparseable_references, n (+ perm_all_accuracy, perm_mean_accuracy, n_groups).
"""


class ChoiceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, kind="mcqa", options=None, groups=None):
        res = choice_accuracy(predictions, references, kind=kind, options=options, groups=groups)
        res.pop("per_example", None)
        return res
