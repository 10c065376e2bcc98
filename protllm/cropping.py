"""Proteins cropped to `max_protein_length`, counted instead of warned about one by one.

The processor warns once per cropped protein (naming it), which on real data is a warning line for most batches of
a training or evaluation run; these runs count the crops and say it once.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

# The processor's warning for a protein longer than max_protein_length (processing_protllm.prepare_protein).
CROP_WARNING = "cropped to max_protein_length"


@contextmanager
def counted_crops():
    """Collect the processor's crop warnings raised inside the block instead of showing them; any other warning is
    shown as usual. Yields a list that holds, once the block has ended, the message of each cropped protein."""
    crops: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield crops
    for warning in caught:
        if issubclass(warning.category, UserWarning) and CROP_WARNING in str(warning.message):
            crops.append(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


__all__ = ["CROP_WARNING", "counted_crops"]
