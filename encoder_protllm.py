"""The protein-encoder side of ProtLLM: transformers `EsmModel` (or fair-esm `ESM2`) plus SEPIT's structure bias
(pairwise CA distances -> Gaussian kernels -> per-head attention bias and a residue term). ESM3 / ESM C encoders
subclass `ProtLLMProteinEncoder` in an optional module, which a model folder carries only when its model needs it.

Shapes used below: P proteins in the batch, T protein tokens (residues + <cls> + <eos>, padded),
R = T - 2 residue positions, H encoder attention heads, K distance kernels, D_p encoder width.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.esm.modeling_esm import EsmModel

try:
    from .configuration_protllm import EVOLUTIONARYSCALE_BACKENDS, ProtLLMConfig
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from configuration_protllm import EVOLUTIONARYSCALE_BACKENDS, ProtLLMConfig


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


class ProtLLMProteinEncoder(nn.Module):
    """Protein encoder: transformers `EsmModel` (default) or fair-esm `ESM2`, plus the optional structure bias.

    Returns the hidden state of `config.protein_feature_layer` at residue positions (no <cls>/<eos>).
    A frozen encoder (`config.freeze_protein_encoder`) stays in eval mode whatever `.train()` says, so its
    dropout never runs, and runs without autograd.

    The backbone (`self.esm`) is built by `build_backbone` and run by `backbone_states`; a subclass for another
    encoder family overrides those two (and `unused_parameter_prefixes`).
    """

    def __init__(self, config: ProtLLMConfig):
        super().__init__()
        self.config = config
        protein_config = config.protein_config
        self.backend = config.protein_encoder_backend
        config.route_protein_attn_implementation()  # the structure bias needs eager/sdpa, never flash
        self.esm = self.build_backbone(config)
        self.structure_bias = None
        if config.use_structure_bias:
            self.structure_bias = ProtLLMStructureBias(
                config.structure_num_kernels,
                protein_config.num_attention_heads,
                protein_config.hidden_size,
                config.structure_embedding_scale,
                config.structure_chunk_size,
            )
        self.set_frozen(config.freeze_protein_encoder)

    def build_backbone(self, config: ProtLLMConfig) -> nn.Module:
        """The encoder network of `config.protein_encoder_backend`: `EsmModel` (`esm`) or fair-esm `ESM2` (`fair-esm`)."""
        if config.protein_encoder_backend in EVOLUTIONARYSCALE_BACKENDS:
            raise ValueError(
                f"protein_encoder_backend={config.protein_encoder_backend!r} (EvolutionaryScale's ESM3 / ESM C) needs "
                "esm3_protllm.ProtLLMEvolutionaryScaleForConditionalGeneration, not the core ProtLLM classes: load its "
                "model folder through the folder's own auto_map (AutoModelForCausalLM.from_pretrained(folder, "
                "trust_remote_code=True)), or build it with protllm.building / protllm.model_classes.causal_lm_class(config)"
            )
        if config.protein_encoder_backend == "esm":
            return EsmModel(config.protein_config, add_pooling_layer=False)
        return build_fair_esm(config.protein_config)

    def set_frozen(self, frozen: bool):
        self.config.freeze_protein_encoder = frozen
        unused = self.unused_parameter_prefixes()
        for name, param in self.named_parameters():
            # Parameters the forward never reaches stay frozen even in a trainable encoder: a trainable parameter
            # without a gradient is fatal under DDP ("Expected to have finished reduction").
            param.requires_grad_(not frozen and not name.startswith(unused))
        if frozen:
            self.eval()

    def unused_parameter_prefixes(self) -> tuple[str, ...]:
        """Names (prefixes) of encoder parameters the forward never uses: the contact-prediction head, and with
        `protein_feature_layer` below the last layer, the layers after it and the final layer norm."""
        if self.backend != "esm":
            return ("esm.contact_head.",)
        unused = ["esm.contact_head."]
        feature_layer = self._feature_layer_index()
        if feature_layer != self.num_layers:
            unused += [f"esm.encoder.layer.{index}." for index in range(feature_layer, self.num_layers)]
            unused.append("esm.encoder.emb_layer_norm_after.")
        return tuple(unused)

    @property
    def frozen(self) -> bool:
        return self.config.freeze_protein_encoder

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    @property
    def num_layers(self) -> int:
        return self.config.protein_config.num_hidden_layers

    def forward(self, protein_input_ids, protein_attention_mask, protein_coords=None, protein_coord_mask=None):
        """
        protein_input_ids, protein_attention_mask: `(P, T)`, right-padded, each row `<cls> residues <eos> <pad>...`
        protein_coords: `(P, R, 4, 3)` backbone N/CA/C/O per residue (NaN allowed where masked), optional
        protein_coord_mask: `(P, R)` bool, True where the residue has coordinates
        Returns `(P, R, D_p)` residue states and the `(P, R)` residue mask.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = self.backbone_states(protein_input_ids, protein_attention_mask, protein_coords, protein_coord_mask)
        lengths = protein_attention_mask.sum(dim=1)  # tokens incl. <cls>, <eos>
        positions = torch.arange(states.shape[1] - 2, device=states.device)
        residue_mask = positions.unsqueeze(0) < (lengths - 2).unsqueeze(1)
        return states[:, 1:-1], residue_mask

    def backbone_states(self, input_ids, attention_mask, coords=None, coord_mask=None) -> torch.Tensor:
        """The backbone's hidden state of `protein_feature_layer` at every token: `(P, T)` ids and mask (+ the
        `(P, R, 4, 3)` backbone and `(P, R)` coordinate mask, read by the structure bias) -> `(P, T, D_p)`."""
        if self.backend == "esm":
            return self._esm_forward(input_ids, attention_mask, coords, coord_mask)
        return self._fair_esm_forward(input_ids)

    def _feature_layer_index(self) -> int:
        layer = self.config.protein_feature_layer
        return layer if layer >= 0 else self.num_layers + 1 + layer

    def _esm_forward(self, input_ids, attention_mask, coords, coord_mask):
        layer = self._feature_layer_index()
        # Layer -1 is `last_hidden_state` (after emb_layer_norm_after); any other layer is selected by index, so
        # transformers' output capture keeps that one hidden state instead of all num_layers + 1 of them.
        want_hidden = layer != self.num_layers
        embeddings = self.esm.embeddings(input_ids=input_ids, attention_mask=attention_mask)
        mask = attention_mask
        if self.structure_bias is not None and coords is not None:
            token_ca, token_mask = self._token_level_ca(coords, coord_mask, input_ids.shape[1])
            bias, residue_term = self.structure_bias(token_ca, token_mask, dtype=embeddings.dtype)
            embeddings = embeddings + residue_term
            # A prepared 4D float mask is passed through by EsmModel unchanged: padding + per-head bias.
            padding = (1.0 - attention_mask[:, None, None, :].to(bias.dtype)) * torch.finfo(bias.dtype).min
            mask = bias.add_(padding)  # in place: one H x T x T tensor, not two
        outputs = self.esm(inputs_embeds=embeddings, attention_mask=mask, output_hidden_states=[layer] if want_hidden else False)
        return outputs.hidden_states[layer] if want_hidden else outputs.last_hidden_state

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

    def _fair_esm_forward(self, input_ids):
        layer = self._feature_layer_index()
        return self.esm(input_ids, repr_layers=[layer])["representations"][layer]


def build_fair_esm(protein_config):
    """A fair-esm `ESM2` with the shape of `protein_config` (same alphabet and token ids as EsmTokenizer)."""
    try:
        from esm.data import Alphabet
        from esm.model.esm2 import ESM2
    except ImportError as error:
        raise ImportError("protein_encoder_backend='fair-esm' needs the fair-esm package: pip install fair-esm") from error
    return ESM2(
        num_layers=protein_config.num_hidden_layers,
        embed_dim=protein_config.hidden_size,
        attention_heads=protein_config.num_attention_heads,
        alphabet=Alphabet.from_architecture("ESM-1b"),
        token_dropout=protein_config.token_dropout,
    )


__all__ = ["ProtLLMGaussianKernels", "ProtLLMStructureBias", "ProtLLMProteinEncoder", "build_fair_esm"]
