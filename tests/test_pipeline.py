"""The `protein-function` pipeline in-process: input forms, batching, greedy default, chat; bad input."""

import pytest
import torch

from pipeline_protllm import DEFAULT_QUESTION, ProteinFunctionPipeline
from protllm.testing import build_tiny_protllm

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MSDNGPQNQRNAPRITFGGPSDSTGSNQNGERSGARSKQRRPQGLPNNTASWFTALTQHGK", "MALWMRLLPLLALLALWGPDPAAA"]
NEW = 8


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_protllm("llama", projector_type="mlp2x_gelu")
    return model, processor, ProteinFunctionPipeline(model=model, processor=processor, device="cpu")


def reference(model, processor, conversations):
    """What processor + generate answer (greedy), one conversation at a time."""
    answers = []
    for messages in conversations:
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        answers.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
    return answers


def ask(sequence, question=DEFAULT_QUESTION):
    return [{"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": question}]}]


def test_registered_task_builds_the_pipeline(tiny):
    from transformers import pipeline

    model, processor, _ = tiny
    pipe = pipeline("protein-function", model=model, processor=processor, device="cpu")
    assert isinstance(pipe, ProteinFunctionPipeline)


def test_single_sequence_and_dict_match_processor_and_generate(tiny):
    model, processor, pipe = tiny
    expected = reference(model, processor, [ask(SEQS[0]), ask(SEQS[2], "Where is this protein located?")])
    assert pipe(SEQS[0], max_new_tokens=NEW) == [{"generated_text": expected[0]}]
    asked = pipe({"sequence": SEQS[2], "question": "Where is this protein located?"}, max_new_tokens=NEW)
    assert asked == [{"generated_text": expected[1]}]
    # A question given to the call applies to bare sequences.
    assert pipe(SEQS[2], question="Where is this protein located?", max_new_tokens=NEW) == [{"generated_text": expected[1]}]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_batched_lists_equal_one_at_a_time(tiny, batch_size):
    model, processor, pipe = tiny
    expected = reference(model, processor, [ask(s) for s in SEQS])
    out = pipe(SEQS, batch_size=batch_size, max_new_tokens=NEW)
    assert out == [[{"generated_text": e}] for e in expected]


def test_greedy_by_default_even_if_the_model_samples(tiny):
    model, processor, pipe = tiny
    model.generation_config.do_sample = True
    try:
        first = pipe(SEQS[1], max_new_tokens=NEW)
        torch.manual_seed(123)
        second = pipe(SEQS[1], max_new_tokens=NEW)
    finally:
        model.generation_config.do_sample = False
    assert first == second == [{"generated_text": reference(model, processor, [ask(SEQS[1])])[0]}]


def test_multi_turn_chat_with_proteins_in_both_turns(tiny):
    model, processor, pipe = tiny
    messages = ask(SEQS[0]) + [
        {"role": "assistant", "content": [{"type": "text", "text": "A small regulatory protein."}]},
        {"role": "user", "content": [{"type": "protein", "sequence": SEQS[1]}, {"type": "text", "text": "And this one?"}]},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.count("<protein>") == 2 and "A small regulatory protein." in rendered
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["protein_input_ids"].shape[0] == 2
    assert int((inputs["input_ids"] == processor.protein_token_id).sum()) == len(SEQS[0]) + len(SEQS[1])
    expected = reference(model, processor, [messages])[0]
    out = pipe(messages, max_new_tokens=NEW)
    assert out[0]["generated_text"][:-1] == messages
    assert out[0]["generated_text"][-1] == {"role": "assistant", "content": expected}
    # The second turn's answer depends on the first turn's protein: the history is really used.
    other = ask(SEQS[2]) + messages[1:]
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        b = model(**processor.apply_chat_template(other, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt")).logits[0, -1]
    assert not torch.allclose(a, b)


def test_several_proteins_in_one_question(tiny):
    model, processor, pipe = tiny
    messages = [{"role": "user", "content": [{"type": "protein", "sequence": SEQS[0]}, {"type": "protein", "sequence": SEQS[2]},
                                             {"type": "text", "text": "Do these interact?"}]}]
    expected = reference(model, processor, [messages])[0]
    out = pipe({"proteins": [SEQS[0], {"sequence": SEQS[2]}], "question": "Do these interact?"}, max_new_tokens=NEW)
    assert out == [{"generated_text": expected}]


@pytest.mark.parametrize("bad, message", [
    ({"question": "no protein"}, "expected a sequence string or a dict"),
    (42, "expected a sequence string or a dict"),
    ({"proteins": []}, "'proteins' is empty"),
    ("MKT1AY", "invalid residue '1' at position 4"),
])
def test_bad_inputs_are_clear_errors(tiny, bad, message):
    _, _, pipe = tiny
    with pytest.raises(ValueError, match=message):
        pipe(bad, max_new_tokens=2)


def test_structure_file_given_to_a_sequence_model_is_the_processors_clear_error(tiny, shared_data):
    """The pipeline reads no structure itself: a sequence model's processor refuses the file, naming it."""
    _, processor, pipe = tiny
    assert type(processor).__name__ == "ProtLLMProcessor"
    path = shared_data / "structures" / "csa_enzymes" / "1A05.pdb.gz"
    with pytest.raises(ValueError, match=r"protein 0: got the structure file '1A05\.pdb\.gz', but this model's processor "
                                         r"reads sequences only"):
        pipe({"structure": str(path), "chain": "A"}, max_new_tokens=2)


def test_sharing_registers_the_task():
    from transformers.pipelines import PIPELINE_REGISTRY

    from protllm import sharing

    cls = sharing.register_protein_function_pipeline()
    assert PIPELINE_REGISTRY.supported_tasks["protein-function"]["impl"] is cls


def test_structure_file_input_matches_processor_and_generate(shared_data):
    path = shared_data / "structures" / "csa_enzymes" / "1A05.pdb.gz"
    if not path.is_file():
        pytest.skip("CSA structures not available")
    model, processor = build_tiny_protllm("llama", use_structure_bias=True, structure_num_kernels=16)
    pipe = ProteinFunctionPipeline(model=model, processor=processor, device="cpu")
    block = {"type": "protein", "structure": str(path), "chain": "A"}
    messages = [{"role": "user", "content": [block, {"type": "text", "text": DEFAULT_QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert "protein_coords" in inputs
    expected = reference(model, processor, [messages])[0]
    assert pipe({"structure": str(path), "chain": "A"}, max_new_tokens=NEW) == [{"generated_text": expected}]
    # The structure changes the answer's logits compared with the same sequence alone.
    sequence_only = {k: v for k, v in inputs.items() if k not in ("protein_coords", "protein_coord_mask")}
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[0, -1], model(**sequence_only).logits[0, -1])
