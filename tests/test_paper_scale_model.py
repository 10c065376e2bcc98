"""Issue 11, model side: what breaks at paper scale (bf16, flash attention, MoE under checkpointing and padding,
generation emitting protein tokens), on tiny random models and real CSA structures from ../shared/data."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from configuration_protllm import ProtLLMConfig
from fresh_process import run_fresh_python
from sepit_protllm import ProtLLMStructureBias
from protllm.model_folder import save_model_folder
from protllm.testing import build_tiny_protllm, tiny_protein_config

QUESTION = "What is the function of this enzyme?"
SEQUENCES = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MSEQNNTEMTFQIQRIYTKDISFEAPNAPHVFQKDWQPEVKLDLDTASSQLADDVYTLSGTHAAVK")


def no_dropout_protein_config():
    return dict(tiny_protein_config(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_bias_model():
    return build_tiny_protllm("llama", use_structure_bias=True, structure_num_kernels=16,
                              protein_config=no_dropout_protein_config())


def conversation(protein_block, answer=None):
    messages = [{"role": "user", "content": [dict(protein_block, type="protein"), {"type": "text", "text": QUESTION}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def model_inputs(processor, conversations, **kwargs):
    return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=True, **kwargs)


def real_ca(csa) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level CA coordinates `(1, T, 3)` of a real enzyme (1BJP A), moved to sit around 60-100 A, and mask."""
    model, processor = build_bias_model()
    inputs = model_inputs(processor, [conversation({"structure": str(csa / "1BJP.pdb.gz"), "chain": "A"})])
    encoder = model.model.protein_encoder
    ca, mask = encoder._token_level_ca(inputs["protein_coords"], inputs["protein_coord_mask"],
                                       inputs["protein_input_ids"].shape[1])
    ca = ca - ca[mask].mean(0) + torch.tensor([80.0, 70.0, 90.0])
    return ca * mask.unsqueeze(-1), mask


# ----- item 2: the structure bias in bf16 ----------------------------------------------------------------------

def test_structure_distances_stay_fp32_in_a_bf16_model(csa):
    ca, mask = real_ca(csa)
    assert ca[mask].abs().max() > 60
    module = ProtLLMStructureBias(16, num_heads=4, hidden_size=32, embedding_scale=0.1, chunk_size=8).to(torch.bfloat16)
    seen = []
    module.kernels.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    bias, residue_term = module(ca, mask)
    assert bias.dtype == residue_term.dtype == torch.bfloat16
    distances = torch.cat(seen, dim=1)
    assert distances.dtype == torch.float32
    exact = torch.cdist(ca.double(), ca.double(), compute_mode="donot_use_mm_for_euclid_dist")
    pairs = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    assert (distances.double() - exact)[pairs].abs().max() < 1e-3  # bf16 coordinates would be off by up to 0.5 A


def test_bf16_structure_bias_equals_the_fp32_bias_within_bf16_rounding(csa):
    ca, mask = real_ca(csa)
    torch.manual_seed(0)
    bf16 = ProtLLMStructureBias(16, num_heads=4, hidden_size=32, embedding_scale=0.1, chunk_size=8)
    for param in bf16.parameters():  # non-trivial values at the scale of the bias
        torch.nn.init.normal_(param, std=0.5)
    bf16 = bf16.to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()  # the same (bf16-representable) weights
    bias16, term16 = bf16(ca, mask)
    bias32, term32 = fp32(ca, mask)
    assert bias32.abs().max() > 0.1
    # Only the final cast differs: at most half a bf16 ulp (2^-9 relative).
    assert torch.all((bias16.float() - bias32).abs() <= bias32.abs() * 2**-8 + 1e-30)
    assert torch.all((term16.float() - term32).abs() <= term32.abs() * 2**-8 + 1e-30)


def test_bf16_model_with_structure_bias_runs_forward(csa):
    model, processor = build_bias_model()
    model = model.to(torch.bfloat16)
    inputs = model_inputs(processor, [conversation({"structure": str(csa / "1BJP.pdb.gz"), "chain": "A"})])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ----- item 4: generation and the protein tokens -----------------------------------------------------------------

def test_generate_never_emits_protein_tokens_even_when_the_model_prefers_them():
    model, processor = build_tiny_protllm("llama")
    protein_id = model.config.protein_token_id
    # Make <protein> the model's favourite next token at every step.
    model.lm_head.register_forward_hook(lambda mod, args, out: out.index_add(
        -1, torch.tensor([protein_id]), torch.full((*out.shape[:-1], 1), 1e4)))
    inputs = model_inputs(processor, [conversation({"sequence": SEQUENCES[0]})])
    with torch.no_grad():
        assert model(**inputs).logits[0, -1].argmax() == protein_id
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    assert new_tokens.numel() == 4 and protein_id not in new_tokens.tolist()


def test_generation_config_suppresses_the_protein_start_and_end_ids_too():
    model, processor = build_tiny_protllm("llama")  # building records the start/end ids in the config
    generation_config, _ = model._prepare_generation_config(None, suppress_tokens=[5])
    assert set(generation_config.suppress_tokens) == {5, processor.protein_token_id, processor.protein_start_token_id,
                                                      processor.protein_end_token_id}


def test_placeholder_count_is_checked_on_the_prefill_only():
    model, processor = build_tiny_protllm("llama")
    protein_id = model.config.protein_token_id
    text_only = processor.tokenizer(["Hello there"], return_tensors="pt")
    with pytest.raises(ValueError, match="placeholder tokens but no protein inputs"):
        model(input_ids=torch.cat([text_only["input_ids"], torch.tensor([[protein_id]])], dim=1))
    with torch.no_grad():
        prefill = model(**text_only, use_cache=True)
        step = model(input_ids=torch.tensor([[protein_id]]), past_key_values=prefill.past_key_values, use_cache=True)
    assert torch.isfinite(step.logits).all()


# ----- MoE: items 5, 11, 12 -------------------------------------------------------------------------------------

def build_moe_model(**kwargs):
    model, processor = build_tiny_protllm("llama", moe_num_experts=4, moe_top_k=1, **kwargs)
    torch.manual_seed(1)
    with torch.no_grad():  # distinct experts and a decisive router, so routing and capacity matter
        for name, param in model.named_parameters():
            if ".experts." in name or ".router." in name:
                param.add_(torch.randn_like(param) * (0.5 if ".router." in name else 0.05))
    return model, processor


def train_inputs(processor, answers=("An enzyme.", "A kinase that phosphorylates tyrosine residues.")):
    conversations = [conversation({"sequence": seq}, answer) for seq, answer in zip(SEQUENCES, answers)]
    inputs = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                           padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == processor.protein_token_id, -100)
    return dict(inputs), labels


def router_grads(model, inputs, labels):
    model.zero_grad()
    out = model(**inputs, labels=labels)
    out.aux_loss.backward()
    return [layer.mlp.router.weight.grad for layer in model.model.language_model.layers]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_router_aux_loss_reaches_the_router_under_gradient_checkpointing(use_reentrant):
    model, processor = build_moe_model()
    model.train()
    inputs, labels = train_inputs(processor)
    reference = router_grads(model, inputs, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = router_grads(model, inputs, labels)
    for ref, grad in zip(reference, checkpointed):
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, ref)


def test_aux_loss_is_weighted_by_the_micro_batch_label_share_with_num_items_in_batch():
    model, processor = build_moe_model()
    model.train()
    inputs, labels = train_inputs(processor)
    coef = model.config.moe_router_aux_loss_coef = 0.5
    rows = [{k: v[i : i + 1] for k, v in inputs.items() if k in ("input_ids", "attention_mask")} for i in range(2)]
    # Each micro-batch (one row, as with gradient accumulation 2) carries its own protein.
    protein_rows = [{k: v[i : i + 1] for k, v in inputs.items() if k.startswith("protein_")} for i in range(2)]
    items = [int((labels[i, 1:] != -100).sum()) for i in range(2)]
    total_items = sum(items)
    assert items[0] != items[1]
    expected = torch.tensor(0.0)
    accumulated = torch.tensor(0.0)
    for i in range(2):
        torch.manual_seed(0)
        out = model(**rows[i], **protein_rows[i], labels=labels[i : i + 1], num_items_in_batch=total_items)
        lm_sum = F.cross_entropy(out.logits[0, :-1].float(), labels[i, 1:], ignore_index=-100, reduction="sum")
        expected = expected + lm_sum / total_items + coef * out.aux_loss * items[i] / total_items
        accumulated = accumulated + out.loss
    # What Trainer sums over the accumulation steps: the label-weighted mean balancing loss, not twice its sum.
    torch.testing.assert_close(accumulated, expected)
    # One micro-batch holding every label: the plain coefficient, as without num_items_in_batch.
    out = model(**rows[0], **protein_rows[0], labels=labels[:1], num_items_in_batch=items[0])
    plain = model(**rows[0], **protein_rows[0], labels=labels[:1])
    torch.testing.assert_close(out.loss, plain.loss)


def test_moe_batched_left_padded_generation_equals_one_at_a_time():
    model, processor = build_moe_model(moe_eval_capacity_factor=2.0)
    processor.tokenizer.padding_side = "left"
    conversations = [[{"role": "user", "content": [{"type": "protein", "sequence": seq},
                                                    {"type": "text", "text": QUESTION}]}] for seq in SEQUENCES]
    batch = model_inputs(processor, conversations)
    assert (batch["attention_mask"] == 0).any()  # the short prompt is left-padded
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=8, do_sample=False)
        for row, conv in enumerate(conversations):
            single = model_inputs(processor, [conv])
            alone = model.generate(**single, max_new_tokens=8, do_sample=False)
            prompt = single["input_ids"].shape[1]
            assert batched[row, batch["input_ids"].shape[1]:].tolist() == alone[0, prompt:].tolist()


def test_padding_takes_no_expert_capacity():
    model, processor = build_moe_model(moe_eval_capacity_factor=1.0)
    block = model.model.language_model.layers[0].mlp
    hidden = torch.randn(1, 6, block.hidden_size)
    top_experts = block.router(hidden).argmax(-1, keepdim=True)
    padded = torch.cat([torch.zeros(1, 10, 1, dtype=torch.long), top_experts], dim=1)  # 10 pads routed to expert 0
    mask = torch.cat([torch.zeros(1, 10, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)], dim=1)
    kept_padded = block._kept_assignments(padded, mask)
    kept_alone = block._kept_assignments(top_experts, torch.ones(1, 6, dtype=torch.bool))
    assert not kept_padded[:10].any()
    assert torch.equal(kept_padded[10:], kept_alone)


# ----- item 9: attention implementation per sub-model -----------------------------------------------------------

def tiny_config(**kwargs):
    return ProtLLMConfig(protein_config=tiny_protein_config(), text_config=dict(model_type="llama", hidden_size=64,
                         intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=100), **kwargs)


@pytest.mark.parametrize("requested", ["flash_attention_2", "flash_attention_3", "flex_attention",
                                       {"protein_config": "flash_attention_2", "text_config": "flash_attention_2"}])
def test_structure_bias_encoder_never_gets_flash_attention(requested):
    config = tiny_config(use_structure_bias=True, attn_implementation=requested)
    assert config.protein_config._attn_implementation == "sdpa"
    assert config.text_config._attn_implementation == (requested if isinstance(requested, str) else requested["text_config"])
    config._attn_implementation = "flash_attention_2"  # what from_pretrained(attn_implementation=...) does
    assert config.protein_config._attn_implementation == "sdpa"
    assert config.text_config._attn_implementation == "flash_attention_2"


def test_without_structure_bias_the_encoder_keeps_the_requested_attention():
    config = tiny_config(attn_implementation="flash_attention_2")
    assert config.protein_config._attn_implementation == "flash_attention_2"


def test_set_attn_implementation_routes_the_biased_encoder():
    model, _ = build_bias_model()
    # flash is not installed here: without routing transformers refuses it for the encoder.
    model.set_attn_implementation({"protein_config": "flash_attention_2", "text_config": "eager"})
    encoder_config = model.model.protein_encoder.esm.config
    assert encoder_config._attn_implementation == "sdpa"
    assert model.model.language_model.config._attn_implementation == "eager"
    model.set_attn_implementation("eager")
    assert encoder_config._attn_implementation == "eager"


# ----- item 10: device placement of protein features ------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (the encoder on CUDA, the LLM on CPU)")
def test_protein_features_move_to_the_embedding_device():
    model, processor = build_tiny_protllm("llama")
    reference_inputs = model_inputs(processor, [conversation({"sequence": SEQUENCES[0]})])
    with torch.no_grad():
        reference = model(**reference_inputs).logits
    model.model.protein_encoder.cuda()
    model.model.projector.cuda()
    inputs = dict(reference_inputs)
    for key in ("protein_input_ids", "protein_attention_mask"):
        inputs[key] = inputs[key].cuda()
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


# ----- item 14: protein_feature_layer=-2 keeps one hidden state -------------------------------------------------

def test_feature_layer_minus_two_keeps_only_that_hidden_state():
    model, processor = build_tiny_protllm("llama", protein_feature_layer=-2)
    encoder = model.model.protein_encoder
    inputs = model_inputs(processor, [conversation({"sequence": SEQUENCES[0]})])
    ids, mask = inputs["protein_input_ids"], inputs["protein_attention_mask"]
    kept = []
    forward = encoder.esm.forward

    def spy(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        kept.append(outputs.hidden_states)
        return outputs

    encoder.esm.forward = spy
    with torch.no_grad():
        states, _ = encoder(ids, mask)
    del encoder.esm.forward
    assert sum(h is not None for h in kept[0]) == 1
    with torch.no_grad():
        every = encoder.esm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(states, every[-2][:, 1:-1], atol=0, rtol=0)


# ----- bf16 first class: from_pretrained(dtype=bfloat16) generates, saved folders record the dtype -------------

FRESH_BF16 = """
import json, torch
from transformers import AutoModelForCausalLM, AutoProcessor
folder, structure, out = {folder!r}, {structure!r}, {out!r}
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
assert {{p.dtype for p in model.parameters()}} == {{torch.bfloat16}}, {{p.dtype for p in model.parameters()}}
question = {question!r}
blocks = [{{"structure": structure, "chain": "A"}}, {{"sequence": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"}}]
for block in blocks:
    conv = [{{"role": "user", "content": [dict(block, type="protein"), {{"type": "text", "text": question}}]}}]
    inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert ("protein_coords" in inputs) == ("structure" in block)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
model.save_pretrained(out)
print(json.load(open(out + "/config.json"))["dtype"])
"""


def test_bf16_from_pretrained_generates_with_and_without_structures(tmp_path, csa):
    model, processor = build_bias_model()
    save_model_folder(model, processor, tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    model.to(torch.bfloat16)
    save_model_folder(model, processor, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stdout = run_fresh_python(FRESH_BF16.format(folder=str(tmp_path / "fp32"), structure=str(csa / "1BJP.pdb.gz"),
                                                out=str(tmp_path / "resaved"), question=QUESTION), cwd=elsewhere)
    assert stdout.strip().splitlines()[-1] == "bfloat16"
