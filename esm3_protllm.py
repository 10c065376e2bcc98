"""EvolutionaryScale protein encoders for ProtLLM: ESM3 (sequence + VQ-VAE structure tokens) and ESM C.

An optional remote-code module: `ProtLLMEvolutionaryScaleForConditionalGeneration` (and its base
`ProtLLMEvolutionaryScaleModel`) subclass the core classes with an ESM3 / ESM C protein encoder. A model folder whose
`auto_map` names them carries this file; the core files never import it, so other folders do not.

The architectures are EvolutionaryScale's own modules from their `esm` package (3.2.1.post1); this file only
imports them and runs them the way their SDK does (`ESM3.logits` / `ESMC.forward`), stopping at the hidden state
ProtLLM projects (`protein_feature_layer`) instead of computing every output head.

**The `esm` name clash.** fair-esm (ProtLLM's ESM-2 backend) and EvolutionaryScale's package both install a
top-level package named `esm`. EvolutionaryScale's is therefore installed into its own folder, without its declared
dependencies (it pins `transformers<4.48.2`, which would downgrade the stack):

    pip install --no-deps --target <python prefix>/lib/protllm-esm3 esm==3.2.1.post1
    pip install einops msgpack-numpy cloudpathlib tenacity zstd brotli biopython biotite pandas httpx attrs

and `evolutionaryscale_esm()` imports it from there under the name `evolutionaryscale_esm`: it sets fair-esm's
`esm.*` modules aside in `sys.modules`, imports EvolutionaryScale's, moves those to `evolutionaryscale_esm.*` and puts
fair-esm's back, so `import esm` keeps meaning fair-esm in the same process. EvolutionaryScale's modules import their
siblings at import time (all of them are imported here); the two function-level imports of the package
(`ESM3.from_pretrained`, `ESMC.from_pretrained`, which read `esm.pretrained`) are never called: weights load through
`evolutionaryscale_esm().pretrained` (see `protllm.building`). Set `PROTLLM_ESM_PATH` to use another folder; a plain
`pip install --no-deps esm==3.2.1.post1` (no fair-esm in the environment) is found as well.

Shapes: P proteins, T tokens (`<cls>` residues `<eos>` `<pad>`...), R residues, D `d_model`.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

try:
    from .configuration_protllm import (
        EVOLUTIONARYSCALE_BACKENDS,
        EVOLUTIONARYSCALE_MODEL_SIZES,
        ProtLLMConfig,
    )
    from .encoder_protllm import ProtLLMProteinEncoder
    from .modeling_protllm import ProtLLMForConditionalGeneration, ProtLLMModel
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from configuration_protllm import (
        EVOLUTIONARYSCALE_BACKENDS,
        EVOLUTIONARYSCALE_MODEL_SIZES,
        ProtLLMConfig,
    )
    from encoder_protllm import ProtLLMProteinEncoder
    from modeling_protllm import ProtLLMForConditionalGeneration, ProtLLMModel

ESM_PACKAGE_VERSION = "3.2.1.post1"
ESM_PACKAGE_DEPENDENCIES = "einops msgpack-numpy cloudpathlib tenacity zstd brotli biopython biotite pandas httpx attrs"
ESM_PATH_ENV = "PROTLLM_ESM_PATH"
ISOLATED_NAME = "evolutionaryscale_esm"

# The published models, by the names EvolutionaryScale uses on the Hub: where their weights are, and their constructor
# sizes (kept in configuration_protllm.py, which turns them into the stored config).
EVOLUTIONARYSCALE_MODELS = {
    "esm3-sm-open-v1": {
        "backend": "esm3", "hub_id": "EvolutionaryScale/esm3-sm-open-v1", "weights": "data/weights/esm3_sm_open_v1.pth",
        "structure_encoder_weights": "data/weights/esm3_structure_encoder_v0.pth",
        "sizes": EVOLUTIONARYSCALE_MODEL_SIZES["esm3-sm-open-v1"],
    },
    "esmc-300m": {
        "backend": "esmc", "hub_id": "EvolutionaryScale/esmc-300m-2024-12", "weights": "data/weights/esmc_300m_2024_12_v0.pth",
        "sizes": EVOLUTIONARYSCALE_MODEL_SIZES["esmc-300m"],
    },
    "esmc-600m": {
        "backend": "esmc", "hub_id": "EvolutionaryScale/esmc-600m-2024-12", "weights": "data/weights/esmc_600m_2024_12_v0.pth",
        "sizes": EVOLUTIONARYSCALE_MODEL_SIZES["esmc-600m"],
    },
}
# Imported eagerly so that no later `from esm...` inside the package is ever needed.
_MODULES = (
    "esm.models.esm3", "esm.models.esmc", "esm.models.vqvae", "esm.tokenization", "esm.utils.constants.esm3",
    "esm.utils.structure.affine3d", "esm.utils.structure.normalize_coordinates", "esm.utils.encoding", "esm.pretrained",
)
_LOCK = threading.Lock()
_PACKAGE = None


def install_instructions(backend: str = "esm3") -> str:
    prefix = Path(sys.prefix) / "lib" / "protllm-esm3"
    return (
        f"protein_encoder_backend={backend!r} needs EvolutionaryScale's `esm` package ({ESM_PACKAGE_VERSION}). Install "
        "it with --no-deps (it declares transformers<4.48.2, which would break this stack) into its own folder (fair-esm "
        f"also installs a top-level `esm`):\n    pip install --no-deps --target {prefix} esm=={ESM_PACKAGE_VERSION}\n"
        f"    pip install {ESM_PACKAGE_DEPENDENCIES}\nor point {ESM_PATH_ENV} at a folder that holds that `esm` package."
    )


def _is_evolutionaryscale(folder) -> bool:
    return (Path(folder) / "esm" / "models" / "esmc.py").is_file()


def find_evolutionaryscale_esm() -> Path | None:
    """The folder holding EvolutionaryScale's `esm` package: $PROTLLM_ESM_PATH, `<prefix>/lib/protllm-esm3`, then
    `sys.path`. None when it is not installed."""
    candidates = [os.environ.get(ESM_PATH_ENV), Path(sys.prefix) / "lib" / "protllm-esm3", *sys.path]
    for folder in candidates:
        if folder and _is_evolutionaryscale(folder):
            return Path(folder)
    return None


def _is_esm_module(name: str) -> bool:
    return name == "esm" or name.startswith("esm.")


def evolutionaryscale_esm(backend: str = "esm3"):
    """EvolutionaryScale's `esm` package, imported beside fair-esm (see the module docstring). Raises ImportError with
    the install line when it is missing."""
    global _PACKAGE
    with _LOCK:
        if _PACKAGE is not None:
            return _PACKAGE
        folder = find_evolutionaryscale_esm()
        if folder is None:
            raise ImportError(install_instructions(backend))
        set_aside = {name: module for name, module in sys.modules.items() if _is_esm_module(name)}
        for name in set_aside:
            del sys.modules[name]
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
        try:
            for name in _MODULES:
                importlib.import_module(name)
            loaded = {name: module for name, module in sys.modules.items() if _is_esm_module(name)}
        except ImportError as error:
            raise ImportError(f"EvolutionaryScale's esm in {folder} failed to import ({error}).\n{install_instructions(backend)}") from error
        finally:
            sys.path.remove(str(folder))
            for name in [name for name in sys.modules if _is_esm_module(name)]:
                del sys.modules[name]
            sys.modules.update(set_aside)
        for name, module in loaded.items():
            sys.modules[ISOLATED_NAME + name[len("esm"):]] = module
        _PACKAGE = loaded["esm"]
        return _PACKAGE


def _not_bundled(*_):
    raise RuntimeError("ProtLLM's ESM3 encoder carries only the structure *encoder*; decode structures with the esm package")


class ProtLLMEvolutionaryScaleEncoder(nn.Module):
    """An ESM3 or ESM C model of the `esm` package (`self.model`) and, for ESM3, its VQ-VAE structure encoder
    (`self.structure_encoder`, always frozen and in eval mode: its codebook has no training rule in the package).

    `forward` returns the hidden state after `feature_layer` blocks (0 = the input embedding). The last layer is what
    the package returns as `embeddings`: after the final norm for ESM C (`ESMC.forward`), before it for ESM3 (`ESM3.forward`).
    """

    def __init__(self, backend: str, protein_config):
        super().__init__()
        if backend not in EVOLUTIONARYSCALE_BACKENDS:
            raise ValueError(f"unknown EvolutionaryScale backend {backend!r}; expected one of {EVOLUTIONARYSCALE_BACKENDS}")
        esm = evolutionaryscale_esm(backend)
        self.backend = backend
        sequence_tokenizer = esm.tokenization.EsmSequenceTokenizer()
        d_model, n_heads, n_layers = protein_config.d_model, protein_config.n_heads, protein_config.n_layers
        if backend == "esmc":
            # Flash attention would unpad the batch (a different kernel path); the SDPA path is the package default on CPU.
            self.model = esm.models.esmc.ESMC(d_model, n_heads, n_layers, tokenizer=sequence_tokenizer, use_flash_attn=False)
            self.structure_encoder = None
        else:
            # Only the sequence tokenizer is read by ESM3.forward; the full collection downloads annotation vocabularies.
            self.model = esm.models.esm3.ESM3(
                d_model, n_heads, protein_config.v_heads, n_layers, structure_encoder_fn=_not_bundled,
                structure_decoder_fn=_not_bundled, function_decoder_fn=_not_bundled,
                tokenizers=SimpleNamespace(sequence=sequence_tokenizer),
            )
            self.structure_encoder = esm.models.vqvae.StructureTokenEncoder(**protein_config.structure_encoder)
            self.structure_encoder.requires_grad_(False)

    @property
    def num_layers(self) -> int:
        return len(self.model.transformer.blocks)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.structure_encoder is not None:
            self.structure_encoder.eval()  # EMACodebook asserts in training mode
        return self

    def unused_parameter_prefixes(self, feature_layer: int) -> tuple[str, ...]:
        """Parameter-name prefixes (relative to this module) the forward never reaches with `gradients`: the output
        heads, the structure encoder (tokens are discrete), and the blocks after `feature_layer`."""
        unused = ["model.sequence_head.", "model.output_heads.", "structure_encoder."]
        if feature_layer != self.num_layers:
            unused += [f"model.transformer.blocks.{index}." for index in range(feature_layer, self.num_layers)]
            unused.append("model.transformer.norm.")
        elif self.backend == "esm3":
            unused.append("model.transformer.norm.")  # ESM3's embeddings are taken before the final norm
        return tuple(unused)

    def forward(self, input_ids, attention_mask, coords=None, coord_mask=None, feature_layer: int | None = None):
        """
        input_ids, attention_mask: `(P, T)`, right-padded `<cls> residues <eos> <pad>...` (ESM-2 ids == esm ids)
        coords: `(P, R, 4 or 3, 3)` backbone N, CA, C(, O) per residue, optional (ESM3 only; ESM C ignores it)
        coord_mask: `(P, R)` bool, True where the residue has coordinates
        Returns `(P, T, D)`.
        """
        layer = self.num_layers if feature_layer is None else feature_layer
        dtype = next(self.model.parameters()).dtype
        # The package runs reduced precision under autocast (ESM3.logits on CUDA): its plDDT/affine inputs stay fp32.
        with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if self.backend == "esmc":
                return self._esmc_forward(input_ids, attention_mask, layer)
            return self._esm3_forward(input_ids, attention_mask, coords, coord_mask, layer)

    def _esmc_forward(self, input_ids, attention_mask, layer):
        # As ESMC.forward (sequence_id = the non-padding mask), through `layer` blocks only.
        x = self.model.embed(input_ids)
        sequence_id = attention_mask.bool()
        chain_id = torch.ones_like(input_ids)
        for block in self.model.transformer.blocks[:layer]:
            x = block(x, sequence_id, None, None, chain_id)
        return self.model.transformer.norm(x) if layer == self.num_layers else x

    def structure_inputs(self, input_ids, coords=None, coord_mask=None):
        """ESM3's structure track as `ESM3.encode` + `ESM3.logits` build it: per token `(P, T)` VQ-VAE structure
        tokens, `(P, T, 3, 3)` normalised N/CA/C coordinates and `(P, T)` per-residue plDDT conditioning.

        Residues without coordinates get ESM3's structure `<mask>` token (its "unknown structure" input, also what
        ESM3.forward fills in for a protein without structure), NaN coordinates (no frame: masked in the geometric
        attention, zeroed by `mask_and_zero_frameless`) and plDDT 0; with none at all this is the sequence-only input.
        """
        constants = evolutionaryscale_esm().utils.constants.esm3
        num_proteins, num_tokens = input_ids.shape
        device = input_ids.device
        tokens = torch.full((num_proteins, num_tokens), constants.STRUCTURE_MASK_TOKEN, dtype=torch.long, device=device)
        token_coords = torch.full((num_proteins, num_tokens, 3, 3), float("nan"), device=device)
        if coords is not None:
            residues = min(coords.shape[1], num_tokens - 2)
            backbone = coords[:, :residues, :3].float()
            mask = coord_mask[:, :residues].bool() & torch.isfinite(backbone).flatten(2).all(dim=-1)
            backbone = backbone.masked_fill(~mask[..., None, None], float("nan"))
            if mask.any():
                esm = evolutionaryscale_esm()
                # Per protein: frame at the mean N/CA/C (tokenize_structure -> ProteinChain.to_structure_encoder_inputs).
                backbone = esm.utils.structure.normalize_coordinates.normalize_coordinates(backbone)
                residue_index = torch.arange(residues, device=device).expand(num_proteins, residues)
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    # Residues without coordinates (and padding) are left out of the k-NN graph by their missing frame.
                    _, codes = self.structure_encoder.encode(backbone, residue_index=residue_index)
                tokens[:, 1 : 1 + residues] = codes.masked_fill(~mask, constants.STRUCTURE_MASK_TOKEN)
                token_coords[:, 1 : 1 + residues] = backbone
        per_residue_plddt = token_coords.isfinite().all(dim=-1).any(dim=-1).float()
        return tokens, token_coords, per_residue_plddt

    def _esm3_forward(self, input_ids, attention_mask, coords, coord_mask, layer):
        # As ESM3.logits -> ESM3.forward with the sequence and structure tracks (other tracks at their pad tokens).
        esm = evolutionaryscale_esm()
        constants = esm.utils.constants.esm3
        num_proteins, num_tokens = input_ids.shape
        device = input_ids.device
        structure_tokens, structure_coords, per_res_plddt = self.structure_inputs(input_ids, coords, coord_mask)

        def full(value, *extra):
            return torch.full((num_proteins, num_tokens, *extra), value, dtype=torch.long, device=device)

        sequence_tokens = input_ids
        structure_tokens = (
            structure_tokens.masked_fill(sequence_tokens == constants.SEQUENCE_BOS_TOKEN, constants.STRUCTURE_BOS_TOKEN)
            .masked_fill(sequence_tokens == constants.SEQUENCE_PAD_TOKEN, constants.STRUCTURE_PAD_TOKEN)
            .masked_fill(sequence_tokens == constants.SEQUENCE_EOS_TOKEN, constants.STRUCTURE_EOS_TOKEN)
            .masked_fill(sequence_tokens == constants.SEQUENCE_CHAINBREAK_TOKEN, constants.STRUCTURE_CHAINBREAK_TOKEN)
        )
        affine, affine_mask = esm.utils.structure.affine3d.build_affine3d_from_coordinates(structure_coords)
        x = self.model.encoder(
            sequence_tokens, structure_tokens, torch.ones(num_proteins, num_tokens, device=device), per_res_plddt,
            full(constants.SS8_PAD_TOKEN), full(constants.SASA_PAD_TOKEN), full(constants.INTERPRO_PAD_TOKEN, 8),
            full(constants.RESIDUE_PAD_TOKEN, 16),
        )
        # The SDK runs one protein at a time without a sequence_id; in a padded batch the padding must not be attended
        # (padded keys have no frame either, so the geometric attention already ignores them).
        sequence_id = None if bool(attention_mask.all()) else attention_mask.bool()
        chain_id = torch.zeros_like(input_ids)
        for block in self.model.transformer.blocks[:layer]:
            x = block(x, sequence_id, affine, affine_mask, chain_id)
        return x


def reset_non_persistent_buffers(module: nn.Module) -> None:
    """Rebuild the esm package's rotary `inv_freq` (a non-persistent buffer: left uninitialised by meta-device
    loading in `from_pretrained`)."""
    if hasattr(module, "_compute_inv_freq") and hasattr(module, "inv_freq"):
        module.inv_freq = module._compute_inv_freq(module.inv_freq.device)
        module._seq_len_cached = 0
        module._cos_cached = module._sin_cached = None


class ProtLLMEvolutionaryScaleProteinEncoder(ProtLLMProteinEncoder):
    """`ProtLLMProteinEncoder` whose backbone (`self.esm`) is a `ProtLLMEvolutionaryScaleEncoder` (ESM3 / ESM C).

    Parameter names are the core encoder's (`esm.model.*`, `esm.structure_encoder.*` under `protein_encoder`), so
    folders saved before this subclass existed load into it unchanged.
    """

    def build_backbone(self, config: ProtLLMConfig) -> ProtLLMEvolutionaryScaleEncoder:
        return ProtLLMEvolutionaryScaleEncoder(config.protein_encoder_backend, config.protein_config)

    def backbone_states(self, input_ids, attention_mask, coords=None, coord_mask=None) -> torch.Tensor:
        """
        input_ids, attention_mask: `(P, T)`, right-padded `<cls> residues <eos> <pad>...`
        coords: `(P, R, 4, 3)` backbone N/CA/C/O per residue, optional (ESM3 reads it as VQ-VAE structure tokens,
            ESM C ignores it); coord_mask: `(P, R)` bool
        Returns the `(P, T, D)` hidden state of `protein_feature_layer`.
        """
        return self.esm(input_ids, attention_mask, coords, coord_mask, self._feature_layer_index())

    def unused_parameter_prefixes(self) -> tuple[str, ...]:
        """The output heads, the structure encoder and the blocks after `protein_feature_layer` (see the backbone's)."""
        return tuple("esm." + prefix for prefix in self.esm.unused_parameter_prefixes(self._feature_layer_index()))


class ProtLLMEvolutionaryScaleModel(ProtLLMModel):
    """`ProtLLMModel` with an ESM3 / ESM C protein encoder (the `AutoModel` class of such a folder)."""

    protein_encoder_class = ProtLLMEvolutionaryScaleProteinEncoder
    _no_split_modules = ["ProtLLMEvolutionaryScaleProteinEncoder"]

    def _init_weights(self, module):
        super()._init_weights(module)
        reset_non_persistent_buffers(module)


class ProtLLMEvolutionaryScaleForConditionalGeneration(ProtLLMForConditionalGeneration):
    """`ProtLLMForConditionalGeneration` with an ESM3 / ESM C protein encoder (the `AutoModelForCausalLM` class of
    such a folder; see `ProtLLMProcessor` for inputs)."""

    base_model_class = ProtLLMEvolutionaryScaleModel
    _no_split_modules = ["ProtLLMEvolutionaryScaleProteinEncoder"]

    def _init_weights(self, module):
        super()._init_weights(module)
        reset_non_persistent_buffers(module)


__all__ = [
    "EVOLUTIONARYSCALE_BACKENDS",
    "EVOLUTIONARYSCALE_MODELS",
    "ProtLLMEvolutionaryScaleEncoder",
    "ProtLLMEvolutionaryScaleForConditionalGeneration",
    "ProtLLMEvolutionaryScaleModel",
    "ProtLLMEvolutionaryScaleProteinEncoder",
    "evolutionaryscale_esm",
    "install_instructions",
]
