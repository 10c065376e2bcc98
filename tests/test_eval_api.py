"""`eval.run.run_evaluation` (the function behind `python -m eval`) and the demo table `eval.json` built from it."""

import json

import pytest

from eval.summary import COLUMNS, summarise_metrics

LYSOZYME = "KVFGRCELAAAMKRHGLDNYRGYSLGNWVCAAKFESNFNTQATNRNTDGSTDYGILQINSRWWCNDGRTPGSRNLCNIPCSALLSSDITASVNCAKKIVSDGNGMNAWVAWRNRCKGTDVQAWIRGCRL"
UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_function_and_cli_give_the_same_metrics_and_the_demo_table_schema(tmp_path):
    """run_evaluation returns what metrics.json holds; python -m eval writes the same; eval.json keeps its contract."""
    pytest.importorskip("torch")
    pytest.importorskip("pyswrd")
    from eval.__main__ import main
    from eval.run import run_evaluation
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm
    from retrieval_protllm import RetrievalDatabase

    model, processor = build_tiny_protllm("llama", seed=0)
    processor.retrieval_database = RetrievalDatabase(
        [{"id": "T1", "sequence": LYSOZYME, "annotations": {"function_text": "Hydrolyses bacterial cell walls"}}])
    folder = save_model_folder(model, processor, tmp_path / "model")
    train = _write(tmp_path / "train.jsonl", [
        {"accession": "T1", "sequence": LYSOZYME, "description": "Hydrolyses bacterial cell walls"},
        {"accession": "T2", "sequence": UBIQUITIN, "description": "Tags proteins for degradation"}])
    test = _write(tmp_path / "test.jsonl", [
        {"accession": f"Q{i}", "sequence": seq, "description": desc} for i, (seq, desc) in enumerate(
            [(LYSOZYME[2:], "Hydrolyses cell walls"), (UBIQUITIN[:-4], "Protein degradation tag"), (LYSOZYME[:90], "Lysis")])])
    common = dict(train=train, shuffled_proteins=True, no_retrieval=True, max_new_tokens=3, batch_size=2,
                  bootstrap=20, meteor=False, identity=False, progress=False)
    metrics = run_evaluation(test, [str(folder), "retrieval", "most_common"], tmp_path / "api", **common)
    assert metrics == json.loads((tmp_path / "api" / "metrics.json").read_text())
    predictors = metrics["tasks"]["function_text"]["predictors"]
    assert set(predictors) == {"model", "model+shuffled_proteins", "model+no_retrieval", "retrieval", "most_common"}
    assert predictors["retrieval"]["counts"]["retrieval_no_hit"] == 0  # -s 7.5 finds every homolog here
    rouge = predictors["retrieval"]["metrics"]["rougeL"]
    assert set(rouge) >= {"value", "ci_low", "ci_high"}

    assert main(["--data", str(test), "--train", str(train), "--predictor", str(folder), "--shuffled_proteins",
                 "--no_retrieval", "--predictor", "retrieval", "--predictor", "most_common", "--out", str(tmp_path / "cli"),
                 "--max_new_tokens", "3", "--batch_size", "2", "--bootstrap", "20", "--no_meteor", "--no_identity",
                 "--no_progress"]) == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    for name, result in cli["tasks"]["function_text"]["predictors"].items():
        assert result["metrics"] == predictors[name]["metrics"], name

    table = summarise_metrics(metrics, model_name="model")
    row = table["tasks"]["function_text"]
    assert set(row) == set(COLUMNS)
    for column in COLUMNS:
        assert set(row[column]) == {"metric", "value", "ci_low", "ci_high", "n"} and row[column]["n"] == 3
    # The model against each other predictor on the same rows: metrics.json by predictor name, eval.json by column.
    paired = metrics["tasks"]["function_text"]["paired_differences"]
    assert set(paired) == {"model"} and set(paired["model"]) == set(predictors) - {"model"}
    difference = paired["model"]["retrieval"]
    assert difference["difference"] == pytest.approx(predictors["model"]["metrics"]["rougeL"]["value"] - rouge["value"])
    assert difference["ci_low"] <= difference["difference"] <= difference["ci_high"] and difference["n"] == 3
    assert table["paired_differences"]["function_text"]["model_shuffled_proteins"] == paired["model"]["model+shuffled_proteins"]


def test_paired_difference_is_the_interval_of_the_difference_on_the_same_rows():
    """Two predictors that share most answers: their own intervals overlap, the paired interval of the difference
    does not include 0 (every row where they differ favours A); identical predictions give exactly 0."""
    from eval.report import paired_difference, task_scorer

    rows = [{"id": f"r{i}", "reference": f"binds zinc ion number {i % 7}"} for i in range(40)]
    shared = {r["id"]: ("binds zinc ion" if i % 3 else "transports sugar") for i, r in enumerate(rows)}
    better = {**shared, **{r["id"]: r["reference"] for i, r in enumerate(rows) if i % 5 == 0}}
    a, b = (task_scorer("function_text", rows, p, meteor=False) for p in (better, shared))
    d = paired_difference(a, b, bootstrap=500, seed=0)
    assert d["metric"] == "rougeL" and d["n"] == 40 and d["ci_low"] > 0
    (a_low, _), (_, b_high) = a.bootstrap(500, 0)["rougeL"], b.bootstrap(500, 0)["rougeL"]
    assert a_low < b_high  # the separate intervals overlap
    same = paired_difference(b, task_scorer("function_text", rows, dict(shared), meteor=False), bootstrap=200, seed=0)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0
    with pytest.raises(ValueError, match="same examples"):
        paired_difference(a, task_scorer("function_text", rows[:10], shared, meteor=False))


def test_no_examples_is_an_error_naming_the_file(tmp_path):
    from eval.run import run_evaluation

    data = _write(tmp_path / "d.jsonl", [{"accession": "Q1", "sequence": UBIQUITIN, "description": "x", "split": "train"}])
    with pytest.raises(ValueError, match=r"no examples .*d\.jsonl"):
        run_evaluation(data, ["most_common"], tmp_path / "out", split="test", train=data)
