"""Decode speed: static cache + `torch.compile(fullgraph=True)` (Inductor) against the default dynamic cache, eager.

    OMP_NUM_THREADS=1 python bench/bench_compile.py [--new-tokens 32] [--repeats 3] [--layers 2] [--hidden 128]

A random ProtLLM (Llama text model, ESM-2 encoder) of the given width generates greedily for one row with a protein;
both runs produce the same tokens (checked). The prefill (protein encoder + prompt) is timed apart: transformers
compiles the decode step only. The first compiled call pays the compilation, printed separately; tokens/s are
measured on the following calls, in the same process, and reported with their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import CompileConfig  # noqa: E402

from configuration_protllm import ProtLLMConfig  # noqa: E402
from protllm.model_classes import causal_lm_class  # noqa: E402

PROTEIN_TOKEN_ID = 5


def build(layers: int, hidden: int, vocab: int, num_residues: int, prompt_text: int):
    text = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=max(hidden // 32, 1),
                num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=1024,
                bos_token_id=0, pad_token_id=1, eos_token_id=2)
    protein = dict(model_type="esm", vocab_size=33, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=1026, position_embedding_type="rotary",
                   token_dropout=True, emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32)
    config = ProtLLMConfig(protein_config=protein, text_config=text, protein_token_id=PROTEIN_TOKEN_ID,
                           max_protein_length=num_residues)
    torch.manual_seed(0)
    model = causal_lm_class(config)(config).eval()
    residues = torch.randint(4, 24, (1, num_residues))
    protein_input_ids = torch.cat([torch.zeros(1, 1, dtype=torch.long), residues, torch.full((1, 1), 2)], dim=1)
    input_ids = torch.randint(6, vocab, (1, num_residues + prompt_text))
    input_ids[:, :num_residues] = PROTEIN_TOKEN_ID
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  protein_input_ids=protein_input_ids, protein_attention_mask=torch.ones_like(protein_input_ids))
    return model, inputs


def timed_generate(model, inputs, new_tokens, **kwargs):
    generation = dict(do_sample=False, pad_token_id=1, eos_token_id=None, **kwargs)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, **generation)  # prefill + first token
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, **generation)
    total = time.perf_counter() - start
    decode_tokens_per_s = (new_tokens - 1) / max(total - prefill, 1e-9)
    return out, decode_tokens_per_s, prefill


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--residues", type=int, default=64)
    parser.add_argument("--prompt-text", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model, inputs = build(args.layers, args.hidden, args.vocab, args.residues, args.prompt_text)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # transformers auto-compiles on accelerators only by default
    static = dict(cache_implementation="static", compile_config=compile_config)

    with torch.no_grad():
        start = time.perf_counter()
        first_static, _, _ = timed_generate(model, inputs, args.new_tokens, **static)
        compile_seconds = time.perf_counter() - start
        dynamic_runs, static_runs = [], []
        for _ in range(args.repeats):  # interleaved, so machine load affects both alike
            dynamic_out, dynamic_tps, _ = timed_generate(model, inputs, args.new_tokens)
            static_out, static_tps, _ = timed_generate(model, inputs, args.new_tokens, **static)
            dynamic_runs.append(dynamic_tps)
            static_runs.append(static_tps)
    same_tokens = dynamic_out.tolist() == static_out.tolist() == first_static.tolist()
    dynamic_best, static_best = max(dynamic_runs), max(static_runs)
    print(json.dumps({
        "config": vars(args),
        "same_tokens": same_tokens,
        "first_static_compiled_call_s (includes compilation)": round(compile_seconds, 2),
        "decode_tokens_per_s_dynamic_eager": round(dynamic_best, 1),
        "decode_tokens_per_s_static_compiled": round(static_best, 1),
        "ratio_static_compiled_over_dynamic": round(static_best / dynamic_best, 2),
    }, indent=2))
    if not same_tokens:
        raise SystemExit("static + compiled decoding gave different tokens from dynamic-cache decoding")


if __name__ == "__main__":
    main()
