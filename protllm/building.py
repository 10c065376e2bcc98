"""Building a ProtLLM from pretrained parts, and converting one (MoE upcycling). Not uploaded with models.

    model, processor = build_protllm("HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/esm2_t12_35M_UR50D")
    upcycle_to_moe(model, num_experts=4)        # SEPIT stage 2
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from configuration_protllm import ProtLLMConfig
from modeling_protllm import ProtLLMForConditionalGeneration
from moe_protllm import moe_blocks, upcycle_feed_forward_blocks
from sepit_protllm import (
    ProtLLMSepitForConditionalGeneration,
    ProtLLMSepitModel,
    mirror_moe_settings_to_text_config,
)

from .model_classes import causal_lm_class, processor_class
from .parameter_groups import numel, parameter_counts, protllm_core
from .processors import build_processor

logger = logging.getLogger("protllm.building")


def resolve_dtype(dtype) -> torch.dtype | str | None:
    """A recipe's `model.dtype` (`bfloat16`, `float16`, `float32`, `auto`, a `torch.dtype` or None) as a torch dtype,
    `"auto"` (the checkpoint's own dtype) or None (the same as `"auto"`)."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.")
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"model.dtype: {dtype!r} is not a floating-point torch dtype (bfloat16, float16, float32 or auto)")
    return resolved


def _built_whole_under_zero3(build):
    """Run `build` with transformers' DeepSpeed ZeRO-3 integration switched off, then on again.

    Once a ZeRO-3 SFTConfig is parsed, transformers builds every model inside `deepspeed.zero.Init` (partitioned
    into empty placeholders as it is built). `build_protllm` assigns the loaded LLM's tensors into a meta-device
    ProtLLM skeleton, which needs them whole. So under ZeRO-3 the ProtLLM is built whole on each rank (host memory:
    one full copy per process during the build, as without ZeRO-3) and DeepSpeed partitions it when the trainer
    wraps it, broadcasting rank 0's values. A null change without ZeRO-3.
    """
    import functools

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        from transformers.integrations import deepspeed as hf_deepspeed

        if not hf_deepspeed.is_deepspeed_zero3_enabled():
            return build(*args, **kwargs)
        config_ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter; restored below
        hf_deepspeed.unset_hf_deepspeed_config()
        try:
            return build(*args, **kwargs)
        finally:
            hf_deepspeed._hf_deepspeed_config_weak_ref = config_ref

    return wrapper


@_built_whole_under_zero3
def build_protllm(
    language_model: str,
    protein_encoder: str | None = None,
    protein_config=None,
    processor_kwargs: dict | None = None,
    dtype=None,
    attn_implementation: str | None = None,
    quantization: dict | None = None,
    **config_kwargs,
):
    """Build a ProtLLM from a pretrained causal LLM and a pretrained protein encoder (Hub names or local paths).

    `protein_encoder`: an ESM-2 / SaProt checkpoint (transformers format; fair-esm names such as
    `esm2_t33_650M_UR50D` with `protein_encoder_backend="fair-esm"`), or None for a randomly initialised
    encoder of shape `protein_config`. The `<protein>` and protein-boundary tokens are added to the LLM
    tokenizer and the embeddings resized (new rows initialised to the mean embedding).

    dtype policy: ONE dtype for every part (LLM body, LM head, projector, encoder, structure bias): `dtype` when
    given (`"bfloat16"`, `torch.bfloat16`...), else the LLM checkpoint's own dtype (what transformers' `"auto"`
    loads: bf16 for Llama-3.1 / TinyLlama). It is logged and recorded in `config.dtype`. Mixed precision (fp32
    master weights of the trained parameters under `bf16: true`) is the trainer's business, see
    `protllm.training.trainers.upcast_trainable_parameters`.

    Memory: the ProtLLM skeleton is built on the meta device and the loaded LLM / encoder tensors are *assigned*
    into it (`load_state_dict(assign=True)`), so the weights exist once in host memory; only the new modules
    (projector, structure bias, a random encoder) are allocated and initialised.

    `quantization`: `BitsAndBytesConfig` keyword arguments (`{load_in_4bit: true, bnb_4bit_quant_type: nf4, ...}`):
    the LLM is loaded quantized (QLoRA) while the encoder and projector stay in `dtype`.

    Returns `(model, processor)`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.esm.modeling_esm import EsmModel

    backend = config_kwargs.get("protein_encoder_backend", "esm")
    encoder_input = config_kwargs.get("protein_encoder_input", "sequence")
    dtype = resolve_dtype(dtype)
    llm_kwargs = {"gguf_file": config_kwargs.pop("gguf_file")} if "gguf_file" in config_kwargs else {}
    load_kwargs = dict(llm_kwargs, dtype=dtype if dtype is not None else "auto")
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if quantization:
        from transformers import BitsAndBytesConfig

        quantization = dict(quantization)
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if key in quantization:
                quantization[key] = resolve_dtype(quantization[key])
        load_kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
    llm = AutoModelForCausalLM.from_pretrained(language_model, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(language_model, **llm_kwargs)
    dtype_source = "model.dtype"
    if dtype is None or dtype == "auto":
        dtype = llm.get_input_embeddings().weight.dtype  # the checkpoint's dtype (quantized layers excluded)
        dtype_source = "the language model checkpoint's dtype"

    encoder_module = None
    # None: the processor class's own for `protein_encoder_input` (ESM-2's, whose ids are also the esm package's for
    # ESM3 / ESM C, or SaProt's); a Hub ESM checkpoint brings its own.
    protein_tokenizer = None
    if protein_encoder is not None and backend in ("esm3", "esmc"):
        encoder_module, protein_config = load_evolutionaryscale_encoder(protein_encoder, backend, protein_config)
    elif protein_encoder is not None and backend == "fair-esm":
        encoder_module, protein_config = load_fair_esm(protein_encoder)
    elif protein_encoder is not None:
        protein_config = AutoConfig.from_pretrained(protein_encoder)
        protein_config._name_or_path = str(protein_encoder)  # where the SEPIT warm-up finds ESM's pretrained MLM head
        encoder_module = EsmModel.from_pretrained(protein_encoder, add_pooling_layer=False, dtype=dtype)
        protein_tokenizer = AutoTokenizer.from_pretrained(protein_encoder)

    processor_kwargs = {"protein_encoder_input": encoder_input, **(processor_kwargs or {})}
    processor = build_processor(tokenizer, protein_tokenizer, processor_class=processor_class(config_kwargs),
                                **processor_kwargs)
    if len(processor.tokenizer) > llm.config.vocab_size:
        # Whole tensors even under ZeRO-3 (see _built_whole_under_zero3); transformers' resize gathers them otherwise.
        llm.resize_token_embeddings(len(processor.tokenizer), mean_resizing=True)

    config = ProtLLMConfig(
        protein_config=protein_config,
        text_config=llm.config,
        protein_token_id=processor.protein_token_id,
        protein_start_token_id=processor.protein_start_token_id,
        protein_end_token_id=processor.protein_end_token_id,
        **config_kwargs,
    )
    processor.num_query_tokens = config.num_query_tokens if config.projector_type == "resampler" else None
    processor.max_protein_length = config.max_protein_length
    processor.protein_encoder_input = config.protein_encoder_input

    # The skeleton on the meta device: no random 8B LLM allocated (and initialised) only to be overwritten.
    with torch.device("meta"):
        model = causal_lm_class(config)(config)
    core = model.model
    llm_body = llm.model if hasattr(llm, "model") else llm.base_model
    if quantization:
        # bitsandbytes layers cannot be assigned into nn.Linear slots: take the loaded modules themselves.
        llm_body.config = config.text_config
        core.language_model = llm_body
        model.lm_head = llm.get_output_embeddings()
    else:
        _assign_weights(core.language_model, llm_body, strict=True)
        if not config.tie_word_embeddings:
            _assign_weights(model.lm_head, llm.get_output_embeddings(), strict=True)
    if encoder_module is not None:
        _assign_weights(core.protein_encoder.esm, encoder_module, strict=False)
    else:  # a random encoder: built for real, initialised as EsmModel initialises itself
        with torch.device("cpu"):
            core.protein_encoder = type(core.protein_encoder)(config)
        if getattr(core.protein_encoder, "structure_bias", None) is not None:  # initialised as the ProtLLM's new modules
            core.protein_encoder.structure_bias.apply(model._init_weights)
    model.tie_weights()
    new_modules = _materialize_meta_modules(model)
    del llm, llm_body, encoder_module

    # Parameters only: buffers such as rotary `inv_freq` keep the precision transformers gave them.
    if quantization:
        for module in (core.protein_encoder, core.projector):
            cast_floating_parameters(module, dtype)
    else:
        cast_floating_parameters(model, dtype)
    model.config.dtype = dtype
    core.protein_encoder.set_frozen(config.freeze_protein_encoder)
    model.tie_weights()
    logger.info("built ProtLLM in %s (%s); newly initialised: %s", dtype, dtype_source, ", ".join(new_modules) or "none")
    return model, processor


def cast_floating_parameters(module, dtype: torch.dtype, trainable_only: bool = False) -> int:
    """Cast `module`'s floating-point *parameters* (not its buffers: rotary `inv_freq` stays fp32) to `dtype`,
    in place. Returns the number of parameter tensors cast."""
    cast = 0
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype and (param.requires_grad or not trainable_only):
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def _assign_weights(target: nn.Module, source: nn.Module, strict: bool) -> None:
    """Move `source`'s tensors into the meta-device `target` without copying (`assign=True`), including the
    non-persistent buffers and plain tensor attributes (rotary `inv_freq`, ...) that a state dict leaves out."""
    result = target.load_state_dict(source.state_dict(), strict=strict, assign=True)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "contact_head" not in k and "pooler" not in k]
    if unexpected:
        raise ValueError(f"pretrained weights have tensors the ProtLLM has no place for: {unexpected[:5]}")
    source_modules = dict(source.named_modules())
    for name, module in target.named_modules():
        twin = source_modules.get(name)
        if twin is None:
            continue
        for key, value in list(module._buffers.items()):
            if value is not None and value.is_meta and isinstance(twin._buffers.get(key), torch.Tensor):
                module._buffers[key] = twin._buffers[key]
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta:
                twin_value = getattr(twin, key, None)
                if isinstance(twin_value, torch.Tensor):
                    setattr(module, key, twin_value)


def _materialize_meta_modules(model) -> list[str]:
    """Allocate on CPU and initialise (the model's `_init_weights`) every module whose own tensors are still on the
    meta device after the pretrained weights were assigned: the projector, the structure bias. Returns their names."""
    initialised = []
    for name, module in model.named_modules():
        meta = [key for key, value in list(module._parameters.items()) + list(module._buffers.items())
                if value is not None and value.is_meta]
        if not meta:
            continue
        for key in meta:
            if key in module._parameters:
                param = module._parameters[key]
                module._parameters[key] = nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad)
            else:
                module._buffers[key] = torch.empty_like(module._buffers[key], device="cpu")
        module._is_hf_initialized = False
        model._init_weights(module)
        initialised.append(name)
    leftover = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if leftover:
        raise RuntimeError(f"ProtLLM build left tensors on the meta device: {leftover[:5]}")
    return [name for name in initialised if not any(name.startswith(other + ".") for other in initialised)]


def load_fair_esm(name_or_path: str):
    """A pretrained fair-esm ESM2 (hub name such as `esm2_t33_650M_UR50D` or a local .pt) and its EsmConfig."""
    try:
        import esm
    except ImportError as error:
        raise ImportError("protein_encoder_backend='fair-esm' needs the fair-esm package: pip install fair-esm") from error
    from transformers import EsmConfig

    if name_or_path.endswith(".pt"):
        module, _ = esm.pretrained.load_model_and_alphabet_local(name_or_path)
    else:
        module, _ = esm.pretrained.load_model_and_alphabet_hub(name_or_path)
    config = EsmConfig(
        vocab_size=33,
        hidden_size=module.embed_dim,
        num_hidden_layers=module.num_layers,
        num_attention_heads=module.attention_heads,
        intermediate_size=4 * module.embed_dim,
        position_embedding_type="rotary",
        token_dropout=module.token_dropout,
        pad_token_id=1,
        mask_token_id=32,
    )
    return module, config


def upcycle_to_moe(model, num_experts: int = 4, top_k: int = 1, capacity_factor: float = 1.25,
                   eval_capacity_factor: float | None = 2.0, router_aux_loss_coef: float = 0.01, seed: int | None = None):
    """SEPIT stage 2: every LLM feed-forward block of `model` becomes `num_experts` copies of itself behind a router.

    `seed`: router `i` (the `i`-th MoE block) is drawn from its own `torch.Generator` seeded with `seed + i`, so the
    routers do not depend on what used the global RNG before (a resumed run loads the earlier stages instead of
    training them; each rank of a distributed run must build the same routers). None: the global RNG.
    Under DeepSpeed ZeRO-3 the dense blocks are gathered while they are copied into experts.
    Returns `model` (converted in place): a core `ProtLLMForConditionalGeneration` becomes the SEPIT class, which runs
    the experts and is the `auto_map` class of the folder it is saved to. Every parameter the dense model had stays
    the same object; the experts and routers are new.
    """
    config = model.config
    if config.moe_num_experts:
        raise ValueError("this ProtLLM is already a mixture of experts")
    if type(model) not in (ProtLLMForConditionalGeneration, ProtLLMSepitForConditionalGeneration):
        raise ValueError(f"upcycle_to_moe converts an ESM-2 ProtLLM (ProtLLMForConditionalGeneration or the SEPIT "
                         f"class); {type(model).__name__} stays dense")
    config.moe_num_experts = num_experts
    config.moe_top_k = top_k
    config.moe_capacity_factor = capacity_factor
    config.moe_eval_capacity_factor = eval_capacity_factor
    config.moe_router_aux_loss_coef = router_aux_loss_coef
    config.validate()
    mirror_moe_settings_to_text_config(config)
    with _gathered_under_zero3(list(model.model.language_model.parameters())):
        # deep copies of the (whole, not partitioned) dense blocks
        upcycle_feed_forward_blocks(model.model.language_model, config.text_config.hidden_size, num_experts, top_k,
                                    capacity_factor, eval_capacity_factor)
    if not isinstance(model, ProtLLMSepitForConditionalGeneration):
        # The same objects under the subclasses that run the experts (they add methods, no state): the model may
        # already be registered with a trainer, an optimiser or a ZeRO-3 engine, so it is not rebuilt.
        model.__class__ = ProtLLMSepitForConditionalGeneration
        model.model.__class__ = ProtLLMSepitModel
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    std = config.text_config.initializer_range
    for index, block in enumerate(moe_blocks(model)):
        if seed is None:
            nn.init.normal_(block.router.weight, std=std)
        else:
            generator = torch.Generator().manual_seed(seed + index)
            with torch.no_grad():
                block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=generator) * std)
        block.router.to(device=device, dtype=dtype)
        block.train(model.training)  # new modules start in training mode: an eval model must not apply training capacity
    return model


def _gathered_under_zero3(params: list):
    """DeepSpeed ZeRO-3 partitions every parameter across ranks (each holds an empty placeholder): gather them whole
    for a block that reads or copies them. A null context without ZeRO-3 (or without DeepSpeed installed)."""
    from contextlib import nullcontext

    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def model_parameter_counts(model) -> dict[str, int]:
    """Total and per-token active parameters, per part (MoE: one routed expert per token and top-k)."""
    counts = parameter_counts(model.named_parameters())
    language_model = protllm_core(model).language_model
    inactive = sum(numel(p) for p in language_model.parameters()) - active_parameter_count(language_model)
    counts["language_model_active_per_token"] = counts["language_model"] - inactive
    return counts


def active_parameter_count(language_model: nn.Module) -> int:
    """Parameters one token passes through: routers + top_k experts per MoE block + everything else."""
    total = sum(numel(param) for name, param in language_model.named_parameters() if ".experts." not in name)
    for block in moe_blocks(language_model):
        total += block.top_k * sum(numel(p) for p in block.experts[0].parameters())
    return total


def build_from_recipe(spec: dict, seed: int = 0, tiny: str | None = None):
    """Build the ProtLLM and processor a recipe's `model:` block names. Returns `(model, processor)`.

    `protein_encoder: null` gives a randomly initialised encoder of shape `protein_config` (as the demo trains its
    own); `tiny` (or `model.tiny`) builds a tiny random LLM of that family, for tests.
    """
    from .local_weights import resolve as resolve_local_alias
    from .testing import build_tiny_protllm, tiny_protein_config

    config_kwargs = dict(spec.get("config") or {})
    if spec.get("protein_encoder_backend"):  # `model.protein_encoder_backend`, or the same key under `model.config`
        config_kwargs["protein_encoder_backend"] = spec["protein_encoder_backend"]
    protein_config = None
    if config_kwargs.get("protein_encoder_backend") in ("esm3", "esmc"):
        # The esm package's constructor sizes (d_model, n_heads, n_layers, v_heads); None: the published sizes.
        protein_config = spec.get("protein_config")
    elif spec.get("protein_config") or spec.get("protein_encoder") is None:
        protein_config = {**tiny_protein_config(), **(spec.get("protein_config") or {})}
        if config_kwargs.get("protein_encoder_input") == "saprot":
            protein_config.update(vocab_size=446, mask_token_id=4)
    tiny = tiny or spec.get("tiny")
    torch.manual_seed(seed)
    if tiny:
        if protein_config is None and config_kwargs.get("protein_encoder_backend") in ("esm3", "esmc"):
            from .testing import tiny_evolutionaryscale_config

            protein_config = spec["protein_config"] = tiny_evolutionaryscale_config(config_kwargs["protein_encoder_backend"])
        model, processor = build_tiny_protllm(tiny, seed=seed, protein_config=protein_config if spec.get("protein_config") else None,
                                              processor_kwargs=spec.get("processor"), **config_kwargs)
        dtype = resolve_dtype(spec.get("dtype"))
        if isinstance(dtype, torch.dtype):
            cast_floating_parameters(model, dtype)
            model.config.dtype = dtype
        return model, processor
    return build_protllm(
        resolve_local_alias(spec["language_model"]),
        protein_encoder=spec.get("protein_encoder"),
        protein_config=protein_config,
        processor_kwargs=spec.get("processor"),
        dtype=spec.get("dtype"),
        attn_implementation=spec.get("attn_implementation"),
        quantization=spec.get("quantization"),
        **config_kwargs,
    )


def load_evolutionaryscale_encoder(name_or_path, backend: str, protein_config: dict | None = None):
    """Pretrained ESM3 / ESM C weights in EvolutionaryScale's published format -> `(ProtLLMEvolutionaryScaleEncoder,
    protein_config kwargs)`.

    `name_or_path`: a published name (`esm3-sm-open-v1`, `esmc-300m`, `esmc-600m`; their Hub repositories are
    `EvolutionaryScale/esm3-sm-open-v1`, `EvolutionaryScale/esmc-300m-2024-12`, `EvolutionaryScale/esmc-600m-2024-12`),
    one of those Hub ids, or a local snapshot of one (a folder with `data/weights/<file>.pth`, as on the Hub). A local
    folder of other sizes needs `protein_config` in the esm package's sizes.
    """
    from pathlib import Path

    from transformers import AutoConfig

    from configuration_protllm import evolutionaryscale_protein_config_kwargs
    from esm3_protllm import EVOLUTIONARYSCALE_MODELS, ProtLLMEvolutionaryScaleEncoder

    by_hub_id = {spec["hub_id"]: name for name, spec in EVOLUTIONARYSCALE_MODELS.items()}
    name = by_hub_id.get(str(name_or_path), str(name_or_path))
    spec = EVOLUTIONARYSCALE_MODELS.get(name)
    if spec is not None:
        if spec["backend"] != backend:
            raise ValueError(f"{name_or_path} is an {spec['backend']} model, not protein_encoder_backend={backend!r}")
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec["hub_id"]))
        sizes = {**spec["sizes"], **(protein_config or {})}
    else:
        folder = Path(name_or_path)
        if not folder.is_dir():
            known = ", ".join(EVOLUTIONARYSCALE_MODELS)
            raise FileNotFoundError(f"{name_or_path}: neither a published EvolutionaryScale model ({known}) nor a local folder")
        sizes = protein_config
    weights = [w for w in sorted((folder / "data" / "weights").glob("*.pth")) if "structure" not in w.name and "function" not in w.name]
    wanted = [w for w in weights if spec is None or w.name == Path(spec["weights"]).name] or weights
    if len(wanted) != 1:
        raise FileNotFoundError(f"{folder}: expected one {backend} weights file under data/weights/, found {[w.name for w in weights]}")
    protein_config = AutoConfig.for_model(**evolutionaryscale_protein_config_kwargs(backend, sizes))
    encoder = ProtLLMEvolutionaryScaleEncoder(backend, protein_config)
    encoder.model.load_state_dict(torch.load(wanted[0], map_location="cpu", weights_only=True))
    if backend == "esm3":
        structure_weights = folder / "data" / "weights" / "esm3_structure_encoder_v0.pth"
        if not structure_weights.is_file():
            raise FileNotFoundError(f"{folder}: ESM3 needs its VQ-VAE structure encoder weights {structure_weights}")
        encoder.structure_encoder.load_state_dict(torch.load(structure_weights, map_location="cpu", weights_only=True))
    return encoder.eval(), protein_config

