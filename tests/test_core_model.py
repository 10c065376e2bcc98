"""Core behaviour of ProtLLMConfig / ProtLLMForConditionalGeneration / ProtLLMProcessor on tiny random models."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fresh_process import run_fresh_python
from protllm.model_folder import save_model_folder
from protllm.remote_code import CORE_CODE_FILES, OPTIONAL_CODE_FILES
from processing_protllm import ProteinInputError
from protllm.testing import build_tiny_protllm

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MSDNGPQNQRNAPRITFGGPSDSTGSNQNGERSGARSKQRRPQGLPNNTASWFTALTQHGK", "MALWMRLLPLLALLALWGPDPAAA"]
QUESTION = "What is the function of this protein?"


def chat(sequence, question=QUESTION, answer=None):
    messages = [{"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def generation_inputs(processor, conversations):
    return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def llama():
    return build_tiny_protllm("llama", projector_type="mlp2x_gelu")


@pytest.fixture(scope="module")
def qwen_tied():
    return build_tiny_protllm("qwen2", projector_type="linear")


# ----- configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (dict(projector_type="conv"), "projector_type"),
    (dict(moe_num_experts=1), "moe_num_experts"),
    (dict(structure_dropout=1.5), "structure_dropout"),
    (dict(protein_feature_layer=-40), "protein_feature_layer"),
    (dict(moe_num_experts=4, moe_top_k=5), "moe_top_k"),
    (dict(use_structure_bias=True, protein_encoder_backend="fair-esm"), "use_structure_bias"),
    (dict(protein_token_id=10**7, text_config={"model_type": "llama", "vocab_size": 100}), "protein_token_id"),
])
def test_config_rejects_wrong_values(bad, message):
    from configuration_protllm import ProtLLMConfig

    with pytest.raises(Exception, match=message):
        ProtLLMConfig(**bad)


def test_tied_embeddings_are_copied_up_and_shared(qwen_tied):
    model, _ = qwen_tied
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# ----- fresh-process round trip ----------------------------------------------------------------------------

ROUND_TRIP_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor
d, out = sys.argv[1] if len(sys.argv) > 1 else {folder!r}, {out!r}
config = AutoConfig.from_pretrained(d, trust_remote_code=True)
assert type(config).__name__ == "ProtLLMConfig" and config.model_type == "protllm"
base = AutoModel.from_pretrained(d, trust_remote_code=True)
assert type(base).__name__ == "ProtLLMModel"
proc = AutoProcessor.from_pretrained(d, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
assert type(model).__name__ == "ProtLLMForConditionalGeneration"
msgs = [[{{"role": "user", "content": [{{"type": "protein", "sequence": s}}, {{"type": "text", "text": "What is the function of this protein?"}}]}}] for s in {seqs!r}]
inputs = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**inputs).logits
out_ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
save_file({{"logits": logits.contiguous(), "generated": out_ids.contiguous()}}, out)
print(proc.batch_decode(out_ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


@pytest.mark.parametrize("text_model, backend, projector", [
    ("llama", "esm", "mlp2x_gelu"),
    ("qwen2", "esm", "linear"),
    ("llama", "fair-esm", "resampler"),
])
def test_fresh_process_round_trip_is_bit_identical(tmp_path, text_model, backend, projector):
    model, processor = build_tiny_protllm(text_model, projector_type=projector, protein_encoder_backend=backend,
                                          num_query_tokens=6, resampler_num_heads=4)
    folder = tmp_path / "model"
    save_model_folder(model, processor, folder)
    for name in CORE_CODE_FILES + ("config.json", "model.safetensors", "processor_config.json"):
        assert (folder / name).is_file(), name
    # A sequence model carries no optional module (ESM3 encoders, structure reading): it never runs them.
    assert [name for name in OPTIONAL_CODE_FILES if (folder / name).exists()] == []
    assert (folder / "protein_tokenizer").is_dir()
    inputs = generation_inputs(processor, [chat(s) for s in SEQS])
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    out = tmp_path / "fresh.safetensors"
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    run_fresh_python(ROUND_TRIP_SCRIPT.format(folder=str(folder), out=str(out), seqs=SEQS), cwd=empty)
    fresh = load_file(out)
    assert torch.equal(fresh["logits"], logits)
    assert torch.equal(fresh["generated"], generated)


# ----- generation equalities --------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["llama", "qwen_tied"])
def test_batched_left_padded_generation_equals_one_at_a_time(request, fixture):
    model, processor = request.getfixturevalue(fixture)
    assert processor.tokenizer.padding_side == "left"
    batch = generation_inputs(processor, [chat(s) for s in SEQS])
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different lengths must be left padded"
    batched = model.generate(**batch, max_new_tokens=10, do_sample=False)
    prompt_length = batch["input_ids"].shape[1]
    for index, sequence in enumerate(SEQS):
        single = generation_inputs(processor, chat(sequence))
        alone = model.generate(**single, max_new_tokens=10, do_sample=False)
        assert alone[0, single["input_ids"].shape[1]:].tolist() == batched[index, prompt_length:].tolist()


def test_cached_generation_equals_uncached(llama):
    model, processor = llama
    inputs = generation_inputs(processor, [chat(s) for s in SEQS])
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generation_depends_on_the_protein():
    """A few steps of training on two proteins with two different answers: the model must give each protein its own
    answer. A model that ignores the protein (the failure this project had) can produce at most one of them."""
    from protllm.training.collator import ProtLLMDataCollator

    model, processor = build_tiny_protllm("llama", projector_type="mlp2x_gelu", seed=3)
    answers = {SEQS[0]: "Kinase.", SEQS[2]: "Secreted toxin."}
    rows = [{"messages": chat(sequence, answer=answer)} for sequence, answer in answers.items()]
    batch = ProtLLMDataCollator(processor)(rows)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    inputs = generation_inputs(processor, [chat(sequence) for sequence in answers])
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    generated = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [g.strip() for g in generated] == list(answers.values())


# ----- processor ---------------------------------------------------------------------------------------------

def test_placeholder_expands_to_projector_token_count(llama):
    _, processor = llama
    inputs = generation_inputs(processor, chat(SEQS[0]))
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.protein_token_id) == len(SEQS[0])
    start = ids.index(processor.protein_start_token_id)
    assert ids[start + len(SEQS[0]) + 1] == processor.protein_end_token_id
    assert inputs["protein_input_ids"].shape == (1, len(SEQS[0]) + 2)


def test_resampler_emits_a_fixed_number_of_tokens():
    model, processor = build_tiny_protllm("llama", projector_type="resampler", num_query_tokens=5, resampler_num_heads=4)
    inputs = generation_inputs(processor, [chat(s) for s in SEQS])
    assert ((inputs["input_ids"] == processor.protein_token_id).sum(dim=1) == 5).all()
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_several_proteins_in_one_prompt(llama):
    """Two proteins in one prompt (and a second conversation in the batch): each placeholder span carries its own
    protein's features, so the answer depends on each protein, and on nothing of the other conversation."""
    model, processor = llama

    def two_proteins(first, second):
        return [{"role": "user", "content": [
            {"type": "protein", "sequence": first}, {"type": "protein", "sequence": second},
            {"type": "text", "text": "Do these two proteins interact?"}]}]

    inputs = generation_inputs(processor, [two_proteins(SEQS[0], SEQS[2]), chat(SEQS[1])])
    assert inputs["protein_input_ids"].shape[0] == 3
    assert int((inputs["input_ids"] == processor.protein_token_id).sum()) == sum(len(s) for s in SEQS)
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        # The embeddings at the placeholders are exactly each protein's own projected features, in order.
        features = [model.model.get_protein_features(**{k: v[i : i + 1] for k, v in inputs.items() if k.startswith("protein_")})
                    for i in range(3)]
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        placeholder = inputs["input_ids"] == processor.protein_token_id
        scattered = embeds.masked_scatter(placeholder.unsqueeze(-1), torch.cat(features))
        assert torch.equal(scattered[placeholder], torch.cat(features))
        for changed in (two_proteins(SEQS[0][::-1], SEQS[2]), two_proteins(SEQS[0], SEQS[2][::-1])):
            logits = model(**generation_inputs(processor, [changed, chat(SEQS[1])])).logits[:, -1]
            assert not torch.allclose(logits[0], reference[0], atol=1e-5)  # each protein matters to its row
            torch.testing.assert_close(logits[1], reference[1])  # and to no other row


def test_assistant_mask_covers_exactly_the_answer(llama):
    _, processor = llama
    answer = "Catalyses the hydrolysis of ATP."
    out = processor.apply_chat_template([chat(SEQS[0], answer=answer)], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, padding_side="right")
    ids = torch.tensor(out["input_ids"][0])
    mask = torch.tensor(out["assistant_masks"][0]).bool()
    decoded = processor.decode(ids[mask])
    assert decoded.strip().startswith(answer) and decoded.strip().endswith("<|im_end|>")
    assert not mask[ids == processor.protein_token_id].any()


def test_multi_turn_chat_keeps_earlier_turns_and_proteins(llama):
    _, processor = llama
    messages = chat(SEQS[0], answer="A kinase.") + [{"role": "user", "content": [
        {"type": "protein", "sequence": SEQS[1]}, {"type": "text", "text": "And this one?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<protein>") == 2 and "A kinase." in text
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert len(inputs["protein_input_ids"]) == 2


@pytest.mark.parametrize("sequence, position", [("MKT1AY", 4), ("MK TA#Y", 5), ("MKJ", 3)])
def test_junk_residues_are_rejected_with_protein_and_position(llama, sequence, position):
    _, processor = llama
    with pytest.raises(ProteinInputError, match=rf"protein 1: invalid residue .* at position {position}"):
        processor(text=["<protein> a", "<protein> b"], proteins=[[SEQS[0]], [sequence]])


def test_ambiguous_residues_map_per_esm_alphabet(llama):
    _, processor = llama
    out = processor(text="<protein>", proteins=["mkbzuox*"])
    vocab = processor.protein_tokenizer.get_vocab()
    assert out["protein_input_ids"][0][1:-1] == [vocab[c] for c in "MKBZUOX"]


def test_empty_sequence_and_count_mismatch_are_errors(llama):
    _, processor = llama
    with pytest.raises(ProteinInputError, match="protein 0: empty sequence"):
        processor(text="<protein>", proteins=["  "])
    with pytest.raises(ProteinInputError, match="1 '<protein>' placeholders but 2 proteins"):
        processor(text="<protein>", proteins=[SEQS[0], SEQS[1]])


def test_long_protein_is_cropped_with_warning_or_refused():
    _, processor = build_tiny_protllm("llama", max_protein_length=16)
    with pytest.warns(UserWarning, match="cropped to max_protein_length=16"):
        out = processor(text="<protein>", proteins=["A" * 40])
    assert len(out["protein_input_ids"][0]) == 18
    processor.protein_overflow = "error"
    with pytest.raises(ProteinInputError, match="40 residues exceed max_protein_length=16"):
        processor(text="<protein>", proteins=["A" * 40])


def test_model_checks_placeholder_feature_counts(llama):
    model, processor = llama
    inputs = generation_inputs(processor, chat(SEQS[0]))
    inputs["input_ids"][0, -3] = processor.protein_token_id  # one placeholder too many
    with pytest.raises(ValueError, match="do not match"):
        model(**inputs)
    no_proteins = {k: v for k, v in generation_inputs(processor, chat(SEQS[0])).items() if not k.startswith("protein")}
    with pytest.raises(ValueError, match="no protein inputs"):
        model(**no_proteins)


# ----- training behaviour -----------------------------------------------------------------------------------

def test_frozen_encoder_stays_frozen_and_in_eval_mode(llama):
    model, processor = llama
    model.train()
    encoder = model.model.protein_encoder
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    assert model.model.projector.training
    out = processor.apply_chat_template([chat(SEQS[0], answer="An enzyme.")], tokenize=True, return_dict=True,
                                        return_tensors="pt", return_assistant_tokens_mask=True)
    labels = out["input_ids"].masked_fill(out.pop("assistant_masks") == 0, -100)
    loss = model(**out, labels=labels).loss
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert model.model.projector.linear_1.weight.grad is not None
    model.zero_grad()
    model.eval()


def test_trl_fused_lm_head_path_gives_the_model_loss(qwen_tied):
    from trl.trainer.utils import add_fused_lm_head

    model, processor = build_tiny_protllm("qwen2", projector_type="linear")
    out = processor.apply_chat_template([chat(SEQS[0], answer="An enzyme.")], tokenize=True, return_dict=True,
                                        return_tensors="pt", return_assistant_tokens_mask=True)
    labels = out["input_ids"].masked_fill(out.pop("assistant_masks") == 0, -100)
    with torch.no_grad():
        reference = model(**out, labels=labels).loss
        add_fused_lm_head(model)
        fused = model(**out, labels=labels, fused_lm_head=True).loss
    assert torch.allclose(reference, fused, atol=1e-5)
