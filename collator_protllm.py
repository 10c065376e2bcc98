"""ProtLLMDataCollator: dataset rows -> padded training batches, with labels on the answer tokens only.

Shipped with every model folder (remote code) and used by this repository's `train_sft.py` too: one
implementation. A user with only a model folder gets it from the processor, `processor.data_collator()`, and hands
it to TRL's `SFTTrainer` (see the model card's "Fine-tune" snippet).

Rows (TRL's dataset formats, with proteins as content blocks):
- language modelling, conversational: `{"messages": [...]}`; every assistant turn is learned.
- prompt-completion, conversational: `{"prompt": [...messages], "completion": [...messages]}`; the assistant turns of
  the completion are learned.
- prompt-completion, standard: `{"prompt": str, "completion": str, "proteins": [...]}` with one `<protein>`
  placeholder in the text per entry of `proteins` (a sequence or `{"sequence", "structure", "chain"}`); the
  completion (plus EOS) is learned.

A protein is a content block `{"type": "protein", "sequence": ..., "structure": ..., "chain": ...}`.
"""

from collections import Counter

import torch


class ProtLLMDataCollator:
    """Rows -> `input_ids`, `attention_mask`, `labels` `(B, S)` (right padded; -100 outside the learned tokens) and the
    protein inputs of `ProtLLMProcessor.__call__` (`protein_input_ids` `(P, T)`, ...).

    Truncation to `max_length` never cuts a protein span: a row longer than `max_length` loses the end of its answer
    when every protein fits, and is dropped from the batch otherwise. Both are counted in `stats`
    (`examples`, `truncated_examples`, `truncated_answer_tokens`, `dropped_examples`).

    Args:
        processor: the model's `ProtLLMProcessor`.
        max_length (`int`, *optional*): tokens per row (protein tokens included); None keeps every row whole.
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this.
    """

    def __init__(self, processor, max_length: int | None = None, pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.stats = Counter()

    def row_messages(self, row: dict) -> tuple[list[dict], int] | None:
        """A conversational row -> (messages, index of the first message whose assistant turns are learned).

        None for a standard (string) prompt-completion row. Subclasses may accept more row formats here.
        """
        if row.get("messages"):
            return row["messages"], 0
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return list(prompt) + list(completion), len(prompt)
        if isinstance(prompt, str) and isinstance(completion, str):
            return None
        raise ValueError(
            f"row {row.get('id', '?')}: expected `messages`, or `prompt` and `completion` (both messages or both "
            f"strings); got columns {sorted(row)}"
        )

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

    def __call__(self, rows: list[dict]) -> dict:
        texts, proteins, spans = [], [], []
        for row in rows:
            conversation = self.row_messages(row)
            if conversation is None:
                text, row_proteins, row_spans = self._standard_row(row)
            else:
                messages, learn_from = conversation
                text, row_proteins, row_spans = self.processor.render_conversation(messages, learn_from=learn_from)
            texts.append(text)
            proteins.append(row_proteins)
            spans.append(row_spans)
        batch = self.processor(
            text=texts, proteins=proteins, padding=True, padding_side="right", return_tensors="pt",
            add_special_tokens=False, assistant_char_spans=spans, pad_to_multiple_of=self.pad_to_multiple_of,
        )
        labels = batch["input_ids"].masked_fill(batch.pop("assistant_masks") == 0, -100)
        batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
        self.stats["examples"] += len(rows)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            batch = self._truncate(batch)
        return dict(batch)

    def _truncate(self, batch) -> dict:
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


__all__ = ["ProtLLMDataCollator"]
