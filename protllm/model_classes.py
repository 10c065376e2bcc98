"""Which remote-code classes a ProtLLM config needs: the core ones, or the subclasses of an optional module.

A model folder carries only the remote code its model uses. transformers copies (on save) and fetches (on load)
exactly the module its `auto_map` names plus the modules that one imports (`from .x import ...`), so the core files
(configuration, modeling, encoder, processing, retrieval) never import an optional one; an optional module
subclasses the core classes, and a folder's `auto_map` names the subclass its model needs:

- `sepit_protllm.py` (SEPIT's structure bias and / or mixture-of-experts LLM; it imports `moe_protllm.py`):
  `ProtLLMSepitForConditionalGeneration`;
- `esm3_protllm.py` (ESM3 / ESM C encoders): `ProtLLMEvolutionaryScaleForConditionalGeneration`;
- `structure_processing_protllm.py` (structure files, 3Di / SaProt tokens; it imports `structure_protllm.py`,
  `structure_files_protllm.py` and `saprot_protllm.py`): `ProtLLMStructureProcessor`.

Our tooling builds and loads models through these functions, so the class always matches the config.
"""

from __future__ import annotations

from collections.abc import Mapping

from configuration_protllm import EVOLUTIONARYSCALE_BACKENDS, ProtLLMConfig
from esm3_protllm import ProtLLMEvolutionaryScaleForConditionalGeneration
from modeling_protllm import ProtLLMForConditionalGeneration
from processing_protllm import ProtLLMProcessor
from sepit_protllm import ProtLLMSepitForConditionalGeneration
from structure_processing_protllm import ProtLLMStructureProcessor

__all__ = ["causal_lm_class", "messages_for", "processor_class", "reads_structures", "sequence_only_messages"]


def causal_lm_class(config: ProtLLMConfig) -> type[ProtLLMForConditionalGeneration]:
    """The `ProtLLMForConditionalGeneration` class (core, or an optional module's subclass) that `config` needs."""
    if config.protein_encoder_backend in EVOLUTIONARYSCALE_BACKENDS:
        return ProtLLMEvolutionaryScaleForConditionalGeneration
    if config.use_structure_bias or config.moe_num_experts:
        return ProtLLMSepitForConditionalGeneration
    return ProtLLMForConditionalGeneration


def _setting(config, name: str):
    """`config.<name>`, from a `ProtLLMConfig` or a mapping of its keyword arguments (missing: the config default)."""
    if isinstance(config, Mapping):
        return config.get(name, getattr(ProtLLMConfig, name))
    return getattr(config, name)


def reads_structures(config: ProtLLMConfig | Mapping) -> bool:
    """Whether the model of `config` reads structures (coordinates or 3Di tokens), so its processor must too.

    `config` may be the keyword arguments a `ProtLLMConfig` is about to be built from (a processor is built before
    its config, which takes the processor's token ids). True for SEPIT's structure bias (CA coordinates), SaProt input
    (3Di tokens from the structure) and an ESM3 encoder (its VQ-VAE encodes backbone coordinates into structure
    tokens); ESM C and ESM-2 on amino acids read none.
    """
    return bool(
        _setting(config, "use_structure_bias")
        or _setting(config, "protein_encoder_input") == "saprot"
        or _setting(config, "protein_encoder_backend") == "esm3"
    )


def processor_class(config: ProtLLMConfig | Mapping) -> type[ProtLLMProcessor]:
    """The processor class for the model of `config` (a `ProtLLMConfig` or its keyword arguments):
    `ProtLLMStructureProcessor` when the model reads structures, else the core `ProtLLMProcessor`."""
    return ProtLLMStructureProcessor if reads_structures(config) else ProtLLMProcessor


def sequence_only_messages(messages: list[dict]) -> list[dict]:
    """Chat messages for a model that reads sequences only: each protein block keeps its sequence (read from its
    structure file's chain when the block has none) and loses `structure` / `chain`.

    Training and evaluation rows may name structure files (`python -m data.build --structures-dir`); such a model
    has no use for the coordinates, and its processor (without the structure reader) refuses files. Raises
    `structure_protllm.StructureError` naming the file for a structure that cannot be read.
    """
    from structure_protllm import load_structure

    def sequence_block(block):
        if not (isinstance(block, dict) and block.get("type") == "protein" and block.get("structure") is not None):
            return block
        sequence = block.get("sequence") or load_structure(block["structure"], chain=block.get("chain")).sequence
        return {**{key: value for key, value in block.items() if key not in ("structure", "chain")}, "sequence": sequence}

    return [{**message, "content": [sequence_block(block) for block in message["content"]]}
            if isinstance(message.get("content"), list) else message for message in messages]


def messages_for(processor, messages: list[dict]) -> list[dict]:
    """`messages` as `processor` takes them: unchanged for a processor that reads structures (or one that predates
    `reads_structures`, which read them all), `sequence_only_messages` for a sequence model's."""
    return messages if getattr(processor, "reads_structures", True) else sequence_only_messages(messages)
