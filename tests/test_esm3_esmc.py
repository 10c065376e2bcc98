"""ESM3 and ESM C (EvolutionaryScale's `esm` package) as ProtLLM protein encoders: esm3_protllm.py.

Tiny random configs of both architectures; structures are the real CSA enzyme files in ../shared/data. The esm
package is imported from its own folder next to fair-esm (the two both install a top-level `esm`).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import esm3_protllm
from protllm.testing import build_tiny_protllm, tiny_evolutionaryscale_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

pytestmark = pytest.mark.skipif(esm3_protllm.find_evolutionaryscale_esm() is None, reason="EvolutionaryScale's esm not installed (scripts/setup.sh)")


def messages(protein: dict, question: str = "What does this enzyme do?"):
    return [{"role": "user", "content": [{"type": "protein", **protein}, {"type": "text", "text": question}]}]


def tiny(backend, **kwargs):
    kwargs.setdefault("projector_type", "linear")
    return build_tiny_protllm(protein_encoder_backend=backend, protein_config=tiny_evolutionaryscale_config(backend), **kwargs)


@pytest.fixture(scope="module")
def csa_chain(shared_data):
    """Two short real CSA chains (full backbones as deposited): `((path, structure), (path, structure))`."""
    from structure_protllm import load_structure

    found = []
    for path in sorted((shared_data / "structures" / "csa_enzymes").glob("*.pdb.gz")):
        structure = load_structure(str(path))
        if 40 <= len(structure) <= 150 and structure.coord_mask.all():
            found.append((path, structure))
        if len(found) == 2:
            return tuple(found)
    pytest.skip("no short CSA chains")


def test_fair_esm_and_evolutionaryscale_side_by_side():
    import esm as fair_esm  # fair-esm, imported first

    package = esm3_protllm.evolutionaryscale_esm()
    import esm

    assert esm is fair_esm and hasattr(esm, "pretrained") and hasattr(esm.pretrained, "esm2_t6_8M_UR50D")
    assert sys.modules["evolutionaryscale_esm.models.esmc"] is package.models.esmc
    assert not any(name.startswith("esm.models") for name in sys.modules)  # EvolutionaryScale's names stay set aside
    fair, processor = build_tiny_protllm(protein_encoder_backend="fair-esm")
    esmc, _ = tiny("esmc")
    inputs = processor.apply_chat_template(messages({"sequence": "MKTAYIAKQRQISFVKSHFSRQ"}), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(fair(**inputs).logits).all() and torch.isfinite(esmc(**inputs).logits).all()


def test_missing_package_error_names_the_install_line(monkeypatch):
    monkeypatch.setattr(esm3_protllm, "_PACKAGE", None)
    monkeypatch.setattr(esm3_protllm, "find_evolutionaryscale_esm", lambda: None)
    with pytest.raises(ImportError) as error:
        tiny("esm3")
    message = str(error.value)
    assert "protein_encoder_backend='esm3'" in message and "--no-deps" in message and "esm==3.2.1.post1" in message
    assert "einops" in message and "PROTLLM_ESM_PATH" in message


def test_config_takes_the_esm_package_sizes_and_records_the_backend():
    from configuration_protllm import ProtLLMConfig

    model, _ = tiny("esm3")
    saved = json.loads(model.config.to_json_string())
    assert saved["protein_encoder_backend"] == "esm3"
    assert {k: saved["protein_config"][k] for k in ("d_model", "n_heads", "v_heads", "n_layers", "hidden_size")} == {
        "d_model": 32, "n_heads": 2, "v_heads": 2, "n_layers": 2, "hidden_size": 32}
    reloaded = ProtLLMConfig.from_dict(saved)
    assert reloaded.protein_config.structure_encoder == saved["protein_config"]["structure_encoder"]
    published = ProtLLMConfig(protein_encoder_backend="esmc", text_config={"model_type": "llama"})
    assert (published.protein_config.d_model, published.protein_config.n_layers) == (960, 30)  # esmc-300m
    with pytest.raises(ValueError, match="unknown keys"):
        ProtLLMConfig(protein_encoder_backend="esm3", protein_config={"d_model": 32, "n_heads": 2, "n_layer": 2, "v_heads": 2})
    with pytest.raises(Exception, match="protein_encoder_input must be .sequence."):
        ProtLLMConfig(protein_encoder_backend="esmc", protein_encoder_input="saprot", text_config={"model_type": "llama"})


@pytest.mark.parametrize("backend", ["esmc", "esm3"])
def test_wrapper_features_equal_the_esm_packages_own_forward(backend, csa_chain):
    package = esm3_protllm.evolutionaryscale_esm()
    model, processor = tiny(backend)
    wrapper = model.model.protein_encoder.esm
    (path, structure), _ = csa_chain
    sequence = structure.sequence
    ids = torch.tensor([package.utils.encoding.tokenize_sequence(sequence, package.tokenization.EsmSequenceTokenizer(), add_special_tokens=True).tolist()])
    assert ids.tolist() == processor.protein_tokenizer([sequence])["input_ids"]  # ESM-2 ids == esm package ids
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if backend == "esmc":
            reference = wrapper.model(sequence_tokens=ids)
            torch.testing.assert_close(wrapper(ids, mask), reference.embeddings, rtol=0, atol=0)
            torch.testing.assert_close(wrapper(ids, mask, feature_layer=1), reference.hidden_states[0], rtol=0, atol=0)
            return
        # ESM3 with a structure, as the SDK does it: ESM3.encode (tokenize_structure) then ESM3.logits -> forward.
        atom37 = torch.full((len(sequence), 37, 3), float("nan"))
        atom37[:, :3] = torch.as_tensor(structure.coords[:, :3], dtype=torch.float32)
        coords, _, structure_tokens = package.utils.encoding.tokenize_structure(
            atom37, wrapper.structure_encoder, package.tokenization.StructureTokenizer(), reference_sequence=sequence)
        reference = wrapper.model(sequence_tokens=ids, structure_tokens=structure_tokens[None], structure_coords=coords[None],
                                  average_plddt=torch.tensor(1.0), per_res_plddt=coords.isfinite().all(-1).any(-1).float()[None])
        backbone = torch.as_tensor(structure.coords, dtype=torch.float32)[None]
        coord_mask = torch.as_tensor(structure.coord_mask)[None]
        ours_tokens, _, _ = wrapper.structure_inputs(ids, backbone, coord_mask)
        assert torch.equal(ours_tokens[0, 1:-1], structure_tokens[1:-1])  # the same VQ-VAE codes per residue
        torch.testing.assert_close(wrapper(ids, mask, backbone, coord_mask), reference.embeddings, rtol=1e-5, atol=1e-5)
        sequence_only = wrapper.model(sequence_tokens=ids)  # the package's own defaults: no structure track
        torch.testing.assert_close(wrapper(ids, mask), sequence_only.embeddings, rtol=1e-5, atol=1e-5)


def test_esm3_structure_tokens_from_real_csa_structures_mask_missing_residues(csa_chain):
    constants = esm3_protllm.evolutionaryscale_esm().utils.constants.esm3
    model, processor = tiny("esm3")
    (path, structure), (other_path, other) = csa_chain
    batch = processor.apply_chat_template([messages({"structure": str(path)}), messages({"sequence": other.sequence})],
                                          add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    protein = {k: v for k, v in batch.items() if k.startswith("protein_")}
    assert protein["protein_coord_mask"][0, : len(structure)].all()  # the chat block's structure reached the batch
    wrapper = model.model.protein_encoder.esm
    # Residues without coordinates (here: every third one, as the processor marks unresolved residues).
    missing = torch.zeros_like(protein["protein_coord_mask"])
    missing[0, : len(structure) : 3] = True
    gapped = {**protein, "protein_coord_mask": protein["protein_coord_mask"] & ~missing}
    tokens, coords, plddt = wrapper.structure_inputs(protein["protein_input_ids"], gapped["protein_coords"], gapped["protein_coord_mask"])
    row, row_missing = tokens[0, 1 : 1 + len(structure)], missing[0, : len(structure)]
    assert (row[row_missing] == constants.STRUCTURE_MASK_TOKEN).all()  # no coordinates: ESM3's structure <mask>
    assert (row[~row_missing] < 64).all()  # codes of the tiny 64-code VQ-VAE
    assert torch.isnan(coords[0, 1 : 1 + len(structure)][row_missing]).all()
    assert torch.equal(plddt[0, 1 : 1 + len(structure)], (~row_missing).float())
    assert (tokens[1] == constants.STRUCTURE_MASK_TOKEN).all() and (plddt[1] == 0).all()  # sequence only
    with torch.no_grad():  # the structure reaches the features; the sequence-only protein is untouched by it
        with_structure = model.model.get_protein_features(**protein)
        with_gaps = model.model.get_protein_features(**gapped)
        without = model.model.get_protein_features(protein["protein_input_ids"], protein["protein_attention_mask"])
    n = len(structure)
    assert not torch.allclose(with_structure[:n], without[:n]) and not torch.allclose(with_gaps[:n], with_structure[:n])
    torch.testing.assert_close(with_structure[n:], without[n:])


@pytest.mark.parametrize("backend", ["esmc", "esm3"])
def test_batched_equals_one_at_a_time_generation_and_cached_features(backend, csa_chain):
    model, processor = tiny(backend)
    (path, structure), _ = csa_chain
    # ESM C reads no structure, so its processor reads no structure file: it is given the parsed chain.
    proteins = [{"structure": str(path) if backend == "esm3" else structure}, {"sequence": "MKTAYIAKQRQISFVK"}]
    batch = processor.apply_chat_template([messages(p) for p in proteins], add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for index, protein in enumerate(proteins):
            single = processor.apply_chat_template(messages(protein), add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            alone = model.generate(**single, max_new_tokens=4, do_sample=False)[:, single["input_ids"].shape[1] :]
            assert torch.equal(alone[0], batched[index])
        # Frozen encoder: precomputed residue states (what the feature cache stores) give the same logits.
        encoder = model.model.protein_encoder
        states, residue_mask = encoder(batch["protein_input_ids"], batch["protein_attention_mask"],
                                       batch.get("protein_coords"), batch.get("protein_coord_mask"))
        direct = model(**batch).logits
        text = {k: v for k, v in batch.items() if not k.startswith("protein_")}
        cached = model(**text, protein_embeds=states, protein_embeds_mask=residue_mask).logits
    assert torch.equal(direct, cached)
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())


def test_trainable_encoder_leaves_heads_and_structure_encoder_frozen():
    model, _ = tiny("esm3", freeze_protein_encoder=False, protein_feature_layer=1)
    trainable = {n for n, p in model.model.protein_encoder.named_parameters() if p.requires_grad}
    assert any(n.startswith("esm.model.transformer.blocks.0.") for n in trainable)
    assert not any(n.startswith(("esm.model.transformer.blocks.1.", "esm.model.output_heads.", "esm.structure_encoder.")) for n in trainable)
    model.train()
    assert not model.model.protein_encoder.esm.structure_encoder.training


RELOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoProcessor
folder, protein, out = {folder!r}, {protein!r}, {out!r}
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__name__ == "ProtLLMEvolutionaryScaleForConditionalGeneration", type(model)
assert type(model).__module__.endswith(".esm3_protllm"), type(model).__module__  # the folder's own code ran
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{{"role": "user", "content": [dict(protein, type="protein"), {{"type": "text", "text": "What does this enzyme do?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
from safetensors.torch import save_file
save_file({{"logits": logits.contiguous()}}, out)
esm = sys.modules.get("esm")
assert esm is None or hasattr(esm, "pretrained") and hasattr(esm.pretrained, "esm2_t6_8M_UR50D"), "esm is not fair-esm"
"""


@pytest.mark.parametrize("backend", ["esmc", "esm3"])
def test_save_and_reload_through_auto_classes_in_a_fresh_process_bit_identical(backend, tmp_path, csa_chain):
    """A saved ESM3 / ESM C folder names the optional module's subclasses in its auto_map, carries that module, and
    loads through the Auto classes in a process that cannot import the repository, with the same logits."""
    from fresh_process import run_fresh_python

    from protllm.model_folder import save_model_folder

    model, processor = tiny(backend)
    assert type(model).__name__ == "ProtLLMEvolutionaryScaleForConditionalGeneration"
    (path, structure), _ = csa_chain
    # ESM C reads no structure (its processor reads no structure file): it gets the chain's sequence.
    protein = {"structure": str(path)} if backend == "esm3" else {"sequence": structure.sequence}
    folder = save_model_folder(model, processor, tmp_path / "model")
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "esm3_protllm.ProtLLMEvolutionaryScaleForConditionalGeneration"
    assert auto_map["AutoModel"] == "esm3_protllm.ProtLLMEvolutionaryScaleModel"
    assert (folder / "esm3_protllm.py").is_file()
    inputs = processor.apply_chat_template(messages(protein), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    empty = tmp_path / "cwd"
    empty.mkdir()
    out = tmp_path / "logits.safetensors"
    run_fresh_python(RELOAD_SCRIPT.format(folder=str(folder), protein=protein, out=str(out)), cwd=empty, timeout=600)
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["logits"], expected)


def test_core_classes_refuse_an_evolutionaryscale_config_and_name_the_subclass():
    """The core model files carry no ESM3 code: building the core class for an esm3 / esmc config fails at once with
    the class to use, and our tooling (`causal_lm_class`) picks that subclass."""
    from configuration_protllm import ProtLLMConfig
    from esm3_protllm import ProtLLMEvolutionaryScaleForConditionalGeneration
    from modeling_protllm import ProtLLMForConditionalGeneration, ProtLLMModel
    from protllm.model_classes import causal_lm_class

    for backend in ("esm3", "esmc"):
        config = ProtLLMConfig(protein_encoder_backend=backend, protein_config=tiny_evolutionaryscale_config(backend),
                               text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 128})
        for core_class in (ProtLLMForConditionalGeneration, ProtLLMModel):
            with pytest.raises(ValueError, match=f"protein_encoder_backend='{backend}'.*esm3_protllm.ProtLLMEvolutionaryScaleForConditionalGeneration"):
                core_class(config)
        assert causal_lm_class(config) is ProtLLMEvolutionaryScaleForConditionalGeneration
    assert causal_lm_class(ProtLLMConfig(text_config={"model_type": "llama"})) is ProtLLMForConditionalGeneration


def test_other_backends_never_import_the_esm_package(tmp_path):
    script = textwrap.dedent("""
        import sys
        from protllm.testing import build_tiny_protllm
        build_tiny_protllm()
        assert not any(name.startswith("evolutionaryscale_esm") for name in sys.modules), "imported"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_load_weights_from_a_local_folder_in_evolutionaryscale_format(tmp_path):
    from protllm.building import load_evolutionaryscale_encoder
    from protllm.sharing.card import EVOLUTIONARYSCALE_LICENCES, resolve_license

    model, _ = tiny("esm3")
    wrapper = model.model.protein_encoder.esm
    weights = tmp_path / "snapshot" / "data" / "weights"
    weights.mkdir(parents=True)
    torch.save(wrapper.model.state_dict(), weights / "esm3_sm_open_v1.pth")
    torch.save(wrapper.structure_encoder.state_dict(), weights / "esm3_structure_encoder_v0.pth")
    loaded, protein_config = load_evolutionaryscale_encoder(tmp_path / "snapshot", "esm3", tiny_evolutionaryscale_config("esm3"))
    for name, tensor in wrapper.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert protein_config.v_heads == 2
    with pytest.raises(ValueError, match="esmc model"):
        load_evolutionaryscale_encoder("esmc-300m", "esm3")
    # Licences as the esm package's LICENSE.md states them (ESM C 300M open; ESM3 open small and ESM C 600M non-commercial).
    assert EVOLUTIONARYSCALE_LICENCES["esmc-300m"]["name"] == "Cambrian Open License Agreement"
    assert EVOLUTIONARYSCALE_LICENCES["esm3-sm-open-v1"]["name"] == EVOLUTIONARYSCALE_LICENCES["esmc-600m"]["name"] == "Cambrian Non-Commercial License Agreement"
    # The card names the encoder's own agreement next to the LLM's licence.
    licence, reason = resolve_license({"meta-llama/Llama-3.1-8B-Instruct": "llama3.1", "esm3-sm-open-v1": "other"})
    assert licence == "other" and "Cambrian Non-Commercial License Agreement" in reason


def test_stella_esm3_recipe_dry_runs_on_tiny_stand_ins(tmp_path, shared_data):
    import train_sft
    from protllm.training.recipe import load_recipe

    recipe = yaml.safe_load((REPO / "configs" / "stella_esm3.yaml").read_text())
    assert recipe["model"]["protein_encoder_backend"] == "esm3" and recipe["model"]["config"]["projector_type"] == "linear"
    assert recipe["model"]["config"]["freeze_protein_encoder"] and all(stage["feature_cache"] for stage in recipe["stages"])
    directory = shared_data / "structures" / "csa_enzymes"
    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as handle:
        for index, path in enumerate(sorted(directory.glob("*.pdb.gz"))[:4]):
            handle.write(json.dumps({"id": f"row{index}", "messages": messages({"structure": str(path)}) + [
                {"role": "assistant", "content": [{"type": "text", "text": "An enzyme."}]}]}) + "\n")
    recipe["model"].update(tiny="llama", protein_encoder=None, protein_config=tiny_evolutionaryscale_config("esm3"), dtype="float32")
    recipe["model"]["config"]["max_protein_length"] = 64
    recipe["data"].update(train=str(rows), max_length=512)
    recipe["data"].pop("train_split", None)
    recipe["output_dir"] = str(tmp_path / "out")
    recipe["training"].update(report_to="none", save_strategy="no", logging_steps=1, bf16=False, gradient_checkpointing=False)
    for stage in recipe["stages"]:
        stage["training"].update(max_steps=1, per_device_train_batch_size=2)
    path = tmp_path / "stella_esm3.yaml"
    path.write_text(yaml.safe_dump(recipe))
    load_recipe(path)
    assert train_sft.main(["--config", str(path), "--no_eval", "--use_cpu", "true"]) == 0
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["protein_encoder_backend"] == "esm3" and saved["protein_config"]["v_heads"] == 2


@pytest.mark.slow
def test_documented_install_line_works_in_a_fresh_venv(tmp_path):
    """The install line of esm3_protllm.py in a fresh venv (system site packages + this venv's, so torch and
    transformers are not reinstalled): EvolutionaryScale's esm lands in <prefix>/lib/protllm-esm3, transformers keeps
    its version, and both encoders build next to fair-esm."""
    import site
    import transformers

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "parent_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    target = venv / "lib" / "protllm-esm3"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "esm==3.2.1.post1"],
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    check = textwrap.dedent(f"""
        import esm, transformers, esm3_protllm
        assert transformers.__version__ == {transformers.__version__!r}
        assert str(esm3_protllm.find_evolutionaryscale_esm()) == {str(target)!r}
        from protllm.testing import build_tiny_protllm, tiny_evolutionaryscale_config
        for backend in ("esm3", "esmc"):
            build_tiny_protllm(protein_encoder_backend=backend, protein_config=tiny_evolutionaryscale_config(backend))
        assert hasattr(esm, "pretrained") and hasattr(esm.pretrained, "esm2_t6_8M_UR50D")  # fair-esm untouched
        print("ok")
    """)
    result = subprocess.run([str(python), "-c", check], cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
