"""ProtLLMProcessor: the LLM tokenizer and the protein tokenizer behind one call, for a model that reads sequences.

Text carries one `<protein>` placeholder per protein. The processor expands each placeholder to
`<|protein_start|>` + n x `<protein>` + `<|protein_end|>`, where n is the number of tokens the model's
projector emits for that protein (its residue count, or `num_query_tokens` for a resampler), and tokenizes
the proteins' amino acids with padding.

Residue policy (ESM alphabet, `clean_residues`: the one rule, which the structure reader uses too): the 20 standard
amino acids plus B, Z, U, O, X are kept; lower case is upper-cased; white space and a terminal `*` are removed;
anything else (digits, punctuation, other letters such as J) is an error naming the protein and position. An empty
sequence is an error. A sequence longer than `max_protein_length` is cropped to its first `max_protein_length`
residues with a warning (`protein_overflow="crop"`) or refused (`protein_overflow="error"`).

Structures: this processor reads no structure file, only an already parsed structure (`.sequence`, `.coords`); a
model that reads structures has `structure_processing_protllm.ProtLLMStructureProcessor`, which overrides the hooks
`_load_structure` and `_saprot_tokens`.
"""

import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack
from transformers.utils.chat_template_utils import render_jinja_template

try:
    from .retrieval_protllm import DATABASE_DIR, RetrievalDatabase, render_block
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from retrieval_protllm import DATABASE_DIR, RetrievalDatabase, render_block

PROTEIN_TOKEN = "<protein>"
PROTEIN_START_TOKEN = "<|protein_start|>"
PROTEIN_END_TOKEN = "<|protein_end|>"
# A chat template's `{% generation %}` tag (the same pattern transformers looks for): marks the assistant text.
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")

#: The residue rule of every ProtLLM input: the ESM-2 alphabet (20 amino acids plus B, Z, U, O, X).
VALID_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYBZUOX")


class ProteinInputError(ValueError):
    """A protein input the processor cannot use; the message names the protein (and residue) at fault."""


def clean_residues(sequence, context: str = "sequence", error_class: type = ValueError) -> str:
    """The residue policy above (shared by the processor, the structure reader and the data tools) -> the upper-case
    sequence; raises `error_class` with a message starting with `context` (`"protein 2"`, a file name)."""
    if not isinstance(sequence, str):
        raise error_class(f"{context}: sequence must be a string, got {type(sequence).__name__}")
    cleaned = "".join(sequence.split())
    cleaned = cleaned[:-1] if cleaned.endswith("*") else cleaned
    if not cleaned:
        raise error_class(f"{context}: empty sequence")
    # Checked before upper-casing: str.upper maps some non-ASCII letters to residues ('ß' -> 'SS', 'ı' -> 'I').
    upper = cleaned.upper()
    if not (cleaned.isascii() and VALID_RESIDUES.issuperset(upper)):
        position, residue = next((i, r) for i, r in enumerate(cleaned) if not r.isascii() or r.upper() not in VALID_RESIDUES)
        raise error_class(f"{context}: invalid residue {residue!r} at position {position + 1} (allowed: 20 amino acids and B, Z, U, O, X)")
    return upper


def clean_sequence(sequence, protein_index: int) -> str:
    """`clean_residues` for protein `protein_index`: ProteinInputError naming the protein and the first bad residue."""
    return clean_residues(sequence, f"protein {protein_index}", ProteinInputError)


def _describe_structure_input(source) -> str:
    """A structure input as an error message names it: a file name, structure bytes or text, a coordinate dict."""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source):
        return f"the structure file {os.path.basename(os.fspath(source))[:200]!r}"
    kinds = {bytes: "structure bytes", str: "structure text", dict: "a coordinate dict"}
    return next((name for kind, name in kinds.items() if isinstance(source, kind)), f"a structure of type {type(source).__name__}")


def _set_padding_side(tokenizer, padding_side: str) -> None:
    """Set the LLM tokenizer's padding side so that `save_pretrained` keeps it (a tokenizer saves its init kwargs)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer.padding_side = padding_side
    tokenizer.init_kwargs["padding_side"] = padding_side


class ProtLLMProcessorKwargs(ProcessingKwargs, total=False):
    """Typed kwargs of `ProtLLMProcessor.__call__`: transformers' `TextKwargs` (`padding_side` overrides the LLM
    tokenizer's padding side for one call; `add_special_tokens=False` for rendered chats) plus

    assistant_char_spans (`list[list[tuple[int, int]]]`, *optional*): per text, the character spans whose tokens are
        learned; the output then has `assistant_masks` `(B, S)` (1 on tokens overlapping a span, 0 elsewhere and on
        proteins).
    """

    text_kwargs: TextKwargs
    assistant_char_spans: list | None


@dataclass
class ProtLLMMultiModalData(MultiModalData):
    """`MultiModalData` with the LLM tokens each protein takes (its `<protein>` run, start/end markers excluded)."""

    num_protein_tokens: list[int] | None = None


class ProtLLMProcessor(ProcessorMixin):
    r"""
    Constructs a ProtLLM processor from an LLM tokenizer and a protein tokenizer (EsmTokenizer), for a model that
    reads sequences (one that reads structures: `structure_processing_protllm.ProtLLMStructureProcessor`).

    Args:
        tokenizer: the LLM tokenizer (any fast tokenizer with a chat template); must know the protein tokens
            (`protllm.processors.build_processor` of the ProtLLM repository adds them).
        protein_tokenizer: an `EsmTokenizer` (ESM-2 or SaProt vocabulary).
        chat_template (`str`, *optional*): a Jinja template; defaults to the LLM tokenizer's own.
        num_query_tokens (`int`, *optional*): protein tokens per protein for a resampler projector; None means
            one token per residue.
        max_protein_length (`int`): residues per protein.
        protein_overflow (`"crop"` or `"error"`): what to do with longer proteins.
        protein_encoder_input (`"sequence"`; `"saprot"` in `ProtLLMStructureProcessor`): tokenize amino acids, or
            SaProt amino acid + 3Di.
        plddt_threshold (`float`): SaProt input masks the 3Di token of residues below this pLDDT.

    Chat templates: `apply_chat_template` renders with the `chat_template` passed, else the processor's own, else the
    LLM tokenizer's. Message contents reach a template as it reads them (see `template_reads_blocks`): one string
    with a `<protein>` per protein for text-LLM templates, content blocks for templates written for transformers'
    structured content (a protein block then carries `"text": "<protein>"`).

    Padding side: the LLM tokenizer's `padding_side` (saved with the tokenizer, as for every transformers processor);
    `build_processor` sets it to left, what batched generation needs. `padding_side=` on a call overrides it.
    """

    valid_processor_kwargs = ProtLLMProcessorKwargs
    protein_encoder_inputs = ("sequence",)  # what the protein encoder may read; the structure subclass adds "saprot"
    reads_structures = False  # structure files: the subclass in structure_processing_protllm.py
    # Only defaults that differ from the tokenizer's own (its `add_special_tokens=True` is not repeated here).
    text_kwargs = {"padding": True}

    def __init__(
        self,
        tokenizer=None,
        protein_tokenizer=None,
        chat_template=None,
        num_query_tokens: int | None = None,
        max_protein_length: int = 1024,
        protein_overflow: str = "crop",
        protein_encoder_input: str = "sequence",
        plddt_threshold: float = 70.0,
        **kwargs,
    ):
        if protein_overflow not in ("crop", "error"):
            raise ValueError(f"protein_overflow must be 'crop' or 'error', got {protein_overflow!r}")
        if protein_encoder_input not in self.protein_encoder_inputs:
            raise ValueError(f"protein_encoder_input must be one of {self.protein_encoder_inputs} for {type(self).__name__}, got "
                             f"{protein_encoder_input!r} (SaProt's 3Di tokens come from structures: use "
                             "structure_processing_protllm.ProtLLMStructureProcessor)")
        self.num_query_tokens = num_query_tokens
        self.max_protein_length = max_protein_length
        self.protein_overflow = protein_overflow
        self.protein_encoder_input = protein_encoder_input
        self.plddt_threshold = plddt_threshold
        # Set on the LLM tokenizer (saved there): by `build_processor`, and from the processor_config.json of folders
        # saved before padding_side moved to the tokenizer.
        padding_side = kwargs.pop("padding_side", None)
        super().__init__(tokenizer, protein_tokenizer, chat_template=chat_template)
        if padding_side is not None:
            _set_padding_side(self.tokenizer, padding_side)
        # The model folder's retrieval database (retrieval_protllm.RetrievalDatabase), or None: set by from_pretrained.
        self.retrieval_database = None
        missing = [t for t in (PROTEIN_TOKEN, PROTEIN_START_TOKEN, PROTEIN_END_TOKEN) if t not in self.tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the LLM tokenizer lacks the protein tokens {missing}; build the processor with "
                             "protllm.processors.build_processor (ProtLLM repository), which adds them")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the processor and, when the folder has `retrieval/`, its retrieval database."""
        # The LLM tokenizer is plain: loading it must not ask whether to run the folder's model code (AutoTokenizer
        # reads config.json, whose `auto_map` makes transformers prompt, and wait 15 s, when nobody said).
        kwargs.setdefault("trust_remote_code", False)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor.retrieval_database = RetrievalDatabase.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        database, self.retrieval_database = self.retrieval_database, None  # plain JSON files, not processor config
        try:
            saved = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.retrieval_database = database
        if database is not None:
            database.save(os.path.join(save_directory, DATABASE_DIR))
        return saved

    @property
    def protein_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(PROTEIN_TOKEN)

    @property
    def protein_start_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(PROTEIN_START_TOKEN)

    @property
    def protein_end_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(PROTEIN_END_TOKEN)

    @property
    def model_input_names(self):
        return [
            "input_ids", "attention_mask", "protein_input_ids", "protein_attention_mask",
            "protein_coords", "protein_coord_mask",
        ]

    # ----- proteins --------------------------------------------------------------------------------------

    def prepare_protein(self, protein, protein_index: int) -> dict:
        """One protein spec -> {"sequence", "tokens" (string for the protein tokenizer), "structure" or None}.

        `protein`: a sequence string; a dict with `sequence` and/or `structure` (a parsed structure, with `.sequence`
        and `.coords`; files too in `ProtLLMStructureProcessor`) and optional `chain`; or a parsed structure.
        """
        if isinstance(protein, str):
            protein = {"sequence": protein}
        elif not isinstance(protein, dict):
            if hasattr(protein, "coords") and hasattr(protein, "sequence"):
                protein = {"sequence": protein.sequence, "structure": protein}
            else:
                raise ProteinInputError(f"protein {protein_index}: expected a sequence string or a dict, got {type(protein).__name__}")
        sequence, source = protein.get("sequence"), protein.get("structure")
        if sequence is None and source is None:
            raise ProteinInputError(f"protein {protein_index}: give a sequence, a structure, or both")
        structure = None
        if source is not None:
            structure = self._load_structure(source, protein.get("chain"), None if sequence is None else clean_sequence(sequence, protein_index), protein_index)
            sequence = structure.sequence
        sequence = clean_sequence(sequence, protein_index)
        if len(sequence) > self.max_protein_length:
            if self.protein_overflow == "error":
                raise ProteinInputError(
                    f"protein {protein_index}: {len(sequence)} residues exceed max_protein_length={self.max_protein_length}"
                )
            warnings.warn(
                f"protein {protein_index}: {len(sequence)} residues cropped to max_protein_length={self.max_protein_length}",
                stacklevel=3,
            )
            sequence = sequence[: self.max_protein_length]
            if structure is not None:
                structure = structure.crop(0, self.max_protein_length)
        tokens = sequence
        if self.protein_encoder_input == "saprot":
            tokens = self._saprot_tokens(sequence, structure)
        return {"sequence": sequence, "tokens": tokens, "structure": structure}

    def _load_structure(self, source, chain, sequence, protein_index):
        """Hook: one protein's structure input -> a parsed structure (`.sequence`, `.coords` `(L, 4, 3)`, `.coord_mask`
        `(L,)`, `.crop`) aligned to `sequence` (cleaned, or None). Here a parsed one as is; anything else is refused."""
        if not (hasattr(source, "sequence") and hasattr(source, "coords")):
            raise ProteinInputError(
                f"protein {protein_index}: got {_describe_structure_input(source)}, but this model's processor reads "
                "sequences only (its model uses no structure); give the protein's sequence, or use a model that "
                "reads structures (its processor, ProtLLMStructureProcessor, reads structure files)")
        if chain is not None and getattr(source, "chain_id", chain) != chain:
            raise ProteinInputError(f"protein {protein_index}: chain {chain!r} requested but the structure holds chain "
                                    f"{source.chain_id!r}")
        if sequence is not None and clean_sequence(source.sequence, protein_index) != sequence:
            raise ProteinInputError(f"protein {protein_index}: the given sequence differs from the structure's; aligning "
                                    "them needs a structure-reading processor: give the structure's own sequence, or none")
        return source

    def _saprot_tokens(self, sequence, structure) -> str:
        """Hook: SaProt tokens (amino acid + 3Di per residue) of one protein; `ProtLLMStructureProcessor` makes them."""
        raise ValueError(f"protein_encoder_input={self.protein_encoder_input!r}: {type(self).__name__} makes no 3Di "
                         "tokens; use structure_processing_protllm.ProtLLMStructureProcessor")

    def num_protein_tokens(self, sequence: str) -> int:
        """LLM tokens the projector emits for one protein."""
        return self.num_query_tokens if self.num_query_tokens else len(sequence)

    def _protein_tensors(self, prepared: list[dict]) -> dict:
        encoded = self.protein_tokenizer(
            [p["tokens"] for p in prepared], padding=True, return_attention_mask=True, add_special_tokens=True
        )
        data = {"protein_input_ids": encoded["input_ids"], "protein_attention_mask": encoded["attention_mask"]}
        if any(p["structure"] is not None for p in prepared):
            longest = max(len(p["sequence"]) for p in prepared)
            coords = np.zeros((len(prepared), longest, 4, 3), dtype=np.float32)
            mask = np.zeros((len(prepared), longest), dtype=bool)
            for i, p in enumerate(prepared):
                if p["structure"] is not None:
                    length = len(p["structure"])
                    coords[i, :length] = np.nan_to_num(p["structure"].coords)
                    mask[i, :length] = p["structure"].coord_mask
            data["protein_coords"] = coords
            data["protein_coord_mask"] = mask
        return data

    # ----- text ------------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | list[str] | None = None,
        proteins=None,
        images=None,
        videos=None,
        audio=None,
        **kwargs: Unpack[ProtLLMProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize text with `<protein>` placeholders and the proteins they stand for.

        text: a string or a list of strings. proteins: for one string, a list of protein specs (see
        `prepare_protein`); for a list of strings, one such list per string (None or [] where a text has none).
        Text kwargs (`ProtLLMProcessorKwargs`): `padding` (default True), `padding_side`, `pad_to_multiple_of`,
        `truncation` + `max_length` (a row is cut only where no protein span crosses `max_length`; otherwise
        ProteinInputError), `add_special_tokens`, `return_tensors`; and `assistant_char_spans`.
        Returns `input_ids`, `attention_mask` `(B, S)`, `protein_input_ids`, `protein_attention_mask` `(P, T)` and,
        when any protein has a structure, `protein_coords` `(P, R, 4, 3)` and `protein_coord_mask` `(P, R)`.
        """
        if text is None:
            raise ValueError("ProtLLMProcessor needs `text` (use '<protein>' where each protein goes)")
        for name, value in (("images", images), ("videos", videos), ("audio", audio)):
            if value is not None:
                raise ValueError(f"ProtLLMProcessor takes `proteins`, not {name}")
        merged = self._merge_kwargs(ProtLLMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = merged["text_kwargs"]
        assistant_char_spans = merged.get("assistant_char_spans")
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        if proteins is None:
            per_text = [[] for _ in texts]
        elif batched:
            per_text = [list(p) if p else [] for p in proteins]
        else:
            per_text = [list(proteins)]
        if len(per_text) != len(texts):
            raise ProteinInputError(f"got {len(texts)} texts but protein lists for {len(per_text)}")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("every text must be a string")
        for text_index, sample in enumerate(texts):
            try:  # a lone surrogate (e.g. from a badly decoded file) makes the tokenizer raise a TypeError
                sample.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ProteinInputError(f"text {text_index}: not valid Unicode text ({error.reason} at character {error.start})") from None

        prepared, rows, masks = [], [], []
        protein_index = 0
        for text_index, sample in enumerate(texts):
            encoded = self.tokenizer(
                sample,
                add_special_tokens=text_kwargs.get("add_special_tokens", True),
                return_offsets_mapping=assistant_char_spans is not None,
            )
            ids = encoded["input_ids"]
            count = ids.count(self.protein_token_id)
            if count != len(per_text[text_index]):
                raise ProteinInputError(
                    f"text {text_index} has {count} '{PROTEIN_TOKEN}' placeholders but {len(per_text[text_index])} proteins were given"
                )
            char_mask = None
            if assistant_char_spans is not None:
                spans = assistant_char_spans[text_index]
                # A token is learned when it overlaps a span (transformers' rule); zero-width tokens never are.
                char_mask = [
                    int(any(token_start < end and token_end > start for start, end in spans))
                    for token_start, token_end in encoded["offset_mapping"]
                ]
            sample_proteins = []
            for protein in per_text[text_index]:
                sample_proteins.append(self.prepare_protein(protein, protein_index))
                protein_index += 1
            expanded, expanded_mask = self._expand_placeholders(ids, char_mask, sample_proteins)
            if text_kwargs.get("truncation") and text_kwargs.get("max_length"):
                expanded, expanded_mask = self._truncate_row(expanded, expanded_mask, text_kwargs["max_length"], text_index)
            prepared.extend(sample_proteins)
            rows.append(expanded)
            masks.append(expanded_mask)

        data = self._pad(
            rows, masks if assistant_char_spans is not None else None, text_kwargs.get("padding", True),
            text_kwargs.get("padding_side"), text_kwargs.get("max_length"), text_kwargs.get("pad_to_multiple_of"),
        )
        if prepared:
            data.update(self._protein_tensors(prepared))
        return BatchFeature(data=data, tensor_type=text_kwargs.get("return_tensors"))

    def _truncate_row(self, ids, mask, max_length, text_index):
        """Cut a row to `max_length` tokens unless that would cut a protein span (then ProteinInputError)."""
        if len(ids) <= max_length:
            return ids, mask
        if self.protein_end_token_id in ids[max_length:] or self.protein_token_id in ids[max_length:]:
            raise ProteinInputError(
                f"text {text_index}: truncation to max_length={max_length} would cut a protein span; raise max_length "
                "or lower max_protein_length"
            )
        return ids[:max_length], mask[:max_length]

    def _get_num_multimodal_tokens(self, protein_lengths: list[int] | None = None, **kwargs) -> ProtLLMMultiModalData:
        """LLM tokens of each protein's `<protein>` run, from residue counts (after cropping to `max_protein_length`)."""
        if protein_lengths is None:
            return ProtLLMMultiModalData()
        return ProtLLMMultiModalData(
            num_protein_tokens=[self.num_protein_tokens("X" * min(n, self.max_protein_length)) for n in protein_lengths]
        )

    def _expand_placeholders(self, ids, char_mask, proteins):
        expanded, expanded_mask, next_protein = [], [], 0
        for position, token in enumerate(ids):
            flag = char_mask[position] if char_mask is not None else 0
            if token == self.protein_token_id:
                n = self.num_protein_tokens(proteins[next_protein]["sequence"])
                next_protein += 1
                span = [self.protein_start_token_id] + [self.protein_token_id] * n + [self.protein_end_token_id]
                expanded.extend(span)
                expanded_mask.extend([0] * len(span))
            else:
                expanded.append(token)
                expanded_mask.append(flag)
        return expanded, expanded_mask

    def _pad(self, rows, assistant_masks, padding, padding_side, max_length=None, pad_to_multiple_of=None):
        side = padding_side or self.tokenizer.padding_side
        if len(rows) > 1 and not padding and len({len(r) for r in rows}) > 1:
            raise ValueError("texts of different lengths need padding=True to be batched")
        longest = max(len(r) for r in rows)
        if padding == "max_length" and max_length:
            longest = max(longest, max_length)
        if padding and pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        data = {"input_ids": [], "attention_mask": []}
        if assistant_masks is not None:
            data["assistant_masks"] = []
        for i, row in enumerate(rows):
            gap = longest - len(row)
            pad, ones = [pad_id] * gap, [1] * len(row)
            zeros = [0] * gap
            if side == "left":
                data["input_ids"].append(pad + row)
                data["attention_mask"].append(zeros + ones)
                if assistant_masks is not None:
                    data["assistant_masks"].append(zeros + assistant_masks[i])
            else:
                data["input_ids"].append(row + pad)
                data["attention_mask"].append(ones + zeros)
                if assistant_masks is not None:
                    data["assistant_masks"].append(assistant_masks[i] + zeros)
        return data

    # ----- chat ------------------------------------------------------------------------------------------

    @staticmethod
    def split_messages(messages, as_blocks: bool = False):
        """Chat messages with content blocks -> (messages for the chat template, proteins in order).

        A `{"type": "protein", "sequence": ..., "structure": ..., "chain": ...}` block stands for one `<protein>`
        placeholder. With `as_blocks=False` (text-LLM templates, which read `message['content']` as a string) the
        blocks of a message are joined by newlines into one string; with `as_blocks=True` (templates written for
        transformers' structured content) contents stay lists of blocks and a protein block becomes
        `{"type": "protein", "text": "<protein>"}`. String contents pass unchanged.
        """
        text_messages, proteins = [], []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"message {index}: expected a dict with a 'role' ('user', 'assistant' or 'system') and "
                                 f"a 'content', got {message!r:.200}")
            content = message.get("content")
            if isinstance(content, str) or content is None:
                text_messages.append(dict(message))
                continue
            pieces = []
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "protein":
                    proteins.append({k: block.get(k) for k in ("sequence", "structure", "chain") if block.get(k) is not None})
                    pieces.append({"type": "protein", "text": PROTEIN_TOKEN})
                elif kind == "text":
                    # datasets stores blocks of mixed types with every key, None where absent
                    text = block.get("text") or ""
                    if PROTEIN_TOKEN in text:  # it would be counted as a protein with none behind it
                        raise ValueError(f"message {index}: text holds the literal {PROTEIN_TOKEN!r}, which stands for a "
                                         "protein; give proteins as {'type': 'protein', 'sequence': ...} blocks and "
                                         f"reword the text")
                    pieces.append({"type": "text", "text": text})
                elif kind == "neighbours":  # retrieved (or user-given) similar proteins, rendered as text
                    pieces.append({"type": "text", "text": render_block(block)})
                else:
                    raise ValueError(f"message {index}: unsupported content block {block!r} "
                                     "(expected type 'protein', 'text' or 'neighbours')")
            if not as_blocks:
                pieces = "\n".join(piece["text"] for piece in pieces)
            text_messages.append({**message, "content": pieces})
        return text_messages, proteins

    def template_reads_blocks(self, chat_template=None) -> bool:
        """Whether `chat_template` (None: the tokenizer's) is written for structured content (`message['content']` a
        list of `{"type", "text"}` blocks, as transformers' multimodal templates are) rather than for strings.

        Decided once per template by rendering a probe chat with block contents: a string template fails on it
        (`'...' + list`) or prints the blocks' repr.
        """
        cache = self.__dict__.setdefault("_reads_blocks", {})
        if chat_template not in cache:
            probe = [{"role": "user", "content": [{"type": "text", "text": "PROBE-USER"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "PROBE-ANSWER"}]}]
            try:
                rendered = self._render(probe, chat_template)
                cache[chat_template] = "PROBE-USER" in rendered and "PROBE-ANSWER" in rendered and "'type'" not in rendered
            except Exception:  # noqa: BLE001 - any template error on block contents means it reads strings
                cache[chat_template] = False
        return cache[chat_template]

    def _template_messages(self, messages, chat_template):
        return self.split_messages(messages, as_blocks=self.template_reads_blocks(chat_template))

    def _template(self, chat_template):
        """The template to render with: `chat_template` (a Jinja string or the name of one of the processor's
        templates), else the processor's own, else None (the LLM tokenizer's)."""
        if chat_template is None:
            chat_template = self.chat_template
            if isinstance(chat_template, dict):
                chat_template = chat_template.get("default")
        elif isinstance(self.chat_template, dict) and chat_template in self.chat_template:
            chat_template = self.chat_template[chat_template]
        return chat_template

    def _render(self, messages, chat_template=None, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template, **kwargs)

    def assistant_turn_spans(self, messages, learn_from: int = 0, chat_template=None, **kwargs) -> list[tuple[int, int]]:
        """Character spans of the assistant turns from message `learn_from` on, in the rendered chat.

        A template with `{% generation %}` ... `{% endgeneration %}` blocks declares them itself: the spans are those
        blocks (transformers' `return_assistant_tokens_mask` convention, which TRL's `assistant_only_loss` follows).
        A template without them (most text-LLM templates, SmolLM2's and Qwen2's included) gets, per assistant message,
        the text its rendering adds after the generation prompt: its content and end-of-turn marker.
        """
        template = self.tokenizer.get_chat_template(chat_template, kwargs.get("tools"))
        if GENERATION_BLOCK.search(template):
            rendered, generation_spans = render_jinja_template(
                conversations=[messages],
                chat_template=template,
                return_assistant_tokens_mask=True,
                **{**self.tokenizer.special_tokens_map, **kwargs},  # the template variables the tokenizer's render sees
            )
            if rendered[0] != self._render(messages, chat_template, **kwargs):
                raise ValueError("the chat template renders differently with assistant tracking; cannot mask assistant turns")
            start = len(self._render(messages[:learn_from], chat_template, **kwargs)) if learn_from else 0
            return [(begin, end) for begin, end in generation_spans[0] if begin >= start]
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or index < learn_from:
                continue
            prefix = self._render(messages[:index], chat_template, add_generation_prompt=True, **kwargs) if index else ""
            upto = self._render(messages[: index + 1], chat_template, **kwargs)
            if not upto.startswith(prefix):
                raise ValueError("the chat template does not render conversations prefix-consistently; cannot mask assistant turns")
            spans.append((len(prefix), len(upto)))
        return spans

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        return_assistant_tokens_mask: bool = False,
        tokenize: bool = False,
        return_tensors=None,
        return_dict: bool = False,
        processor_kwargs: dict | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        retrieval: bool | None = None,
        retrieval_field: str | list | None = None,
        **kwargs,
    ):
        """Render (and optionally tokenize) one conversation or a batch of them.

        Same signature as `ProcessorMixin.apply_chat_template`: `chat_template` (a Jinja string or a template name),
        `tools`, `documents` and any other `**kwargs` reach the template; `processor_kwargs` reach `__call__`
        (`padding`, `padding_side` are accepted directly too). With `tokenize=False` returns the rendered string(s)
        with one `<protein>` per protein. With `tokenize=True` and `return_dict=True` returns what `__call__`
        returns (plus `assistant_masks` when `return_assistant_tokens_mask=True`: 1 on assistant answer tokens, the
        only ones training learns from).
        `retrieval`: None (default) adds the retrieval database's neighbours after each protein when the processor
        has one (a message holding a neighbours block is kept as given); False never; True requires a database.
        `retrieval_field`: neighbours among the database proteins that carry this annotation field (e.g. "ec_number"
        for an EC question), or one such field (or None) per conversation; None: the closest proteins, whatever they
        carry. `self.retrieval_database.field_for_task(task)` is the field a task was trained with.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        if retrieval and self.retrieval_database is None:
            raise ValueError("retrieval=True but this processor has no retrieval database (the model folder has no retrieval/)")
        if retrieval is not False and self.retrieval_database is not None:
            conversations = self.retrieval_database.augment([list(messages) for messages in conversations],
                                                            field=retrieval_field)
        chat_template = self._template(chat_template)
        template_kwargs = {k: v for k, v in (("tools", tools), ("documents", documents)) if v is not None}
        template_kwargs.update(kwargs)
        rendered, proteins, spans = [], [], []
        for messages in conversations:
            text_messages, conversation_proteins = self._template_messages(messages, chat_template)
            rendered.append(
                self._render(
                    text_messages,
                    chat_template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    **template_kwargs,
                )
            )
            proteins.append(conversation_proteins)
            if return_assistant_tokens_mask:
                spans.append(self.assistant_turn_spans(text_messages, 0, chat_template, **template_kwargs))
        if not tokenize:
            return rendered if batched else rendered[0]
        call_kwargs = {
            "padding": padding,
            "padding_side": padding_side,
            "add_special_tokens": False,  # the chat template already holds BOS where the model wants one
            **(processor_kwargs or {}),
        }
        if return_tensors is not None and return_tensors != "auto":
            call_kwargs["return_tensors"] = return_tensors
        out = self(
            text=rendered,
            proteins=proteins,
            assistant_char_spans=spans if return_assistant_tokens_mask else None,
            **call_kwargs,
        )
        return out if return_dict else out["input_ids"]


__all__ = ["ProtLLMProcessor", "ProtLLMProcessorKwargs", "ProteinInputError", "VALID_RESIDUES", "clean_residues",
           "clean_sequence"]
