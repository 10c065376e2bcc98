"""The protein-encoder side of ProtLLM: transformers `EsmModel` (or fair-esm `ESM2`) on amino acids.

Optional modules subclass `ProtLLMProteinEncoder`, and a model folder carries one only when its model needs it:
SEPIT's structure bias (`sepit_protllm.py`), ESM3 / ESM C encoders (`esm3_protllm.py`).

Shapes used below: P proteins in the batch, T protein tokens (residues + <cls> + <eos>, padded),
R = T - 2 residue positions, D_p encoder width.
"""

import torch
from torch import nn
from transformers.models.esm.modeling_esm import EsmModel

try:
    from .configuration_protllm import EVOLUTIONARYSCALE_BACKENDS, ProtLLMConfig
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from configuration_protllm import EVOLUTIONARYSCALE_BACKENDS, ProtLLMConfig


class ProtLLMProteinEncoder(nn.Module):
    """Protein encoder: transformers `EsmModel` (default) or fair-esm `ESM2`.

    Returns the hidden state of `config.protein_feature_layer` at residue positions (no <cls>/<eos>).
    A frozen encoder (`config.freeze_protein_encoder`) stays in eval mode whatever `.train()` says, so its
    dropout never runs, and runs without autograd.

    The backbone (`self.esm`) is built by `build_backbone` and run by `backbone_states`; a subclass for another
    encoder family overrides those two (and `unused_parameter_prefixes`). `add_structure` is the hook where
    SEPIT's structure bias joins EsmModel's input.
    """

    def __init__(self, config: ProtLLMConfig):
        super().__init__()
        self.config = config
        self.backend = config.protein_encoder_backend
        self.esm = self.build_backbone(config)
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
        embeddings, mask = self.add_structure(embeddings, attention_mask, coords, coord_mask)
        outputs = self.esm(inputs_embeds=embeddings, attention_mask=mask, output_hidden_states=[layer] if want_hidden else False)
        return outputs.hidden_states[layer] if want_hidden else outputs.last_hidden_state

    def add_structure(self, embeddings, attention_mask, coords, coord_mask):
        """Hook: `(P, T, D_p)` token embeddings and `(P, T)` mask -> (embeddings, the attention mask EsmModel gets).
        Here unchanged: this encoder reads sequences only."""
        return embeddings, attention_mask

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


__all__ = ["ProtLLMProteinEncoder", "build_fair_esm"]
