"""The SFT collator of train_sft.py: the remote-code `ProtLLMDataCollator` (collator_protllm.py, shipped with every
model folder) plus two repository-only inputs, Alpaca / OPI records and the frozen-encoder feature cache.

Labelling (answers only) and truncation (never inside a protein span) are the remote-code collator's: one
implementation serves `train_sft.py` and a user fine-tuning a released folder with plain TRL.
"""

from __future__ import annotations

from collator_protllm import ProtLLMDataCollator as _RemoteCodeCollator

from .data import rows_to_messages


class ProtLLMDataCollator(_RemoteCodeCollator):
    """Rows -> padded model inputs with `labels` on assistant answers only (see `collator_protllm`).

    Beyond the remote-code collator: rows may be Alpaca / OPI records (`instruction`, `input`, `output`), and with a
    `FeatureCache` the protein tokens are replaced by the cached encoder states (`protein_embeds`,
    `protein_embeds_mask`).
    """

    def __init__(self, processor, max_length: int | None = None, feature_cache: "FeatureCache | None" = None):
        super().__init__(processor, max_length=max_length)
        self.feature_cache = feature_cache

    def row_messages(self, row: dict):
        if row.get("messages") or "prompt" in row:
            return super().row_messages(row)
        return rows_to_messages(row), 0

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        if self.feature_cache is not None and "protein_input_ids" in batch:
            batch = self.feature_cache.swap_in(batch)
        return batch


__all__ = ["ProtLLMDataCollator"]
