"""Model folders on disk: an all-or-nothing save, the umask's permissions, loading with no prompt, no planted links.

Issue 15 items 7 (atomic final save), 10 (no "run custom code? [y/N]" prompt), 12 (permissions; a planted symlink
in the feature cache). Every kill below is a real SIGKILL of a child process.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fresh_process import kill_when_printed
from safetensors.torch import load_file

from protllm.model_folder import load_model_folder, save_model_folder
from protllm.testing import build_tiny_protllm

REPO = Path(__file__).resolve().parents[1]
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "MDLVNHLTDRLLFAIPKKGRLYSKSVS", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_protllm("llama", seed=0)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ============================================================================ item 7: the save is all or nothing

_KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm

    model, processor = build_tiny_protllm("llama", seed=1)  # other weights than the folder on disk

    def hang(*args, **kwargs):  # the weights are written, the processor is being written: hang until killed
        print("MIDWRITE", flush=True)
        time.sleep(600)

    processor.save_pretrained = hang
    save_model_folder(model, processor, sys.argv[1])
    """
)


def test_save_killed_mid_write_keeps_the_previous_complete_folder(tmp_path, tiny):
    model, processor = tiny
    folder = save_model_folder(model, processor, tmp_path / "model")
    before = _weights(folder)
    kill_when_printed([sys.executable, "-c", _KILLED_SAVE, str(folder)], "MIDWRITE", cwd=REPO, env=_env())

    # What a later run reads is the previous folder, whole: its weights, and a processor that loads.
    after = _weights(folder)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    reloaded, reloaded_processor = load_model_folder(folder)
    assert reloaded_processor.protein_tokenizer is not None
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "model")
    assert all(name.startswith(".model.tmp-") for name in leftovers), leftovers

    # The next save replaces it completely and clears what the killed one left.
    other, _ = build_tiny_protllm("llama", seed=1)
    save_model_folder(other, processor, folder, write_extras=lambda d: (d / "training_args.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (folder / "training_args.json").read_text() == "{}"
    new = _weights(folder)
    assert any(not torch.equal(new[k], before[k]) for k in before)


def test_failed_save_leaves_the_previous_folder_and_no_temporary(tmp_path, tiny):
    model, processor = tiny
    folder = save_model_folder(model, processor, tmp_path / "model")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*"))

    def fail(staging: Path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model_folder(model, processor, folder, write_extras=fail)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ============================================================================ item 12: permissions


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_follow_the_umask(tmp_path, tiny, umask):
    """Weights were written 0600 (transformers' temporary file) beside 0644 configs: colleagues could not read them."""
    model, processor = tiny
    previous = os.umask(umask)
    try:
        folder = save_model_folder(model, processor, tmp_path / "model")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes["model/model.safetensors"] == 0o666 & ~umask
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask}
    assert not wrong, wrong


def test_feature_cache_takes_a_planted_symlink_for_a_miss(tmp_path, tiny):
    """A symlink in the cache (to a file or a folder elsewhere) is not a hit: the states are computed and stored."""
    from protllm.training.collator import ProtLLMDataCollator
    from protllm.training.feature_cache import FeatureCache

    model, processor = tiny
    cache = FeatureCache(tmp_path / "cache", model)
    collator = ProtLLMDataCollator(processor)
    rows = [{"instruction": "What does it do?", "input": s, "output": "It binds zinc."} for s in SEQUENCES]
    batch = collator(rows)
    reference = cache.swap_in(batch)["protein_embeds"]  # computed and stored
    assert cache.misses == len(SEQUENCES)

    keys = [cache.key(ids, None, None) for _, ids, _, _ in cache._rows(batch)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "junk.safetensors").write_bytes(b"not a safetensors file")
    cache.path(keys[0]).unlink()
    cache.path(keys[0]).symlink_to(elsewhere / "junk.safetensors")  # a planted file link
    moved = cache.path(keys[1]).parent
    moved.rename(elsewhere / "moved")
    moved.symlink_to(elsewhere / "moved", target_is_directory=True)  # a planted folder link
    assert not cache.has(keys[0]) and not cache.has(keys[1]) and cache.has(keys[2])

    hits, misses = cache.hits, cache.misses
    again = cache.swap_in(batch)["protein_embeds"]
    assert torch.equal(again, reference)
    assert cache.misses - misses == 2 and cache.hits - hits == 1
    for key in keys:  # replaced by regular files inside the cache directory
        assert cache.has(key) and not cache.path(key).is_symlink() and not cache.path(key).parent.is_symlink()
    assert (elsewhere / "junk.safetensors").read_bytes() == b"not a safetensors file"


# ============================================================================ item 10: no interactive prompt

_LOAD_WITHOUT_PROMPT = textwrap.dedent(
    """
    import builtins, sys
    prompts = []

    def no_input(prompt=""):  # transformers' "run custom code? [y/N]" goes through input()
        prompts.append(prompt)
        raise EOFError

    builtins.input = no_input
    from processing_protllm import ProtLLMProcessor
    from protllm.model_folder import load_model_folder

    folder = sys.argv[1]
    ProtLLMProcessor.from_pretrained(folder)  # plain, before the classes are registered (transformers used to ask)
    print("PLAIN", len(prompts), flush=True)
    prompts.clear()
    model, processor = load_model_folder(folder)  # our tooling's way
    print("TOOLING", len(prompts), type(model).__name__, type(processor).__name__, flush=True)
    """
)


def test_loading_our_folder_shows_no_prompt_with_stdin_closed(tmp_path, tiny):
    model, processor = tiny
    folder = save_model_folder(model, processor, tmp_path / "model")
    result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_PROMPT, str(folder)], cwd=tmp_path, env=_env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("PLAIN", "TOOLING")))
    assert int(lines["PLAIN"]) == 0  # the processor class reads its tokenizer without asking to run model code
    assert lines["TOOLING"] == "0 ProtLLMForConditionalGeneration ProtLLMProcessor"


# ============================================================================ issue 12: folders of the previous layout

# The last commit whose folders carried every remote-code file (before optional modules and per-model auto_maps).
PREVIOUS_LAYOUT = "9c1a4a8"

_SAVE_WITH_PREVIOUS_LAYOUT = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import save_file
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm

    folder, messages = sys.argv[1], json.loads(sys.argv[2])
    model, processor = build_tiny_protllm("llama", seed=3, use_structure_bias=True, moe_num_experts=2, moe_top_k=1)
    model.eval()
    save_model_folder(model, processor, folder)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"logits": logits.contiguous(), **{k: v.contiguous() for k, v in inputs.items()}}, folder + "/expected.safetensors")
    """
)


def test_a_folder_saved_with_the_previous_layout_loads_and_gives_the_same_logits(tmp_path, csa):
    """A SEPIT folder (structure bias + mixture of experts) saved by the code of PREVIOUS_LAYOUT, which carried every
    remote-code file, named the core model and processor classes and ran SEPIT in the core ones: our tooling loads it
    with the SEPIT model class and the structure processor its model needs, the same inputs from the same structure
    file, and bit-identical logits; re-saved, it carries only what that model uses and names the SEPIT classes."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_LAYOUT], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"git history with {PREVIOUS_LAYOUT} is not available: {archive.stderr.decode()[:200]}")
    old_checkout = tmp_path / "previous"
    old_checkout.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old_checkout)], input=archive.stdout, check=True)
    structure = str(sorted(csa.glob("*.pdb*"))[0])
    # The same chats in both processes: a protein from a structure file, and one from a sequence.
    messages = [[{"role": "user", "content": [{"type": "protein", "structure": structure},
                                              {"type": "text", "text": "What does it do?"}]}],
                [{"role": "user", "content": [{"type": "protein", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"},
                                              {"type": "text", "text": "Name it."}]}]]
    folder = tmp_path / "saved_before"
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _SAVE_WITH_PREVIOUS_LAYOUT, str(folder), json.dumps(messages)], cwd=old_checkout,
                   env=env, check=True, capture_output=True, timeout=300)
    assert (folder / "saprot_protllm.py").is_file()  # the previous layout: every file, the core processor named
    assert '"processing_protllm.ProtLLMProcessor"' in (folder / "processor_config.json").read_text()

    expected = load_file(folder / "expected.safetensors")
    model, processor = load_model_folder(folder)
    assert type(processor).__name__ == "ProtLLMStructureProcessor"
    assert type(model).__name__ == "ProtLLMSepitForConditionalGeneration" and model.config.moe_num_experts == 2
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert sorted(inputs) == sorted(k for k in expected if k != "logits")
    for key, value in inputs.items():
        assert torch.equal(value, expected[key]), key
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected["logits"])

    resaved = tmp_path / "saved_again"
    save_model_folder(model, processor, resaved)
    assert not (resaved / "esm3_protllm.py").exists() and (resaved / "structure_processing_protllm.py").is_file()
    assert (resaved / "sepit_protllm.py").is_file() and (resaved / "moe_protllm.py").is_file()
    assert json.loads((resaved / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "sepit_protllm.ProtLLMSepitForConditionalGeneration"
    assert '"structure_processing_protllm.ProtLLMStructureProcessor"' in (resaved / "processor_config.json").read_text()
