"""train_sft.py and training.py: every stage on tiny models and real data, collator, cache, MoE, resume, DDP."""

import json
import os
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

import train_sft
from protllm.testing import build_tiny_protllm
from protllm.training.collator import ProtLLMDataCollator
from protllm.training.feature_cache import FeatureCache, encoder_fingerprint
from protllm.training.trainers import make_sft_trainer
from protllm.building import build_from_recipe, model_parameter_counts, upcycle_to_moe
from protllm.training.recipe import RecipeError, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def yeast_rows(tmp_path_factory, shared_data):
    """Function-description instruction rows built from real yeast proteins (short ones, for speed)."""
    rows = yeast_function_rows(shared_data, max_residues=120, max_description_chars=120, count=48)
    return write_jsonl(tmp_path_factory.mktemp("rows") / "yeast_rows.jsonl", rows)


def write_recipe(path: Path, stages, train, **extra):
    recipe = {
        "output_dir": str(path.parent / "out"), "seed": 0,
        "model": {"tiny": "llama", "config": {"projector_type": "mlp2x_gelu", "max_protein_length": 128}},
        "data": {"train": str(train), "max_length": 256},
        "training": {"per_device_train_batch_size": 8, "logging_steps": 1, "learning_rate": 3e-3},
        "stages": stages,
    }
    recipe.update(extra)
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(output_dir: Path, stage: str):
    history = json.loads((output_dir / "stages" / stage / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


# ----- recipes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["stella", "sepit", "demo"])
def test_paper_recipes_parse_and_build_with_tiny_sizes(name):
    recipe = load_recipe(REPO / "configs" / f"{name}.yaml")
    for stage in recipe["stages"]:
        args = train_sft.stage_training_args(recipe, stage, Path("/tmp/unused"), ["--bf16", "false"])
        assert args.output_dir.endswith(f"stages/{stage['name']}/trainer")
    model, processor = build_from_recipe(recipe["model"], tiny="llama")
    wanted = recipe["model"]["config"]
    assert model.config.projector_type == wanted["projector_type"]
    assert model.config.use_structure_bias == wanted.get("use_structure_bias", False)
    assert model.config.protein_feature_layer == wanted.get("protein_feature_layer", -1)


def test_unknown_stage_and_unknown_training_field_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"name": "pretrain"}]}))
    with pytest.raises(RecipeError, match="unknown stage `stages.0..name: pretrain`"):
        load_recipe(bad)
    recipe = load_recipe(REPO / "configs" / "demo.yaml")
    with pytest.raises(ValueError, match="no_such_field"):
        train_sft.stage_training_args(recipe, recipe["stages"][1], tmp_path, ["--no_such_field", "1"])
    bad_recipe = {**recipe, "training": {"warmup_ratio": 0.1}}
    with pytest.raises(RecipeError, match="unknown recipe key `training.warmup_ratio`"):
        validate_recipe(bad_recipe)


# ----- every stage on real data -------------------------------------------------------------------------------

def test_every_stage_runs_and_lowers_the_loss_on_real_yeast_data(tmp_path, yeast_rows):
    stages = [
        {"name": "warmup", "training": {"max_steps": 12, "learning_rate": 3e-3}},
        {"name": "align", "training": {"max_steps": 12}},
        {"name": "instruct", "training": {"max_steps": 12}, "projector_learning_rate": 3e-3},
        {"name": "moe", "training": {"max_steps": 12}, "moe": {"num_experts": 4, "top_k": 1, "eval_capacity_factor": None}},
    ]
    recipe = write_recipe(tmp_path / "recipe.yaml", stages, yeast_rows)
    assert train_sft.main(["--config", str(recipe), "--no_eval"]) == 0
    out = tmp_path / "out"
    for stage in ("warmup", "align", "instruct", "moe"):
        curve = losses(out, stage)
        assert len(curve) == 12
        first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
        assert last < first, f"{stage}: loss did not decrease ({curve})"
        summary = json.loads((out / "stages" / stage / "stage_complete.json").read_text())
        assert summary["steps"] == 12
    moe_summary = json.loads((out / "stages" / "moe" / "stage_complete.json").read_text())
    params = moe_summary["parameters"]
    assert params["language_model_active_per_token"] < params["language_model"]
    assert (out / "loss_curves.png").stat().st_size > 1000
    record = json.loads((out / "model" / "training_args.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["warmup", "align", "instruct", "moe"]


def test_group_by_length_batches_rows_of_similar_length(tmp_path, yeast_rows):
    """`training.train_sampling_strategy: group_by_length` (the Trainer's LengthGroupedSampler) reads a length per row;
    chat rows have no `input_ids`, so the stage measures each row as the collator builds it. Same rows, less padding."""
    padding = {}
    for strategy in ("random", "group_by_length"):
        # 48 rows, batch 2: one epoch. (The sampler groups within "megabatches" of min(rows // (4 x batch), 50)
        # batches, here 6; at batch 8 a megabatch would be one batch and nothing could be grouped.)
        stages = [{"name": "warmup", "training": {"max_steps": 2}},  # random batches: its caption mix stays
                  {"name": "align", "training": {"max_steps": 24}}]
        (tmp_path / strategy).mkdir()
        recipe = write_recipe(tmp_path / strategy / "recipe.yaml", stages, yeast_rows,
                              training={"per_device_train_batch_size": 2, "logging_steps": 4, "learning_rate": 3e-3,
                                        "train_sampling_strategy": strategy})
        assert train_sft.main(["--config", str(recipe), "--no_eval"]) == 0
        summary = json.loads((tmp_path / strategy / "out" / "stages" / "align" / "stage_complete.json").read_text())
        assert summary["collator"]["examples"] == 48
        padding[strategy] = summary["collator"]["padding_tokens"] / summary["collator"]["tokens"]
    assert padding["group_by_length"] < 0.5 * padding["random"], padding


def test_length_grouped_batches_come_in_random_order():
    """The SFT trainer's group_by_length sampler keeps transformers' batches of similar length but shuffles their order:
    the parent's come longest first within each megabatch."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from protllm.training.trainers import ShuffledBatchesLengthGroupedSampler

    lengths = [int(x) for x in torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(0))]
    parent = list(LengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    shuffled = list(ShuffledBatchesLengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    batches = lambda order: [tuple(order[i: i + 8]) for i in range(0, len(order), 8)]  # noqa: E731
    assert sorted(shuffled) == list(range(400)) and set(batches(shuffled)) == set(batches(parent))
    assert batches(shuffled) != batches(parent)
    # the parent: longest first within each megabatch (12 batches here), the order a short run must not inherit
    maxima = [max(lengths[i] for i in batch) for batch in batches(parent)]
    assert all(maxima[k + 1: k + 12] == sorted(maxima[k + 1: k + 12], reverse=True) for k in range(12, 48, 12))


def test_row_length_is_the_length_of_the_row_in_a_batch(tiny):
    _, processor = tiny
    collator = ProtLLMDataCollator(processor)
    rows = [{"messages": MESSAGES}, {"prompt": "Name <protein>:", "completion": " kinase", "proteins": ["MKTAYIAK"]}]
    batch = collator(rows)
    assert [collator.row_length(row) for row in rows] == batch["attention_mask"].sum(1).tolist()


def test_lora_instruct_saves_adapter_with_projector_and_merged_model(tmp_path, yeast_rows):
    stages = [{"name": "instruct", "training": {"max_steps": 3},
               "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}]
    recipe = write_recipe(tmp_path / "recipe.yaml", stages, yeast_rows)
    assert train_sft.main(["--config", str(recipe), "--no_eval"]) == 0
    adapter = tmp_path / "out" / "stages" / "instruct" / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("projector" in k for k in weights)
    # The stage's parameter count includes the adapters (they exist only once the stage wraps the model).
    parameters = json.loads((tmp_path / "out" / "stages" / "instruct" / "stage_complete.json").read_text())["parameters"]
    lora = sum(t.numel() for k, t in weights.items() if "lora_" in k)
    assert parameters["trainable"] == parameters["projector"] + lora
    from modeling_protllm import ProtLLMForConditionalGeneration

    merged = ProtLLMForConditionalGeneration.from_pretrained(tmp_path / "out" / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())


# ----- collator ------------------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "user", "content": [{"type": "protein", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"}, {"type": "text", "text": "Function?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "It binds ATP and hydrolyses it to ADP slowly."}]},
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_protllm("llama")


def test_collator_labels_only_answer_tokens(tiny):
    _, processor = tiny
    batch = ProtLLMDataCollator(processor)([{"messages": MESSAGES}])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.decode(labelled).startswith("It binds ATP")
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["attention_mask"][0, -1] == 1), "training batches are right padded"


def test_training_collator_counts_cropped_proteins_instead_of_warning_each(tiny, recwarn):
    _, processor = tiny
    limit = processor.max_protein_length
    long_rows = [{"messages": [{"role": "user", "content": [{"type": "protein", "sequence": "A" * (limit + n)},
                                                            {"type": "text", "text": "?"}]}, MESSAGES[1]]} for n in (1, 7)]
    collator = ProtLLMDataCollator(processor)
    batch = collator([{"messages": MESSAGES}, *long_rows])
    assert batch["protein_input_ids"].shape[1] == limit + 2, "cropped to max_protein_length (+ <cls>, <eos>)"
    assert collator.stats["cropped_proteins"] == 2
    assert not [w for w in recwarn if "cropped" in str(w.message)]
    with pytest.warns(UserWarning, match="cropped to max_protein_length"):  # the processor itself still warns
        processor(text=["<protein>"], proteins=[["A" * (limit + 1)]])


def test_collator_truncates_answers_but_never_a_protein_span(tiny):
    _, processor = tiny
    full = ProtLLMDataCollator(processor)([{"messages": MESSAGES}])
    length = int(full["attention_mask"].sum())
    protein_end = int((full["input_ids"][0] == processor.protein_end_token_id).nonzero()[0])
    long_protein = [{"role": "user", "content": [{"type": "protein", "sequence": "A" * 100}, {"type": "text", "text": "?"}]},
                    MESSAGES[1]]
    collator = ProtLLMDataCollator(processor, max_length=protein_end + 4)
    batch = collator([{"messages": MESSAGES}, {"messages": long_protein}])
    assert batch["input_ids"].shape == (1, protein_end + 4)
    assert batch["protein_input_ids"].shape[0] == 1, "the dropped row's protein is dropped with it"
    assert collator.stats["dropped_examples"] == 1 and collator.stats["truncated_examples"] == 1
    assert collator.stats["truncated_answer_tokens"] == int((full["labels"][0, protein_end + 4:] != -100).sum())
    assert length > protein_end + 4
    with pytest.raises(ValueError, match="beyond max_length"):
        ProtLLMDataCollator(processor, max_length=10)([{"messages": long_protein}])


def test_collator_accepts_alpaca_records(tiny):
    _, processor = tiny
    record = {"instruction": "What is the function of this protein?", "input": "MKTAYIAKQRQISFVKSHFSRQ",
              "output": "An ATPase."}
    batch = ProtLLMDataCollator(processor)([record])
    assert batch["protein_input_ids"].shape == (1, 24)
    with pytest.raises(ValueError, match="no protein sequence"):
        ProtLLMDataCollator(processor)([{"instruction": "x", "input": "", "output": "y"}])


# ----- feature cache ---------------------------------------------------------------------------------------------

def test_feature_cache_gives_the_same_loss_and_is_keyed_by_encoder(tmp_path, tiny):
    model, processor = tiny
    rows = [{"messages": MESSAGES}, {"messages": MESSAGES[:1] + [{"role": "assistant", "content": "A kinase."}]}]
    plain = ProtLLMDataCollator(processor)(rows)
    cache = FeatureCache(tmp_path, model)
    cached_collator = ProtLLMDataCollator(processor, feature_cache=cache)
    assert cache.precompute(rows, cached_collator) == 1  # one distinct protein
    cached = cached_collator(rows)
    assert "protein_embeds" in cached and "protein_input_ids" not in cached
    assert cache.hits == 2 and cache.misses == 0
    with torch.no_grad():
        assert torch.allclose(model(**plain).loss, model(**cached).loss, atol=1e-6)
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files left behind"
    other, _ = build_tiny_protllm("llama", seed=1)
    assert encoder_fingerprint(other) != encoder_fingerprint(model)
    assert FeatureCache(tmp_path, other).directory != cache.directory


# ----- MoE ------------------------------------------------------------------------------------------------------

def test_upcycled_moe_equals_dense_at_start_and_keeps_active_parameters():
    model, processor = build_tiny_protllm("qwen2")
    inputs = processor(text="<protein> what is it?", proteins=["MKTAYIAKQR"], return_tensors="pt")
    with torch.no_grad():
        dense = model(**inputs).logits
    dense_counts = model_parameter_counts(model)
    upcycle_to_moe(model, num_experts=4, top_k=1, eval_capacity_factor=None)
    with torch.no_grad():
        moe = model(**inputs).logits
    assert torch.allclose(dense, moe, atol=1e-5)
    counts = model_parameter_counts(model)
    router = sum(b.router.weight.numel() for b in model.modules() if type(b).__name__ == "ProtLLMSparseMoeBlock")
    assert counts["language_model_active_per_token"] == dense_counts["language_model"] + router
    one_expert = sum(sum(p.numel() for p in b.experts[0].parameters()) for b in model.modules()
                     if type(b).__name__ == "ProtLLMSparseMoeBlock")
    assert counts["language_model"] - counts["language_model_active_per_token"] == 3 * one_expert  # 4 experts, top-1


@pytest.mark.parametrize("fused", [True, False], ids=["trl_fused_lm_head", "model_loss"])
def test_router_loss_reaches_the_gradient_under_sft_trainer(tmp_path, fused):
    from trl import SFTConfig

    model, processor = build_tiny_protllm("llama")
    upcycle_to_moe(model, num_experts=4, top_k=1, router_aux_loss_coef=0.5)
    model.train()
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, gradient_checkpointing=False, bf16=False)
    rows = [{"messages": MESSAGES}] * 4
    collator = ProtLLMDataCollator(processor)
    from datasets import Dataset

    trainer = make_sft_trainer(model, processor, args, Dataset.from_list(rows), collator, fused_lm_head=fused)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5

    def router_grad(enabled):
        model.zero_grad()
        trainer.aux_loss_enabled = enabled  # TRL's switch
        model.config.moe_router_aux_loss_coef = 0.5 if enabled else 0.0  # the model's own loss
        batch = collator(rows)
        torch.manual_seed(0)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach(), torch.cat([b.router.weight.grad.flatten() for b in model.modules()
                                         if type(b).__name__ == "ProtLLMSparseMoeBlock"])

    loss_with, grad_with = router_grad(True)
    loss_without, grad_without = router_grad(False)
    with torch.no_grad():
        aux = float(model(**collator(rows)).aux_loss)
    if fused:
        assert trainer._metrics["train"]["aux_loss"][0] == pytest.approx(aux, rel=1e-4)
    assert aux > 0
    assert torch.allclose(loss_with - loss_without, torch.tensor(0.5 * aux), atol=1e-4)
    assert not torch.allclose(grad_with, grad_without)


def test_moe_model_round_trips_through_auto_classes(tmp_path):
    from fresh_process import run_fresh_python
    from protllm.model_folder import save_model_folder

    model, processor = build_tiny_protllm("llama")
    upcycle_to_moe(model, num_experts=4, top_k=1)
    save_model_folder(model, processor, tmp_path / "moe")
    inputs = processor(text="<protein> what is it?", proteins=["MKTAYIAKQR"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits[0, -1, :5].tolist()
    script = f"""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor
    d = {str(tmp_path / 'moe')!r}
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    proc = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    assert model.config.moe_num_experts == 4
    with torch.no_grad():
        print(model(**proc(text="<protein> what is it?", proteins=["MKTAYIAKQR"], return_tensors="pt")).logits[0, -1, :5].tolist())
    """
    out = run_fresh_python(script, cwd=tmp_path)
    assert eval(out.strip().splitlines()[-1]) == expected


# ----- interrupted and distributed runs ---------------------------------------------------------------------------

def _train_command(recipe, *extra):
    return [sys.executable, str(REPO / "train_sft.py"), "--config", str(recipe), "--no_eval", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_resume_after_sigkill_reaches_the_uninterrupted_weights(tmp_path, yeast_rows):
    stages = [{"name": "align", "training": {"max_steps": 8, "save_strategy": "steps", "save_steps": 2}}]
    (tmp_path / "a").mkdir()
    straight = write_recipe(tmp_path / "a" / "recipe.yaml", stages, yeast_rows)
    subprocess.run(_train_command(straight), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)

    (tmp_path / "b").mkdir()
    killed = write_recipe(tmp_path / "b" / "recipe.yaml", stages, yeast_rows)
    trainer_dir = tmp_path / "b" / "out" / "stages" / "align" / "trainer"
    process = subprocess.Popen(_train_command(killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (trainer_dir / "checkpoint-4" / "trainer_state.json").is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "b" / "out" / "model").exists(), "killed before the end"
    subprocess.run(_train_command(killed, "--resume_from_checkpoint"), cwd=REPO, env=_env(), check=True,
                   capture_output=True, timeout=600)

    a = load_file(tmp_path / "a" / "out" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_process_ddp_run_on_cpu(tmp_path, yeast_rows):
    stages = [{"name": "align", "training": {"max_steps": 6, "per_device_train_batch_size": 4}}]
    recipe = write_recipe(tmp_path / "recipe.yaml", stages, yeast_rows)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_ddp_2proc.yaml"), "--dynamo_backend", "no",
               str(REPO / "train_sft.py"), "--config", str(recipe), "--no_eval"]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    curve = losses(tmp_path / "out", "align")
    assert len(curve) == 6 and curve[-1] < curve[0]
    # Two ranks really ran: each step consumed 2 x 4 rows, so 6 steps are 48 rows (one epoch of the 48 yeast rows);
    # one process would have read half of them (epoch 0.5).
    rows = len(yeast_rows.read_text().splitlines())
    history = json.loads((tmp_path / "out" / "stages" / "align" / "log_history.json").read_text())
    assert history[-1]["epoch"] == pytest.approx(6 * 2 * 4 / rows), (rows, history[-1])
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
