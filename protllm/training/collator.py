"""ProtLLMDataCollator: dataset rows -> padded training batches, with labels on the answer tokens only.

The SFT collator of train_sft.py (tooling, not uploaded with a model: a user fine-tuning a released folder with
plain TRL writes a short collate function on the processor's `apply_chat_template(return_assistant_tokens_mask=True)`,
see the model card's "Fine-tune" snippet).

Rows (TRL's dataset formats, with proteins as content blocks, plus Alpaca / OPI records):
- language modelling, conversational: `{"messages": [...]}`; every assistant turn is learned.
- prompt-completion, conversational: `{"prompt": [...messages], "completion": [...messages]}`; the assistant turns of
  the completion are learned.
- prompt-completion, standard: `{"prompt": str, "completion": str, "proteins": [...]}` with one `<protein>`
  placeholder in the text per entry of `proteins` (a sequence or `{"sequence", "structure", "chain"}`); the
  completion (plus EOS) is learned.
- Alpaca / OPI: `{"instruction", "input" (holding the sequence), "output"}`; the output is learned.

A protein is a content block `{"type": "protein", "sequence": ..., "structure": ..., "chain": ...}`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import torch

from ..cropping import counted_crops
from ..model_classes import messages_for
from .data import rows_to_messages

if TYPE_CHECKING:
    from .feature_cache import FeatureCache  # feature_cache imports this module

logger = logging.getLogger("protllm.train")


def render_conversation(processor, messages: list[dict], learn_from: int = 0,
                        chat_template: str | None = None) -> tuple[str, list, list[tuple[int, int]]]:
    """One conversation -> (rendered text with one `<protein>` per protein, proteins in order, character spans of the
    assistant turns from message `learn_from` on), with `chat_template` (a Jinja string or the name of one of the
    processor's templates), else the processor's own, else the LLM tokenizer's.

    The steps of `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`, with `learn_from` (a
    prompt-completion row learns its completion only) and without the retrieval database's neighbours.
    """
    template = processor._template(chat_template)  # resolved as apply_chat_template does (None: the tokenizer's)
    text_messages, proteins = processor.split_messages(messages, as_blocks=processor.template_reads_blocks(template))
    text = processor.tokenizer.apply_chat_template(text_messages, tokenize=False, chat_template=template)
    return text, proteins, processor.assistant_turn_spans(text_messages, learn_from, template)


class ProtLLMDataCollator:
    """Rows -> `input_ids`, `attention_mask`, `labels` `(B, S)` (right padded; -100 outside the learned tokens) and the
    protein inputs of `ProtLLMProcessor.__call__` (`protein_input_ids` `(P, T)`, ...).

    Truncation to `max_length` never cuts a protein span: a row longer than `max_length` loses the end of its answer
    when every protein fits, and is dropped from the batch otherwise. Both are counted in `stats` (`examples`,
    `truncated_examples`, `truncated_answer_tokens`, `dropped_examples`), as are proteins cropped to the processor's
    `max_protein_length` (`cropped_proteins`, logged once instead of a warning per protein).

    For a model that reads sequences only, a protein given as a structure file becomes its chain's sequence. With a
    `FeatureCache` the protein tokens are replaced by the cached encoder states (`protein_embeds`,
    `protein_embeds_mask`); with `padding_free` the batch is one packed row (`pack_rows`).

    Args:
        processor: the model's `ProtLLMProcessor`.
        max_length (`int`, *optional*): tokens per row (protein tokens included); None keeps every row whole.
        feature_cache (`FeatureCache`, *optional*): cached frozen-encoder states to use instead of the protein tokens.
        padding_free (`bool`): pack the rows into one (TRL's `padding_free`).
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this.
    """

    def __init__(self, processor, max_length: int | None = None, feature_cache: FeatureCache | None = None,
                 padding_free: bool = False, pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.max_length = max_length
        self.feature_cache = feature_cache
        self.padding_free = padding_free  # TRL's `padding_free`: one packed row, position_ids restart per example
        self.pad_to_multiple_of = pad_to_multiple_of
        self.stats = Counter()

    def row_messages(self, row: dict) -> tuple[list[dict], int] | None:
        """A conversational or Alpaca row -> (messages, index of the first message whose assistant turns are learned).

        None for a standard (string) prompt-completion row.
        """
        if row.get("messages"):
            messages, learn_from = row["messages"], 0
        elif "prompt" in row or "completion" in row:
            prompt, completion = row.get("prompt"), row.get("completion")
            if isinstance(prompt, str) and isinstance(completion, str):
                return None
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise ValueError(
                    f"row {row.get('id', '?')}: expected `messages`, or `prompt` and `completion` (both messages or "
                    f"both strings); got columns {sorted(row)}"
                )
            messages, learn_from = list(prompt) + list(completion), len(prompt)
        elif "instruction" in row and "output" in row:
            messages, learn_from = rows_to_messages(row), 0
        else:
            raise ValueError(
                f"row {row.get('id', '?')}: expected `messages`, or `prompt` and `completion` (both messages or both "
                f"strings), or Alpaca fields instruction/input/output; got columns {sorted(row)}"
            )
        return messages_for(self.processor, messages), learn_from  # a sequence model: structure files -> sequences

    def _standard_row(self, row: dict) -> tuple[str, list, list[tuple[int, int]]]:
        tokenizer = self.processor.tokenizer
        prompt, completion = row["prompt"], row["completion"]
        if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token  # the model learns to stop, as TRL does for this format
        # Texts are tokenized without special tokens (chat templates hold their own); add the BOS a plain text needs.
        bos = tokenizer.bos_token or ""
        if bos and not prompt.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
            prompt = bos + prompt
        return prompt + completion, list(row.get("proteins") or []), [(len(prompt), len(prompt) + len(completion))]

    def render_row(self, row: dict) -> tuple[str, list, list[tuple[int, int]]]:
        """One row of any format -> (text with one `<protein>` per protein, its proteins, character spans learned)."""
        conversation = self.row_messages(row)
        if conversation is None:
            return self._standard_row(row)
        return render_conversation(self.processor, *conversation)

    def row_length(self, row: dict) -> int:
        """Tokens `row` takes in a batch before truncation (protein placeholders expanded, no padding): the `length`
        column of the Trainer's `train_sampling_strategy="group_by_length"`."""
        text, proteins, _ = self.render_row(row)
        with counted_crops():
            batch = self.processor(text=[text], proteins=[proteins], add_special_tokens=False)
        return len(batch["input_ids"][0])

    def __call__(self, rows: list[dict]) -> dict:
        texts, proteins, spans = [], [], []
        for row in rows:
            text, row_proteins, row_spans = self.render_row(row)
            texts.append(text)
            proteins.append(row_proteins)
            spans.append(row_spans)
        # Long proteins are counted (`stats["cropped_proteins"]`, logged with the loss), not warned about one by one:
        # on real data that is a warning line for most batches.
        with counted_crops() as crops:
            batch = self.processor(
                text=texts, proteins=proteins, padding=True, padding_side="right", return_tensors="pt",
                add_special_tokens=False, assistant_char_spans=spans, pad_to_multiple_of=self.pad_to_multiple_of,
            )
        if crops and not self.stats["cropped_proteins"]:
            limit = getattr(self.processor, "max_protein_length", None)
            logger.info("proteins longer than %s residues are cropped to their first %s (counted as "
                        "collator/cropped_proteins)", limit, limit)
        self.stats["cropped_proteins"] += len(crops)
        labels = batch["input_ids"].masked_fill(batch.pop("assistant_masks") == 0, -100)
        batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
        self.stats["examples"] += len(rows)
        batch = dict(batch)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            batch = self._truncate(batch)
        if self.feature_cache is not None and "protein_input_ids" in batch:
            batch = self.feature_cache.swap_in(batch)
        # What the batch costs: padding is computed on, then thrown away (`group_by_length` and `padding_free` cut it).
        self.stats["tokens"] += batch["input_ids"].numel()
        self.stats["padding_tokens"] += int((batch["attention_mask"] == 0).sum())
        if self.padding_free:
            batch = pack_rows(batch)
        return batch

    def _truncate(self, batch: dict) -> dict:
        processor = self.processor
        keep_rows, keep_proteins, first_protein = [], [], 0
        for row in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][row]
            length = int(batch["attention_mask"][row].sum())
            starts = (ids == processor.protein_start_token_id).nonzero().flatten()
            ends = (ids == processor.protein_end_token_id).nonzero().flatten()
            proteins = list(range(first_protein, first_protein + len(starts)))
            first_protein += len(starts)
            if len(ends) and int(ends.max()) >= self.max_length:
                self.stats["dropped_examples"] += 1
                continue
            if length > self.max_length:
                self.stats["truncated_examples"] += 1
                self.stats["truncated_answer_tokens"] += int((batch["labels"][row, self.max_length:] != -100).sum())
            keep_rows.append(row)
            keep_proteins.extend(proteins)
        if not keep_rows:
            raise ValueError(
                f"every row of this batch has a protein span beyond max_length={self.max_length}; raise max_length "
                "or lower the processor's max_protein_length"
            )
        out = {}
        for key, value in batch.items():
            if key.startswith("protein_"):
                out[key] = value[torch.tensor(keep_proteins, dtype=torch.long)]
            else:
                out[key] = value[keep_rows, : self.max_length]
        return out


def pack_rows(batch: dict) -> dict:
    """Right-padded `(B, S)` text tensors -> one `(1, sum_b L_b)` row without padding (TRL's `padding_free`):
    `position_ids` restart at 0 for every example and there is no `attention_mask` (transformers derives the
    block-diagonal causal mask from the position_ids; flash attention uses them directly). Each example's first
    label is -100, so no token is predicted across a boundary. Protein tensors keep their order, so the `<protein>`
    placeholders still meet their proteins in order."""
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


__all__ = ["ProtLLMDataCollator", "pack_rows", "render_conversation"]
