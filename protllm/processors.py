"""Build a ProtLLM processor from an LLM tokenizer: the protein tokens added, a pad token, left padding, and the
protein tokenizer the model's encoder reads (ESM-2's or SaProt's).

Building is tooling (train_sft.py, `protllm.building`, tests): a model folder's processor is loaded with
`AutoProcessor.from_pretrained`, which needs none of this, so it stays out of the uploaded remote code.
"""

from __future__ import annotations

import os
import tempfile

from transformers import AutoTokenizer, EsmTokenizer

from processing_protllm import (
    PROTEIN_END_TOKEN,
    PROTEIN_START_TOKEN,
    PROTEIN_TOKEN,
    ProtLLMProcessor,
)

from .model_classes import processor_class as processor_class_for

# fair-esm / HF ESM-2 alphabet, in id order.
ESM_VOCAB = [
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
]
# The protein tokenizer each `protein_encoder_input` reads.
PROTEIN_TOKENIZER_KINDS = {"sequence": "esm", "saprot": "saprot"}


def protein_tokenizer_from_vocab(vocab: list[str]) -> EsmTokenizer:
    """An `EsmTokenizer` over `vocab` (token strings in id order), built offline."""
    with tempfile.TemporaryDirectory() as directory:
        vocab_file = os.path.join(directory, "vocab.txt")
        with open(vocab_file, "w") as handle:
            handle.write("\n".join(vocab) + "\n")
        return EsmTokenizer(vocab_file=vocab_file)


def build_protein_tokenizer(kind: str = "esm") -> EsmTokenizer:
    """A protein tokenizer built offline: `"esm"` (ESM-2's 33 tokens; the esm package's ids for ESM3 / ESM C too) or
    `"saprot"` (SaProt's 446 amino acid x 3Di tokens, ids of westlake-repl/SaProt_650M_AF2)."""
    if kind == "esm":
        return protein_tokenizer_from_vocab(ESM_VOCAB)
    if kind == "saprot":
        from saprot_protllm import SAPROT_VOCAB

        return protein_tokenizer_from_vocab(SAPROT_VOCAB)
    raise ValueError(f"protein tokenizer kind must be 'esm' or 'saprot', got {kind!r}")


def build_processor(tokenizer, protein_tokenizer=None, *, processor_class: type[ProtLLMProcessor] | None = None,
                    **kwargs) -> ProtLLMProcessor:
    """Add the protein tokens to an LLM tokenizer (a name, path or tokenizer) and build the processor.

    Args:
        tokenizer: the LLM tokenizer, or its name / path. It gets `<protein>`, `<|protein_start|>` and
            `<|protein_end|>` as special tokens, EOS as pad token when it has none, and left padding (what batched
            generation needs; `padding_side=` overrides it), all saved with the tokenizer.
        protein_tokenizer (*optional*): an `EsmTokenizer` or its name / path; None builds the one
            `protein_encoder_input` reads (`build_protein_tokenizer`: ESM-2's for `"sequence"`, SaProt's for
            `"saprot"`).
        processor_class (*optional*): `ProtLLMProcessor` or `ProtLLMStructureProcessor`; None picks the one the model
            needs (`protllm.model_classes.processor_class` of `kwargs`: the structure reader for SaProt input).
        **kwargs: the processor's arguments (`protein_encoder_input`, `max_protein_length`, `num_query_tokens`, ...).
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if processor_class is None:
        processor_class = processor_class_for(kwargs)
    if protein_tokenizer is None:
        # An unknown input gets ESM-2's here and the processor's error below.
        encoder_input = kwargs.get("protein_encoder_input", "sequence")
        protein_tokenizer = build_protein_tokenizer(PROTEIN_TOKENIZER_KINDS.get(encoder_input, "esm"))
    elif isinstance(protein_tokenizer, (str, os.PathLike)):
        protein_tokenizer = AutoTokenizer.from_pretrained(protein_tokenizer)
    tokenizer.add_tokens([PROTEIN_TOKEN, PROTEIN_START_TOKEN, PROTEIN_END_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The processor sets a `padding_side` argument on the tokenizer (saved there, not in processor_config.json).
    kwargs.setdefault("padding_side", "left")
    return processor_class(tokenizer, protein_tokenizer, **kwargs)


__all__ = ["ESM_VOCAB", "build_processor", "build_protein_tokenizer", "protein_tokenizer_from_vocab"]
