"""Generation runner: length-sorted batches, resume after a kill without duplicates, settings file,
shuffled-proteins wrapper, and the real tiny ProtLLM through the model-folder contract."""

import json

import pytest

from eval.baselines import ShuffledProteins, derangement
from eval.generate import ModelPredictor, read_predictions, run_generation


def _examples(n=7):
    return [{"id": f"ex{i}", "task": "function_text", "question": "What is the function of this protein?",
             "proteins": [{"sequence": "M" + "A" * (3 * i + 1)}], "reference": f"ref {i}", "meta": {}}
            for i in range(n)]


class FakePredictor:
    name = "fake"

    def __init__(self, fail_after_batches=None):
        self.calls = []
        self.fail_after = fail_after_batches

    def predict(self, examples):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append([e["id"] for e in examples])
        return [f"pred for {e['id']}" for e in examples]

    def settings(self):
        return {"kind": "fake"}


def test_batches_are_length_sorted_longest_first(tmp_path):
    fake = FakePredictor()
    out = run_generation(fake, _examples(7), tmp_path / "p.jsonl", batch_size=3, progress=False)
    assert fake.calls == [["ex6", "ex5", "ex4"], ["ex3", "ex2", "ex1"], ["ex0"]]
    assert out == {f"ex{i}": f"pred for ex{i}" for i in range(7)}
    settings = json.loads((tmp_path / "p.jsonl.settings.json").read_text())
    assert settings["predictor"] == "fake" and settings["batch_size"] == 3 and settings["kind"] == "fake"


def test_resume_after_kill_and_torn_line_has_no_duplicates(tmp_path):
    path = tmp_path / "p.jsonl"
    exs = _examples(7)
    with pytest.raises(KeyboardInterrupt):
        run_generation(FakePredictor(fail_after_batches=2), exs, path, batch_size=2, progress=False)
    assert len(path.read_text().splitlines()) == 4  # two batches were flushed before the kill
    with open(path, "a") as fh:  # a write torn by the kill
        fh.write('{"id": "ex1", "predic')
    again = FakePredictor()
    out = run_generation(again, exs, path, batch_size=2, progress=False)
    assert sorted(i for call in again.calls for i in call) == ["ex0", "ex1", "ex2"]  # only what was missing
    ids = [json.loads(l)["id"] for l in path.read_text().splitlines()]
    assert sorted(ids) == sorted(e["id"] for e in exs) and len(ids) == len(set(ids))
    assert len(out) == 7
    # a third run predicts nothing and writes nothing
    third = FakePredictor()
    run_generation(third, exs, path, batch_size=2, progress=False)
    assert third.calls == [] and len(path.read_text().splitlines()) == 7


def test_resume_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    run_generation(FakePredictor(), _examples(2), path, batch_size=2, progress=False)

    class Other(FakePredictor):
        def settings(self):
            return {"kind": "other"}

    with pytest.raises(ValueError, match="other settings"):
        run_generation(Other(), _examples(3), path, batch_size=2, progress=False)


def test_read_predictions_counts_bad_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a", "prediction": "x"}\nnot json\n{"id": "a", "prediction": "y"}\n{"prediction": "z"}\n'
                 '{"id": "b", "prediction": null}\n')
    preds, info = read_predictions(p)
    assert preds == {"a": "x", "b": ""}
    assert info == {"invalid_lines": 2, "duplicate_ids": 1}


def test_derangement_and_shuffled_wrapper():
    for n in (2, 3, 10, 101):
        perm = derangement(n, seed=1)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    assert derangement(10, 1) == derangement(10, 1)

    class Echo:
        name = "echo"

        def predict(self, examples):
            return [e["proteins"][0]["sequence"] for e in examples]

    exs = _examples(5)
    sh = ShuffledProteins(Echo(), seed=0).fit(exs)
    got = sh.predict(exs[:2]) + sh.predict(exs[2:])  # batching does not change the permutation
    own = [e["proteins"][0]["sequence"] for e in exs]
    assert sorted(got) == sorted(own) and all(g != o for g, o in zip(got, own))
    assert sh.name == "echo+shuffled_proteins"


def test_real_tiny_protllm_batched_resumable_equals_one_at_a_time(tmp_path):
    pytest.importorskip("torch")
    try:
        from protllm.testing import build_tiny_protllm
    except Exception as exc:  # core not importable here
        pytest.skip(f"ProtLLM core not importable: {exc}")
    model, proc = build_tiny_protllm("llama", seed=0)
    exs = _examples(6)
    batched = ModelPredictor("tiny", model=model, processor=proc, max_new_tokens=6)
    single = ModelPredictor("tiny", model=model, processor=proc, max_new_tokens=6)
    path = tmp_path / "pred.jsonl"
    out = run_generation(batched, exs[:4], path, batch_size=3, progress=False)
    out = run_generation(batched, exs, path, batch_size=3, progress=False)  # resume adds the last 2
    ones = {e["id"]: single.predict([e])[0] for e in exs}
    assert out == ones
    assert len(path.read_text().splitlines()) == 6
    s = json.loads((tmp_path / "pred.jsonl.settings.json").read_text())
    assert s["do_sample"] is False and s["use_cache"] is True and s["padding_side"] == "left"


def test_model_predictor_counts_cropped_proteins_instead_of_warning_each(recwarn, capsys):
    pytest.importorskip("torch")
    from protllm.testing import build_tiny_protllm

    model, proc = build_tiny_protllm("llama", seed=0)
    proc.max_protein_length = 20
    exs = _examples(3)
    for ex in exs:
        ex["proteins"][0]["sequence"] = "M" + "A" * 30
    predictor = ModelPredictor("tiny", model=model, processor=proc, max_new_tokens=2)
    predictor.predict(exs)
    assert predictor.cropped_proteins == 3
    assert not [w for w in recwarn if "cropped" in str(w.message)]
    assert capsys.readouterr().err.count("are cropped to it") == 1


def test_cli_with_saved_model_folder_and_shuffled_proteins(tmp_path):
    """The model-folder contract end to end: save a tiny ProtLLM, evaluate it with python -m eval."""
    pytest.importorskip("torch")
    try:
        from protllm.model_folder import save_model_folder
        from protllm.testing import build_tiny_protllm
    except Exception as exc:
        pytest.skip(f"ProtLLM core not importable: {exc}")
    from eval.__main__ import main

    model, proc = build_tiny_protllm("llama", seed=0)
    folder = save_model_folder(model, proc, tmp_path / "tiny_model")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"accession": f"P{i}", "sequence": "MKTAYIAKQRQISFVKSHFSRQ"[: 10 + i],
                                          "description": f"Binds zinc {i}", "split": "test"}) for i in range(4)) + "\n")
    out = tmp_path / "out"
    assert main(["--data", str(data), "--predictor", str(folder), "--shuffled_proteins", "--out", str(out),
                 "--max_new_tokens", "4", "--batch_size", "2", "--bootstrap", "0", "--no_meteor", "--no_progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["tasks"]["function_text"]["predictors"]) == {"tiny_model", "tiny_model+shuffled_proteins"}
    s = json.loads((out / "predictions" / "function_text" / "tiny_model.jsonl.settings.json").read_text())
    assert s["model_dir"] == str(folder) and s["do_sample"] is False and s["max_new_tokens"] == 4
