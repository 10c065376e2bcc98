"""Recipes: a key that does not exist is refused with its name (a typo must never silently change the run), and
nonsense step counts or learning rates are refused before anything is built."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from protllm.training.recipe import RecipeError, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_are_valid(path):
    assert load_recipe(path)["stages"]


def _demo():
    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


def _with(edit):
    recipe = _demo()
    edit(recipe)
    return recipe


@pytest.mark.parametrize("edit, named, suggestion", [
    (lambda r: r["stages"][2].update(lroa=r["stages"][2].pop("lora")), "stages[2].lroa", "lora"),
    (lambda r: r["stages"][2].update(projector_learnin_rate=1e-3), "stages[2].projector_learnin_rate", "projector_learning_rate"),
    (lambda r: r["stages"][1].update(trainig=r["stages"][1].pop("training")), "stages[1].trainig", "training"),
    (lambda r: r["data"].update(max_lenght=128), "data.max_lenght", "max_length"),
    (lambda r: r["model"]["config"].update(projector_typ="linear"), "model.config.projector_typ", "projector_type"),
    (lambda r: r.update(trainig={}), "trainig", "training"),
    (lambda r: r["stages"][2]["lora"].update(alpah=8), "stages[2].lora.alpah", "alpha"),
    (lambda r: r["training"].update(learning_rte=1e-3), "training.learning_rte", "learning_rate"),
])
def test_unknown_keys_are_refused_with_a_did_you_mean(edit, named, suggestion):
    with pytest.raises(RecipeError) as error:
        validate_recipe(_with(edit), "demo.yaml")
    assert f"`{named}`" in str(error.value) and f"did you mean `{suggestion}`" in str(error.value)


@pytest.mark.parametrize("edit, named", [
    (lambda r: r["stages"][0].update(name="warmpu"), "warmpu"),
    (lambda r: r["stages"][1]["training"].update(max_steps=0), "stages[1].training.max_steps"),
    (lambda r: r["stages"][1]["training"].update(learning_rate=-1e-3), "stages[1].training.learning_rate"),
    (lambda r: r["stages"][2].update(encoder_learning_rate=0), "stages[2].encoder_learning_rate"),
    (lambda r: r["stages"][1].update(lora={"r": 4}), "stages[1].lora"),  # align trains no LLM: LoRA would do nothing
])
def test_wrong_values_are_refused_by_name(edit, named):
    with pytest.raises(RecipeError, match=None) as error:
        validate_recipe(_with(edit), "demo.yaml")
    assert named in str(error.value)


def _run(args, tmp_path):
    return subprocess.run([sys.executable, str(REPO / "train_sft.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                       "PYTHONPATH": str(REPO)})


def test_cli_refuses_a_typo_recipe_before_building_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with(lambda r: r["stages"][2].update(lroa=r["stages"][2].pop("lora")))))
    result = _run(["--config", str(bad), "--output_dir", str(tmp_path / "out")], tmp_path)
    assert result.returncode != 0 and "stages[2].lroa" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_refuses_nonsense_max_steps(tmp_path, value):
    result = _run(["--config", str(REPO / "configs" / "demo.yaml"), "--output_dir", str(tmp_path / "out"),
                   "--max_steps", value], tmp_path)
    assert result.returncode != 0 and "max_steps" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_negative_learning_rate_before_building(tmp_path):
    result = _run(["--config", str(REPO / "configs" / "demo.yaml"), "--output_dir", str(tmp_path / "out"),
                   "--learning_rate=-1e-4"], tmp_path)
    assert result.returncode != 0 and "learning_rate" in result.stderr
