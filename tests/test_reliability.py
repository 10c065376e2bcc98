"""Reliability and security: interrupted work, atomic writes, safe loading, no network, resource bounds.

Every kill below is a real SIGKILL of a child process. The training SIGKILL/resume test lives in
tests/test_training.py (test_resume_after_sigkill_reaches_the_uninterrupted_weights) and is not repeated here.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import yeast_function_rows
import torch

REPO = Path(__file__).resolve().parents[1]
REMOTE_CODE_MODULES = ("configuration_protllm", "modeling_protllm", "moe_protllm", "sepit_protllm", "processing_protllm",
                       "structure_protllm", "pipeline_protllm")
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "MDLVNHLTDRLLFAIPKKGRLYSKSVS", "MSTNPKPQRKTKRNTNRRPQDVKFPGG",
             "MAHHHHHHVDDDDK", "MGSSHHHHHHSSGLVPRGSH", "MKVLAAGIVGLLLAQ", "MSDKIIHLTDDSFDTDVLK",
             "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO), **extra}


def _wait_for(predicate, process, what, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            out = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"the child ended (rc={process.returncode}) before {what}:\n{out[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def tiny():
    from protllm.testing import build_tiny_protllm

    return build_tiny_protllm("llama", seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny):
    from protllm.model_folder import save_model_folder

    model, processor = tiny
    return save_model_folder(model, processor, tmp_path_factory.mktemp("folder") / "tiny_model")


# ============================================================================ interrupted evaluation


def test_eval_killed_mid_way_resumes_without_recomputing_or_duplicating(tmp_path, tiny_folder, monkeypatch):
    from eval.__main__ import main
    from eval.generate import ModelPredictor, read_predictions

    n = 40
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"accession": f"P{i:03d}", "sequence": SEQUENCES[i % len(SEQUENCES)][: 12 + i % 9],
                                        "description": f"Binds zinc {i}", "split": "test"}) + "\n" for i in range(n)))
    args = ["--data", str(data), "--predictor", str(tiny_folder), "--max_new_tokens", "16", "--batch_size", "1",
            "--bootstrap", "0", "--no_meteor", "--no_progress", "--no_identity"]
    out = tmp_path / "killed"
    predictions = out / "predictions" / "function_text" / "tiny_model.jsonl"

    def lines():
        return predictions.read_text().count("\n") if predictions.exists() else 0

    process = subprocess.Popen([sys.executable, "-m", "eval", *args, "--out", str(out)], cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: lines() >= 5, process, "five predictions were written")
    _kill(process)
    before = predictions.read_text()
    done_before, _ = read_predictions(predictions)
    assert 5 <= len(done_before) < n, f"killed after {len(done_before)} of {n}: not mid-way"
    assert not (out / "metrics.json").exists()
    settings_before = (predictions.parent / "tiny_model.jsonl.settings.json").read_text()

    predicted = []
    real_predict = ModelPredictor.predict

    def counting_predict(self, examples):
        predicted.extend(e["id"] for e in examples)
        return real_predict(self, examples)

    monkeypatch.setattr(ModelPredictor, "predict", counting_predict)
    assert main([*args, "--out", str(out)]) == 0
    complete_before = before[: before.rfind("\n") + 1]  # a line torn by the kill is dropped and redone
    after = predictions.read_text()
    assert after.startswith(complete_before), "predictions written before the kill were rewritten"
    assert not set(predicted) & set(done_before), "done predictions were recomputed"
    assert len(predicted) == len(set(predicted)) == n - len(done_before)
    resumed_count = len(predicted)
    ids = [json.loads(line)["id"] for line in after.splitlines()]
    assert len(ids) == len(set(ids)) == n, "duplicated or missing predictions"
    assert (predictions.parent / "tiny_model.jsonl.settings.json").read_text() == settings_before

    # the resumed run gives what one uninterrupted run gives
    straight = tmp_path / "straight"
    assert main([*args, "--out", str(straight)]) == 0
    resumed, _ = read_predictions(predictions)
    uninterrupted, _ = read_predictions(straight / "predictions" / "function_text" / "tiny_model.jsonl")
    assert resumed == uninterrupted
    print(f"\neval SIGKILL: killed after {len(done_before)}/{n} predictions; resume predicted {resumed_count} "
          f"(none of the done ones), {len(ids)} unique lines, equal to an uninterrupted run")


# ============================================================================ atomic feature cache and dataset builds


_CACHE_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import safetensors.torch
    from protllm.testing import build_tiny_protllm
    from protllm.training.collator import ProtLLMDataCollator
    from protllm.training.feature_cache import FeatureCache

    root, mode = sys.argv[1], sys.argv[2]
    sequences = sys.argv[3].split(",")
    model, processor = build_tiny_protllm("llama", seed=0)
    rows = [{"instruction": "What does it do?", "input": s, "output": "It binds zinc."} for s in sequences]
    cache = FeatureCache(root, model)
    real_save = safetensors.torch.save_file
    calls = [0]

    def save_file(tensors, filename, metadata=None):
        calls[0] += 1
        if mode == "kill" and calls[0] == 3:  # the third file: write half of it, then hang until killed
            real_save(tensors, filename, metadata=metadata)
            data = open(filename, "rb").read()
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            print("MIDWRITE", filename, flush=True)
            time.sleep(600)
        if mode == "race":  # a slow file system (NFS on a cluster): the two writers of a key overlap in time
            real_save(tensors, filename, metadata=metadata)
            data = open(filename, "rb").read()
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                time.sleep(0.05)
                handle.write(data[len(data) // 2 :])
            return None
        return real_save(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = save_file
    if mode == "race":  # start together with the other process
        print("READY", flush=True)
        while not os.path.exists(sys.argv[4]):
            time.sleep(0.001)
    written = cache.precompute(rows, ProtLLMDataCollator(processor), batch_size=1)
    # every file this process can see must load (a reader racing a writer must never see a torn file)
    for path in cache.directory.rglob("*.safetensors"):
        safetensors.torch.load_file(path)
    print("WRITTEN", written, flush=True)
    """
)


def _reference_states(model, processor, sequences):
    """Encoder residue states per cache key, computed in this process one protein at a time."""
    from protllm.training.feature_cache import FeatureCache

    states = {}
    for sequence in sequences:
        batch = processor(text="<protein>", proteins=[sequence], return_tensors="pt")
        ids = batch["protein_input_ids"][0]
        with torch.no_grad():
            residue_states, mask = model.model.protein_encoder(batch["protein_input_ids"], batch["protein_attention_mask"])
        states[FeatureCache.key(ids, None, None)] = residue_states[0, : int(mask[0].sum())]
    return states


def test_feature_cache_killed_mid_write_leaves_nothing_trusted(tmp_path, tiny):
    from safetensors.torch import load_file

    from protllm.training.collator import ProtLLMDataCollator
    from protllm.training.feature_cache import FeatureCache

    model, processor = tiny
    sequences = SEQUENCES[:6]
    root = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", _CACHE_CHILD, str(root), "kill", ",".join(sequences)],
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    while "MIDWRITE" not in line:  # tqdm writes \r-separated bars on the same line
        line = process.stdout.readline()
        assert line or process.poll() is None, "the child ended before writing"
    _kill(process)

    cache = FeatureCache(root, model)
    reference = _reference_states(model, processor, sequences)
    trusted = sorted(cache.directory.rglob("*.safetensors"))
    assert len(trusted) == 2, f"exactly the two finished files are visible, got {[p.name for p in trusted]}"
    for path in trusted:  # what a later run trusts is complete and correct
        assert torch.equal(load_file(path)["states"], reference[path.stem])
    # the later run recomputes only what the killed one did not finish, then every protein loads
    rows = [{"instruction": "What does it do?", "input": s, "output": "It binds zinc."} for s in sequences]
    assert cache.precompute(rows, ProtLLMDataCollator(processor), batch_size=1) == len(sequences) - 2
    for key, states in reference.items():
        assert torch.equal(load_file(cache.path(key))["states"], states)
    leftovers = [p.name for p in cache.directory.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
    print(f"\nfeature cache SIGKILL mid-write: 2 complete files trusted, torn write left only {leftovers} (never read)")


def test_two_processes_filling_one_cache_directory(tmp_path, tiny):
    from safetensors.torch import load_file

    from protllm.training.feature_cache import FeatureCache

    model, processor = tiny
    sequences = SEQUENCES
    root, go = tmp_path / "shared_cache", tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", _CACHE_CHILD, str(root), "race", ",".join(sequences), str(go)],
                                 cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
    for child in children:
        line = ""
        while "READY" not in line:
            line = child.stdout.readline()
            assert line or child.poll() is None, "a child ended before the start"
    go.touch()
    outputs = [child.communicate(timeout=300)[0] for child in children]
    for child, output in zip(children, outputs):
        assert child.returncode == 0, output[-3000:]
    written = [int(output.split("WRITTEN")[-1].split()[0]) for output in outputs]

    cache = FeatureCache(root, model)
    reference = _reference_states(model, processor, sequences)
    files = sorted(cache.directory.rglob("*"))
    assert sorted(p.stem for p in files if p.is_file()) == sorted(reference), f"stray files: {files}"
    for key, states in reference.items():
        assert torch.equal(load_file(cache.path(key))["states"], states)
    assert sum(written) >= len(sequences)
    print(f"\ntwo processes, one cache: wrote {written} files ({sum(written) - len(sequences)} written by both), "
          f"{len(reference)} identical loadable files, no temporary left")


_SAVE_CHILD = textwrap.dedent(
    """
    import sys, time
    import datasets
    from data.card import save_atomic

    real = datasets.Dataset.save_to_disk
    calls = [0]

    def save_to_disk(self, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the first split is on disk, the second is being written: hang until killed
            print("MIDWRITE", path, flush=True)
            time.sleep(600)
        return real(self, path, *args, **kwargs)

    datasets.Dataset.save_to_disk = save_to_disk
    new = datasets.DatasetDict(train=datasets.Dataset.from_dict({"id": ["new-1", "new-2"]}),
                               test=datasets.Dataset.from_dict({"id": ["new-3"]}))
    save_atomic(new, sys.argv[1], extra_files={"README.md": "new card"})
    """
)


def test_dataset_build_killed_mid_write_keeps_the_previous_build(tmp_path):
    import datasets

    from data.card import save_atomic

    out = tmp_path / "built"
    old = datasets.DatasetDict(train=datasets.Dataset.from_dict({"id": ["old-1"]}),
                               test=datasets.Dataset.from_dict({"id": ["old-2"]}))
    save_atomic(old, out, extra_files={"README.md": "old card"})
    process = subprocess.Popen([sys.executable, "-c", _SAVE_CHILD, str(out)], cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    while "MIDWRITE" not in line:  # tqdm writes \r-separated bars on the same line
        line = process.stdout.readline()
        assert line or process.poll() is None, "the child ended before writing"
    _kill(process)
    loaded = datasets.load_from_disk(str(out))  # what a later run trusts: still the previous, complete build
    assert loaded["train"]["id"] == ["old-1"] and loaded["test"]["id"] == ["old-2"]
    assert (out / "README.md").read_text() == "old card"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "built")
    assert all(name.startswith(".built.tmp-") for name in leftovers), leftovers
    # and the next build replaces it completely
    new = datasets.DatasetDict(train=datasets.Dataset.from_dict({"id": ["new-1", "new-2"]}),
                               test=datasets.Dataset.from_dict({"id": ["new-3"]}))
    save_atomic(new, out, extra_files={"README.md": "new card"})
    assert datasets.load_from_disk(str(out))["test"]["id"] == ["new-3"]
    print(f"\ndataset build SIGKILL mid-write: previous build intact; hidden temporary left: {leftovers}")


# ============================================================================ safe loading


_SKIP_DIRS = {".venv", ".git", "outputs", "__pycache__", ".cache", "build", "dist", ".hypothesis", ".whl"}
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# The only places that may write pickles, each for a reason outside our control: transformers' own vendored tests
# check torch.save compatibility, and EvolutionaryScale publishes its weights as torch pickles (.pth), so the loader
# test writes tiny weights in that format (the loader reads them with weights_only=True).
_ALLOWED_PICKLE_WRITES = {"tests/transformers_common/test_modeling_common.py", "tests/test_esm3_esmc.py"}


def unsafe_serialisation(source: str, filename: str = "<string>") -> list[str]:
    """Calls that load or write pickles: torch.load without weights_only=True, torch.save, pickle-family modules,
    numpy allow_pickle=True, save_pretrained(safe_serialization=False)."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in _PICKLE_MODULES:
                    problems.append(f"{where}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}

        def is_true(key):
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

        if owner == "torch" and name == "load" and not is_true("weights_only"):
            problems.append(f"{where}: torch.load without weights_only=True")
        if owner == "torch" and name == "save":
            problems.append(f"{where}: torch.save writes a pickle")
        if owner in ("np", "numpy") and name == "load" and "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
            problems.append(f"{where}: numpy.load with allow_pickle")
        if name == "save_pretrained" and "safe_serialization" in keywords and not is_true("safe_serialization"):
            problems.append(f"{where}: save_pretrained without safetensors")
    return problems


def test_no_pickle_loading_or_writing_anywhere_in_the_repository():
    # the scanner itself catches each pattern
    for bad in ["import torch\ntorch.load(p)", "torch.load(p, weights_only=False)", "torch.save(model, p)",
                "import pickle", "from dill import dumps", "np.load(p, allow_pickle=True)",
                "model.save_pretrained(d, safe_serialization=False)", "import joblib\njoblib.dump(m, p)"]:
        assert unsafe_serialisation(bad), bad
    assert not unsafe_serialisation("torch.load(p, weights_only=True)\nnp.load(p)\nsave_file(t, p)")
    problems, scanned = [], 0
    for path in sorted(REPO.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(REPO).parts[:-1]):
            continue
        if path.name == Path(__file__).name:
            continue  # this file spells the patterns out
        scanned += 1
        found = unsafe_serialisation(path.read_text(), str(path.relative_to(REPO)))
        problems += [p for p in found if not (p.split(":")[0] in _ALLOWED_PICKLE_WRITES and p.endswith("torch.save writes a pickle"))]
    assert scanned > 40
    assert not problems, "\n".join(problems)


def test_saved_model_folder_holds_no_pickle(tiny_folder):
    suffixes = {p.suffix for p in tiny_folder.rglob("*") if p.is_file()}
    assert ".safetensors" in suffixes
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, suffixes


_IMPORT_AUDIT = textwrap.dedent(
    """
    import ast, importlib, json, os, socket, sys
    sys.dont_write_bytecode = True
    repo, names = sys.argv[1], sys.argv[2].split(",")
    sys.path.insert(0, repo)

    # Import what the modules import from elsewhere first: only the modules' own effects are audited.
    for name in names:
        tree = ast.parse(open(os.path.join(repo, name + ".py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps = [node.module]
            else:
                continue
            for dep in deps:
                if dep.split(".")[0] not in names:  # the modules themselves are what is audited
                    try:
                        importlib.import_module(dep)
                    except ImportError:
                        pass

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    WATCHED = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
               "pty.spawn", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.bind",
               "urllib.Request", "http.client.connect", "os.mkdir", "os.rename", "os.remove", "os.rmdir",
               "os.truncate", "os.symlink", "os.link", "os.chmod", "shutil.rmtree", "shutil.copyfile", "shutil.move")
    events = []

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            if (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and flags & WRITE_FLAGS):
                events.append(["open for writing", str(path)])
        elif event in WATCHED:
            events.append([event, repr(args)[:160]])

    def no_network(*args, **kwargs):
        raise OSError("network access during import")

    socket.socket.connect = socket.socket.connect_ex = no_network
    socket.create_connection = socket.getaddrinfo = no_network
    sys.addaudithook(audit)
    with open(os.devnull, "w"):  # canary: the hook sees writes
        pass
    assert events == [["open for writing", os.devnull]], events
    events.clear()
    for name in names:
        importlib.import_module(name)
    print(json.dumps(events))
    """
)


def _audit_import(directory, names):
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-B", "-c", _IMPORT_AUDIT, str(directory), ",".join(names)],
                            cwd=directory, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_remote_code_has_no_side_effects(tmp_path):
    # the audit catches a module that writes, spawns or connects at import time
    (tmp_path / "canary_protllm.py").write_text(
        "import socket, subprocess\nopen(__file__ + '.log', 'a').close()\nsubprocess.run(['true'])\n"
        "try:\n    socket.create_connection(('example.org', 80), timeout=1)\nexcept OSError:\n    pass\n")
    caught = {event for event, _ in _audit_import(tmp_path, ["canary_protllm"])}
    assert {"open for writing", "subprocess.Popen"} <= caught, caught
    # the real remote-code modules: definitions only
    assert _audit_import(REPO, list(REMOTE_CODE_MODULES)) == []


def _edit_config(folder: Path, target: Path, edit) -> Path:
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


CONFIG_EDITS = {  # change -> (edit, who catches it)
    "more_llm_layers": (lambda c: c["text_config"].update(num_hidden_layers=3), "ours"),  # missing keys
    "fewer_llm_layers": (lambda c: c["text_config"].update(num_hidden_layers=1), "ours"),  # unexpected keys
    # The core classes refuse a config that asks for SEPIT's structure bias: it lives in the optional sepit module.
    "structure_bias_on": (lambda c: c.update(use_structure_bias=True), "class"),
    "fewer_encoder_layers": (lambda c: c["protein_config"].update(num_hidden_layers=1), "transformers"),  # contact head size
    "wider_encoder": (lambda c: c["protein_config"].update(intermediate_size=128), "transformers"),  # size mismatch
}


@pytest.mark.parametrize("change", sorted(CONFIG_EDITS))
def test_config_that_disagrees_with_weights_fails_clearly(tmp_path, tiny_folder, change):
    from transformers import AutoModelForCausalLM

    edit, catcher = CONFIG_EDITS[change]
    folder = _edit_config(tiny_folder, tmp_path / change, edit)
    with pytest.raises((ValueError, RuntimeError)) as caught:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    message = str(caught.value)
    if catcher == "ours":  # transformers alone only warns and returns a partly random model
        assert isinstance(caught.value, ValueError) and message.startswith(f"{folder}: the weights do not match config.json")
        assert "Refusing a partial load" in message and "model." in message  # names the offending tensors
    elif catcher == "class":
        assert isinstance(caught.value, ValueError) and "use_structure_bias" in message and "sepit_protllm" in message
    else:
        assert "ignore_mismatched_sizes" in message or "size mismatch" in message, message


def test_matching_folder_still_loads_with_both_auto_classes(tiny_folder, tiny):
    from transformers import AutoModel, AutoModelForCausalLM

    model, _ = tiny
    loaded = AutoModelForCausalLM.from_pretrained(tiny_folder, trust_remote_code=True)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    AutoModel.from_pretrained(tiny_folder, trust_remote_code=True)


# ============================================================================ no network


def test_socket_guard_fails_a_non_loopback_connection():
    for family, address in ((socket.AF_INET, ("93.184.216.34", 80)), (socket.AF_INET6, ("2606:2800:220:1::", 80))):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            with pytest.raises(RuntimeError, match="network access attempted during tests"):
                sock.connect(address)
            with pytest.raises(RuntimeError, match="network access attempted during tests"):
                sock.connect_ex(address)
    with pytest.raises(RuntimeError, match="network access attempted during tests"):
        socket.create_connection(("93.184.216.34", 443), timeout=1)
    # loopback stays usable (test servers)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# ============================================================================ resource bounds


_LONG_PROTEIN_CHILD = textwrap.dedent(
    """
    import json, resource, sys, warnings
    import numpy as np, torch
    from protllm.testing import build_tiny_protllm

    structure = sys.argv[1] == "structure"
    model, processor = build_tiny_protllm("llama", seed=0, use_structure_bias=structure)
    rng = np.random.default_rng(0)
    sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 5000))
    def spec(seq):
        if not structure:
            return seq
        ca = np.cumsum(rng.normal(size=(len(seq), 3)) * 2.2, axis=0)
        coords = np.stack([ca - 1.0, ca, ca + 1.0, ca + 2.0], axis=1)
        return {"sequence": seq, "structure": {"coords": coords, "sequence": seq}}
    def run(seq):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = processor(text="<protein> What does this protein do?", proteins=[spec(seq)], return_tensors="pt")
        with torch.no_grad():
            model(**batch)
        return batch, [str(w.message) for w in caught]
    def peak_rss_kib():
        # VmHWM is this process image's own peak; ru_maxrss can carry the parent's peak over fork + exec
        try:
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(sequence[:50])  # warm-up: allocator and lazy imports do not count
    before = peak_rss_kib()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        batch, messages = run(sequence)
    after = peak_rss_kib()
    # torch allocator peak: the "Total Allocated" counter of the trace (live bytes), minus its starting value
    import os, tempfile
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        events = json.load(open(os.path.join(tmp, "trace.json")))["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    torch_peak = max(m["Total Allocated"] for m in memory) - (memory[0]["Total Allocated"] - memory[0]["Bytes"])
    processor.protein_overflow = "error"
    try:
        processor(text="<protein>", proteins=[sequence])
        refused = None
    except ValueError as error:
        refused = f"{type(error).__name__}: {error}"
    print(json.dumps({"protein_tokens": list(batch["protein_input_ids"].shape), "text_tokens": list(batch["input_ids"].shape),
                      "warnings": messages, "peak_rss_growth_mb": round((after - before) / 1024, 1),
                      "torch_peak_mb": round(torch_peak / 2**20, 1), "has_coords": "protein_coords" in batch,
                      "peak_rss_mb": round(after / 1024, 1), "refused": refused,
                      "max_protein_length": processor.max_protein_length}))
    """
)


@pytest.mark.parametrize("kind", ["sequence", "structure"])
def test_5000_residue_protein_is_cropped_with_bounded_memory(kind):
    result = subprocess.run([sys.executable, "-c", _LONG_PROTEIN_CHILD, kind], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    cap = info["max_protein_length"]
    assert cap == 1024
    assert info["protein_tokens"] == [1, cap + 2]  # <cls> + 1024 residues + <eos>
    assert info["has_coords"] == (kind == "structure")
    assert any("5000 residues cropped to max_protein_length=1024" in w for w in info["warnings"])
    assert info["refused"] == "ProteinInputError: protein 0: 5000 residues exceed max_protein_length=1024"
    assert info["peak_rss_growth_mb"] < 1024 and 0 < info["torch_peak_mb"] < 1024, info
    print(f"\n5,000-residue protein ({kind}): cropped to {cap}; processor + tiny forward: torch allocator peak "
          f"{info['torch_peak_mb']} MB, peak RSS growth {info['peak_rss_growth_mb']} MB (process peak {info['peak_rss_mb']} MB)")


def test_a_batch_that_does_not_fit_is_split_not_crashed(tmp_path, tiny):
    from eval.generate import ModelPredictor, run_generation

    model, processor = tiny
    real_generate = model.generate
    sizes = []

    def generate(**kwargs):
        size = kwargs["input_ids"].shape[0]
        sizes.append(size)
        if size > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB (batch of {size})")
        return real_generate(**kwargs)

    examples = [{"id": f"ex{i}", "task": "function_text", "question": "What is the function of this protein?",
                 "proteins": [{"sequence": SEQUENCES[i % len(SEQUENCES)]}], "reference": "", "meta": {}} for i in range(7)]
    predictor = ModelPredictor("tiny", model=model, processor=processor, max_new_tokens=5)
    model.generate = generate
    try:
        out = run_generation(predictor, examples, tmp_path / "p.jsonl", batch_size=7, progress=False)
        assert sizes[0] == 7 and max(sizes[1:]) <= 4 and 1 <= min(sizes)
        assert sum(s for s in sizes if s <= 2) == 7  # every example was generated exactly once, in batches that fit
        model.generate = real_generate
        single = {ex["id"]: predictor.predict([ex])[0] for ex in examples}
        assert out == single
        # one example that does not fit is an error, not an endless split
        model.generate = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            predictor.predict(examples[:1])
        # other errors are not mistaken for memory errors
        model.generate = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
        with pytest.raises(RuntimeError, match="shape mismatch"):
            predictor.predict(examples[:4])
    finally:
        model.generate = real_generate


# ============================================================================ round two (issue 15)


def _function_rows(path: Path, n: int, bad: dict | None = None) -> Path:
    """`n` raw function rows (P000, P001...) as JSONL; `bad` maps a row index to the sequence it gets instead."""
    rows = [{"accession": f"P{i:03d}", "sequence": (bad or {}).get(i, SEQUENCES[i % len(SEQUENCES)][:16]),
             "description": f"Binds zinc {i}", "split": "test"} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_after_retraining_into_the_same_folder_predicts_again(tmp_path, tiny):
    """Stale evaluation: the resume key includes a fingerprint of the weights and config, not only the path."""
    from eval.__main__ import main
    from eval.generate import read_predictions
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm

    model, processor = tiny
    folder = save_model_folder(model, processor, tmp_path / "model")
    data = _function_rows(tmp_path / "d.jsonl", 4)
    # With the shuffled-protein control, whose settings hold the model's under `inner` (`make demo` run twice).
    args = ["--data", str(data), "--predictor", str(folder), "--shuffled_proteins", "--max_new_tokens", "6",
            "--bootstrap", "0", "--no_meteor", "--no_progress", "--no_identity"]
    predictions = tmp_path / "out" / "predictions" / "function_text" / "model.jsonl"
    control = tmp_path / "out" / "predictions" / "function_text" / "model+shuffled_proteins.jsonl"
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    first, _ = read_predictions(predictions)

    retrained, retrained_processor = build_tiny_protllm("llama", seed=1)  # "retrained with another seed"
    save_model_folder(retrained, retrained_processor, folder)
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert main([*args, "--out", str(tmp_path / "fresh")]) == 0
    resumed, _ = read_predictions(predictions)
    fresh, _ = read_predictions(tmp_path / "fresh" / "predictions" / "function_text" / "model.jsonl")
    assert fresh != first, "the two models answer alike: the test cannot tell stale from fresh"
    assert resumed == fresh, "predictions of the previous model were reported for the retrained one"
    fresh_control, _ = read_predictions(tmp_path / "fresh" / "predictions" / "function_text" / "model+shuffled_proteins.jsonl")
    assert read_predictions(control)[0] == fresh_control
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    fresh_metrics = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    assert metrics["tasks"] == fresh_metrics["tasks"]


@pytest.fixture(scope="module")
def yeast_rows(tmp_path_factory, shared_data):
    """Short real yeast function rows for the tiny training runs below."""
    return yeast_function_rows(shared_data, max_residues=80, max_description_chars=60, count=16)


def _recipe(path: Path, rows_file: Path, stages, tiny="llama", **data) -> Path:
    import yaml

    recipe = {"output_dir": str(path.parent / "out"), "seed": 0,
              "model": {"tiny": tiny, "config": {"projector_type": "mlp2x_gelu", "max_protein_length": 96}},
              "data": {"train": str(rows_file), "max_length": 192, **data},
              "training": {"per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3},
              "stages": stages}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_warmup_checkpoints_with_tied_embeddings_and_resume_skips_a_broken_checkpoint(tmp_path, yeast_rows):
    """The README's kill/resume flow on the warm-up stage of a model whose lm_head is tied to embed_tokens (qwen2,
    like SmolLM2): checkpoints save, and a checkpoint folder a failed save left behind does not break the resume."""
    import train_sft

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in yeast_rows))
    stages = [{"name": "warmup", "training": {"max_steps": 2, "save_strategy": "steps", "save_steps": 1}}]
    recipe = _recipe(tmp_path / "recipe.yaml", rows, stages, tiny="qwen2")
    assert train_sft.main(["--config", str(recipe), "--no_eval", "--tiny", "qwen2"]) == 0
    trainer_dir = tmp_path / "out" / "stages" / "warmup" / "trainer"
    assert (trainer_dir / "checkpoint-2" / "trainer_state.json").is_file()

    # a later run was killed (or failed) while writing checkpoint-9: the folder exists, incomplete
    (trainer_dir / "checkpoint-9").mkdir()
    (trainer_dir / "checkpoint-9" / "model.safetensors").write_bytes(b"")
    (tmp_path / "out" / "stages" / "warmup" / "stage_complete.json").unlink()
    assert train_sft.main(["--config", str(recipe), "--no_eval", "--tiny", "qwen2", "--resume_from_checkpoint"]) == 0
    assert not (trainer_dir / "checkpoint-9").exists(), "the incomplete checkpoint was left for the next resume"
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_a_failed_checkpoint_save_leaves_no_folder(tmp_path, tiny):
    """A save that raises half-way removes the checkpoint folder it started, so --resume_from_checkpoint works."""
    from protllm.training.trainers import RemoveFailedCheckpoint  # noqa: F401 - the mechanism under test
    from protllm.training.warmup import WarmupCollator, WarmupHeads, WarmupModel, make_warmup_trainer
    from transformers import TrainingArguments

    model, processor = tiny
    heads = WarmupHeads(model.config.protein_config, model.config.text_config.hidden_size)
    wrapper = WarmupModel(model, heads, {"contrastive": 1.0, "mlm": 1.0, "denoise": 1.0})
    rows = [{"messages": [{"role": "user", "content": [{"type": "protein", "sequence": s}, {"type": "text", "text": "?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "a kinase"}]}]} for s in SEQUENCES[:4]]
    args = TrainingArguments(str(tmp_path / "trainer"), max_steps=1, save_strategy="steps", save_steps=1, use_cpu=True,
                             report_to="none", per_device_train_batch_size=2, remove_unused_columns=False)
    trainer = make_warmup_trainer(wrapper, args, rows, WarmupCollator(processor))

    def failing_save(*_, **__):
        os.makedirs(tmp_path / "trainer" / "checkpoint-1", exist_ok=True)
        (tmp_path / "trainer" / "checkpoint-1" / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    trainer.save_model = failing_save
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert not (tmp_path / "trainer" / "checkpoint-1").exists()


def test_bad_training_rows_are_all_reported_by_id_and_line_before_training(tmp_path, yeast_rows):
    import train_sft

    rows = [dict(r) for r in yeast_rows[:8]]
    bad = {2: "MKT4YIAK", 5: ""}
    for index, sequence in bad.items():
        rows[index] = json.loads(json.dumps(rows[index]))
        rows[index]["id"] = f"bad{index}"
        for message in rows[index]["messages"]:
            for block in message["content"] if isinstance(message["content"], list) else []:
                if block.get("type") == "protein":
                    block["sequence"] = sequence
        if rows[index].get("proteins"):
            for protein in rows[index]["proteins"]:
                protein["sequence"] = sequence
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stages = [{"name": "align", "training": {"max_steps": 1}}]
    recipe = _recipe(tmp_path / "recipe.yaml", rows_file, stages)
    with pytest.raises(SystemExit) as stopped:
        train_sft.main(["--config", str(recipe), "--no_eval"])
    message = str(stopped.value)
    assert "bad2" in message and "line 3" in message and "invalid residue '4'" in message, message
    assert "bad5" in message and "line 6" in message and "empty" in message, message
    assert "on_bad_rows" in message
    assert not (tmp_path / "out" / "stages").exists(), "training started before the data was checked"

    skipping = _recipe(tmp_path / "recipe.yaml", rows_file, stages, on_bad_rows="skip")
    assert train_sft.main(["--config", str(skipping), "--no_eval"]) == 0
    record = json.loads((tmp_path / "out" / "model" / "training_args.json").read_text())
    assert record["data_checks"]["skipped_rows"] == 2


def test_bad_eval_rows_are_reported_by_id_and_line(tmp_path, capsys):
    from eval.__main__ import main

    data = _function_rows(tmp_path / "d.jsonl", 6, bad={1: "MK7", 4: ""})
    args = ["--data", str(data), "--train", str(_function_rows(tmp_path / "t.jsonl", 6)), "--predictor", "most_common",
            "--bootstrap", "0", "--no_meteor", "--no_progress", "--no_identity"]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--out", str(tmp_path / "out")])
    message = str(stopped.value)
    assert "P001" in message and "line 2" in message and "P004" in message and "line 5" in message, message
    assert main([*args, "--out", str(tmp_path / "out"), "--on_bad_rows", "skip"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["tasks"]["function_text"]["n"] == 4
    assert metrics["header"]["data_stats"]["bad_rows"] == 2


@pytest.mark.parametrize("sequence", ["", "MKT4YIAK", "   "])
def test_retrieval_baseline_refuses_a_sequence_it_cannot_search(sequence):
    from eval.baselines import Retrieval

    train = [{"id": "T1", "task": "function_text", "proteins": [{"sequence": SEQUENCES[0]}], "reference": "zinc"}]
    retrieval = Retrieval(train)
    with pytest.raises(ValueError, match="Q1"):
        retrieval.predict([{"id": "Q1", "task": "function_text", "proteins": [{"sequence": sequence}], "reference": ""}])


def test_a_prompt_longer_than_the_context_is_refused_before_generating(tiny):
    model, processor = tiny
    context = model.config.text_config.max_position_embeddings
    model.config.text_config.max_position_embeddings = 48  # a small context: the same check as 10k tokens on 8k
    try:
        long = [{"role": "user", "content": [{"type": "protein", "sequence": SEQUENCES[0]},
                                             {"type": "text", "text": "Is it an enzyme? " * 40}]}]
        inputs = processor.apply_chat_template(long, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        assert inputs["input_ids"].shape[1] > 48
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"the prompt has \d+ tokens .* context is 48 tokens"):
            model.generate(**inputs, max_new_tokens=5)
        assert time.perf_counter() - start < 5
        short = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        inputs = processor.apply_chat_template(short, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        prompt = inputs["input_ids"].shape[1]
        with pytest.warns(UserWarning, match="max_new_tokens=100 cut to"):
            out = model.generate(**inputs, max_new_tokens=100, do_sample=False)
        assert out.shape[1] <= 48 and prompt < 48
    finally:
        model.config.text_config.max_position_embeddings = context


@pytest.mark.parametrize("messages, match", [
    ([{"content": [{"type": "text", "text": "hi"}]}], "message 0: expected a dict with a 'role'"),
    ([{"role": "user", "content": [{"type": "protein", "sequence": "MKTAYIAK"},
                                   {"type": "text", "text": "Compare it with <protein>"}]}], "literal '<protein>'"),
])
def test_chat_mistakes_get_a_message_not_a_traceback(tiny, messages, match):
    _, processor = tiny
    with pytest.raises(ValueError, match=match):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


@pytest.fixture(scope="module")
def tiny_pipe(tiny):
    from pipeline_protllm import ProteinFunctionPipeline

    model, processor = tiny
    return ProteinFunctionPipeline(model=model, processor=processor, max_new_tokens=4)


def test_pipeline_empty_list_and_bad_inputs_numbered_in_the_call(tiny_pipe):
    from pipeline_protllm import ProteinFunctionBatchError

    assert tiny_pipe([]) == []
    inputs = [SEQUENCES[0], SEQUENCES[1], "MKT4YIAK", SEQUENCES[2], {"sequence": SEQUENCES[3], "question": "What is <protein>?"}]
    with pytest.raises(ProteinFunctionBatchError) as caught:
        tiny_pipe(inputs, batch_size=2)
    message = str(caught.value)
    assert "input 2:" in message and "invalid residue '4'" in message and "input 4:" in message, message
    assert "input 0" not in message and "input 3" not in message
    results = caught.value.results
    assert results[2] is None and results[4] is None
    alone = [tiny_pipe(inputs[i]) for i in (0, 1, 3)]
    assert [results[i] for i in (0, 1, 3)] == alone, "the good inputs' answers were lost or differ"
    with pytest.raises(ValueError, match="needs a 'role'"):
        tiny_pipe([[{"content": "What does MKTAYIAK do?"}]])


def test_eval_command_line_mistakes_are_messages(tmp_path, tiny_folder):
    data = _function_rows(tmp_path / "d.jsonl", 3)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "eval", *args, "--bootstrap", "0", "--no_meteor", "--no_progress",
                               "--no_identity"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)

    (tmp_path / "out_file").write_text("x")
    result = run("--data", str(data), "--predictor", str(tiny_folder), "--out", str(tmp_path / "out_file"))
    assert result.returncode != 0 and "is a file" in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = run("--data", str(tmp_path / "missing.jsonl"), "--predictor", str(tiny_folder), "--out", str(tmp_path / "new"))
    assert result.returncode != 0 and "missing.jsonl: no such file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists(), "--out was created before --data was checked"
    (tmp_path / "empty_model").mkdir()
    result = run("--data", str(data), "--predictor", str(tmp_path / "empty_model"), "--out", str(tmp_path / "o2"))
    assert result.returncode != 0 and "no config.json" in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = run("--data", str(data), "--predictor", str(tiny_folder), "--out", str(tmp_path / "o3"), "--limit", "0")
    assert result.returncode != 0 and "--limit must be a positive" in result.stderr, result.stderr


def test_converting_the_packaged_llm_leaves_the_seeded_random_stream_alone(tmp_path, monkeypatch):
    """The first demo on a fresh machine converts SmolLM2's GGUF weights inside a seeded run; building the model to
    convert draws random weights, and before the fix that shifted every later draw (the first run's encoder and
    results differed from every later run's). The conversion must give the same weights and leave the stream as it was."""
    from safetensors.torch import load_file

    from protllm.local_weights import smollm2_path

    monkeypatch.setenv("PROTLLM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    folder = smollm2_path()
    assert torch.equal(torch.rand(4), expected)
    assert folder.parent == tmp_path / "cache" and not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    weights = load_file(str(folder / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (49152, 576) and torch.isfinite(weights["model.norm.weight"]).all()
