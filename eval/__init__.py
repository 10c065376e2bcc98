"""ProtLLM evaluation harness: data loading, resumable generation, baselines, metrics, reports.

Run ``python -m eval --help``. Metric modules for ``evaluate.load`` live in ``eval/metrics/<name>``;
the plain functions they call are in :mod:`eval.scoring`. Importing this package is cheap (no torch).
"""

__all__ = ["data", "scoring", "generate", "baselines", "report"]
