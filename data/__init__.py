"""ProtLLM data: readers, instruction builders, leakage-aware splits and dataset cards."""

from .mmseqs import (  # noqa: F401
    MMseqsError,
    easy_cluster,
    easy_search,
    mmseqs_binary,
    mmseqs_version,
    nearest_identity,
)
