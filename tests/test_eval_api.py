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


def _chat_row(row_id, task, sequence, question, answer):
    return {"id": row_id, "task": task, "answer": answer, "proteins": [{"accession": row_id, "sequence": sequence}],
            "messages": [{"role": "user", "content": [{"type": "protein", "sequence": sequence},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def test_per_task_generation_limits_reach_the_model_and_its_controls(tmp_path):
    """`--max_new_tokens 6,yes_no=1`: yes/no rows decode one token (the model and its shuffled / no-retrieval twins),
    names up to six; the limits are recorded; an unknown task or a bad number is refused by name."""
    pytest.importorskip("torch")
    from eval.__main__ import main
    from eval.run import generation_limits
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm
    from retrieval_protllm import RetrievalDatabase

    assert generation_limits(24) == (24, {}) and generation_limits("24,yes_no=4") == (24, {"yes_no": 4})
    assert generation_limits({"default": 16, "reaction": 48}) == (16, {"reaction": 48})
    with pytest.raises(ValueError, match="unknown task 'yesno'"):
        generation_limits("24,yesno=4")
    with pytest.raises(ValueError, match="yes_no must be a positive integer, got '0'"):
        generation_limits("24,yes_no=0")

    model, processor = build_tiny_protllm("llama", seed=0)
    processor.retrieval_database = RetrievalDatabase(
        [{"id": "T1", "sequence": LYSOZYME, "annotations": {"protein_name": "Lysozyme C"}}])
    folder = save_model_folder(model, processor, tmp_path / "model")
    test = _write(tmp_path / "test.jsonl", [
        _chat_row("Q1", "yes_no", LYSOZYME[2:], "Is this protein a hydrolase? Answer yes or no.", "yes"),
        _chat_row("Q2", "yes_no", UBIQUITIN, "Is this protein a kinase? Answer yes or no.", "no"),
        _chat_row("Q3", "protein_name", LYSOZYME[4:], "What is the name of this protein?", "Lysozyme C"),
        _chat_row("Q4", "protein_name", UBIQUITIN[3:], "What is the name of this protein?", "Ubiquitin")])
    def run(out, limits):
        assert main(["--data", str(test), "--predictor", str(folder), "--shuffled_proteins", "--no_retrieval",
                     "--out", str(out), "--max_new_tokens", limits, "--batch_size", "2", "--bootstrap", "10",
                     "--no_meteor", "--no_identity", "--no_progress"]) == 0

    def answers(out, task, name):
        path = out / "predictions" / task / f"{name}.jsonl"
        settings = json.loads(path.with_name(path.name + ".settings.json").read_text())
        limit = settings.get("inner", settings)["max_new_tokens"]  # the shuffled control records its model's
        return limit, {row["id"]: row["prediction"] for row in map(json.loads, path.read_text().splitlines())}

    run(tmp_path / "six", "6")
    run(tmp_path / "limited", "6,yes_no=1")
    for name in ("model", "model+shuffled_proteins", "model+no_retrieval"):
        assert answers(tmp_path / "limited", "protein_name", name) == answers(tmp_path / "six", "protein_name", name)
        (short_limit, short), (long_limit, long) = (answers(tmp_path / d, "yes_no", name) for d in ("limited", "six"))
        assert (short_limit, long_limit) == (1, 6)
        # greedy decoding: one token is the start of the six-token answer (this random tiny model never stops early)
        assert all(long[i].startswith(short[i].strip()) and len(short[i]) < len(long[i]) for i in long), (short, long)
    header = json.loads((tmp_path / "limited" / "metrics.json").read_text())["header"]
    assert header["max_new_tokens"] == {"default": 6, "yes_no": 1}


def test_per_task_example_limits_keep_the_first_rows_of_each_task(tmp_path):
    """`--limit 1,yes_no=3`: one example of each task but three yes/no ones, the first in file order, recorded in the
    header; an unknown task or a bad number is refused by name (`0` as before)."""
    from eval.__main__ import main
    from eval.run import example_limits

    assert example_limits(None) is None and example_limits(24) == {"default": 24}
    assert example_limits("24,yes_no=72") == {"default": 24, "yes_no": 72}
    assert example_limits("yes_no=2") == {"default": None, "yes_no": 2}  # the other tasks keep every row
    with pytest.raises(ValueError, match="--limit: unknown task 'yesno'"):
        example_limits("24,yesno=4")
    with pytest.raises(ValueError, match="--limit must be a positive number of examples per task, got 0"):
        example_limits("0")
    rows = [_chat_row(f"N{i}", "protein_name", LYSOZYME[i:], "What is the name of this protein?", "Lysozyme C")
            for i in range(3)]
    rows += [_chat_row(f"Y{i}", "yes_no", UBIQUITIN[i:], "Is this protein a kinase? Answer yes or no.", "no")
             for i in range(5)]
    test = _write(tmp_path / "test.jsonl", rows)
    train = _write(tmp_path / "train.jsonl", rows[:1] + rows[3:4])
    assert main(["--data", str(test), "--train", str(train), "--predictor", "most_common", "--limit", "1,yes_no=3",
                 "--out", str(tmp_path / "out"), "--bootstrap", "10", "--no_meteor", "--no_identity",
                 "--no_progress"]) == 0
    header = json.loads((tmp_path / "out" / "metrics.json").read_text())["header"]
    assert header["limit"] == {"default": 1, "yes_no": 3}
    assert header["data_stats"]["by_task"] == {"protein_name": 1, "yes_no": 3}
    kept = [json.loads(line)["id"] for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(kept) == ["N0", "Y0", "Y1", "Y2"]


def test_recipe_refuses_a_bad_generation_limit_before_training():
    pytest.importorskip("trl")
    from protllm.training.recipe import RecipeError, validate_recipe

    recipe = {"model": {}, "stages": [{"name": "align"}], "evaluate": {"max_new_tokens": {"default": 24, "yes_no": 4}}}
    validate_recipe(recipe, "demo.yaml")
    recipe["evaluate"]["max_new_tokens"]["name"] = 8
    with pytest.raises(RecipeError, match=r"demo.yaml: `evaluate.max_new_tokens: unknown task 'name'"):
        validate_recipe(recipe, "demo.yaml")
    del recipe["evaluate"]["max_new_tokens"]["name"]
    recipe["evaluate"]["limit"] = {"default": 24, "yes_no": 0}
    with pytest.raises(RecipeError, match=r"demo.yaml: `evaluate.limit: yes_no must be a positive integer, got 0"):
        validate_recipe(recipe, "demo.yaml")
