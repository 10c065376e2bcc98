"""The processor split: the core `ProtLLMProcessor` reads sequences only; `ProtLLMStructureProcessor` (an optional
remote-code module) reads structures, and only a folder whose model reads structures carries it."""

import json

import numpy as np
import pytest

from fresh_process import run_fresh_python
from processing_protllm import ProteinInputError, ProtLLMProcessor
from protllm.local_weights import smollm2_path
from protllm.model_classes import processor_class, reads_structures
from protllm.processors import build_processor
from structure_processing_protllm import ProtLLMStructureProcessor
from structure_protllm import load_structure

STRUCTURE_MODULES = ("structure_protllm.py", "structure_files_protllm.py", "saprot_protllm.py", "structure_processing_protllm.py")
CSA_FILE = "structures/csa_enzymes/1A05.pdb.gz"  # chains A and B


@pytest.fixture(scope="module")
def core_processor():
    return build_processor(str(smollm2_path(tokenizer_only=True)), processor_class=ProtLLMProcessor)


@pytest.fixture(scope="module")
def csa_file(shared_data):
    return shared_data / CSA_FILE


def test_core_processor_refuses_structure_inputs_naming_the_protein(core_processor, csa_file):
    sequence = load_structure(str(csa_file), chain="A").sequence
    inputs = {
        "structure file '1A05.pdb.gz'": {"structure": str(csa_file), "chain": "A"},
        "structure bytes": {"structure": csa_file.read_bytes()},
        "structure text": {"structure": "ATOM      1  N   MET A   1      11.104   6.134  -6.504  1.00  0.00           N\n"},
        "a coordinate dict": {"sequence": "MKT", "structure": {"coords": np.zeros((3, 4, 3)), "sequence": "MKT"}},
    }
    for described, protein in inputs.items():
        with pytest.raises(ProteinInputError) as caught:
            # the second protein is the bad one: the message names it
            core_processor(text="<protein> and <protein>", proteins=[sequence, protein])
        message = str(caught.value)
        assert message.startswith("protein 1: ") and described in message, message
        assert "reads sequences only" in message and "use a model that reads structures" in message
    # through a chat, as a pipeline or the app hands it over
    chat = [{"role": "user", "content": [{"type": "protein", "structure": str(csa_file)}, {"type": "text", "text": "What?"}]}]
    with pytest.raises(ProteinInputError, match=r"^protein 0: got the structure file '1A05\.pdb\.gz'"):
        core_processor.apply_chat_template(chat, tokenize=True, return_dict=True)


def test_core_processor_takes_a_parsed_structure_and_its_coordinates(core_processor, csa_file):
    """A structure parsed elsewhere (the app, a user) needs no reader: the core processor passes its coordinates on,
    exactly as the structure processor does for the same chain."""
    structure = load_structure(str(csa_file), chain="B")
    core = core_processor(text="<protein>", proteins=[structure], return_tensors="np")
    reader = build_processor(str(smollm2_path(tokenizer_only=True)), processor_class=ProtLLMStructureProcessor)
    from_file = reader(text="<protein>", proteins=[{"structure": str(csa_file), "chain": "B"}], return_tensors="np")
    for key in ("input_ids", "protein_input_ids", "protein_coords", "protein_coord_mask"):
        np.testing.assert_array_equal(core[key], from_file[key])
    assert core["protein_coord_mask"].sum() > 0.9 * len(structure)
    with pytest.raises(ProteinInputError, match="chain 'A' requested but the structure holds chain 'B'"):
        core_processor(text="<protein>", proteins=[{"structure": structure, "chain": "A"}])
    with pytest.raises(ProteinInputError, match="given sequence differs from the structure's"):
        core_processor(text="<protein>", proteins=[{"structure": structure, "sequence": "MKTAYIAKQR"}])


def test_saprot_input_needs_the_structure_processor():
    with pytest.raises(ValueError, match="protein_encoder_input must be one of \\('sequence',\\) for ProtLLMProcessor, got 'saprot'.*3Di.*ProtLLMStructureProcessor"):
        build_processor(str(smollm2_path(tokenizer_only=True)), processor_class=ProtLLMProcessor, protein_encoder_input="saprot")
    saprot = build_processor(str(smollm2_path(tokenizer_only=True)), processor_class=ProtLLMStructureProcessor,
                             protein_encoder_input="saprot")
    assert len(saprot.protein_tokenizer) == 446
    # Without a class, the builder picks the one the model needs, and the protein tokenizer its encoder reads.
    chosen = build_processor(str(smollm2_path(tokenizer_only=True)), protein_encoder_input="saprot")
    assert type(chosen) is ProtLLMStructureProcessor and chosen.protein_tokenizer.get_vocab() == saprot.protein_tokenizer.get_vocab()
    sequence = build_processor(str(smollm2_path(tokenizer_only=True)))
    assert type(sequence) is ProtLLMProcessor and len(sequence.protein_tokenizer) == 33
    # which models read structures, and so get the structure processor
    assert not reads_structures({}) and processor_class({}) is ProtLLMProcessor
    assert not reads_structures({"protein_encoder_backend": "esmc"})
    for settings in ({"use_structure_bias": True}, {"protein_encoder_input": "saprot"}, {"protein_encoder_backend": "esm3"}):
        assert reads_structures(settings) and processor_class(settings) is ProtLLMStructureProcessor, settings


def test_a_tokenizer_without_the_protein_tokens_is_refused_naming_the_builder():
    from transformers import AutoTokenizer

    from protllm.processors import build_protein_tokenizer

    plain = AutoTokenizer.from_pretrained(str(smollm2_path(tokenizer_only=True)))
    with pytest.raises(ValueError, match=r"lacks the protein tokens \['<protein>'.*protllm\.processors\.build_processor"):
        ProtLLMProcessor(plain, build_protein_tokenizer("esm"))
    with pytest.raises(ValueError, match="protein tokenizer kind must be 'esm' or 'saprot', got 'esm2'"):
        build_protein_tokenizer("esm2")


FRESH_STRUCTURE_PROCESSOR = """
import json
import numpy as np
from transformers import AutoProcessor
folder, structure_file = {folder!r}, {structure!r}
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
out = processor(text="<protein>", proteins=[{{"structure": structure_file, "chain": "A"}}], return_tensors="np")
np.savez({out!r}, **{{k: out[k] for k in ("protein_input_ids", "protein_coords", "protein_coord_mask")}})
print(json.dumps({{"class": type(processor).__name__, "module": type(processor).__module__}}))
"""


def test_structure_processor_saves_and_loads_through_auto_processor_in_a_fresh_process(tmp_path, csa_file):
    processor = build_processor(str(smollm2_path(tokenizer_only=True)), processor_class=ProtLLMStructureProcessor,
                                max_protein_length=512)
    processor.register_for_auto_class()
    folder = tmp_path / "processor"
    processor.save_pretrained(folder)
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == "structure_processing_protllm.ProtLLMStructureProcessor"
    assert saved["processor_class"] == "ProtLLMStructureProcessor" and saved["max_protein_length"] == 512
    assert all((folder / name).is_file() for name in (*STRUCTURE_MODULES, "processing_protllm.py"))
    expected = processor(text="<protein>", proteins=[{"structure": str(csa_file), "chain": "A"}], return_tensors="np")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "fresh.npz"
    stdout = run_fresh_python(FRESH_STRUCTURE_PROCESSOR.format(folder=str(folder), structure=str(csa_file), out=str(out)),
                              cwd=elsewhere)
    loaded = json.loads(stdout.strip().splitlines()[-1])
    assert loaded["class"] == "ProtLLMStructureProcessor"
    assert loaded["module"].endswith("structure_processing_protllm")  # the folder's own copy, not this checkout's
    fresh = np.load(out)
    assert fresh["protein_coords"].shape == expected["protein_coords"].shape and expected["protein_coord_mask"].any()
    for key in ("protein_input_ids", "protein_coords", "protein_coord_mask"):
        np.testing.assert_array_equal(fresh[key], expected[key])


FRESH_SEQUENCE_FOLDER = """
import json
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained({folder!r}, trust_remote_code=True)
out = processor(text="<protein>", proteins=["MKTAYIAKQR"])
try:
    processor(text="<protein>", proteins=[{{"structure": {structure!r}}}])
    refused = None
except ValueError as error:
    refused = f"{{type(error).__name__}}: {{error}}"
print(json.dumps({{"class": type(processor).__name__, "protein_input_ids": out["protein_input_ids"], "refused": refused}}))
"""


def test_sequence_model_folder_carries_no_structure_code_and_loads_in_a_fresh_process(tmp_path, csa_file):
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm

    model, processor = build_tiny_protllm("llama")
    assert type(processor) is ProtLLMProcessor
    folder = save_model_folder(model, processor, tmp_path / "model")
    carried = sorted(path.name for path in folder.glob("*.py"))
    assert not set(STRUCTURE_MODULES) & set(carried), carried
    assert "processing_protllm.py" in carried
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == "processing_protllm.ProtLLMProcessor"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stdout = run_fresh_python(FRESH_SEQUENCE_FOLDER.format(folder=str(folder), structure=str(csa_file)), cwd=elsewhere)
    loaded = json.loads(stdout.strip().splitlines()[-1])
    assert loaded["class"] == "ProtLLMProcessor"
    assert loaded["protein_input_ids"] == processor(text="<protein>", proteins=["MKTAYIAKQR"])["protein_input_ids"]
    assert loaded["refused"].startswith("ProteinInputError: protein 0: got the structure file '1A05.pdb.gz'")
