"""Sharing: model cards, Hub pushes (HfApi patched), clean loads in a fresh process, LoRA adapters, bad input."""

import ast
import json
import re
import shutil
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

from fresh_process import run_fresh_python
from pipeline_protllm import ProteinFunctionPipeline
from protllm import sharing
from protllm.model_folder import load_model_folder, save_model_folder
from protllm.remote_code import CORE_CODE_FILES, OPTIONAL_CODE_FILES, ForeignCodeError, auto_map_problems
from protllm.sharing.__main__ import main as sharing_cli
from protllm.sharing.hub import _adapter_weights
from protllm.sharing.snippet import README_REPO_ID
from protllm.testing import build_tiny_protllm

REPO_ROOT = Path(__file__).resolve().parents[1]
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MSDNGPQNQRNAPRITFGGPSDSTGSNQNGERSGARSKQRRPQGLPNNTASWFTALTQHGK", "MALWMRLLPLLALLALWGPDPAAA"]
NEW = 8
REPO_ID = "protllm-test/tiny-llama"
TRAINING_ARGS = {
    "recipe": "demo", "language_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "protein_encoder": "facebook/esm2_t6_8M_UR50D",
    "datasets": ["protllm-test/swissprot-demo"], "seed": 0,
    "stages": [
        {"name": "align", "trainable": ["projector"], "num_train_epochs": 3, "learning_rate": 1e-3,
         "per_device_train_batch_size": 8, "logging_steps": 5},
        {"name": "instruct", "trainable": ["projector", "language_model"], "use_peft": True, "lora_r": 8,
         "lora_alpha": 16, "lora_target_modules": ["q_proj", "v_proj"], "num_train_epochs": 3, "learning_rate": 2e-4},
    ],
}


def metric(value, low=None, high=None):
    return {"value": value, "ci_low": low, "ci_high": high}


def predictor(rouge_l, bleu4):
    return {"family": "text", "primary": "rougeL", "counts": {"n_examples": 40},
            "metrics": {"rougeL": metric(rouge_l, rouge_l - 0.05, rouge_l + 0.05), "bleu4": metric(bleu4)},
            "by_identity_bin": {"<30%": {"n": 30, "rougeL": rouge_l - 0.1}, ">=90%": {"n": 10, "rougeL": rouge_l + 0.2}},
            "notes": []}


METRICS = {
    "header": {"data": "../shared/data/function/yeast_function.jsonl", "split": "test", "seed": 0},
    "tasks": {"function_text": {"family": "text", "n": 40, "predictors": {
        "tiny-model": predictor(0.31, 0.12), "retrieval": predictor(0.35, 0.15), "most_common": predictor(0.20, 0.01),
        "tiny-model+shuffled_proteins": predictor(0.22, 0.02)}}},
}


def ask(sequence, question="What is the function of this protein?"):
    return [{"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": question}]}]


def greedy(model, processor, conversations, new=NEW):
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=new, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def decode(processor, tokens):
    return [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_protllm("llama", projector_type="mlp2x_gelu")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny):
    """A Hub-ready folder, pushed with HfApi patched; what would have been uploaded is recorded."""
    model, processor = tiny
    folder = tmp_path_factory.mktemp("hub") / "tiny-model"
    save_model_folder(model, processor, folder)
    sharing.prepare_model_folder(folder, repo_id=REPO_ID, training_args=TRAINING_ARGS, metrics=METRICS)
    uploaded = {}

    def fake_upload(self, *, repo_id, folder_path, **kwargs):
        uploaded.update(repo_id=repo_id, kwargs=kwargs,
                        files=sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()))
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    with mock.patch.object(HfApi, "create_repo") as create_repo, mock.patch.object(HfApi, "upload_folder", fake_upload):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a card with eval results: no warning
            sharing.push_model_folder(folder, REPO_ID, private=True)
    create_repo.assert_called_once()
    assert create_repo.call_args.args == (REPO_ID,) and create_repo.call_args.kwargs["private"] is True
    return folder, uploaded


# ----- what would be uploaded -------------------------------------------------------------------------------

def test_push_uploads_weights_config_processor_code_and_card(shared):
    folder, uploaded = shared
    files = set(uploaded["files"])
    assert uploaded["repo_id"] == REPO_ID
    expected = {"model.safetensors", "config.json", "generation_config.json", "README.md", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "protein_tokenizer/vocab.txt",
                "protein_tokenizer/tokenizer_config.json", "pipeline_protllm.py", *CORE_CODE_FILES}
    assert expected <= files, expected - files
    assert files.isdisjoint(OPTIONAL_CODE_FILES), files & set(OPTIONAL_CODE_FILES)  # a sequence model uses none
    assert not any("__pycache__" in f for f in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_protllm.ProtLLMConfig",
                                  "AutoModel": "modeling_protllm.ProtLLMModel",
                                  "AutoModelForCausalLM": "modeling_protllm.ProtLLMForConditionalGeneration"}
    assert config["custom_pipelines"]["protein-function"]["impl"] == "pipeline_protllm.ProteinFunctionPipeline"
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == \
        "processing_protllm.ProtLLMProcessor"


def test_uploaded_remote_code_is_the_model_only(shared):
    """Issue 12: the code a released sequence model uploads (pipeline included) stays under 2,150 lines (1,995 at the
    issue's close, + the retrieval's composition fallback, per-field and by-question neighbours: 2,148) and holds no builder, converter or training code; the SEPIT
    and ESM3 modules are not part of it."""
    folder, uploaded = shared
    code = {name: (folder / name).read_text() for name in uploaded["files"] if name.endswith(".py")}
    assert set(code) == {*CORE_CODE_FILES, "pipeline_protllm.py"}, sorted(code)
    lines = sum(len(text.splitlines()) for text in code.values())
    assert lines < 2150, f"{lines} lines of remote code"
    # What the code defines and imports, not what its docstrings mention.
    defined, imported = set(), set()
    for text in code.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    tooling = [name for name in defined if re.search(r"collator|upcycl|from_tokenizers|build_processor|fair_esm_weights|"
                                                       r"from_pretrained_components|parameter_counts|trainer", name, re.I)]
    assert tooling == [], tooling
    assert imported.isdisjoint({"protllm", "trl", "peft", "datasets", "accelerate", "deepspeed"}), imported


def test_card_metadata_and_sections(shared):
    folder, _ = shared
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/esm2_t6_8M_UR50D"]
    assert data["license"] == "apache-2.0"  # apache-2.0 (SmolLM2) is more restrictive than mit (ESM-2)
    assert data["datasets"] == ["protllm-test/swissprot-demo"]
    assert {"protllm", "protein", "biology", "custom_code"} <= set(data["tags"])
    results = data["model-index"][0]["results"]
    values = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    assert values == {"rougeL": 0.31, "bleu4": 0.12}
    assert results[0]["dataset"] == {"name": "yeast_function", "type": "yeast_function", "split": "test",
                                     "config": "function_text"}
    text = card.text
    for needle in ("## Training", "Stage `align`", "Stage `instruct`", "`lora_r` | 8", "## Evaluation",
                   "retrieval (MMseqs2 nearest neighbour)", "this model, shuffled proteins", "## Limitations",
                   "Memorisation", "arXiv:2506.03800", "arXiv:2410.03553", f'repo = "{REPO_ID}"'):
        assert needle in text, needle
    row = next(line for line in text.splitlines() if line.startswith("| rougeL (primary)"))
    assert "0.310 [0.260, 0.360]" in row and "0.350 [0.300, 0.400]" in row  # the retrieval number beside the model's


def test_card_snippet_and_readme_section_are_the_same_code(shared):
    folder, _ = shared
    card_code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    doc_code = readme_snippet()
    assert card_code.strip() == sharing.usage_snippet(REPO_ID).strip()
    assert doc_code == sharing.usage_snippet(README_REPO_ID)


# ----- the exact uploaded folder, loaded where the repository is not importable -----------------------------

CLEAN_LOAD = """
import json, sys, torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, pipeline
folder = {folder!r}
assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "ProtLLMConfig"
assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "ProtLLMModel"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
msgs = [[{{"role": "user", "content": [{{"type": "protein", "sequence": s}}, {{"type": "text", "text": "What is the function of this protein?"}}]}}] for s in {seqs!r}]
inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
tokens = model.generate(**inputs, max_new_tokens={new}, do_sample=False)[:, inputs["input_ids"].shape[1]:]
pipe = pipeline("protein-function", model=folder, trust_remote_code=True)
assert type(pipe).__name__ == "ProteinFunctionPipeline" and type(pipe).__module__.startswith("transformers_modules")
answers = pipe({seqs!r}, batch_size=2, max_new_tokens={new})
print(json.dumps({{"tokens": tokens.tolist(), "pipeline": answers}}))
"""


def test_uploaded_folder_loads_in_a_clean_process_with_the_same_answers(shared, tiny, tmp_path):
    folder, _ = shared
    model, processor = tiny
    expected = greedy(model, processor, [ask(s) for s in SEQS])
    stdout = run_fresh_python(CLEAN_LOAD.format(folder=str(folder), seqs=SEQS, new=NEW), cwd=tmp_path)
    fresh = json.loads(stdout.strip().splitlines()[-1])
    assert fresh["tokens"] == expected.tolist()
    assert fresh["pipeline"] == [[{"generated_text": text}] for text in decode(processor, expected)]


def readme_snippet() -> str:
    """The python block of README.md's "Use a released model" section (protllm/sharing/snippet.py is its source)."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Use a released model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's 'Use a released model' section must hold exactly one python block"
    return blocks[0]


def test_readme_snippet_runs_in_a_clean_process(shared, tiny, tmp_path):
    folder, _ = shared
    model, processor = tiny
    snippet = readme_snippet()
    assert snippet.count(f'"{README_REPO_ID}"') == 1
    stdout = run_fresh_python(snippet.replace(f'"{README_REPO_ID}"', repr(str(folder))), cwd=tmp_path)
    # The same steps with the original model in this process.
    sequence = sharing.EXAMPLE_SEQUENCE
    messages = ask(sequence)
    first = processor.batch_decode(greedy(model, processor, [messages], 64), skip_special_tokens=True)[0]
    messages += [{"role": "assistant", "content": [{"type": "text", "text": first}]},
                 {"role": "user", "content": [{"type": "protein", "sequence": sequence[:80]},
                                              {"type": "text", "text": "And this fragment of it?"}]}]
    second = processor.batch_decode(greedy(model, processor, [messages], 64), skip_special_tokens=True)[0]
    pipe = ProteinFunctionPipeline(model=model, processor=processor, device="cpu")
    piped = pipe([sequence, {"sequence": sequence[:80], "question": "Where is this protein located?"}], batch_size=2,
                 max_new_tokens=64)
    expected = "\n".join([first, second] + [r[0]["generated_text"] for r in piped]) + "\n"
    assert stdout == expected


# ----- bad input ----------------------------------------------------------------------------------------------

@pytest.fixture
def copy_of(shared, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(shared[0], folder)
    return folder


@pytest.mark.parametrize("remove, named", [
    ("modeling_protllm.py", "remote-code file modeling_protllm.py"),
    ("encoder_protllm.py", "remote-code file encoder_protllm.py"),
    ("pipeline_protllm.py", "remote-code file pipeline_protllm.py"),
    ("model.safetensors", "weights: no *.safetensors file"),
    ("protein_tokenizer/vocab.txt", "processor file protein_tokenizer/vocab.txt"),
    ("config.json", "config.json (the model configuration)"),
])
def test_push_refuses_incomplete_folders_and_names_what_is_missing(copy_of, remove, named):
    (copy_of / remove).unlink()
    with mock.patch.object(HfApi, "create_repo") as create_repo, mock.patch.object(HfApi, "upload_folder") as upload:
        with pytest.raises(sharing.ModelFolderError, match=re.escape(named)):
            sharing.push_model_folder(copy_of, REPO_ID)
    create_repo.assert_not_called()
    upload.assert_not_called()


def test_push_names_an_optional_module_the_auto_map_needs_but_the_folder_lacks(copy_of):
    """A folder whose processor is the structure-reading subclass needs that module and what it imports."""
    processor_config = json.loads((copy_of / "processor_config.json").read_text())
    processor_config["auto_map"]["AutoProcessor"] = "structure_processing_protllm.ProtLLMStructureProcessor"
    (copy_of / "processor_config.json").write_text(json.dumps(processor_config))
    problems = sharing.check_model_folder(copy_of)
    assert "remote-code file structure_processing_protllm.py" in problems, problems
    # With the module copied in, what it imports is named next.
    shutil.copyfile(REPO_ROOT / "structure_processing_protllm.py", copy_of / "structure_processing_protllm.py")
    problems = sharing.check_model_folder(copy_of)
    assert "remote-code file structure_protllm.py" in problems, problems


def test_push_names_a_missing_auto_map_entry(copy_of):
    config = json.loads((copy_of / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (copy_of / "config.json").write_text(json.dumps(config))
    assert sharing.check_model_folder(copy_of) == ["config.json auto_map entry AutoModel"]


# A module that leaves a mark when anything imports it: the code an attacker's auto_map would have transformers run.
EVIL_MODULE = """
import pathlib
pathlib.Path(__file__).with_name("EVIL_CODE_RAN").touch()
class ProtLLMConfig: pass
"""


def _plant_foreign_auto_map(folder: Path, case: str) -> Path:
    """Point one code reference of `folder` outside our own files; returns where the attacker's module lies."""
    elsewhere = folder.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    for place in (elsewhere / "evil.py", folder.parent / "evil.py", folder / "evil.py"):
        place.write_text(EVIL_MODULE)
    config_file, key, ref = {
        "absolute path": ("config.json", "AutoConfig", f"{elsewhere}/evil.ProtLLMConfig"),
        "parent folder": ("config.json", "AutoModelForCausalLM", "../evil.ProtLLMConfig"),
        "other Hub repo": ("config.json", "AutoModel", "attacker/repo--modeling_protllm.ProtLLMModel"),
        "processor from a Hub repo": ("processor_config.json", "AutoProcessor",
                                      "attacker/repo--processing_protllm.ProtLLMProcessor"),
        "tokenizer module not ours": ("tokenizer_config.json", "AutoTokenizer", ["evil.ProtLLMConfig", None]),
        "pipeline from a Hub repo": ("config.json", "custom_pipelines", "attacker/repo--pipeline_protllm.X"),
    }[case]
    data = json.loads((folder / config_file).read_text())
    if key == "custom_pipelines":
        data["custom_pipelines"]["protein-function"]["impl"] = ref
    else:
        data.setdefault("auto_map", {})[key] = ref
    (folder / config_file).write_text(json.dumps(data))
    return elsewhere


FOREIGN_CASES = ["absolute path", "parent folder", "other Hub repo", "processor from a Hub repo",
                 "tokenizer module not ours", "pipeline from a Hub repo"]


@pytest.mark.parametrize("case", FOREIGN_CASES)
def test_push_and_load_refuse_an_auto_map_that_leaves_the_folder(copy_of, case):
    """Issue 15 item 2: only `<module>.<Class>` of our remote-code files inside the folder is accepted."""
    assert auto_map_problems(copy_of) == []
    _plant_foreign_auto_map(copy_of, case)
    problems = sharing.check_model_folder(copy_of)
    assert len(problems) == 1 and "auto_map" in problems[0], problems
    with mock.patch.object(HfApi, "create_repo") as create_repo, mock.patch.object(HfApi, "upload_folder") as upload:
        with pytest.raises(sharing.ModelFolderError, match="auto_map"):
            sharing.push_model_folder(copy_of, REPO_ID)
    create_repo.assert_not_called()
    upload.assert_not_called()
    with pytest.raises(ForeignCodeError, match="auto_map"):
        load_model_folder(copy_of)
    assert not list(copy_of.parent.rglob("EVIL_CODE_RAN"))


def test_eval_cli_refuses_a_model_folder_whose_auto_map_leaves_it(copy_of, tmp_path):
    """The contract: `python -m eval` with such a folder exits non-zero and names `auto_map`; nothing of it runs."""
    import subprocess
    import sys

    _plant_foreign_auto_map(copy_of, "absolute path")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "P1", "sequence": SEQS[0], "description": "Binds zinc."}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "eval", "--data", str(data), "--task", "function_text", "--predictor", str(copy_of),
         "--out", str(tmp_path / "eval"), "--no_progress", "--bootstrap", "0", "--no_identity"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "auto_map" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.rglob("EVIL_CODE_RAN"))


def test_merge_refuses_a_base_whose_auto_map_leaves_it(lora, tmp_path, capsys):
    base_folder, adapter, _ = lora
    base = tmp_path / "base"
    shutil.copytree(base_folder, base)
    _plant_foreign_auto_map(base, "other Hub repo")
    with pytest.raises(ForeignCodeError, match="auto_map"):
        sharing.merge_adapter(base, adapter, tmp_path / "merged")
    assert sharing_cli(["merge", str(base), str(adapter), str(tmp_path / "merged")]) == 2
    assert "auto_map" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_card_without_eval_results_warns(copy_of):
    sharing.write_model_card(copy_of, repo_id=REPO_ID, training_args=TRAINING_ARGS, metrics=None)
    card = ModelCard.load(copy_of / "README.md")
    assert "model-index" not in card.data.to_dict()
    assert "shared without evaluation results" in card.text
    with mock.patch.object(HfApi, "create_repo"), mock.patch.object(HfApi, "upload_folder") as upload:
        with pytest.warns(UserWarning, match="no evaluation results"):
            sharing.push_model_folder(copy_of, REPO_ID)
    upload.assert_called_once()


def test_card_states_the_warmup_perplexity_and_not_the_raw_summaries(copy_of):
    """A folder whose warm-up measured its held-out MLM perplexity: the card says before, after and the residue-frequency
    reference in a sentence; the stage summaries (long JSON) are not cut into a table cell."""
    summaries = [{"stage": "warmup", "mlm_corpus": {"sequences": 17899},
                  "mlm_perplexity": {"before": {"perplexity": 34.49, "sequences": 190}, "unigram_reference": 18.142,
                                     "after": {"perplexity": 17.73, "sequences": 190}}},
                 {"stage": "align", "steps": 4}]
    card = sharing.build_model_card(copy_of, repo_id=REPO_ID, training_args={**TRAINING_ARGS, "summaries": summaries},
                                    metrics=None).content
    assert ("masked-LM perplexity on 190 held-out proteins, 34.49 before and 17.73 after; residue frequencies alone "
            "give 18.14") in card
    assert "`summaries`" not in card and "Stage `align`" in card
    plain = sharing.build_model_card(copy_of, repo_id=REPO_ID, training_args=TRAINING_ARGS, metrics=None).content
    assert "masked-LM perplexity" not in plain  # no warm-up measured: no sentence


def test_card_states_the_retrieval_database(copy_of):
    from retrieval_protllm import RetrievalDatabase

    assert "## Retrieval" not in sharing.build_model_card(copy_of, repo_id=REPO_ID, training_args=TRAINING_ARGS).content
    database = RetrievalDatabase(
        [{"id": "P1", "sequence": "MKTAYIAKQR", "annotations": {"function_text": "A kinase."}},
         {"id": "P2", "sequence": "MSDNGPQNQR", "annotations": {"protein_name": "Toxin"}}],
        {"sources": ["data/demo"], "training": {"max_identity": 0.3, "exclusion": "leave_one_out"}})
    database.save(copy_of / "retrieval")
    card = sharing.build_model_card(copy_of, repo_id=REPO_ID, training_args=TRAINING_ARGS, metrics=None).content
    section = card.split("## Retrieval", 1)[1].split("\n## ", 1)[0]
    assert "2 proteins" in section and "`data/demo`" in section and "above 0.3 identity" in section
    assert "composition" not in section
    database.config["fallback"] = "composition"
    database.save(copy_of / "retrieval")
    card = sharing.build_model_card(copy_of, repo_id=REPO_ID, training_args=TRAINING_ARGS, metrics=None).content
    assert "the 3 proteins closest in amino-acid + dipeptide composition (cosine) are shown instead" in card
    assert "Per field" not in card
    database.config["per_field"] = True
    database.save(copy_of / "retrieval")
    card = sharing.build_model_card(copy_of, repo_id=REPO_ID, training_args=TRAINING_ARGS, metrics=None).content
    assert "the top 3 are found for each annotation field among the proteins that carry it" in card
    assert "By question" not in card
    database.config["task_fields"] = {"ec_number": "ec_number", "yes_no": "protein_name"}
    database.save(copy_of / "retrieval")
    card = sharing.build_model_card(copy_of, repo_id=REPO_ID, training_args=TRAINING_ARGS, metrics=None).content
    assert "questions of a task saw the closest proteins that carry its field (ec_number -> ec_number, yes_no -> " \
           "protein_name)" in card and 'retrieval_field=\\"ec_number\\"' not in card and 'retrieval_field="ec_number"' in card


def test_metrics_without_retrieval_baseline_are_flagged(copy_of):
    metrics = json.loads(json.dumps(METRICS))
    del metrics["tasks"]["function_text"]["predictors"]["retrieval"]
    card = sharing.build_model_card(copy_of, repo_id=REPO_ID, metrics=metrics)
    assert "No nearest-neighbour retrieval baseline was run" in card.text


def test_cli_card_and_push(copy_of, tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "args.json").write_text(json.dumps(TRAINING_ARGS))
    assert sharing_cli(["card", str(copy_of), "--metrics", str(tmp_path / "metrics.json"),
                         "--training-args", str(tmp_path / "args.json")]) == 0
    assert 'repo = "ORG/NAME"' in (copy_of / "README.md").read_text()
    with mock.patch.object(HfApi, "create_repo") as create_repo, mock.patch.object(HfApi, "upload_folder") as upload:
        assert sharing_cli(["push", str(copy_of), "--repo-id", "me/x", "--private"]) == 0
    assert create_repo.call_args.kwargs["private"] is True and upload.call_args.kwargs["repo_id"] == "me/x"
    assert 'repo = "me/x"' in (copy_of / "README.md").read_text()  # placeholder filled at push time
    capsys.readouterr()
    assert sharing_cli(["push", str(copy_of), "--repo-id", "me/x"]) == 1  # offline: a clear error, no traceback
    assert "offline mode is enabled" in capsys.readouterr().err
    (copy_of / "modeling_protllm.py").unlink()
    assert sharing_cli(["push", str(copy_of), "--repo-id", "me/x"]) == 2
    assert "modeling_protllm.py" in capsys.readouterr().err


@pytest.mark.parametrize("licences, expected", [
    ({"a/llm": "apache-2.0", "b/enc": "apache-2.0"}, "apache-2.0"),
    ({"a/llm": "apache-2.0", "b/enc": "mit"}, "apache-2.0"),
    ({"meta-llama/Llama-3.1-8B-Instruct": "llama3.1", "facebook/esm2_t33_650M_UR50D": "mit"}, "llama3.1"),
    ({"a/llm": "llama3.1", "b/enc": "gemma"}, "other"),
    ({"a/llm": "apache-2.0", "b/enc": None}, "other"),
    ({"a/llm": "cc-by-nc-4.0", "b/enc": "llama3"}, "cc-by-nc-4.0"),
    ({}, "other"),
])
def test_license_rule(licences, expected):
    assert sharing.resolve_license(licences)[0] == expected


def test_known_base_licences():
    assert sharing.base_license("meta-llama/Llama-3.1-8B-Instruct") == "llama3.1"
    assert sharing.base_license("facebook/esm2_t33_650M_UR50D") == "mit"
    assert sharing.base_license("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "apache-2.0"
    assert sharing.base_license("someone/unknown-model") is None


# ----- LoRA adapters ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora(shared, tmp_path_factory):
    """A LoRA adapter (q_proj, v_proj; projector in modules_to_save) trained-looking (random non-zero weights)."""
    from peft import LoraConfig, get_peft_model

    from modeling_protllm import ProtLLMForConditionalGeneration

    base_folder = shared[0]
    base = ProtLLMForConditionalGeneration.from_pretrained(base_folder).eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["projector"], init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    peft_model.eval()
    adapter = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(adapter)
    return base_folder, adapter, peft_model


def test_adapter_on_base_and_merged_model_give_the_same_generations(lora, tiny, tmp_path):
    from peft import PeftModel

    from modeling_protllm import ProtLLMForConditionalGeneration

    base_folder, adapter, peft_model = lora
    _, processor = tiny
    conversations = [ask(s) for s in SEQS]
    trained = greedy(peft_model, processor, conversations)
    assert not torch.equal(trained, greedy(tiny[0], processor, conversations)), "the adapter must change the answers"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_folder)

    reloaded = PeftModel.from_pretrained(ProtLLMForConditionalGeneration.from_pretrained(base_folder), str(adapter)).eval()
    assert torch.equal(greedy(reloaded, processor, conversations), trained)

    merged_folder = sharing.merge_adapter(base_folder, adapter, tmp_path / "merged", repo_id="me/merged",
                                          training_args=TRAINING_ARGS, metrics=METRICS)
    assert sharing.check_model_folder(merged_folder) == []
    merged = ProtLLMForConditionalGeneration.from_pretrained(merged_folder).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert torch.equal(greedy(merged, processor, conversations), trained)


def test_push_adapter_checks_the_base_and_uploads_projector_weights(lora):
    _, adapter, _ = lora
    uploaded = {}

    def fake_upload(self, *, repo_id, folder_path, **kwargs):
        uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        uploaded["config"] = json.loads((Path(folder_path) / "adapter_config.json").read_text())
        uploaded["card"] = (Path(folder_path) / "README.md").read_text()

    with mock.patch.object(HfApi, "model_info") as model_info, mock.patch.object(HfApi, "create_repo"), \
            mock.patch.object(HfApi, "upload_folder", fake_upload):
        sharing.push_adapter(adapter, "me/tiny-lora", base_repo_id=REPO_ID)
    model_info.assert_called_once_with(REPO_ID)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded["files"])
    assert uploaded["config"]["base_model_name_or_path"] == REPO_ID
    assert "library_name: peft" in uploaded["card"] and f"base_model: {REPO_ID}" in uploaded["card"]
    assert any(".projector." in key for key in _adapter_weights(adapter))


def _adapter_with_base(adapter, tmp_path, base):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def test_adapter_with_unknown_base_is_refused(lora, tmp_path):
    _, adapter, _ = lora
    unknown = _adapter_with_base(adapter, tmp_path, "nobody/no-such-model")
    missing = RepositoryNotFoundError("404", response=mock.Mock(status_code=404, headers={}))
    with mock.patch.object(HfApi, "model_info", side_effect=missing), \
            mock.patch.object(HfApi, "upload_folder") as upload:
        with pytest.raises(sharing.ModelFolderError, match="'nobody/no-such-model' is not a Hub repository"):
            sharing.push_adapter(unknown, "me/tiny-lora")
    upload.assert_not_called()
    # Offline (HF_HUB_OFFLINE=1 in tests), the base cannot be checked: also refused, saying so.
    with pytest.raises(sharing.ModelFolderError, match="cannot be checked offline"):
        sharing.push_adapter(unknown, "me/tiny-lora")
    with pytest.raises(sharing.ModelFolderError, match="neither an existing folder nor a Hub repository id"):
        sharing.push_adapter(_adapter_with_base(adapter, tmp_path / "x", "/no/such/base"), "me/tiny-lora")


def test_adapter_with_local_base_needs_a_repo_id(lora):
    _, adapter, _ = lora
    with mock.patch.object(HfApi, "upload_folder") as upload:
        with pytest.raises(sharing.ModelFolderError, match="names a local base .* pass base_repo_id"):
            sharing.push_adapter(adapter, "me/tiny-lora")
    upload.assert_not_called()


def test_adapter_without_projector_weights_is_refused(lora, tmp_path):
    from safetensors.torch import load_file, save_file

    _, adapter, _ = lora
    copy = _adapter_with_base(adapter, tmp_path, REPO_ID)
    weights = load_file(copy / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".projector." not in k}, copy / "adapter_model.safetensors")
    with pytest.raises(sharing.ModelFolderError, match="projector weights"):
        sharing.push_adapter(copy, "me/tiny-lora")


def test_model_index_keeps_tasks_of_one_evaluation_file_apart():
    """Regression: two tasks evaluated on one file were merged into a single model-index entry."""
    from huggingface_hub.repocard_data import eval_results_to_model_index

    def result(metric, value):
        return {"primary": metric, "family": "text" if metric == "rougeL" else "yes_no",
                "metrics": {metric: {"value": value, "ci_low": value, "ci_high": value}}, "counts": {"n_examples": 4}}

    metrics = {"header": {"data": "data/demo/test.jsonl"}, "tasks": {
        "protein_name": {"predictors": {"model": result("rougeL", 0.1)}},
        "yes_no": {"predictors": {"model": result("accuracy", 0.5)}}}}
    results, _ = sharing.evaluation_section(metrics, "model", model_predictor="model")
    index = eval_results_to_model_index("model", results)[0]["results"]
    assert [entry["task"]["name"] for entry in index] == ["protein protein_name", "protein yes_no"]
    assert [[m["type"] for m in entry["metrics"]] for entry in index] == [["rougeL"], ["accuracy"]]
