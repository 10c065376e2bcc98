"""Saving ProtLLM model folders that load anywhere with the Auto classes and trust_remote_code.

`save_model_folder` writes weights (safetensors), config with an `auto_map` for AutoConfig, AutoModel and
AutoModelForCausalLM, the processor with both tokenizers and an `auto_map` for AutoProcessor, and every
remote-code file the modules import. `register_auto_classes` makes the same classes available in-process
without trust_remote_code.
"""

from pathlib import Path

from configuration_protllm import ProtLLMConfig
from modeling_protllm import ProtLLMForConditionalGeneration, ProtLLMModel
from processing_protllm import ProtLLMProcessor

# The files a saved folder needs for trust_remote_code loading (the modules import each other relatively).
REMOTE_CODE_FILES = (
    "configuration_protllm.py",
    "modeling_protllm.py",
    "moe_protllm.py",
    "processing_protllm.py",
    "structure_protllm.py",
)


def register_auto_classes() -> None:
    """Register ProtLLM with the Auto classes of this process (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

    try:
        AutoConfig.register("protllm", ProtLLMConfig)
    except ValueError:
        return  # already registered
    AutoModel.register(ProtLLMConfig, ProtLLMModel)
    AutoModelForCausalLM.register(ProtLLMConfig, ProtLLMForConditionalGeneration)
    AutoProcessor.register(ProtLLMConfig, ProtLLMProcessor)


def save_model_folder(model, processor, directory, **save_kwargs) -> Path:
    """Save `model` and `processor` into `directory` as a self-contained remote-code model folder."""
    directory = Path(directory)
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    processor.register_for_auto_class()
    model.save_pretrained(directory, **save_kwargs)
    processor.save_pretrained(directory)
    # register_for_auto_class records only the class saved: add AutoModel so both Auto classes load the folder.
    config = ProtLLMConfig.from_pretrained(directory)
    config.auto_map = {**(config.auto_map or {}), "AutoModel": "modeling_protllm.ProtLLMModel"}
    config.save_pretrained(directory)
    missing = [name for name in REMOTE_CODE_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {directory} lacks remote-code files {missing}")
    return directory
