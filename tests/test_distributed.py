"""FSDP2 on two CPU processes (gloo), launched as a user would: `accelerate launch --config_file
configs/accelerate/fsdp_cpu_2proc.yaml train_sft.py --config ...`.

One run trains every kind of stage on a tiny Llama ProtLLM and real yeast rows: `align` (projector only, frozen
encoder), `instruct` (projector + LLM in full) and `moe` (the LLM upcycled to 2 experts, trained with LoRA and full
routers, saving sharded checkpoints). A second run starts from the first run's finished `align` and `instruct`
stages (loaded, not trained: what a resumed run does), is SIGKILLed after the MoE stage's first sharded checkpoint
and resumed; its final weights must equal the uninterrupted run's bit for bit. The same stages also run under
DeepSpeed ZeRO-3 (configs/accelerate/deepspeed_zero3_cpu_2proc.yaml) when deepspeed is installed. Everything is as small as the
behaviour allows (3 launches, 5 optimizer steps in the longest), because the suite runs on 2 CPU cores in CI.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import yeast_function_rows, write_jsonl
import torch
import yaml
from safetensors.torch import load_file

from tests.fresh_process import run_fresh_python

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"
MOE_STEPS = 3
STAGES = [
    {"name": "align", "training": {"max_steps": 1}},
    {"name": "instruct", "training": {"max_steps": 1}},
    {"name": "moe", "training": {"max_steps": MOE_STEPS, "save_strategy": "steps", "save_steps": 1},
     "moe": {"num_experts": 2, "top_k": 1}, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
]


def _recipe(directory: Path, rows: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    recipe = {
        "output_dir": str(directory / "out"), "seed": 0,
        "model": {"tiny": "llama", "config": {"projector_type": "mlp2x_gelu", "max_protein_length": 64}},
        "data": {"train": str(rows), "max_length": 160},
        "training": {"per_device_train_batch_size": 2, "logging_steps": 1, "learning_rate": 3e-3},
        "stages": STAGES,
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(recipe: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            str(REPO / "train_sft.py"), "--config", str(recipe), "--no_eval", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def yeast_rows(tmp_path_factory, shared_data):
    rows = yeast_function_rows(shared_data, max_residues=60, max_description_chars=80, count=16)
    return write_jsonl(tmp_path_factory.mktemp("rows") / "yeast_rows.jsonl", rows)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, yeast_rows):
    directory = tmp_path_factory.mktemp("fsdp_straight")
    result = subprocess.run(_launch(_recipe(directory, yeast_rows)), check=False, cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return directory / "out", result.stdout + result.stderr


def test_moe_routers_are_seeded_and_train_beside_lora():
    """The routers do not depend on the global RNG (a resumed run draws differently before the MoE stage), and in a
    LoRA MoE stage they train in full and are saved with the adapters (so a resumed run restores them)."""
    from protllm.building import upcycle_to_moe
    from protllm.testing import build_tiny_protllm
    from protllm.training.stages import _lora_model

    routers = []
    for draws in (0, 7):
        model, _ = build_tiny_protllm("llama", seed=0)
        torch.manual_seed(123)
        torch.randn(draws)  # a different global RNG state
        upcycle_to_moe(model, num_experts=2, seed=5)
        routers.append([layer.mlp.router.weight.detach().clone() for layer in model.model.language_model.layers])
    assert len(routers[0]) >= 2 and not torch.equal(routers[0][0], routers[0][1])  # one generator per layer
    assert all(torch.equal(a, b) for a, b in zip(*routers))

    peft_model = _lora_model(model, {"name": "moe", "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}})
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".router.modules_to_save." in n for n in trainable), sorted(trainable)
    assert not any(".experts." in n and "lora_" not in n for n in trainable)
    from peft import get_peft_model_state_dict

    assert any(".router." in key for key in get_peft_model_state_dict(peft_model))


def test_fsdp_trains_every_stage_kind_on_two_cpu_processes(uninterrupted):
    out, log = uninterrupted
    # FSDP2 really ran (not accelerate's silent DDP fallback on CPU), with the decoder layers and encoder as units.
    assert log.count("FSDP2 on 2 CPU processes (gloo); units: LlamaDecoderLayer,ProtLLMProteinEncoder") == 2 * len(STAGES)
    assert "reducer.cpp" not in log, "DDP's reducer ran: the run was not sharded"
    # The MoE stage's checkpoints are sharded (torch.distributed.checkpoint), not one consolidated file.
    checkpoint = out / "stages" / "moe" / "trainer" / "checkpoint-1"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    summaries = {s["stage"]: s for s in json.loads((out / "model" / "training_args.json").read_text())["summaries"]}
    assert summaries["align"]["trained_parts"] == ["projector"]  # the encoder stayed frozen
    assert summaries["instruct"]["trained_parts"] == ["language_model", "projector"]
    assert {"language_model (LoRA)", "routers"} <= set(summaries["moe"]["trained_parts"])
    assert (out / "stages" / "moe" / "adapter" / "adapter_model.safetensors").is_file()
    before = load_file(out / "stages" / "align" / "model" / "model.safetensors")
    after = load_file(out / "stages" / "instruct" / "model" / "model.safetensors")
    assert torch.equal(before["model.protein_encoder.esm.embeddings.word_embeddings.weight"],
                       after["model.protein_encoder.esm.embeddings.word_embeddings.weight"])
    assert not torch.equal(before["model.language_model.layers.0.mlp.up_proj.weight"],
                           after["model.language_model.layers.0.mlp.up_proj.weight"])

    # The final folder is a plain consolidated ProtLLM (merged LoRA, 2 experts) loading through the Auto classes.
    weights = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in key or "modules_to_save" in key for key in weights)
    assert all(torch.isfinite(value).all() for value in weights.values())
    printed = run_fresh_python(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        path = {str(out / "model")!r}
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        messages = [{{"role": "user", "content": [{{"type": "protein", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"}},
                                                  {{"type": "text", "text": "What does it do?"}}]}}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        print("experts", model.config.moe_num_experts, "finite", bool(torch.isfinite(logits).all()))
    """, cwd=out)
    assert "experts 2 finite True" in printed


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and both ranks at once (a node failure). torchrun's workers do not stay in the launcher's
    process group, so the whole process tree is collected from /proc first."""
    tree, stack = [], [process.pid]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        try:
            stack.extend(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
        except FileNotFoundError:
            pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)


def test_sharded_checkpoint_resume_after_sigkill_equals_uninterrupted(tmp_path, yeast_rows, uninterrupted):
    straight, _ = uninterrupted
    recipe = _recipe(tmp_path / "killed", yeast_rows)
    out = tmp_path / "killed" / "out"
    # The earlier stages as a resumed run has them: finished folders, loaded rather than trained (so the global RNG
    # differs from the uninterrupted run's when the MoE stage builds its routers).
    for name in ("align", "instruct"):
        shutil.copytree(straight / "stages" / name, out / "stages" / name)
    checkpoint = out / "stages" / "moe" / "trainer" / "checkpoint-1"
    process = subprocess.Popen(_launch(recipe, "--resume_from_checkpoint"), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (checkpoint / "trainer_state.json").is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no sharded checkpoint within 10 minutes"
        time.sleep(0.02)
    _kill_tree(process)
    time.sleep(1)
    assert not (out / "model").exists(), "killed before the end"
    assert not (out / "stages" / "moe" / "stage_complete.json").exists()

    result = subprocess.run(_launch(recipe, "--resume_from_checkpoint"), check=False, cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    log = result.stdout + result.stderr
    resumed = [line for line in log.splitlines() if "[moe] resuming from" in line]
    assert resumed and "checkpoint-" in resumed[-1] and f"checkpoint-{MOE_STEPS}" not in resumed[-1], resumed

    # Bit-identical: the same shards, optimizer state, scheduler, data order and RNG states are restored on each
    # rank, the routers are seeded (and checkpointed), and gloo's reductions over 2 ranks are deterministic on CPU.
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----- DeepSpeed ZeRO-3 ----------------------------------------------------------------------------------------

ZERO3_CONFIG = REPO / "configs" / "accelerate" / "deepspeed_zero3_cpu_2proc.yaml"


def test_deepspeed_zero3_trains_every_stage_kind_on_two_cpu_processes(tmp_path, yeast_rows):
    """ZeRO-3 (DeepSpeed's CPU accelerator, gloo) as a user launches it, with `zero.Init` on and bf16: the LLM is
    built partitioned, and every stage hands the next one an unsharded copy. `warmup` (the encoder's SEPIT losses),
    `align` (frozen encoder, the warm-up's weights), `instruct` (LLM in
    full), then `moe` upcycled from the instruct stage's gathered weights, with LoRA and routers trained in full (their
    logits and loss through re-entrant activation checkpointing). The experts are frozen under LoRA, so each must still equal the dense block it was
    copied from, bit for bit (a copy of ZeRO-3's empty placeholders could not)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        # Not imported here (the launched ranks import it): probing accelerators in the pytest process is not needed.
        pytest.skip("deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed): the ZeRO-3 launch needs it")
    recipe_path = _recipe(tmp_path, yeast_rows)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["stages"] = [
        {"name": "warmup", "training": {"max_steps": 2, "per_device_train_batch_size": 4}},
        {"name": "align", "training": {"max_steps": 1}},
        {"name": "instruct", "training": {"max_steps": 1}},
        {"name": "moe", "moe": {"num_experts": 2, "top_k": 1}, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
         "training": {"max_steps": 2, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}},
    ]
    recipe["training"]["bf16"] = True  # DeepSpeed's own mixed precision (fp32 master weights), as on GPUs
    recipe_path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3_CONFIG),
               str(REPO / "train_sft.py"), "--config", str(recipe_path), "--no_eval"]
    env = _env()
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    log = result.stdout + result.stderr
    # Each rank gathered partitioned parameters after each stage: ZeRO-3 really ran (not a DDP fallback).
    assert log.count("DeepSpeed ZeRO-3: ") == 2 * len(recipe["stages"]), log[-3000:]

    out = tmp_path / "out"
    warmup = load_file(out / "stages" / "warmup" / "model" / "model.safetensors")
    align = load_file(out / "stages" / "align" / "model" / "model.safetensors")
    instruct = load_file(out / "stages" / "instruct" / "model" / "model.safetensors")
    final = load_file(out / "model" / "model.safetensors")
    for weights in (warmup, align, instruct, final):  # no empty placeholder saved in place of a weight
        assert all(w.numel() > 0 and torch.isfinite(w).all() for w in weights.values())
        assert {w.dtype for w in weights.values()} == {torch.float32}  # as built: bf16 was DeepSpeed's compute dtype
    embedding = "model.language_model.embed_tokens.weight"  # partitioned (above ZeRO-3's persistence threshold)
    assert final[embedding].shape == instruct[embedding].shape and final[embedding].shape[0] > 49000
    assert not torch.equal(align[embedding], instruct[embedding])  # trained in instruct
    assert torch.equal(instruct[embedding], final[embedding])  # frozen under LoRA
    encoder = "model.protein_encoder.esm.embeddings.word_embeddings.weight"
    assert torch.equal(warmup[encoder], align[encoder]) and torch.equal(align[encoder], instruct[encoder])
    for layer in range(2):
        for expert in range(2):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(final[f"model.language_model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"],
                                   instruct[f"model.language_model.layers.{layer}.mlp.{proj}.weight"])
    config = json.loads((out / "model" / "config.json").read_text())
    for layer in range(2):  # the routers trained away from their seeded start (protllm.building.upcycle_to_moe)
        router = final[f"model.language_model.layers.{layer}.mlp.router.weight"]
        start = torch.randn(router.shape, generator=torch.Generator().manual_seed(recipe["seed"] + layer))
        assert not torch.allclose(router, start * config["text_config"]["initializer_range"], atol=1e-3)
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(instruct[q_proj], final[q_proj])  # the LoRA adapters trained and were merged
    summaries = {s["stage"]: s for s in json.loads((out / "model" / "training_args.json").read_text())["summaries"]}
    # parameter counts see through the partitions (ZeRO-3 leaves empty placeholders in the model)
    assert summaries["align"]["parameters"]["language_model"] == summaries["instruct"]["parameters"]["language_model"]
    # instruct trains the LLM in full (+ projector): the trainable count sees through the partitions too
    assert summaries["instruct"]["parameters"]["trainable"] > summaries["instruct"]["parameters"]["language_model"]
    printed = run_fresh_python(f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out / "model")!r}, trust_remote_code=True)
        print("experts", model.config.moe_num_experts)
    """, cwd=out)
    assert "experts 2" in printed


# ----- data at scale -------------------------------------------------------------------------------------------

def _build(out: Path, num_proc: int, shared_data: Path) -> dict:
    from data.build import main as build_main

    build_main(["--out", str(out), "--yeast", str(shared_data / "function" / "yeast_function.jsonl"),
                "--clean-test", str(shared_data / "ec" / "new392.jsonl"), "--num-proc", str(num_proc),
                "--shard-proteins", "1000", "--max-shard-size", "2MB", "--no-record-command"])
    return json.loads((out / "build_summary.json").read_text())


def test_streaming_build_with_two_processes_equals_one_process_and_writes_arrow_shards(tmp_path, shared_data):
    import datasets

    one = _build(tmp_path / "one", 1, shared_data)
    two = _build(tmp_path / "two", 2, shared_data)
    assert one["rows"] == two["rows"] and one["stats"]["counts"] == two["stats"]["counts"]
    assert two["streaming"]["protein_shards"] >= 6  # yeast train/validation/test + New-392, 1000 proteins each
    a, b = datasets.load_from_disk(str(tmp_path / "one")), datasets.load_from_disk(str(tmp_path / "two"))
    assert set(a) == {"train", "validation", "test"}
    for split in a:
        assert a[split].to_list() == b[split].to_list(), split
    assert len(list((tmp_path / "two" / "train").glob("data-*.arrow"))) > 1  # sharded Arrow on disk
    # every real protein once: the build's own duplicate check saw none across shards
    assert "yeast:duplicate_accession" not in two["stats"]["counts"]


def test_training_reads_a_saved_dataset_memory_mapped(tmp_path, shared_data):
    from protllm.training.data import load_rows

    _build(tmp_path / "ds", 2, shared_data)
    rows = load_rows(str(tmp_path / "ds"), split="train")
    # Arrow files mapped from disk, not a table copied into RAM: training on a 500k-row dataset does not load it.
    assert rows.cache_files and all(Path(f["filename"]).parent == tmp_path / "ds" / "train" for f in rows.cache_files)
    from datasets.table import ConcatenationTable, MemoryMappedTable

    tables = [t for blocks in rows.data.blocks for t in blocks] if isinstance(rows.data, ConcatenationTable) else [rows.data]
    assert tables and all(isinstance(t, MemoryMappedTable) for t in tables), [type(t).__name__ for t in tables]
    assert rows[0]["messages"][0]["role"] == "user"
