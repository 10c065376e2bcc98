"""The one map from a ProtLLM parameter to the part of the model it belongs to.

Every piece of tooling that treats the encoder, the projector and the LLM differently (which parts a stage
trains, per-part learning rates, parameter counts on cards and in logs) asks this module, so the answer is
written once. Names may carry wrappers' prefixes (PEFT's `base_model.model.`, DDP's `module.`), so a part is
recognised by its module name anywhere in the dotted path.
"""

from __future__ import annotations

PARTS = ("protein_encoder", "projector", "language_model")
# The module attribute (in ProtLLMModel) that holds each part; `lm_head` belongs to the language model.
_MODULE_OF_PART = {"protein_encoder": "protein_encoder", "projector": "projector"}
# Training-only modules that are not part of a saved model (the warm-up heads).
WARMUP_HEADS = "heads"


def part_of(name: str) -> str:
    """`protein_encoder`, `projector` or `language_model` for a parameter or state-dict key."""
    segments = name.split(".")
    for part, module in _MODULE_OF_PART.items():
        if module in segments:
            return part
    return "language_model"


def is_new_warmup_module(name: str) -> bool:
    """Modules the warm-up creates (structure bias, training heads): trained at a higher learning rate."""
    segments = name.split(".")
    return "structure_bias" in segments or segments[0] == WARMUP_HEADS


def protllm_core(model):
    """The `ProtLLMModel` inside a ProtLLM, a PEFT wrapper or a DDP/FSDP wrapper of one."""
    seen = model
    for _ in range(6):
        if hasattr(seen, "protein_encoder") and hasattr(seen, "projector"):
            return seen
        seen = getattr(seen, "module", None) or getattr(seen, "base_model", None) or getattr(seen, "model", None) \
            or getattr(seen, "protllm", None)
        if seen is None:
            break
    raise TypeError(f"{type(model).__name__} holds no ProtLLMModel")


def set_trainable(model, parts: set[str]) -> None:
    """Train exactly `parts` of `model` (a ProtLLMForConditionalGeneration): the rest is frozen."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; parts are {PARTS}")
    core = protllm_core(model)
    core.protein_encoder.set_frozen("protein_encoder" not in parts)
    for name, param in model.named_parameters():
        part = part_of(name)
        if part != "protein_encoder":
            param.requires_grad_(part in parts)


def numel(tensor) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 has partitioned it into an empty placeholder."""
    return getattr(tensor, "ds_numel", tensor.numel())


def parameter_counts(named_tensors) -> dict[str, int]:
    """Per-part element counts of `(name, tensor)` pairs (a model's parameters or a state dict), plus `total`.

    Tied tensors must be passed once (`named_parameters()` already removes duplicates).
    """
    counts = dict.fromkeys(PARTS, 0)
    for name, tensor in named_tensors:
        counts[part_of(name)] += numel(tensor)
    counts["total"] = sum(counts[p] for p in PARTS)
    return counts
