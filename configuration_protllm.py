"""ProtLLM model configuration.

A ProtLLM is a protein encoder (ESM-2 family) whose per-residue states are projected into the input
embeddings of any causal LLM. This one config also carries the SEPIT structure bias and the MoE settings,
so every stage of training (see train_sft.py) saves a folder that loads with the Auto classes.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Attention implementations that add a 4D float mask to the scores, i.e. that carry the SEPIT structure bias.
# Flash attention would take it for a padding mask (or fail); flex/paged kernels need their own mask formats.
STRUCTURE_BIAS_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# ESM-2 650M (facebook/esm2_t33_650M_UR50D), the encoder SEPIT and our paper recipes use.
ESM2_650M_KWARGS = {
    "vocab_size": 33,
    "hidden_size": 1280,
    "num_hidden_layers": 33,
    "num_attention_heads": 20,
    "intermediate_size": 5120,
    "max_position_embeddings": 1026,
    "position_embedding_type": "rotary",
    "emb_layer_norm_before": False,
    "token_dropout": True,
    "pad_token_id": 1,
    "mask_token_id": 32,
}

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "resampler")

# EvolutionaryScale's ESM3 / ESM C encoders (run by an optional module). The config only needs their shapes: the esm
# package's constructor sizes of the published models (`esm.pretrained` 3.2.1.post1), stored beside the EsmConfig names.
EVOLUTIONARYSCALE_BACKENDS = ("esm3", "esmc")
EVOLUTIONARYSCALE_MODEL_SIZES = {
    "esm3-sm-open-v1": {"d_model": 1536, "n_heads": 24, "v_heads": 256, "n_layers": 48},
    "esmc-300m": {"d_model": 960, "n_heads": 15, "n_layers": 30},
    "esmc-600m": {"d_model": 1152, "n_heads": 18, "n_layers": 36},
}
DEFAULT_MODEL = {"esm3": "esm3-sm-open-v1", "esmc": "esmc-300m"}
# ESM3's structure tokens come from a separate VQ-VAE encoder.
ESM3_STRUCTURE_ENCODER_SIZES = {"d_model": 1024, "n_heads": 1, "v_heads": 128, "n_layers": 2, "d_out": 128, "n_codes": 4096}
# The esm package's sequence vocabulary has 64 embedding rows; its first 33 tokens are ESM-2's (`<cls>`=0, `<pad>`=1,
# `<eos>`=2, amino acids 4-30, `<mask>`=32), so the processor's ESM-2 tokenizer gives ESM3/ESM C the same ids.
SEQUENCE_VOCAB_SIZE = 64


def evolutionaryscale_protein_config_kwargs(backend: str, protein_config: dict | None) -> dict:
    """`model.protein_config` in the esm package's constructor sizes (`d_model`, `n_heads`, `n_layers`, and `v_heads`
    and optionally `structure_encoder` for ESM3), or None for the published default (esm3-sm-open-v1, esmc-300m) ->
    the EsmConfig kwargs ProtLLM stores (`hidden_size` etc. are what the projectors and the feature layer read).
    A dict already in EsmConfig names (a saved config.json) comes back unchanged."""
    protein_config = dict(protein_config or {})
    if "hidden_size" in protein_config:  # already stored form (a saved config.json: EsmConfig names + the esm sizes)
        return protein_config
    sizes = {**EVOLUTIONARYSCALE_MODEL_SIZES[DEFAULT_MODEL[backend]], **protein_config}
    required = ("d_model", "n_heads", "n_layers") + (("v_heads",) if backend == "esm3" else ())
    unknown = set(sizes) - set(required) - {"v_heads", "structure_encoder", "model_type", "name_or_path"}
    if unknown:
        raise ValueError(f"protein_config for protein_encoder_backend={backend!r}: unknown keys {sorted(unknown)}; expected {list(required)}")
    if sizes["d_model"] % sizes["n_heads"]:
        raise ValueError(f"protein_config: d_model={sizes['d_model']} is not divisible by n_heads={sizes['n_heads']}")
    kwargs = {
        "model_type": "esm", "hidden_size": sizes["d_model"], "num_attention_heads": sizes["n_heads"],
        "num_hidden_layers": sizes["n_layers"], "intermediate_size": 0, "vocab_size": SEQUENCE_VOCAB_SIZE,
        "pad_token_id": 1, "mask_token_id": 32, "token_dropout": False, "position_embedding_type": "rotary",
        "d_model": sizes["d_model"], "n_heads": sizes["n_heads"], "n_layers": sizes["n_layers"],
    }
    if backend == "esm3":
        kwargs["v_heads"] = sizes["v_heads"]
        kwargs["structure_encoder"] = {**ESM3_STRUCTURE_ENCODER_SIZES, **(sizes.get("structure_encoder") or {})}
    return kwargs


@strict
class ProtLLMConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ProtLLMForConditionalGeneration`].

    Args:
        protein_config (`EsmConfig` or `dict`): the protein encoder (ESM-2 family; a SaProt checkpoint is an
            ESM model with a 446-token amino-acid x 3Di vocabulary).
        text_config (`PreTrainedConfig` or `dict`): any causal LM config (Llama, Qwen2, SmolLM, Phi-3, GPT-2...).
        protein_encoder_backend (`"esm"`, `"fair-esm"`, `"esm3"` or `"esmc"`): transformers `EsmModel`, fair-esm
            `ESM2`, or EvolutionaryScale's ESM3 (sequence + VQ-VAE structure tokens) / ESM C, which the subclasses
            of the optional module `esm3_protllm.py` run (the core model classes refuse them).
            For `esm3`/`esmc`, `protein_config` takes the esm package's sizes (`d_model`, `n_heads`, `n_layers`, and
            `v_heads` for ESM3) and is stored as an EsmConfig with both names; None means esm3-sm-open-v1 / esmc-300m.
        protein_encoder_input (`"sequence"` or `"saprot"`): amino acids only, or SaProt's amino acid + Foldseek
            3Di tokens (the processor computes 3Di from the structure; residues without one get `#`).
        protein_feature_layer (`int`): which encoder hidden state feeds the projector (-1 last, -2 second-to-last
            as in SEPIT). Index into `(embeddings, layer_1, ..., layer_n)`.
        freeze_protein_encoder (`bool`): keep the encoder frozen and in eval mode, even under `Trainer.train()`.
        projector_type (`str`): `linear` (STELLA), `mlp2x_gelu` (SEPIT / LLaVA) or `resampler` (a fixed number
            of learned queries cross-attending to the residues).
        projector_hidden_size (`int`, *optional*): hidden width of `mlp2x_gelu` / query width of the resampler;
            defaults to the LLM hidden size.
        num_query_tokens (`int`): protein tokens emitted per protein by the resampler.
        resampler_num_heads (`int`): attention heads of the resampler's cross-attention.
        max_protein_length (`int`): residues per protein the model accepts (the processor crops or refuses
            beyond it).
        protein_token_id (`int`): id of the `<protein>` placeholder in the LLM vocabulary; one placeholder per
            protein token the projector emits.
        use_cache (`bool`): return and reuse the key/value cache (generation); the LLM's own `use_cache` is
            unaffected.
        protein_start_token_id / protein_end_token_id (`int`, *optional*): ids of `<|protein_start|>` and
            `<|protein_end|>`. `generate` never emits these or the placeholder (it would have no protein to fill).
        use_structure_bias (`bool`): SEPIT's distance-kernel attention bias in every encoder layer. The encoder
            then runs eager or sdpa attention: a flash (or other) request is routed to sdpa for the encoder only,
            with a warning, while the LLM keeps what was asked.
        structure_num_kernels (`int`): Gaussian basis functions over pairwise CA distances (SEPIT: 128).
        structure_dropout (`float`): probability, per protein and training step, of dropping its structure
            (SEPIT: 0.15) so the model also runs sequence-only.
        structure_embedding_scale (`float`): scale of the summed edge features added to residue embeddings.
        structure_chunk_size (`int`): query rows of the L x L pair map processed at once, bounding memory.
        moe_num_experts (`int`): 0 for a dense LLM; otherwise every LLM feed-forward block is a mixture of this
            many experts (SEPIT: 4), upcycled from the dense weights.
        moe_top_k (`int`): experts per token (SEPIT: 1).
        moe_capacity_factor / moe_eval_capacity_factor (`float`): expert capacity in training / evaluation
            (SEPIT: 1.25 / 2.0); tokens over capacity skip the block (residual path only). Padding never takes
            capacity. In training the capacity is shared by the batch; in evaluation it is per sequence, so batched
            generation equals one-at-a-time generation. The evaluation default None routes every token.
        moe_router_aux_loss_coef (`float`): weight of the load-balancing loss (SEPIT: 0.01).
    """

    model_type = "protllm"

    sub_configs_defaults = {
        "protein_config": SubConfigSpec(config_class=AutoConfig, model_type="esm", init_kwargs=ESM2_650M_KWARGS),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    protein_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    protein_encoder_backend: Literal["esm", "fair-esm", "esm3", "esmc"] = "esm"
    protein_encoder_input: Literal["sequence", "saprot"] = "sequence"
    protein_feature_layer: int = -1
    freeze_protein_encoder: bool = True
    projector_type: Literal["linear", "mlp2x_gelu", "resampler"] = "mlp2x_gelu"
    projector_hidden_size: int | None = None
    num_query_tokens: int = 32
    resampler_num_heads: int = 8
    max_protein_length: int = 1024
    protein_token_id: int | None = None
    protein_start_token_id: int | None = None
    protein_end_token_id: int | None = None
    use_structure_bias: bool = False
    structure_num_kernels: int = 128
    structure_dropout: float = 0.15
    structure_embedding_scale: float = 0.1
    structure_chunk_size: int = 64
    moe_num_experts: int = 0
    moe_top_k: int = 1
    moe_capacity_factor: float = 1.25
    moe_eval_capacity_factor: float | None = None
    moe_router_aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = False
    # Top level as in transformers' own composite configs: generate() and the common tests read `config.use_cache`.
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.protein_encoder_backend in EVOLUTIONARYSCALE_BACKENDS and not isinstance(self.protein_config, PreTrainedConfig):
            self.protein_config = evolutionaryscale_protein_config_kwargs(self.protein_encoder_backend, self.protein_config)
        super().__post_init__(**kwargs)
        # Tied-embedding LLMs (Qwen2, SmolLM) load wrong unless the composite config says so too.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.route_protein_attn_implementation()

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None):
        # transformers sets this (recursively on the sub-configs) for `attn_implementation=` in from_pretrained,
        # from_config and set_attn_implementation: route the encoder right after.
        PreTrainedConfig._attn_implementation.fset(self, value)
        if getattr(self, "protein_config", None) is not None:
            self.route_protein_attn_implementation()

    def route_protein_attn_implementation(self) -> str | None:
        """With the structure bias, keep the encoder on an attention implementation that adds the 4D float bias
        (eager/sdpa): anything else is routed to sdpa for the encoder only. Returns the encoder's implementation."""
        protein_config = self.protein_config
        if not isinstance(protein_config, PreTrainedConfig):
            return None
        requested = protein_config._attn_implementation
        if self.use_structure_bias and requested is not None and requested not in STRUCTURE_BIAS_ATTN_IMPLEMENTATIONS:
            logger.warning_once(
                f"use_structure_bias=True: the protein encoder cannot run attn_implementation={requested!r} (the "
                "structure bias is a 4D float attention mask, which only eager and sdpa add). The encoder uses 'sdpa'; "
                "the language model keeps its own attention implementation."
            )
            protein_config._attn_implementation = "sdpa"
        return protein_config._attn_implementation

    def validate_protllm(self):
        """Part of `@strict` validation: values that type hints cannot express."""
        problems = []
        if self.max_protein_length < 1:
            problems.append(f"max_protein_length must be >= 1, got {self.max_protein_length}")
        if self.num_query_tokens < 1:
            problems.append(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")
        if self.projector_hidden_size is not None and self.projector_hidden_size < 1:
            problems.append(f"projector_hidden_size must be >= 1, got {self.projector_hidden_size}")
        if not 0.0 <= self.structure_dropout <= 1.0:
            problems.append(f"structure_dropout must be in [0, 1], got {self.structure_dropout}")
        if self.structure_num_kernels < 1:
            problems.append(f"structure_num_kernels must be >= 1, got {self.structure_num_kernels}")
        if self.structure_chunk_size < 1:
            problems.append(f"structure_chunk_size must be >= 1, got {self.structure_chunk_size}")
        if self.moe_num_experts < 0 or self.moe_num_experts == 1:
            problems.append(f"moe_num_experts must be 0 (dense) or >= 2, got {self.moe_num_experts}")
        if self.moe_num_experts and not 1 <= self.moe_top_k <= self.moe_num_experts:
            problems.append(f"moe_top_k must be in [1, moe_num_experts={self.moe_num_experts}], got {self.moe_top_k}")
        if self.moe_capacity_factor <= 0 or (self.moe_eval_capacity_factor is not None and self.moe_eval_capacity_factor <= 0):
            problems.append("moe_capacity_factor and moe_eval_capacity_factor must be > 0 (eval: or None, no limit)")
        if self.protein_encoder_backend in EVOLUTIONARYSCALE_BACKENDS and self.protein_encoder_input != "sequence":
            problems.append(f"protein_encoder_backend={self.protein_encoder_backend!r} reads amino acids (ESM3 adds its own structure tokens): protein_encoder_input must be 'sequence'")
        if self.moe_num_experts and self.protein_encoder_backend in EVOLUTIONARYSCALE_BACKENDS:
            problems.append(f"moe_num_experts with protein_encoder_backend={self.protein_encoder_backend!r}: the mixture of "
                            "experts (SEPIT) is built for ESM-2 encoders ('esm', 'fair-esm'); ESM3 / ESM C models stay dense")
        if self.use_structure_bias and self.protein_encoder_backend != "esm":
            problems.append("use_structure_bias requires protein_encoder_backend='esm' (the bias rides in EsmModel's attention mask)")
        if self.protein_config is not None:
            layers = self.protein_config.num_hidden_layers
            if not -(layers + 1) <= self.protein_feature_layer <= layers:
                problems.append(
                    f"protein_feature_layer={self.protein_feature_layer} is outside the encoder's "
                    f"{layers + 1} hidden states (embeddings + {layers} layers)"
                )
            if self.projector_type == "resampler":
                width = self.projector_hidden_size or self.protein_config.hidden_size
                if width % self.resampler_num_heads:
                    problems.append(f"resampler width {width} is not divisible by resampler_num_heads={self.resampler_num_heads}")
        vocab = getattr(self.text_config, "vocab_size", None)
        for name in ("protein_token_id", "protein_start_token_id", "protein_end_token_id"):
            token_id = getattr(self, name)
            if token_id is not None and vocab is not None and not 0 <= token_id < vocab:
                problems.append(f"{name}={token_id} is outside the LLM vocabulary (size {vocab})")
        if problems:
            raise ValueError("Invalid ProtLLMConfig: " + "; ".join(problems))


__all__ = ["EVOLUTIONARYSCALE_BACKENDS", "ProtLLMConfig", "evolutionaryscale_protein_config_kwargs"]
