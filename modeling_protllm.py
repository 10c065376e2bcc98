"""ProtLLM: a protein encoder projected into a causal LLM (LLaVA-shaped; STELLA and SEPIT).

    protein tokens -> encoder (ESM-2 / SaProt) -> projector
        -> features scattered into the LLM's input embeddings at the `<protein>` placeholders -> LLM

SEPIT's structure bias and mixture-of-experts LLM (`sepit_protllm.py`) and ESM3 / ESM C encoders (`esm3_protllm.py`)
subclass these classes in optional modules; a model folder carries one only when its model needs it.

Shapes used below: P proteins in the batch, T protein tokens (residues + <cls> + <eos>, padded),
R = T - 2 residue positions, B text rows, S text length, D_p encoder width, D LLM width.
"""

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.import_utils import torch_compilable_check

try:
    from .configuration_protllm import ProtLLMConfig
    from .encoder_protllm import ProtLLMProteinEncoder
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from configuration_protllm import ProtLLMConfig
    from encoder_protllm import ProtLLMProteinEncoder


# The model inputs indexed by protein (P, ...), not by text row.
PROTEIN_INPUT_KEYS = ("protein_input_ids", "protein_attention_mask", "protein_coords", "protein_coord_mask",
                      "protein_embeds", "protein_embeds_mask")


@dataclass
class ProtLLMModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    router_logits (`tuple(torch.FloatTensor)`, *optional*): per MoE layer, `(B * S, num_experts)` (MoE models only).
    protein_features (`torch.FloatTensor`, *optional*): projected protein tokens, `(num_protein_tokens, D)`.
    """

    router_logits: tuple[torch.FloatTensor, ...] | None = None
    protein_features: torch.FloatTensor | None = None


@dataclass
class ProtLLMCausalLMOutputWithPast(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


class ProtLLMLinearProjector(nn.Module):
    """STELLA's connector: one linear layer, `(..., D_p)` -> `(..., D)`."""

    def __init__(self, config: ProtLLMConfig):
        super().__init__()
        self.linear = nn.Linear(config.protein_config.hidden_size, config.text_config.hidden_size)

    def forward(self, residue_states, residue_mask):
        return self.linear(residue_states), residue_mask


class ProtLLMMLPProjector(nn.Module):
    """SEPIT / LLaVA projector: Linear -> GELU -> Linear, `(..., D_p)` -> `(..., D)`."""

    def __init__(self, config: ProtLLMConfig):
        super().__init__()
        hidden = config.projector_hidden_size or config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.protein_config.hidden_size, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, config.text_config.hidden_size)

    def forward(self, residue_states, residue_mask):
        return self.linear_2(self.act(self.linear_1(residue_states))), residue_mask


class ProtLLMResampler(nn.Module):
    """`num_query_tokens` learned queries cross-attend to the residues: `(P, R, D_p)` -> `(P, Q, D)`, so a protein
    costs the LLM a fixed number of tokens whatever its length."""

    def __init__(self, config: ProtLLMConfig):
        super().__init__()
        width = config.projector_hidden_size or config.protein_config.hidden_size
        self.queries = nn.Parameter(torch.empty(config.num_query_tokens, width))
        self.input_proj = nn.Linear(config.protein_config.hidden_size, width)
        self.norm_queries = nn.LayerNorm(width)
        self.norm_residues = nn.LayerNorm(width)
        self.cross_attention = nn.MultiheadAttention(width, config.resampler_num_heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.output_proj = nn.Linear(width, config.text_config.hidden_size)
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, residue_states, residue_mask):
        residues = self.norm_residues(self.input_proj(residue_states))
        queries = self.norm_queries(self.queries).unsqueeze(0).expand(residues.shape[0], -1, -1)
        attended, _ = self.cross_attention(queries, residues, residues, key_padding_mask=~residue_mask, need_weights=False)
        hidden = queries + attended
        hidden = hidden + self.ffn(self.norm_ffn(hidden))
        out_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return self.output_proj(hidden), out_mask


PROJECTOR_CLASSES = {"linear": ProtLLMLinearProjector, "mlp2x_gelu": ProtLLMMLPProjector, "resampler": ProtLLMResampler}


class ProtLLMPreTrainedModel(PreTrainedModel):
    config_class = ProtLLMConfig
    config: ProtLLMConfig
    base_model_prefix = "model"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = ["ProtLLMProteinEncoder"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # The forward has no data-dependent Python branches (checks go through torch_compilable_check), so
    # `torch.compile(fullgraph=True)` and static-cache generation compile it whole.
    _can_compile_fullgraph = True

    def initialize_weights(self):
        # Under DeepSpeed ZeRO-3 (`zero.Init`), the LLM that `AutoModel.from_config` builds inside `__init__` is
        # already partitioned (every rank holds empty shards) and initialised by transformers' ZeRO-3 variant, which
        # marks modules initialised on rank 0 only: the plain re-init of our `post_init` would index empty tensors on
        # the other ranks. Use that same variant (gather each module, initialise on rank 0, broadcast).
        if any(hasattr(param, "ds_id") for param in self.parameters()):
            from transformers.integrations.deepspeed import initialize_weights_zero3

            initialize_weights_zero3(self)
            # It initialises the modules built outside `zero.Init` (encoder, projector, LM head) on rank 0 only:
            # give every rank rank 0's values now (DeepSpeed would only do so when the trainer wraps the model).
            for param in self.parameters():
                if not hasattr(param, "ds_id"):
                    torch.distributed.broadcast(param.data, src=0)
            return
        super().initialize_weights()

    def _init_weights(self, module):
        super()._init_weights(module)
        # Rebuild what the generic initialiser does not know (meta-device init leaves it uninitialised).
        if isinstance(module, ProtLLMResampler):
            nn.init.normal_(module.queries, std=0.02)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        # Safe loading: transformers only *warns* when the weights hold tensors the config has no place for
        # (unexpected keys) or lack tensors it needs (missing keys, left randomly initialised), e.g. after
        # config.json was edited to another num_hidden_layers. Refuse that silent partial load (size mismatches
        # already raise in transformers). The one expected difference: a base ProtLLMModel loaded from a folder
        # saved with the LM head. Callers passing output_loading_info=True get the report and decide themselves.
        # `strict=False`, or no folder at all (`from_pretrained(None, config=..., state_dict=...)`), follows
        # transformers' convention instead: missing weights are initialised by `_init_weights` (with a warning).
        report_requested = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        encoder = getattr(model, "model", model).protein_encoder
        if encoder.backend == "fair-esm":  # fair-esm ties its (unused) MLM head to its embedding: safetensors keeps one
            encoder.esm.lm_head.weight = encoder.esm.embed_tokens.weight
        if report_requested:
            return model, info
        if not strict or pretrained_model_name_or_path is None:
            return model
        missing = sorted(k for k in info.get("missing_keys") or [] if not _is_tied(model, k, info["missing_keys"]))
        unexpected = sorted(k for k in info.get("unexpected_keys") or [] if hasattr(model, "lm_head") or not k.startswith("lm_head."))
        if missing or unexpected:
            def show(keys):
                return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"

            problems = ([f"missing from the weights: {show(missing)}"] if missing else []) + (
                [f"in the weights but not in this config: {show(unexpected)}"] if unexpected else [])
            raise ValueError(
                f"{pretrained_model_name_or_path}: the weights do not match config.json; " + "; ".join(problems)
                + ". Refusing a partial load: fix config.json or the weights (output_loading_info=True returns the report)."
            )
        return model


def _is_tied(model, key, missing) -> bool:
    """True when the parameter `key` is the same tensor as a loaded one (e.g. fair-esm's lm_head tied to its embedding,
    which safetensors stores once): reported missing by transformers, yet loaded."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    prefix = model.base_model_prefix + "."
    by_name = {n: i for i, ns in names.items() for n in ns}
    ident = by_name.get(key, by_name.get(prefix + key))
    missing = set(missing) | {prefix + k for k in missing}
    return ident is not None and any(n not in missing for n in names[ident])


class ProtLLMModel(ProtLLMPreTrainedModel):
    """Protein encoder + projector + LLM backbone, without the LM head."""

    # A subclass for another encoder (SEPIT's structure bias, ESM3 / ESM C) names its own encoder class here.
    protein_encoder_class = ProtLLMProteinEncoder
    # Whether this class runs SEPIT's structure bias and mixture of experts (the subclass in sepit_protllm.py does).
    runs_sepit_extensions = False

    def __init__(self, config: ProtLLMConfig):
        super().__init__(config)
        wanted = [name for name in ("use_structure_bias", "moe_num_experts") if getattr(config, name)]
        if wanted and not self.runs_sepit_extensions:
            raise ValueError(
                f"{type(self).__name__} does not run {' and '.join(wanted)} (SEPIT's structure bias / mixture of "
                "experts): use sepit_protllm.ProtLLMSepitForConditionalGeneration (a saved folder names it in its "
                "auto_map; protllm.model_classes.causal_lm_class(config) picks it)"
            )
        self.protein_encoder = self.protein_encoder_class(config)
        self.projector = PROJECTOR_CLASSES[config.projector_type](config)
        self.language_model = self.build_language_model(config)
        self.post_init()

    def build_language_model(self, config: ProtLLMConfig) -> nn.Module:
        """The LLM backbone (no LM head) of `config.text_config`; the MoE subclass upcycles its feed-forward blocks."""
        return AutoModel.from_config(config.text_config)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_protein_features(
        self,
        protein_input_ids=None,
        protein_attention_mask=None,
        protein_coords=None,
        protein_coord_mask=None,
        protein_embeds=None,
        protein_embeds_mask=None,
    ) -> torch.Tensor:
        """Projected protein tokens for every protein, concatenated in order: `(sum_i n_i, D)`.

        Either token ids (`(P, T)`, encoder run here) or precomputed encoder residue states `protein_embeds`
        `(P, R, D_p)` with `protein_embeds_mask` `(P, R)` (the frozen-encoder feature cache).
        """
        if protein_embeds is not None:
            residue_states = protein_embeds
            residue_mask = protein_embeds_mask.bool() if protein_embeds_mask is not None else torch.ones(
                protein_embeds.shape[:2], dtype=torch.bool, device=protein_embeds.device
            )
        else:
            if protein_attention_mask is None:
                protein_attention_mask = torch.ones_like(protein_input_ids)
            residue_states, residue_mask = self.protein_encoder(
                protein_input_ids, protein_attention_mask, protein_coords, protein_coord_mask
            )
        projector_dtype = next(self.projector.parameters()).dtype
        features, feature_mask = self.projector(residue_states.to(projector_dtype), residue_mask)
        return features[feature_mask]

    def placeholder_positions(self, input_ids, inputs_embeds):
        """`(B, S)` bool: where the `<protein>` placeholders are, from `input_ids`, else from `inputs_embeds` (the
        placeholder's embedding, as LLaVA finds image tokens)."""
        if input_ids is None:
            placeholder = self.get_input_embeddings()(
                torch.tensor(self.config.protein_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            return (inputs_embeds == placeholder).all(-1)
        return input_ids == self.config.protein_token_id

    def get_placeholder_mask(self, input_ids, inputs_embeds, protein_features):
        """`(B, S, 1)` mask of `<protein>` placeholder positions; their count must equal the protein tokens."""
        mask = self.placeholder_positions(input_ids, inputs_embeds)
        # A tensor condition (no int()/if on data): a hint, not a graph break, under torch.compile / torch.export.
        torch_compilable_check(
            mask.sum() == protein_features.shape[0],
            lambda: f"Protein features and <protein> placeholder tokens do not match: {int(mask.sum())} placeholders in "
            f"the text, {protein_features.shape[0]} protein tokens from the projector. Build inputs with "
            "ProtLLMProcessor (it expands each placeholder to the projector's token count) and do not truncate "
            "through a protein span.",
        )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        protein_input_ids=None,
        protein_attention_mask=None,
        protein_coords=None,
        protein_coord_mask=None,
        protein_embeds=None,
        protein_embeds_mask=None,
        use_cache=None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | ProtLLMModelOutputWithPast:
        """
        input_ids `(B, S)` with `<protein>` placeholders; protein inputs as in `get_protein_features`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        protein_features = None
        if protein_input_ids is not None or protein_embeds is not None:
            protein_features = self.get_protein_features(
                protein_input_ids, protein_attention_mask, protein_coords, protein_coord_mask,
                protein_embeds, protein_embeds_mask,
            )
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, protein_features)
            # Device too, not only dtype: with a device_map the encoder and the LLM embeddings may sit apart.
            protein_features = protein_features.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask, protein_features)
        elif input_ids is not None and self.config.protein_token_id is not None:
            # Prefill only: a decode step's input is the previous output token, which carries no protein. Branchless
            # (a static cache's length is a tensor): the check passes on any decode step.
            protein_token_id = self.config.protein_token_id
            torch_compilable_check(
                ~(input_ids == protein_token_id).any() | _is_decode_step(past_key_values),
                lambda: f"input_ids hold {int((input_ids == protein_token_id).sum())} <protein> placeholder tokens "
                "but no protein inputs were given",
            )

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            return_dict=True,  # fields are read below; `return_dict=False` is applied to our output
            **kwargs,
        )
        return ProtLLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            protein_features=protein_features,
        )


def _is_decode_step(past_key_values) -> bool | torch.Tensor:
    """True when the cache already holds tokens (a bool, or a 0-dim bool tensor for a static cache)."""
    return past_key_values is not None and past_key_values.get_seq_length() > 0


class ProtLLMForConditionalGeneration(ProtLLMPreTrainedModel, GenerationMixin):
    """ProtLLM with the LLM's LM head: answers questions about proteins. See `ProtLLMProcessor` for inputs."""

    # The head may be tied to the (row-sharded) input embedding, so it needs its own tensor-parallel entry.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # Another encoder family (ESM3 / ESM C) is a subclass that names its own base model class here.
    base_model_class = ProtLLMModel

    def __init__(self, config: ProtLLMConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # The tied source is the LLM's own embedding, whose name depends on the family (embed_tokens, wte...).
        embedding = self.model.get_input_embeddings()
        embedding_name = next(name for name, module in self.named_modules() if module is embedding)
        self._tied_weights_keys = {"lm_head.weight": f"{embedding_name}.weight"}
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        protein_input_ids=None,
        protein_attention_mask=None,
        protein_coords=None,
        protein_coord_mask=None,
        protein_embeds=None,
        protein_embeds_mask=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | ProtLLMCausalLMOutputWithPast:
        """`labels` `(B, S)`: next-token targets, -100 where ignored (prompt, protein tokens, padding)."""
        # Trainer passes the batch's label count for the loss only; the backbone must not see it.
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        # Pre-shifted targets (sequence/context parallelism): they replace `labels` in the loss.
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            protein_input_ids=protein_input_ids,
            protein_attention_mask=protein_attention_mask,
            protein_coords=protein_coords,
            protein_coord_mask=protein_coord_mask,
            protein_embeds=protein_embeds,
            protein_embeds_mask=protein_embeds_mask,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      num_items_in_batch=num_items_in_batch, shift_labels=shift_labels)
        return ProtLLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, after checking the prompt fits the LLM's context (`max_position_embeddings`).

        Policy: a prompt that does not fit is refused before anything runs (past the context the model sees positions
        it never trained on and answers nonsense, slowly); an answer budget that would overflow the context is cut to
        what fits, with a warning.
        """
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        context = getattr(self.config.text_config, "max_position_embeddings", None)
        if input_ids is not None and context:
            prompt = int(input_ids.shape[-1])
            if prompt >= context:
                raise ValueError(
                    f"the prompt has {prompt} tokens (proteins included) but the language model's context is {context} "
                    "tokens (text_config.max_position_embeddings): shorten the question, or give fewer or shorter "
                    "proteins (max_protein_length)"
                )
            max_new_tokens = kwargs.get("max_new_tokens")
            if max_new_tokens is not None and prompt + max_new_tokens > context:
                warnings.warn(f"max_new_tokens={max_new_tokens} cut to {context - prompt}: the {prompt}-token prompt "
                              f"leaves that much of the {context}-token context", stacklevel=2)
                kwargs["max_new_tokens"] = context - prompt
        return super().generate(*args, **kwargs)

    def _prepare_generation_config(self, generation_config, **kwargs):
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        # A generated <protein> would be a placeholder with no protein behind it: never emit the protein tokens.
        protein_ids = [self.config.protein_token_id, self.config.protein_start_token_id, self.config.protein_end_token_id]
        suppressed = list(generation_config.suppress_tokens or [])
        suppressed += [token_id for token_id in protein_ids if token_id is not None and token_id not in suppressed]
        generation_config.suppress_tokens = suppressed or None
        return generation_config, model_kwargs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Repeat each row `expand_size` times (sampling with `num_return_sequences`, beam search), proteins included.

        Protein inputs are indexed by protein (P, ...), not by row: a row with proteins [A, C] needs copies
        [A, C, A, C], where the default row-wise `repeat_interleave` would give [A, A, C, C] and pair each copy's
        placeholders with the wrong proteins. The proteins of a row are counted from its placeholder runs.
        """
        protein_inputs = {key: model_kwargs.pop(key) for key in PROTEIN_INPUT_KEYS if model_kwargs.get(key) is not None}
        if expand_size > 1 and protein_inputs:
            placeholders = self.model.placeholder_positions(
                input_ids if input_ids is not None and input_ids.numel() else None, model_kwargs.get("inputs_embeds")
            )
            # (B,): the number of placeholder runs in each row, one run per protein
            run_starts = placeholders & ~torch.nn.functional.pad(placeholders[:, :-1], (1, 0), value=False)
            proteins_per_row = run_starts.sum(-1).tolist()
            first = [sum(proteins_per_row[:row]) for row in range(len(proteins_per_row))]
            index = torch.tensor([first[row] + protein for row, count in enumerate(proteins_per_row)
                                  for _ in range(expand_size) for protein in range(count)], dtype=torch.long)
            protein_inputs = {key: value[index.to(value.device)] for key, value in protein_inputs.items()}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(protein_inputs)
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, *args, inputs_embeds=None, is_first_iteration=False, **kwargs):
        # `inputs_embeds` named in the signature: transformers then lets generate() start from embeddings.
        model_inputs = super().prepare_inputs_for_generation(
            *args, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        # Protein inputs are consumed where their placeholders run. While the cache is empty the whole prompt runs
        # (an assistant model, in assisted / speculative decoding, prefills with is_first_iteration=False). With a
        # filled cache, decode steps carry no placeholders; the first step of a generate() continuing a cache (a
        # returned past_key_values, a cached shared prefix) needs the proteins only if its uncached tokens hold them.
        past_key_values = model_inputs.get("past_key_values")
        if past_key_values is None or not kwargs.get("use_cache", True) or past_key_values.get_seq_length() == 0:
            return model_inputs
        input_ids = model_inputs.get("input_ids")
        tail_has_placeholders = is_first_iteration and (
            model_inputs.get("inputs_embeds") is not None
            or (input_ids is not None and bool((input_ids == self.config.protein_token_id).any()))
        )
        if not tail_has_placeholders:
            for key in PROTEIN_INPUT_KEYS:
                model_inputs.pop(key, None)
        return model_inputs


__all__ = [
    "ProtLLMPreTrainedModel",
    "ProtLLMModel",
    "ProtLLMForConditionalGeneration",
]
