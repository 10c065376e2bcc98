"""The SFT collator of train_sft.py: the remote-code `ProtLLMDataCollator` (collator_protllm.py, shipped with every
model folder) plus two repository-only inputs, Alpaca / OPI records and the frozen-encoder feature cache.

Labelling (answers only) and truncation (never inside a protein span) are the remote-code collator's: one
implementation serves `train_sft.py` and a user fine-tuning a released folder with plain TRL.
"""

from __future__ import annotations

import logging

from collator_protllm import ProtLLMDataCollator as _RemoteCodeCollator

from ..cropping import counted_crops
from ..model_classes import messages_for
from .data import rows_to_messages

logger = logging.getLogger("protllm.train")


class ProtLLMDataCollator(_RemoteCodeCollator):
    """Rows -> padded model inputs with `labels` on assistant answers only (see `collator_protllm`).

    Beyond the remote-code collator: rows may be Alpaca / OPI records (`instruction`, `input`, `output`); for a model
    that reads sequences only, a protein given as a structure file becomes its chain's sequence; and with a
    `FeatureCache` the protein tokens are replaced by the cached encoder states (`protein_embeds`,
    `protein_embeds_mask`).
    """

    def __init__(self, processor, max_length: int | None = None, feature_cache: "FeatureCache | None" = None,
                 padding_free: bool = False):
        super().__init__(processor, max_length=max_length)
        self.feature_cache = feature_cache
        self.padding_free = padding_free  # TRL's `padding_free`: one packed row, position_ids restart per example

    def row_messages(self, row: dict):
        if row.get("messages") or "prompt" in row:
            found = super().row_messages(row)
        else:
            found = rows_to_messages(row), 0
        if found is not None:
            found = messages_for(self.processor, found[0]), found[1]  # a sequence model: structure files -> sequences
        return found

    def __call__(self, rows: list[dict]) -> dict:
        # Long proteins are counted (`stats["cropped_proteins"]`, logged with the loss), not warned about one by one:
        # on real data that is a warning line for most batches.
        with counted_crops() as crops:
            batch = super().__call__(rows)
        if crops and not self.stats["cropped_proteins"]:
            limit = getattr(self.processor, "max_protein_length", None)
            logger.info("proteins longer than %s residues are cropped to their first %s (counted as "
                        "collator/cropped_proteins)", limit, limit)
        self.stats["cropped_proteins"] += len(crops)
        if self.feature_cache is not None and "protein_input_ids" in batch:
            batch = self.feature_cache.swap_in(batch)
        if self.padding_free:
            batch = pack_rows(batch)
        return batch


def pack_rows(batch: dict) -> dict:
    """Right-padded `(B, S)` text tensors -> one `(1, sum_b L_b)` row without padding (TRL's `padding_free`):
    `position_ids` restart at 0 for every example and there is no `attention_mask` (transformers derives the
    block-diagonal causal mask from the position_ids; flash attention uses them directly). Each example's first
    label is -100, so no token is predicted across a boundary. Protein tensors keep their order, so the `<protein>`
    placeholders still meet their proteins in order."""
    import torch

    lengths = batch["attention_mask"].sum(dim=1).tolist()
    packed = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask", "labels")}
    packed["input_ids"] = torch.cat([batch["input_ids"][row, :n] for row, n in enumerate(lengths)]).unsqueeze(0)
    labels = [batch["labels"][row, :n].clone() for row, n in enumerate(lengths)]
    for row_labels in labels:
        row_labels[0] = -100
    packed["labels"] = torch.cat(labels).unsqueeze(0)
    packed["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    # transformers builds the block-diagonal mask from position_ids only without a KV cache (training).
    packed["use_cache"] = False
    return packed


__all__ = ["ProtLLMDataCollator"]
