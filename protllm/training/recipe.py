"""Training recipes (configs/*.yaml): loading, and refusing keys that do not exist.

A recipe names the model to build (`model:`), the data (`data:`), SFTConfig defaults (`training:`), the stages in
order (`stages:`) and an optional evaluation (`evaluate:`). A misspelt key would otherwise do nothing at all
(`lroa:` silently gives a full fine-tune), so every level is checked against the keys below and an unknown key is
an error naming it, with the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

TOP_LEVEL_KEYS = {"recipe", "output_dir", "seed", "model", "data", "training", "stages", "evaluate"}
MODEL_KEYS = {"language_model", "protein_encoder", "protein_encoder_backend", "protein_config", "config", "processor", "tiny", "dtype",
              "attn_implementation", "quantization", "retrieval"}
DATA_KEYS = {"train", "train_split", "max_length", "limit", "tasks", "on_bad_rows"}
STAGE_KEYS = {"name", "training", "loss_weights", "noise_std", "new_module_lr_multiplier", "mask_ratio",
              "projector_learning_rate", "encoder_learning_rate", "train_protein_encoder", "lora", "feature_cache", "moe",
              "mlm_sequences", "mlm_exclude", "mlm_eval_sequences",  # warm-up: masked-LM corpus, held-out files,
              "caption_share", "mlm_window"}  # the share of captioned rows among them, the residues per protein
LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}
MOE_KEYS = {"num_experts", "top_k", "capacity_factor", "eval_capacity_factor", "router_aux_loss_coef"}
LOSS_WEIGHT_KEYS = {"mlm", "contrastive", "denoise"}
RETRIEVAL_KEYS = {"k", "max_identity", "exclusion", "max_evalue", "max_annotation_chars", "fields", "threads", "fallback",
                  "per_field", "task_fields", "train_rows"}
EVALUATE_KEYS = {"data", "train", "baselines", "shuffled_proteins", "no_retrieval", "batch_size", "max_new_tokens",
                 "bootstrap", "flags", "limit", "examples", "tasks", "split"}


class RecipeError(ValueError):
    """A recipe that cannot run as written. The message names the file and the key."""


def _check_keys(found, allowed, where: str, path) -> None:
    if not isinstance(found, dict):
        raise RecipeError(f"{path}: `{where}` must be a mapping, got {type(found).__name__}")
    for key in found:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(sorted(allowed))}"
            raise RecipeError(f"{path}: unknown recipe key `{where}.{key}`{hint}")


def _sft_config_fields() -> set[str]:
    from trl import SFTConfig

    return {field.name for field in dataclasses.fields(SFTConfig)}


def _protllm_config_fields() -> set[str]:
    from configuration_protllm import ProtLLMConfig

    fields = {field.name for field in dataclasses.fields(ProtLLMConfig)}
    return fields - {"protein_config", "text_config", "protein_token_id", "protein_start_token_id", "protein_end_token_id"}


def validate_recipe(recipe: dict, path="recipe") -> dict:
    """Raise `RecipeError` for unknown keys or stages anywhere in `recipe`; return it unchanged."""
    from .stages import STAGES

    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with at least `stages:`")
    for key in recipe:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), sorted(TOP_LEVEL_KEYS), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise RecipeError(f"{path}: unknown recipe key `{key}`{hint}")
    if not recipe.get("stages"):
        raise RecipeError(f"{path}: a recipe needs `stages:` (a list of stages: {', '.join(STAGES)})")
    model = recipe.get("model") or {}
    _check_keys(model, MODEL_KEYS, "model", path)
    _check_keys(model.get("config") or {}, _protllm_config_fields(), "model.config", path)
    if model.get("retrieval"):
        _check_retrieval(model["retrieval"], path)
    _check_keys(recipe.get("data") or {}, DATA_KEYS, "data", path)
    if (recipe.get("data") or {}).get("on_bad_rows", "stop") not in ("stop", "skip"):
        raise RecipeError(f"{path}: `data.on_bad_rows` must be stop or skip, got {recipe['data']['on_bad_rows']!r}")
    sft_fields = _sft_config_fields()
    _check_keys(recipe.get("training") or {}, sft_fields, "training", path)
    _check_keys(recipe.get("evaluate") or {}, EVALUATE_KEYS, "evaluate", path)
    evaluate = recipe.get("evaluate") or {}
    if "max_new_tokens" in evaluate or evaluate.get("limit") is not None:  # checked now, not after the training
        from eval.run import example_limits, generation_limits

        try:
            if "max_new_tokens" in evaluate:
                generation_limits(evaluate["max_new_tokens"])
            example_limits(evaluate.get("limit"))
        except ValueError as error:
            raise RecipeError(f"{path}: `evaluate.{str(error).removeprefix('--')}`") from None
    if not isinstance(recipe["stages"], list):
        raise RecipeError(f"{path}: `stages` must be a list")
    for index, stage in enumerate(recipe["stages"]):
        where = f"stages[{index}]"
        _check_keys(stage, STAGE_KEYS, where, path)
        name = stage.get("name")
        if not isinstance(name, str) or name not in STAGES:  # a list or mapping here is a typo too, not a TypeError
            close = difflib.get_close_matches(str(name), list(STAGES), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise RecipeError(f"{path}: unknown stage `{where}.name: {name}`{hint}; stages are {', '.join(STAGES)}")
        _check_keys(stage.get("training") or {}, sft_fields, f"{where}.training", path)
        if stage.get("lora"):
            _check_keys(stage["lora"], LORA_KEYS, f"{where}.lora", path)
            if not STAGES[name].lora_allowed:
                raise RecipeError(f"{path}: `{where}.lora`: the {name} stage does not train the LLM, so it takes no LoRA")
        if stage.get("moe"):
            _check_keys(stage["moe"], MOE_KEYS, f"{where}.moe", path)
        if stage.get("loss_weights"):
            _check_keys(stage["loss_weights"], LOSS_WEIGHT_KEYS, f"{where}.loss_weights", path)
        window = stage.get("mlm_window")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 8):
            raise RecipeError(f"{path}: `{where}.mlm_window` must be a whole number of residues (8 or more), got {window!r}")
        for key in ("projector_learning_rate", "encoder_learning_rate", "new_module_lr_multiplier"):
            value = stage.get(key)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise RecipeError(f"{path}: `{where}.{key}` must be a positive number, got {value!r}")
    for where, block in [("training", recipe.get("training") or {})] + [
            (f"stages[{i}].training", s.get("training") or {}) for i, s in enumerate(recipe["stages"])]:
        for key in ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size"):
            value = block.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                raise RecipeError(f"{path}: `{where}.{key}` must be a positive number, got {value!r}")
    return recipe


def _check_retrieval(spec, path) -> None:
    """`model.retrieval`: known keys, k >= 1, 0 < max_identity <= 1, a known exclusion."""
    _check_keys(spec, RETRIEVAL_KEYS, "model.retrieval", path)
    k = spec.get("k", 3)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise RecipeError(f"{path}: `model.retrieval.k` must be a positive integer, got {k!r}")
    identity = spec.get("max_identity", 0.3)
    if not isinstance(identity, (int, float)) or isinstance(identity, bool) or not 0 < identity <= 1:
        raise RecipeError(f"{path}: `model.retrieval.max_identity` must be in (0, 1], got {identity!r}")
    if spec.get("exclusion", "leave_one_out") not in ("leave_one_out", "cluster"):
        raise RecipeError(f"{path}: `model.retrieval.exclusion` must be leave_one_out or cluster, got {spec['exclusion']!r}")
    from retrieval_protllm import FALLBACKS

    if spec.get("fallback") not in FALLBACKS:
        raise RecipeError(f"{path}: `model.retrieval.fallback` must be composition or absent, got {spec['fallback']!r}")
    if not isinstance(spec.get("per_field", False), bool):
        raise RecipeError(f"{path}: `model.retrieval.per_field` must be true or false, got {spec['per_field']!r}")
    task_fields = spec.get("task_fields")
    if task_fields is not None:
        from protllm.training.retrieval import DEFAULT_FIELDS

        fields = spec.get("fields") or DEFAULT_FIELDS
        if not isinstance(task_fields, dict):
            raise RecipeError(f"{path}: `model.retrieval.task_fields` must map task names to fields, got {task_fields!r}")
        for task, field in task_fields.items():
            if field not in fields:
                raise RecipeError(f"{path}: `model.retrieval.task_fields.{task}` is {field!r}, not one of the database's "
                                  f"fields ({', '.join(fields)})")
    rows = spec.get("train_rows")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise RecipeError(f"{path}: `model.retrieval.train_rows` must be a positive integer, got {rows!r}")


def load_recipe(path) -> dict:
    """Read and validate a recipe YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    with open(path) as handle:
        recipe = yaml.safe_load(handle)
    return validate_recipe(recipe, path)
