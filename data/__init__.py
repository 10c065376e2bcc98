"""ProtLLM data: readers, instruction builders, leakage-aware splits and dataset cards."""

from .mmseqs import (  # noqa: F401
    MMseqsError,
    easy_cluster,
    easy_search,
    mmseqs_binary,
    mmseqs_version,
    nearest_identity,
)


def load_demo_dataset(path=None):
    """The committed demo dataset (data/demo/*.jsonl) as a ``datasets.DatasetDict``."""
    from .build_demo import DEMO_DIR, load_demo_dataset as _load

    return _load(path or DEMO_DIR)
