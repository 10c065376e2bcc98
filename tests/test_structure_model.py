"""The structure path through the model: SEPIT structure bias and SaProt input, on real CSA enzyme structures.

Tiny random models (tiny_protllm.py); structures are read in place from ../shared/data/structures/csa_enzymes.
Encoder dropout is switched off in the protein config so training-mode outputs are deterministic and the only
train/eval difference left is structure dropout (and checkpointing of the pair map).
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import saprot_protllm as saprot
import structure_protllm as sp
from fresh_process import run_fresh_python
from protllm.model_folder import save_model_folder
from sepit_protllm import ProtLLMStructureBias
from processing_protllm import ProteinInputError
from protllm.testing import build_tiny_protllm, tiny_protein_config

QUESTION = "What is the function of this enzyme?"
SMALL = ("1BJP", "A")  # 62 residues
MEDIUM = ("2ACY", "A")  # 98 residues


@pytest.fixture(scope="module")
def labels(csa):
    with open(csa / "labels.tsv") as fh:
        return {row["pdb_chain"]: row["sequence"] for row in csv.DictReader(fh, delimiter="\t")}


def path_of(csa, entry):
    return str(csa / f"{entry[0]}.pdb.gz")


def no_dropout_protein_config(**kwargs):
    return dict(tiny_protein_config(**kwargs), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_bias_model(**overrides):
    kwargs = dict(use_structure_bias=True, structure_num_kernels=16, freeze_protein_encoder=False,
                  protein_config=no_dropout_protein_config())
    kwargs.update(overrides)
    return build_tiny_protllm("llama", **kwargs)


@pytest.fixture(scope="module")
def bias_model():
    return build_bias_model()


def chat(protein_block, answer=None):
    messages = [{"role": "user", "content": [dict(protein_block, type="protein"), {"type": "text", "text": QUESTION}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def model_inputs(processor, conversations):
    return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=True)


def encode(model, inputs, with_structure=True):
    encoder = model.model.protein_encoder
    coords = inputs.get("protein_coords") if with_structure else None
    coord_mask = inputs.get("protein_coord_mask") if with_structure else None
    states, _ = encoder(inputs["protein_input_ids"], inputs["protein_attention_mask"], coords, coord_mask)
    return states


# ----- save / reload ----------------------------------------------------------------------------------------

FRESH_SCRIPT = """
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoProcessor
folder, out, conversations = {folder!r}, {out!r}, {conversations!r}
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert model.config.use_structure_bias and model.model.protein_encoder.structure_bias is not None
inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**inputs).logits
save_file({{"logits": logits.contiguous(), "coords": inputs["protein_coords"].contiguous(),
           "coord_mask": inputs["protein_coord_mask"].contiguous(), "ids": inputs["protein_input_ids"].contiguous()}}, out)
"""


def test_structure_model_reloads_in_fresh_process_with_identical_logits(tmp_path, csa, labels, bias_model):
    model, processor = bias_model
    conversations = [
        chat({"structure": path_of(csa, SMALL), "chain": "A"}),  # sequence read from the chain
        chat({"sequence": labels["2ACY-A"], "structure": path_of(csa, MEDIUM), "chain": "A"}),
        chat({"sequence": labels["1BJP-B"]}),  # sequence only, in the same batch
    ]
    inputs = model_inputs(processor, conversations)
    assert inputs["protein_coords"].shape == (3, 98, 4, 3)
    mask = inputs["protein_coord_mask"]
    assert mask[0, :62].all() and not mask[0, 62:].any() and mask[1].all() and not mask[2].any()
    with torch.no_grad():
        logits = model(**inputs).logits
        without = model(**{k: v for k, v in inputs.items() if k not in ("protein_coords", "protein_coord_mask")}).logits
    # the structure must matter for the structured rows, else bit-identity below would prove little
    assert not torch.allclose(logits[0], without[0]) and not torch.allclose(logits[1], without[1])
    # the sequence-only row of a mixed batch gets no bias: same result as the sequence-only path
    torch.testing.assert_close(logits[2], without[2], rtol=1e-5, atol=1e-5)

    folder = save_model_folder(model, processor, tmp_path / "model")
    out, elsewhere = tmp_path / "fresh.safetensors", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_fresh_python(FRESH_SCRIPT.format(folder=str(folder), out=str(out), conversations=conversations), cwd=elsewhere)
    fresh = load_file(out)
    assert torch.equal(fresh["ids"], inputs["protein_input_ids"])
    assert torch.equal(fresh["coord_mask"], inputs["protein_coord_mask"])
    assert torch.equal(fresh["coords"], inputs["protein_coords"])
    assert torch.equal(fresh["logits"], logits)


# ----- with / without structure, structure dropout ----------------------------------------------------------

def test_removing_the_structure_gives_the_sequence_only_path(csa, bias_model):
    model, processor = bias_model
    structure = sp.load_structure(path_of(csa, SMALL), chain="A")
    with_structure = model_inputs(processor, [chat({"structure": path_of(csa, SMALL), "chain": "A"})])
    sequence_only = model_inputs(processor, [chat({"sequence": structure.sequence})])
    assert "protein_coords" not in sequence_only
    assert torch.equal(with_structure["input_ids"], sequence_only["input_ids"])
    assert torch.equal(with_structure["protein_input_ids"], sequence_only["protein_input_ids"])
    with torch.no_grad():
        a = model(**with_structure).logits
        b = model(**sequence_only).logits
        # a structure with no usable residue is the sequence-only path exactly
        empty = dict(with_structure, protein_coord_mask=torch.zeros_like(with_structure["protein_coord_mask"]))
        c = model(**empty).logits
    assert torch.isfinite(b).all() and not torch.allclose(a, b)
    assert torch.equal(c, b)


def projected(model, inputs, with_structure=True):
    """Per-protein projected features `(P, n, D)` through the model (where structure dropout applies)."""
    features = model.model.get_protein_features(
        inputs["protein_input_ids"], inputs["protein_attention_mask"],
        inputs.get("protein_coords") if with_structure else None, inputs.get("protein_coord_mask") if with_structure else None)
    return features.reshape(inputs["protein_input_ids"].shape[0], -1, features.shape[-1])


def test_structure_dropout(csa, bias_model):
    model, processor = bias_model
    encoder = model.model.protein_encoder
    inputs = model_inputs(processor, [chat({"structure": path_of(csa, SMALL), "chain": "A"})] * 12)
    try:
        model.train()
        assert encoder.training and encoder.structure_bias.training
        encoder.config.structure_dropout = 1.0
        with torch.no_grad():
            dropped = projected(model, inputs)
            sequence_only = projected(model, inputs, with_structure=False)
        assert torch.equal(dropped, sequence_only)

        # dropout is per protein: with p=0.5 some rows keep their structure, the others are exactly sequence-only
        encoder.config.structure_dropout = 0.5
        torch.manual_seed(3)
        with torch.no_grad():
            mixed = projected(model, inputs)
        same = [torch.equal(mixed[i], sequence_only[i]) for i in range(len(mixed))]
        assert any(same) and not all(same)
    finally:
        encoder.config.structure_dropout = 0.15
        model.eval()

    encoder.config.structure_dropout = 0.0  # eval never drops anyway; 0 makes the setting explicit
    try:
        with torch.no_grad():
            kept = projected(model, inputs)
    finally:
        encoder.config.structure_dropout = 0.15
    assert (kept - sequence_only).abs().amax() > 1e-2  # the bias changes the encoder output


def test_bias_parameters_receive_gradients_and_checkpointing_is_exact(csa, bias_model):
    model, processor = bias_model
    encoder = model.model.protein_encoder
    bias = encoder.structure_bias
    conversation = chat({"structure": path_of(csa, SMALL), "chain": "A"}, answer="A hydrolase.")
    inputs = processor.apply_chat_template([conversation], tokenize=True, return_dict=True, return_tensors="pt",
                                           return_assistant_tokens_mask=True)
    labels = inputs["input_ids"].masked_fill(inputs.pop("assistant_masks") == 0, -100)
    names = ["kernels.means", "kernels.log_stds", "pair_mlp.0.weight", "pair_mlp.2.weight", "pair_mlp.2.bias",
             "edge_proj.weight", "edge_proj.bias"]

    def grads(train: bool):
        model.zero_grad(set_to_none=True)
        model.train(train)
        encoder.config.structure_dropout = 0.0
        try:
            model(**inputs, labels=labels).loss.backward()
        finally:
            encoder.config.structure_dropout = 0.15
            model.eval()
        params = dict(bias.named_parameters())
        return {name: params[name].grad.clone() for name in names}

    checkpointed = grads(train=True)  # training mode: the pair map is chunked and re-computed in backward
    for name, grad in checkpointed.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    plain = grads(train=False)  # eval mode with autograd: no checkpointing
    for name in names:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_frozen_encoder_runs_the_bias_without_autograd(csa):
    model, processor = build_bias_model(freeze_protein_encoder=True)
    inputs = model_inputs(processor, [chat({"structure": path_of(csa, SMALL), "chain": "A"})])
    model.train()
    assert not model.model.protein_encoder.training
    states = encode(model, inputs)
    assert not states.requires_grad
    model.eval()


# ----- residues without coordinates -------------------------------------------------------------------------

def test_residues_without_coordinates_get_no_bias(csa, labels, bias_model):
    model, processor = bias_model
    encoder = model.model.protein_encoder
    sequence = "GSHM" + labels["1BJP-A"] + "LE"  # tag residues the structure does not have
    inputs = model_inputs(processor, [
        chat({"sequence": sequence, "structure": path_of(csa, SMALL), "chain": "A"}),
        chat({"structure": path_of(csa, MEDIUM), "chain": "A"}),
    ])
    coords, coord_mask = inputs["protein_coords"].clone(), inputs["protein_coord_mask"].clone()
    assert not coord_mask[0, :4].any() and not coord_mask[0, 66:68].any() and coord_mask[0, 4:66].all()
    coord_mask[0, 20:25] = False  # masked residues (their coordinates stay in place but must be ignored)
    coords[1, 30] = float("nan")  # NaN coordinates under a True mask count as missing too
    coords[0, 22] = 1e4  # garbage under a False mask must not leak

    token_ca, token_mask = encoder._token_level_ca(coords, coord_mask, inputs["protein_input_ids"].shape[1])
    with torch.no_grad():
        bias, residue_term = encoder.structure_bias(token_ca, token_mask)
    missing = {0: [0, 1, 2, 3, 20, 21, 22, 23, 24, 66, 67], 1: [30]}
    for protein, residues in missing.items():
        tokens = [r + 1 for r in residues] + [0]  # token = residue + 1; <cls> has no coordinates either
        assert torch.equal(bias[protein][:, tokens, :], torch.zeros_like(bias[protein][:, tokens, :]))
        assert torch.equal(bias[protein][:, :, tokens], torch.zeros_like(bias[protein][:, :, tokens]))
        assert torch.equal(residue_term[protein, tokens], torch.zeros_like(residue_term[protein, tokens]))
    assert bias[0, :, 10, 11].abs().sum() > 0 and residue_term[0, 10].abs().sum() > 0  # resolved pairs do get one
    assert bias[1, :, 33, 34].abs().sum() > 0  # sequence neighbours (3.8 A apart)

    with torch.no_grad():
        states = encode(model, dict(inputs, protein_coords=coords, protein_coord_mask=coord_mask))
    assert torch.isfinite(states).all()


# ----- chunking, geometry ---------------------------------------------------------------------------------

def real_ca_batch(csa):
    """Token-level CA `(2, T, 3)` and mask for two real chains of different length (padded, <cls>/<eos> unmasked)."""
    structures = [sp.load_structure(path_of(csa, entry), chain=entry[1]) for entry in (SMALL, MEDIUM)]
    tokens = max(len(s) for s in structures) + 2
    ca = torch.zeros(2, tokens, 3)
    mask = torch.zeros(2, tokens, dtype=torch.bool)
    for i, s in enumerate(structures):
        ca[i, 1 : 1 + len(s)] = torch.from_numpy(np.nan_to_num(s.ca))
        mask[i, 1 : 1 + len(s)] = torch.from_numpy(s.coord_mask)
    return ca, mask


def test_chunked_bias_equals_unchunked(csa):
    ca, mask = real_ca_batch(csa)
    torch.manual_seed(0)
    small = ProtLLMStructureBias(num_kernels=16, num_heads=4, hidden_size=32, embedding_scale=0.1, chunk_size=7)
    large = ProtLLMStructureBias(num_kernels=16, num_heads=4, hidden_size=32, embedding_scale=0.1, chunk_size=4096)
    large.load_state_dict(small.state_dict())
    for module in (small, large):
        module.eval()
    with torch.no_grad():
        bias_small, term_small = small(ca, mask)
        bias_large, term_large = large(ca, mask)
    assert bias_small.shape == (2, 4, ca.shape[1], ca.shape[1])
    torch.testing.assert_close(bias_small, bias_large, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(term_small, term_large, rtol=1e-5, atol=1e-6)

    # training mode (checkpointed chunks): same values and the same gradients
    grads = []
    for module in (small, large):
        module.train()
        module.zero_grad()
        bias, term = module(ca, mask)
        (bias.square().sum() + term.square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_chunk_size_in_the_encoder_does_not_change_outputs(csa, bias_model):
    model, processor = bias_model
    bias = model.model.protein_encoder.structure_bias
    inputs = model_inputs(processor, [chat({"structure": path_of(csa, MEDIUM), "chain": "A"})])
    outputs = {}
    try:
        for chunk in (5, 33, 100_000):
            bias.chunk_size = chunk
            with torch.no_grad():
                outputs[chunk] = encode(model, inputs)
    finally:
        bias.chunk_size = model.config.structure_chunk_size
    torch.testing.assert_close(outputs[5], outputs[100_000], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[33], outputs[100_000], rtol=1e-5, atol=1e-5)


def test_bias_is_invariant_to_rigid_motion(csa):
    """Distances only: translating (500 A, far from the origin) and rotating the structure leaves the bias unchanged."""
    ca, mask = real_ca_batch(csa)
    torch.manual_seed(0)
    module = ProtLLMStructureBias(num_kernels=32, num_heads=4, hidden_size=32, embedding_scale=0.1, chunk_size=64).eval()
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    moved = (ca.double() @ q.T + torch.tensor([500.0, -350.0, 420.0], dtype=torch.float64)).float()
    with torch.no_grad():
        bias, term = module(ca, mask)
        bias_moved, term_moved = module(moved, mask)
    torch.testing.assert_close(bias_moved, bias, rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(term_moved, term, rtol=1e-3, atol=2e-4)


# ----- SaProt input -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saprot_model():
    return build_tiny_protllm("llama", protein_encoder_input="saprot", use_structure_bias=True, structure_num_kernels=8)


def test_saprot_tokens_from_a_real_structure(csa, saprot_model):
    model, processor = saprot_model
    assert model.config.protein_config.vocab_size == len(processor.protein_tokenizer) == len(saprot.SAPROT_VOCAB) == 446
    path = path_of(csa, SMALL)
    structure = sp.load_structure(path, chain="A")
    inputs = model_inputs(processor, [chat({"structure": path, "chain": "A"}), chat({"sequence": "MKTXAYB"})])
    tokens = processor.protein_tokenizer.convert_ids_to_tokens(inputs["protein_input_ids"][0].tolist())
    assert tokens[0] == "<cls>" and tokens[len(structure) + 1] == "<eos>"
    residues = tokens[1 : len(structure) + 1]
    assert all(len(t) == 2 and t[0].isupper() and t[1] in saprot.SAPROT_STRUC_VOCAB for t in residues)
    assert "".join(t[0] for t in residues) == structure.sequence
    three_di = saprot.three_di_tokens(structure)
    assert "".join(t[1] for t in residues) == three_di
    assert sum(t[1] != "#" for t in residues) >= len(structure) - 2  # a resolved chain: 3Di nearly everywhere

    no_structure = processor.protein_tokenizer.convert_ids_to_tokens(inputs["protein_input_ids"][1].tolist())[1:8]
    assert no_structure == ["M#", "K#", "T#", "##", "A#", "Y#", "##"]  # no <unk>: X and B have no SaProt letter
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_saprot_masks_low_plddt_residues(csa, saprot_model):
    _, processor = saprot_model
    structure = sp.load_structure(path_of(csa, SMALL), chain="A")
    three_di = saprot.three_di_tokens(structure)
    plddt = np.where(np.arange(len(structure)) < 30, 45.0, 92.0)
    predicted = {"coords": structure.coords, "sequence": structure.sequence, "plddt": plddt}
    inputs = processor(text="<protein>", proteins=[{"structure": predicted}])
    tokens = processor.protein_tokenizer.convert_ids_to_tokens(inputs["protein_input_ids"][0])[1:-1]
    assert [t[1] for t in tokens[:30]] == ["#"] * 30
    assert "".join(t[1] for t in tokens[30:]) == three_di[30:]
    assert "".join(t[0] for t in tokens) == structure.sequence

    all_low = dict(predicted, plddt=np.full(len(structure), 20.0))
    with pytest.warns(sp.StructureWarning, match="pLDDT below"):
        inputs = processor(text="<protein>", proteins=[{"structure": all_low}])
    tokens = processor.protein_tokenizer.convert_ids_to_tokens(inputs["protein_input_ids"][0])[1:-1]
    assert all(t[1] == "#" for t in tokens)


# ----- bad structure input ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(csa, tmp_path_factory):
    import gzip

    d = tmp_path_factory.mktemp("bad_structures")
    raw = (csa / "1BJP.pdb.gz").read_bytes()
    (d / "truncated.pdb.gz").write_bytes(raw[: len(raw) // 2])
    (d / "random.pdb").write_bytes(os.urandom(2048))
    text = gzip.decompress(raw).decode()
    cut = text.index("\nATOM", len(text) // 3)
    (d / "cut_record.pdb").write_text(text[: cut + 30])
    (d / "water.pdb").write_text("HETATM    1  O   HOH A   1      10.000  10.000  10.000  1.00 20.00           O\nEND\n")
    return d


@pytest.mark.parametrize("block, message", [
    ({"structure": "SMALL", "chain": "Z"}, r"chain 'Z' not found; protein chains available: 'A'"),
    ({"structure": "truncated.pdb.gz"}, r"truncated\.pdb\.gz: gzip stream is truncated"),
    ({"structure": "random.pdb"}, r"random\.pdb: binary data"),
    ({"structure": "cut_record.pdb"}, r"cut_record\.pdb: truncated ATOM/HETATM record"),
    ({"structure": "water.pdb"}, r"water\.pdb: no protein chain found"),
    ({"structure": "absent.pdb"}, r"structure file not found"),
    ({"structure": "SMALL", "chain": "A", "sequence": "W" * 62}, r"does not match the given sequence"),
    ({"structure": {"coords": np.full((5, 4, 3), np.nan), "sequence": "MKTAY"}}, r"NaN or absent coordinates"),
    ({"structure": 12345}, r"unsupported structure source of type int"),
])
def test_bad_structure_input_names_the_protein(csa, bad_files, bias_model, block, message):
    _, processor = bias_model
    block = dict(block)
    if isinstance(block["structure"], str):
        block["structure"] = path_of(csa, SMALL) if block["structure"] == "SMALL" else str(bad_files / block["structure"])
    conversations = [chat({"structure": path_of(csa, MEDIUM), "chain": "A"}), chat(block)]
    with pytest.raises(ProteinInputError, match=r"^protein 1: .*" + message):
        model_inputs(processor, conversations)
