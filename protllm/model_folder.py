"""Saving and loading ProtLLM model folders (the format that loads anywhere with the Auto classes).

`save_model_folder` writes weights (safetensors), config with an `auto_map` for AutoConfig, AutoModel and
AutoModelForCausalLM, the processor with both tokenizers and an `auto_map` for AutoProcessor, and the remote-code
files those classes import: only what this model uses (`protllm.model_classes` explains how a folder gets the
optional modules). It writes into a hidden sibling and swaps it in (`protllm.atomic`): a kill
leaves the previous folder or the new one, never a half.

`load_model_folder` is how our tooling opens a folder: the `auto_map` check first (`protllm.remote_code`), then the
classes of this process (`register_auto_classes`), so no code from the folder runs and transformers never asks
"run custom code? [y/N]".
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from configuration_protllm import ProtLLMConfig
from modeling_protllm import ProtLLMForConditionalGeneration, ProtLLMModel
from processing_protllm import ProtLLMProcessor

from .atomic import staged_directory
from .model_classes import causal_lm_class, processor_class
from .remote_code import PIPELINE_FILE, check_auto_map, needed_code_files

__all__ = ["check_auto_map", "load_model_folder", "needed_code_files", "register_auto_classes", "save_model_folder"]


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


def save_model_folder(model, processor, directory, write_extras: Callable[[Path], None] | None = None,
                      **save_kwargs) -> Path:
    """Save `model` and `processor` into `directory` as a self-contained remote-code model folder.

    `write_extras(folder)` may add files (a training record, plots) before the folder replaces `directory`, so they
    are part of the same all-or-nothing step. `save_kwargs` go to `model.save_pretrained`.
    """
    directory = Path(directory)
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    processor.register_for_auto_class()
    with staged_directory(directory) as staging:
        model.save_pretrained(staging, **save_kwargs)
        processor.save_pretrained(staging)
        # register_for_auto_class records only the class saved: add AutoModel so both Auto classes load the folder.
        config = ProtLLMConfig.from_pretrained(staging)
        base_model = type(model.model)
        config.auto_map = {**(config.auto_map or {}), "AutoModel": f"{base_model.__module__.split('.')[-1]}.{base_model.__name__}"}
        config.save_pretrained(staging)
        if getattr(config, "custom_pipelines", None):  # a folder loaded from a shared one keeps its pipeline
            import pipeline_protllm

            shutil.copyfile(pipeline_protllm.__file__, staging / PIPELINE_FILE)
        missing = [name for name in needed_code_files(staging) if not (staging / name).is_file()]
        if missing:
            raise FileNotFoundError(f"model folder {directory} lacks remote-code files {missing}")
        if write_extras is not None:
            write_extras(staging)
    return directory


def load_model_folder(folder, **model_kwargs) -> tuple[ProtLLMForConditionalGeneration, ProtLLMProcessor]:
    """(model, processor) of a saved ProtLLM folder, with this process's classes: no remote code runs, no prompt.

    Raises `ForeignCodeError` (naming `auto_map`) for a folder whose auto_map leaves our own files.
    `model_kwargs` go to `from_pretrained` (dtype, device_map, ...).
    """
    folder = check_auto_map(folder)
    register_auto_classes()
    # The classes this config needs (a folder saved before the optional modules existed names the core ones).
    config = ProtLLMConfig.from_pretrained(folder)
    model = causal_lm_class(config).from_pretrained(folder, **model_kwargs)
    processor = processor_class(config).from_pretrained(folder)
    return model, processor
