"""ProtLLM data: readers, instruction builders, leakage-aware splits and dataset cards."""

import os
from pathlib import Path

from .mmseqs import (  # noqa: F401
    MMseqsError,
    easy_cluster,
    easy_search,
    mmseqs_binary,
    mmseqs_version,
    nearest_identity,
)

# The project's real data: ../shared/data beside the repository, or $PROTLLM_SHARED_DATA (read in place, never copied).
SHARED_DATA = Path(os.environ.get("PROTLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_demo_dataset(path=None):
    """The committed demo dataset (data/demo/*.jsonl) as a ``datasets.DatasetDict``."""
    from .build_demo import DEMO_DIR, load_demo_dataset as _load

    return _load(path or DEMO_DIR)
