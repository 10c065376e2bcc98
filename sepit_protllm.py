"""SEPIT's two additions to the core ProtLLM (modeling_protllm.py), in one optional module:

- a structure-aware protein encoder: pairwise CA distances -> Gaussian kernels -> one additive attention bias per
  encoder head, plus a per-residue term (`use_structure_bias`);
- a mixture-of-experts LLM: every feed-forward block upcycled to `moe_num_experts` routed copies of itself
  (moe_protllm.py), trained with the Switch / Mixtral load-balancing loss (`moe_num_experts > 0`).

A model uses either or both, as its config says. A model folder whose `auto_map` names these classes carries this
file and moe_protllm.py; other folders do not. Building, upcycling a trained dense model and training live in the
`protllm` package (`protllm.building.upcycle_to_moe`), which is not uploaded.

Shapes used below: P proteins in the batch, T protein tokens (residues + <cls> + <eos>, padded), R = T - 2 residue
positions, H encoder attention heads, K distance kernels, D_p encoder width, B text rows, S text length.
"""

import dataclasses
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils.generic import can_return_tuple

try:
    from .configuration_protllm import (
        STRUCTURE_BIAS_ATTN_IMPLEMENTATIONS,
        ProtLLMConfig,
    )
    from .encoder_protllm import ProtLLMProteinEncoder
    from .modeling_protllm import (
        ProtLLMForConditionalGeneration,
        ProtLLMModel,
        ProtLLMPreTrainedModel,
    )
    from .moe_protllm import (
        ProtLLMMoeRouting,
        ProtLLMSparseMoeBlock,
        checkpoint_returning_router_logits,
        decoder_layers,
        moe_blocks,
        upcycle_feed_forward_blocks,
    )
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from configuration_protllm import STRUCTURE_BIAS_ATTN_IMPLEMENTATIONS, ProtLLMConfig
    from encoder_protllm import ProtLLMProteinEncoder
    from modeling_protllm import (
        ProtLLMForConditionalGeneration,
        ProtLLMModel,
        ProtLLMPreTrainedModel,
    )
    from moe_protllm import (
        ProtLLMMoeRouting,
        ProtLLMSparseMoeBlock,
        checkpoint_returning_router_logits,
        decoder_layers,
        moe_blocks,
        upcycle_feed_forward_blocks,
    )


class ProtLLMGaussianKernels(nn.Module):
    """A bank of learnable Gaussian basis functions over distances: `(...)` -> `(..., num_kernels)`."""

    def __init__(self, num_kernels: int, max_distance: float = 24.0):
        super().__init__()
        self.num_kernels = num_kernels
        self.max_distance = max_distance
        self.means = nn.Parameter(torch.empty(num_kernels))
        self.log_stds = nn.Parameter(torch.empty(num_kernels))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.means.copy_(torch.linspace(0.0, self.max_distance, self.num_kernels))
            spacing = self.max_distance / max(self.num_kernels - 1, 1)
            self.log_stds.fill_(math.log(max(spacing, 0.5)))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        # In the distances' dtype (fp32 from the structure bias): bf16 means/stds would shift kernels of width 0.5 A.
        stds = self.log_stds.to(distances.dtype).exp()
        z = (distances.unsqueeze(-1) - self.means.to(distances.dtype)) / stds
        return torch.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * stds)


class ProtLLMStructureBias(nn.Module):
    """SEPIT's structure module: pairwise CA distances -> Gaussian kernels -> 2-layer GELU MLP -> one additive
    attention bias per head, plus the kernel features summed over each residue's neighbours, projected to the
    encoder width and added to that residue's embedding (per residue, not per batch row as SEPIT's code does).

    Residues without coordinates get no bias and no edge term. The L x L pair map is processed in chunks of
    query rows (re-computed in backward), so memory beyond the bias itself is `chunk x L x num_kernels`.

    Distances, kernels and the small pair MLP always run in fp32, whatever the model dtype: `cdist` has no
    bf16/fp16 kernel, and bf16 coordinates of 60-100 A are off by up to 0.5 A, as wide as a kernel. Only the
    finished bias and residue term are cast to the encoder's dtype.
    """

    def __init__(self, num_kernels: int, num_heads: int, hidden_size: int, embedding_scale: float, chunk_size: int):
        super().__init__()
        self.kernels = ProtLLMGaussianKernels(num_kernels)
        self.pair_mlp = nn.Sequential(nn.Linear(num_kernels, num_kernels), nn.GELU(), nn.Linear(num_kernels, num_heads))
        self.edge_proj = nn.Linear(num_kernels, hidden_size)
        self.embedding_scale = embedding_scale
        self.chunk_size = chunk_size
        self.num_heads = num_heads

    def _chunk(self, ca_rows, ca, mask_rows, mask):
        """fp32 throughout (autocast off): `(P, c, 3)` rows against `(P, T, 3)` -> `(P, H, c, T)`, `(P, c, K)`."""
        with torch.autocast(ca.device.type, enabled=False):
            # Exact differences, not cdist's default |a|^2+|b|^2-2ab matrix product: that one is off by ~0.05 A at d=0
            # for PDB-scale coordinates (|x| ~ 100 A) and by ~0.35 A after a 500 A translation (bias not translation-invariant).
            distances = torch.cdist(ca_rows, ca, compute_mode="donot_use_mm_for_euclid_dist")  # (P, c, T)
            pair_mask = (mask_rows.unsqueeze(-1) & mask.unsqueeze(-2)).unsqueeze(-1)  # (P, c, T, 1)
            features = self.kernels(distances) * pair_mask  # (P, c, T, K)
            linear_1, linear_2 = self.pair_mlp[0], self.pair_mlp[2]
            hidden = F.gelu(F.linear(features, linear_1.weight.float(), linear_1.bias.float()))
            bias = F.linear(hidden, linear_2.weight.float(), linear_2.bias.float()) * pair_mask  # (P, c, T, H)
        return bias.permute(0, 3, 1, 2), features.sum(dim=2)  # (P, H, c, T), (P, c, K)

    def forward(self, ca_coords: torch.Tensor, coord_mask: torch.Tensor, dtype: torch.dtype | None = None):
        """`ca_coords` `(P, T, 3)`, `coord_mask` `(P, T)` bool -> bias `(P, H, T, T)` and residue term `(P, T, D_p)`,
        both in `dtype` (default: the module's parameter dtype), computed in fp32."""
        dtype = dtype or self.edge_proj.weight.dtype
        ca_coords = ca_coords.float()
        ca_coords = torch.where(coord_mask.unsqueeze(-1), ca_coords, torch.zeros_like(ca_coords))
        num_proteins, num_tokens = coord_mask.shape
        # Chunks are written (and cast) into one preallocated bias: no list + torch.cat copy of the H x T x T tensor.
        bias = ca_coords.new_empty(num_proteins, self.num_heads, num_tokens, num_tokens, dtype=dtype)
        edge_sums = []
        for start in range(0, num_tokens, self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            args = (ca_coords[:, rows], ca_coords, coord_mask[:, rows], coord_mask)
            if torch.is_grad_enabled() and self.training:
                chunk_bias, edge_sum = checkpoint(self._chunk, *args, use_reentrant=False)
            else:
                chunk_bias, edge_sum = self._chunk(*args)
            bias[:, :, rows] = chunk_bias
            edge_sums.append(edge_sum)
        with torch.autocast(ca_coords.device.type, enabled=False):
            edge_features = torch.cat(edge_sums, dim=1)  # (P, T, K) fp32
            residue_term = F.linear(edge_features, self.edge_proj.weight.float(), self.edge_proj.bias.float())
            residue_term = residue_term * self.embedding_scale * coord_mask.unsqueeze(-1).float()
        return bias, residue_term.to(dtype)


class ProtLLMSepitProteinEncoder(ProtLLMProteinEncoder):
    """`ProtLLMProteinEncoder` (EsmModel) with SEPIT's structure bias when `config.use_structure_bias`: proteins with
    coordinates get the bias added to every attention layer's scores and the residue term added to their embeddings;
    proteins without get the plain encoder."""

    def __init__(self, config: ProtLLMConfig):
        config.route_protein_attn_implementation()  # the structure bias needs eager/sdpa, never flash
        super().__init__(config)
        self.structure_bias = None
        if config.use_structure_bias:
            self.structure_bias = ProtLLMStructureBias(
                config.structure_num_kernels,
                config.protein_config.num_attention_heads,
                config.protein_config.hidden_size,
                config.structure_embedding_scale,
                config.structure_chunk_size,
            )
            self.set_frozen(config.freeze_protein_encoder)  # the bias follows the encoder

    def add_structure(self, embeddings, attention_mask, coords, coord_mask):
        """`(P, T, D_p)` embeddings + the residue term; the `(P, T)` mask becomes a `(P, H, T, T)` float mask holding
        padding and the per-head bias (EsmModel passes a prepared 4D float mask through unchanged)."""
        if self.structure_bias is None or coords is None:
            return embeddings, attention_mask
        token_ca, token_mask = self._token_level_ca(coords, coord_mask, embeddings.shape[1])
        bias, residue_term = self.structure_bias(token_ca, token_mask, dtype=embeddings.dtype)
        padding = (1.0 - attention_mask[:, None, None, :].to(bias.dtype)) * torch.finfo(bias.dtype).min
        return embeddings + residue_term, bias.add_(padding)  # in place: one H x T x T tensor, not two

    @staticmethod
    def _token_level_ca(coords, coord_mask, num_tokens):
        """Residue-level `(P, R, 4, 3)` backbone -> token-level CA `(P, T, 3)` and mask (token t = residue t-1)."""
        num_proteins, num_residues = coords.shape[:2]
        residues = min(num_residues, num_tokens - 2)
        ca = coords[:, :residues, 1]
        mask = coord_mask[:, :residues].bool() & torch.isfinite(ca).all(dim=-1)
        token_ca = ca.new_zeros(num_proteins, num_tokens, 3)
        token_mask = torch.zeros(num_proteins, num_tokens, dtype=torch.bool, device=coords.device)
        token_ca[:, 1 : 1 + residues] = torch.nan_to_num(ca)
        token_mask[:, 1 : 1 + residues] = mask
        return token_ca, token_mask


def mirror_moe_settings_to_text_config(config: ProtLLMConfig) -> None:
    """Copy the MoE settings to `config.text_config` under the names TRL's SFTTrainer (fused LM head) and
    transformers' load-balancing loss read from `config.get_text_config()`: what makes the router loss reach the
    gradient there."""
    text_config = config.text_config
    text_config.num_experts = text_config.num_local_experts = config.moe_num_experts
    text_config.num_experts_per_tok = config.moe_top_k
    text_config.router_aux_loss_coef = config.moe_router_aux_loss_coef
    if not hasattr(text_config, "output_router_logits"):
        # Present (TRL checks for the attribute) but off: generation need not collect router logits.
        text_config.output_router_logits = False


@contextmanager
def moe_routing(blocks, routing):
    """Install one forward's routing state (token mask, router-logit list) on the MoE blocks for its duration."""
    for block in blocks:
        block.routing = routing
    try:
        yield
    finally:
        for block in blocks:
            block.routing = None


class ProtLLMSepitPreTrainedModel(ProtLLMPreTrainedModel):
    """What both SEPIT classes add to `ProtLLMPreTrainedModel`: encoder attention routing, checkpointed MoE layers
    and the initialisation of the distance kernels."""

    # The core encoder class too: a dense model upcycled in place (protllm.building.upcycle_to_moe) keeps its encoder.
    _no_split_modules = ["ProtLLMProteinEncoder", "ProtLLMSepitProteinEncoder"]

    def _set_gradient_checkpointing(self, *args, **kwargs):
        super()._set_gradient_checkpointing(*args, **kwargs)
        # MoE decoder layers return their router logits through the checkpointed function (re-entrant safe).
        for layer in decoder_layers(getattr(self, "model", self).language_model):
            function = layer.__dict__.get("_gradient_checkpointing_func")
            if isinstance(layer.mlp, ProtLLMSparseMoeBlock) and function is not None and not getattr(function, "protllm_moe_wrapped", False):
                layer._gradient_checkpointing_func = checkpoint_returning_router_logits(function, layer.mlp)

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs):
        # With the structure bias the encoder must stay on eager/sdpa: route the request before transformers checks
        # (and, for flash, imports) it for the encoder.
        if self.config.use_structure_bias:
            requested = attn_implementation if isinstance(attn_implementation, dict) else {"": attn_implementation}
            default = requested.get("", self.config._attn_implementation)
            for_encoder = requested.get("protein_config", default)
            if for_encoder not in (None, *STRUCTURE_BIAS_ATTN_IMPLEMENTATIONS):
                self.config.protein_config._attn_implementation = for_encoder
                attn_implementation = {
                    "": default,
                    "text_config": requested.get("text_config", default),
                    "protein_config": self.config.route_protein_attn_implementation(),
                }
        return super().set_attn_implementation(attn_implementation, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ProtLLMGaussianKernels):  # meta-device init leaves them uninitialised
            module.reset_parameters()


class ProtLLMSepitModel(ProtLLMSepitPreTrainedModel, ProtLLMModel):
    """`ProtLLMModel` with SEPIT's structure-aware encoder and / or mixture-of-experts LLM (the `AutoModel` class of
    such a folder)."""

    protein_encoder_class = ProtLLMSepitProteinEncoder
    runs_sepit_extensions = True

    def build_language_model(self, config: ProtLLMConfig) -> nn.Module:
        language_model = super().build_language_model(config)
        if config.moe_num_experts:
            mirror_moe_settings_to_text_config(config)
            upcycle_feed_forward_blocks(language_model, config.text_config.hidden_size, config.moe_num_experts,
                                        config.moe_top_k, config.moe_capacity_factor, config.moe_eval_capacity_factor)
        return language_model

    def get_protein_features(self, protein_input_ids=None, protein_attention_mask=None, protein_coords=None,
                             protein_coord_mask=None, protein_embeds=None, protein_embeds_mask=None) -> torch.Tensor:
        """`ProtLLMModel.get_protein_features`, after SEPIT's structure dropout in training: a protein loses its whole
        structure at random, so the model also learns sequence-only inputs. Decided by the ProtLLM's training mode
        (a frozen encoder stays in eval mode)."""
        dropout = self.config.structure_dropout if self.config.use_structure_bias else 0.0
        if self.training and dropout > 0 and protein_embeds is None and protein_coord_mask is not None:
            keep = torch.rand(protein_coord_mask.shape[0], 1, device=protein_coord_mask.device) >= dropout
            protein_coord_mask = protein_coord_mask.bool() & keep
        return super().get_protein_features(protein_input_ids, protein_attention_mask, protein_coords,
                                            protein_coord_mask, protein_embeds, protein_embeds_mask)

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_router_logits=None, **kwargs):
        """`ProtLLMModel.forward`; a mixture-of-experts LLM also returns `router_logits` (per MoE layer,
        `(B * S, num_experts)`) when `output_router_logits` (default: `text_config.output_router_logits`)."""
        blocks = moe_blocks(self.language_model)
        token_mask = None
        if blocks and attention_mask is not None and attention_mask.dim() == 2:
            # Padding takes no expert capacity; with a cache the mask also spans the past tokens.
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            token_mask = attention_mask[:, -length:].bool()
        routing = ProtLLMMoeRouting(token_mask)
        with moe_routing(blocks, routing):
            outputs = super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        if output_router_logits is None:
            output_router_logits = getattr(self.config.text_config, "output_router_logits", False)
        if blocks and output_router_logits:
            outputs = dataclasses.replace(outputs, router_logits=tuple(routing.router_logits))
        return outputs


class ProtLLMSepitForConditionalGeneration(ProtLLMSepitPreTrainedModel, ProtLLMForConditionalGeneration):
    """`ProtLLMForConditionalGeneration` with SEPIT's structure-aware encoder and / or mixture-of-experts LLM (the
    `AutoModelForCausalLM` class of such a folder; see `ProtLLMProcessor` for inputs). With experts, the loss adds
    `moe_router_aux_loss_coef` x the load-balancing loss (`aux_loss`)."""

    base_model_class = ProtLLMSepitModel

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
        output_router_logits=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """`ProtLLMForConditionalGeneration.forward`, plus `output_router_logits` (default: True when `labels` are
        given, so that training gets the balancing loss)."""
        if output_router_logits is None and self.config.moe_num_experts:
            output_router_logits = labels is not None or getattr(self.config.text_config, "output_router_logits", False)
        num_items_in_batch, shift_labels = kwargs.get("num_items_in_batch"), kwargs.get("shift_labels")
        outputs = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
            protein_input_ids=protein_input_ids, protein_attention_mask=protein_attention_mask,
            protein_coords=protein_coords, protein_coord_mask=protein_coord_mask, protein_embeds=protein_embeds,
            protein_embeds_mask=protein_embeds_mask, use_cache=use_cache, output_router_logits=output_router_logits,
            logits_to_keep=logits_to_keep, **kwargs,
        )
        if outputs.router_logits is None:
            return outputs
        loss, aux_loss = outputs.loss, self.router_aux_loss(outputs.router_logits, attention_mask)
        if loss is not None:
            aux_term = self.config.moe_router_aux_loss_coef * aux_loss.to(loss.device)
            if num_items_in_batch is not None:
                # The LM loss is then a sum over this micro-batch divided by the label count of all micro-batches
                # and processes, which Trainer neither divides by the accumulation steps nor averages over the
                # world size. Weight the (mean) balancing loss by this micro-batch's share of those labels, so the
                # step optimises the label-weighted mean balancing loss instead of accumulation_steps x world_size x it.
                targets = shift_labels if shift_labels is not None else labels[..., 1:]
                local_items = (targets != -100).sum().to(loss.device)
                aux_term = aux_term * local_items / torch.as_tensor(num_items_in_batch, device=loss.device)
            loss = loss + aux_term
        return dataclasses.replace(outputs, loss=loss, aux_loss=aux_loss)

    def router_aux_loss(self, router_logits, attention_mask=None):
        """Switch/Mixtral load-balancing loss, the same function TRL's fused SFT path applies."""
        from transformers.models.mixtral.modeling_mixtral import (
            load_balancing_loss_func,
        )

        if attention_mask is not None and attention_mask.numel() != router_logits[0].shape[0]:
            attention_mask = None  # cached decoding: the router saw only the new tokens
        return load_balancing_loss_func(router_logits, self.config.moe_num_experts, self.config.moe_top_k, attention_mask)


__all__ = [
    "ProtLLMGaussianKernels",
    "ProtLLMSepitForConditionalGeneration",
    "ProtLLMSepitModel",
    "ProtLLMSepitProteinEncoder",
    "ProtLLMStructureBias",
]
