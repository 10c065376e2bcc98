"""Cost of ESM3 featurisation (the frozen-encoder feature-cache fill of configs/stella_esm3.yaml).

Measured: residues/s of the tiny random ESM3 (tests' config) on this CPU, sequence-only and with VQ-VAE structure
tokens from real CSA structures, and their ratio (same run). Estimated, not measured: the forward FLOPs per residue of
esm3-sm-open-v1 from its parameter count (built on the meta device from the published sizes, no weights needed),
and the GPU time that implies at an assumed utilisation.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_esm3.py [--proteins 8] [--repeats 3]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configuration_protllm import ESM3_STRUCTURE_ENCODER_SIZES  # noqa: E402
from esm3_protllm import EVOLUTIONARYSCALE_MODELS, evolutionaryscale_esm  # noqa: E402
from protllm.testing import build_tiny_protllm, tiny_evolutionaryscale_config  # noqa: E402
from structure_protllm import load_structure  # noqa: E402


def residues_per_second(encoder, batch, repeats):
    ids, mask = batch["protein_input_ids"], batch["protein_attention_mask"]
    coords, coord_mask = batch.get("protein_coords"), batch.get("protein_coord_mask")
    residues = int(mask.sum()) - 2 * ids.shape[0]
    with torch.no_grad():
        encoder(ids, mask, coords, coord_mask)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            encoder(ids, mask, coords, coord_mask)
    return residues * repeats / (time.perf_counter() - start)


def published_flops_per_residue(length: int = 512):
    """Forward FLOPs per residue of esm3-sm-open-v1: 2 x matmul parameters of the trunk + attention scores/values
    (4 x L x d per layer), plus the VQ-VAE encoder on each residue's 16-neighbour patch."""
    esm = evolutionaryscale_esm()
    sizes = EVOLUTIONARYSCALE_MODELS["esm3-sm-open-v1"]["sizes"]
    with torch.device("meta"):
        trunk = esm.layers.transformer_stack.TransformerStack(sizes["d_model"], sizes["n_heads"], sizes["v_heads"], sizes["n_layers"])
        vqvae = esm.models.vqvae.StructureTokenEncoder(**ESM3_STRUCTURE_ENCODER_SIZES)
    trunk_params = sum(p.numel() for p in trunk.parameters())
    vq_params = sum(p.numel() for p in vqvae.transformer.parameters())
    trunk_flops = 2 * trunk_params + 4 * length * sizes["d_model"] * sizes["n_layers"]
    knn = 16
    vq_flops = knn * (2 * vq_params + 4 * knn * ESM3_STRUCTURE_ENCODER_SIZES["d_model"] * ESM3_STRUCTURE_ENCODER_SIZES["n_layers"])
    return trunk_params, trunk_flops, vq_flops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proteins", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-tflops", type=float, default=400.0, help="assumed sustained bf16 TFLOP/s (H100 ~40%% of peak)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, processor = build_tiny_protllm(protein_encoder_backend="esm3", protein_config=tiny_evolutionaryscale_config("esm3"))
    encoder = model.model.protein_encoder
    paths = sorted((REPO.parent / "shared" / "data" / "structures" / "csa_enzymes").glob("*.pdb.gz"))
    structures = [s for s in (load_structure(str(p)) for p in paths[:40]) if len(s) <= 300][: args.proteins]
    proteins = [{"structure": s} for s in structures]
    with_structure = processor._protein_tensors([processor.prepare_protein(p, i) for i, p in enumerate(proteins)])
    sequence_only = processor._protein_tensors([processor.prepare_protein(s.sequence, i) for i, s in enumerate(structures)])
    to_tensor = lambda batch: {k: torch.as_tensor(v) for k, v in batch.items()}  # noqa: E731
    seq_rate = residues_per_second(encoder, to_tensor(sequence_only), args.repeats)
    struct_rate = residues_per_second(encoder, to_tensor(with_structure), args.repeats)
    print(f"tiny ESM3 (d_model 32, 2 layers; VQ-VAE d_model 16, 1 layer), {len(structures)} CSA chains, CPU, 1 thread")
    print(f"  sequence only:            {seq_rate:10.0f} residues/s")
    print(f"  with structure tokens:    {struct_rate:10.0f} residues/s")
    print(f"  structure / sequence-only time ratio: {seq_rate / struct_rate:.2f}x")

    trunk_params, trunk_flops, vq_flops = published_flops_per_residue()
    per_residue = trunk_flops + vq_flops
    rate = args.gpu_tflops * 1e12 / per_residue
    swissprot_residues = 250_000 * 360
    print(f"esm3-sm-open-v1 (estimate, from sizes): trunk {trunk_params / 1e9:.2f}B matmul parameters;"
          f" {trunk_flops / 1e9:.2f} GFLOP/residue trunk + {vq_flops / 1e9:.2f} GFLOP/residue VQ-VAE at L=512")
    print(f"  at {args.gpu_tflops:.0f} TFLOP/s sustained: ~{rate:,.0f} residues/s;"
          f" ~250k Swiss-Prot proteins x 360 residues: ~{swissprot_residues / rate / 60:.0f} GPU-minutes (one pass)")


if __name__ == "__main__":
    main()
