"""Local ``evaluate`` metric scripts (offline; the Hub's scripts cannot be fetched here).

``load(name)`` = ``evaluate.load("eval/metrics/<name>")`` with the repository root made importable
(the scripts call :mod:`eval.scoring`, so no metric code is duplicated).
"""

from __future__ import annotations

import sys
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
NAMES = ("protein_text", "ec_metrics", "choice_accuracy", "label_set_f1")


def ensure_importable() -> None:
    root = str(METRICS_DIR.parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def load(name: str, **kwargs):
    """``evaluate.load`` of the local metric script ``eval/metrics/<name>``."""
    import evaluate

    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}; choose from {NAMES}")
    ensure_importable()
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
