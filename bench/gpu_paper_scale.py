"""Paper-scale training step: ESM-2-650M-shaped encoder + Llama-3.1-8B-shaped LLM, bf16, LoRA, batch 4 x 1k tokens.

Random-init weights of the real shapes (no download), built directly on the device in bf16. For each of "structure
bias off / on" it times LoRA SFT steps (bf16 autocast, fp32 LoRA + projector masters, frozen encoder) and, in the
same run, the same steps of the LLM alone on inputs_embeds of the same shape, and prints:

- peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS),
- tokens/s (text tokens, protein placeholders included),
- LLM MFU = 6 * N_llm * tokens / step time / peak FLOP/s, N_llm = the LLM's non-embedding parameters, peak assumed
  989 TFLOP/s (H100/H200 SXM bf16 dense; `--peak-tflops` to change). With a frozen base and LoRA the backward
  needs no weight gradients (~4N, not 6N), so this MFU is the conventional figure, comparable across papers,
  not the FLOPs actually executed;
- the share of step time spent outside the LLM (1 - LLM-only step / full step): encoder, structure bias, projector.

    python bench/gpu_paper_scale.py                       # on a GPU: full depth (33 + 32 layers), a few minutes
    python bench/gpu_paper_scale.py --layers 1            # real widths, 1 layer each (CPU possible, slow)
    python bench/gpu_paper_scale.py --layers 1 --tiny     # tiny widths, seconds: the CI form
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ESM2_650M = dict(model_type="esm", vocab_size=33, hidden_size=1280, num_hidden_layers=33, num_attention_heads=20,
                 intermediate_size=5120, max_position_embeddings=1026, position_embedding_type="rotary",
                 token_dropout=True, emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32)
LLAMA_31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=8192,
                   tie_word_embeddings=False)
TINY_ESM = dict(ESM2_650M, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_LLAMA = dict(LLAMA_31_8B, vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128)
PROTEIN_TOKEN_ID = 5


def build_model(args, structure: bool, device):
    from configuration_protllm import ProtLLMConfig
    from protllm.model_classes import causal_lm_class

    protein = dict(TINY_ESM if args.tiny else ESM2_650M)
    text = dict(TINY_LLAMA if args.tiny else LLAMA_31_8B)
    if args.layers:
        protein["num_hidden_layers"] = text["num_hidden_layers"] = args.layers
    config = ProtLLMConfig(protein_config=protein, text_config=text, protein_token_id=PROTEIN_TOKEN_ID,
                           projector_type="mlp2x_gelu", protein_feature_layer=-2, use_structure_bias=structure,
                           structure_num_kernels=128, structure_dropout=0.0, max_protein_length=1024,
                           freeze_protein_encoder=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate (and initialise) the 8B directly in bf16 on the device
    try:
        with torch.device(device):
            model = causal_lm_class(config)(config)
    finally:
        torch.set_default_dtype(default)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                   "gate_proj", "up_proj", "down_proj"],
                                             modules_to_save=["projector"], task_type="CAUSAL_LM"))
    for param in model.parameters():  # fp32 masters for what trains (LoRA, projector), bf16 for the frozen rest
        if param.requires_grad:
            param.data = param.data.float()
    return model


def make_batch(args, config, device, generator):
    """`batch` rows of `tokens` text tokens, each holding one protein of `residues` placeholders; CA traces as a
    3.8 A random walk (realistic distances for the Gaussian kernels)."""
    residues = args.residues
    vocab = config.text_config.vocab_size
    input_ids = torch.randint(10, vocab, (args.batch, args.tokens), generator=generator)
    input_ids[:, 4 : 4 + residues] = PROTEIN_TOKEN_ID
    labels = input_ids.masked_fill(input_ids == PROTEIN_TOKEN_ID, -100)
    labels[:, : 4 + residues] = -100
    protein_ids = torch.randint(4, 24, (args.batch, residues + 2), generator=generator)
    protein_ids[:, 0], protein_ids[:, -1] = 0, 2
    steps = torch.randn(args.batch, residues, 3, generator=generator)
    ca = torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), dim=1)
    coords = ca.unsqueeze(2).repeat(1, 1, 4, 1)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                 protein_input_ids=protein_ids, protein_attention_mask=torch.ones_like(protein_ids),
                 protein_coords=coords, protein_coord_mask=torch.ones(args.batch, residues, dtype=torch.bool))
    return {k: v.to(device) for k, v in batch.items()}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps: int, device) -> float:
    step()  # warm-up (allocator, kernels)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(args, structure: bool, device) -> dict:
    model = build_model(args, structure, device)
    model.train()
    core = model.get_base_model().model
    config = model.get_base_model().config
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(args, config, device, torch.Generator().manual_seed(0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def full_step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    embeds = torch.randn(args.batch, args.tokens, config.text_config.hidden_size, device=device, dtype=torch.bfloat16)
    lm_head = model.get_base_model().lm_head

    def llm_only_step():
        with autocast:
            hidden = core.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
            logits = lm_head(hidden)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    full = time_steps(full_step, args.steps, device)
    peak = peak_memory_gb(device)
    llm_only = time_steps(llm_only_step, args.steps, device)
    language_model = core.language_model
    n_llm = sum(p.numel() for n, p in language_model.named_parameters() if "lora_" not in n and "embed_tokens" not in n)
    tokens = args.batch * args.tokens
    result = {
        "structure_bias": structure, "device": str(device), "layers": config.text_config.num_hidden_layers,
        "batch": args.batch, "tokens_per_row": args.tokens, "residues_per_protein": args.residues,
        "llm_non_embedding_params_M": round(n_llm / 1e6, 3),
        "step_s": round(full, 4), "llm_only_step_s": round(llm_only, 4),
        "tokens_per_s": round(tokens / full, 1),
        f"llm_mfu_at_{args.peak_tflops:g}_tflops": float(f"{6 * n_llm * tokens / full / (args.peak_tflops * 1e12):.4g}"),
        "share_outside_llm": round(max(0.0, 1 - llm_only / full), 3),
        "peak_memory_gb": round(peak, 2), "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "host peak RSS",
    }
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="layers of each model (default: the real 33 / 32)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (CI form); default: the real widths")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=None, help="text tokens per row (default 1024; tiny: 64)")
    parser.add_argument("--residues", type=int, default=None, help="protein residues per row (default 400; tiny: 20)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--structure", choices=["both", "on", "off"], default="both")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s (H100/H200 SXM: 989)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (64 if args.tiny else 1024)
    args.residues = args.residues or (20 if args.tiny else 400)
    if args.residues + 8 > args.tokens:
        parser.error("--residues must leave room for text in --tokens")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    results = [run(args, structure, device) for structure in {"both": (False, True), "on": (True,), "off": (False,)}[args.structure]]
    for result in results:
        print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
