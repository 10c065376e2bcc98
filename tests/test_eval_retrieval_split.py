"""The retrieval baselines (`retrieval`: top-k combined, `retrieval_top1`: top hit) and `--split temporal`."""

import json
import shutil
from collections import Counter

import pytest
from conftest import require_shared_data

from eval.__main__ import main
from eval.baselines import Retrieval, medoid_text, vote_ec
from eval.scoring import ec_metrics
from eval.summary import print_table, summarise_metrics


def test_ec_vote_agrees_abstains_to_the_family_or_keeps_the_top_hit():
    # neighbours agree: every EC with half the weight or more is predicted, the heaviest first
    assert vote_ec([(["1.1.1.1"], 5.0), (["1.1.1.1", "2.7.7.7"], 5.0)]) == ["1.1.1.1", "2.7.7.7"]
    # they disagree at the full level (10/21 < 1/2) but share 3.1.1: abstain to the family
    family = vote_ec([(["3.1.1.1"], 10.0), (["3.1.1.2"], 9.0), (["3.1.1.3"], 2.0)])
    assert family == ["3.1.1.-"]
    scores = ec_metrics(["; ".join(family)], ["3.1.1.2"])
    assert scores["level3_accuracy"] == 1.0 and scores["level4_accuracy"] == 0.0
    # no agreement at any level: the top hit
    assert vote_ec([(["1.1.1.1"], 5.0), (["2.1.1.1"], 5.0), (["3.1.1.1"], 5.0)]) == ["1.1.1.1"]
    assert vote_ec([]) == []


def test_medoid_text_is_the_description_the_neighbours_share():
    texts = [("Kinase that phosphorylates serine", 1.5), ("Zinc finger transcription factor", 1.0),
             ("Zinc finger transcription factor of the nucleus", 1.0)]
    assert medoid_text(texts).startswith("Zinc finger transcription factor")
    assert medoid_text([("only one", 0.3)]) == "only one"


def _train(i, task, reference, meta=None):
    return {"id": f"t{i}", "task": task, "proteins": [{"sequence": "MKTAYIAKQR"}], "reference": reference,
            "meta": meta or {}}


def test_go_retrieval_scores_each_term_by_its_best_neighbour_identity():
    train = [_train(0, "go_terms", "zinc binding; nucleus", {"go_ids": ["GO:0000012", "GO:0000021"]}),
             _train(1, "go_terms", "nucleus", {"go_ids": ["GO:0000021", "GO:0000031"]})]
    hits = [{"target": "t0", "identity": 0.62, "bits": 90.0}, {"target": "t1", "identity": 0.81, "bits": 80.0}]
    combined, top1 = Retrieval(train), Retrieval(train, combine=False)
    assert combined.name == "retrieval" and top1.name == "retrieval_top1"
    targets = combined.train["go_terms"]
    assert combined._answer("go_terms", hits, targets) == "GO:0000021 (0.810); GO:0000031 (0.810); GO:0000012 (0.620)"
    assert top1._answer("go_terms", hits, targets) == "zinc binding; nucleus"
    yes_no = Retrieval([_train(0, "yes_no", "no"), _train(1, "yes_no", "yes"), _train(2, "yes_no", "yes")])
    hits = [{"target": f"t{i}", "identity": w, "bits": 1.0} for i, w in enumerate((0.9, 0.5, 0.5))]
    assert yes_no._answer("yes_no", hits, yes_no.train["yes_no"]) == "yes"  # 1.0 of weight against 0.9


def test_retrieval_composition_answers_a_protein_without_homolog_from_its_closest_composition():
    """No hit: `retrieval` gives the most-common answer, `retrieval_composition` the answer of the training protein
    closest in composition (here: the same residues in another order, which no alignment links)."""
    pytest.importorskip("pyswrd")
    from tests.test_retrieval import LYSOZYME, MYOGLOBIN, UBIQUITIN, residue_shuffled

    train = [{"id": f"t{i}", "task": "protein_name", "proteins": [{"sequence": seq}], "reference": name}
             for i, (seq, name) in enumerate([(LYSOZYME, "Lysozyme C"), (UBIQUITIN, "Ubiquitin"),
                                               (UBIQUITIN[::-1], "Ubiquitin"), (MYOGLOBIN, "Myoglobin")])]
    test = [{"id": "decoy", "task": "protein_name", "proteins": [{"sequence": residue_shuffled(MYOGLOBIN, 2)}]},
            {"id": "lys", "task": "protein_name", "proteins": [{"sequence": LYSOZYME[:-2]}]}]
    plain, composition = Retrieval(train), Retrieval(train, fallback="composition")
    assert composition.name == "retrieval_composition" and composition.settings()["fallback"] == "composition"
    assert plain.predict(test) == ["Ubiquitin", "Lysozyme C"] and plain.no_hit == 1
    assert composition.predict(test) == ["Myoglobin", "Lysozyme C"] and composition.no_hit == 1
    with pytest.raises(ValueError, match="fallback must be"):
        Retrieval(train, fallback="kmer")


def test_yes_no_retrieval_answers_from_training_rows_that_ask_the_same_question():
    """A homolog's yes to "a hydrolase?" is no answer to "a kinase?": the same-label rows decide, and a label no
    training row asks about falls back to every yes/no row."""
    pytest.importorskip("pyswrd")
    from tests.test_retrieval import LYSOZYME, MYOGLOBIN, UBIQUITIN, mutate

    def row(i, sequence, label, answer):
        return {"id": f"t{i}", "task": "yes_no", "proteins": [{"sequence": sequence}], "reference": answer,
                "meta": {"label": label, "answer": answer}}

    train = [row(0, LYSOZYME, "a hydrolase", "yes"), row(1, mutate(LYSOZYME, 0.3, 1), "a kinase", "no"),
             row(2, MYOGLOBIN, "a kinase", "yes"), row(3, UBIQUITIN, "a kinase", "yes")]
    query = mutate(LYSOZYME, 0.05, 2)
    test = [{"id": "q_kinase", "task": "yes_no", "proteins": [{"sequence": query}], "meta": {"label": "A kinase"}},
            {"id": "q_hydrolase", "task": "yes_no", "proteins": [{"sequence": query}], "meta": {"label": "a hydrolase"}},
            {"id": "q_toxin", "task": "yes_no", "proteins": [{"sequence": query}], "meta": {"label": "a toxin"}}]
    retrieval = Retrieval(train, combine=False)
    assert retrieval.predict(test) == ["no", "yes", "yes"]  # the toxin question: no such rows, the top hit of all
    assert retrieval.neighbour == {"q_kinase": "t1", "q_hydrolase": "t0", "q_toxin": "t0"}
    blind = Retrieval([{**r, "meta": {}} for r in train], combine=False)
    assert blind.predict(test[:1]) == ["yes"]  # without labels: the closest protein's answer to another question
    # no homolog among the same-label rows: that question's most common answer, not the whole task's
    far = [{"id": "q_far", "task": "yes_no", "proteins": [{"sequence": mutate(MYOGLOBIN, 0.9, 3)}],
            "meta": {"label": "a hydrolase"}}]
    more = [row(4, UBIQUITIN, "a hydrolase", "no"), row(5, UBIQUITIN[::-1], "a hydrolase", "no"),
            row(6, MYOGLOBIN[::-1], "a kinase", "yes")]  # yes/no 4:3 over the task, 1:2 for "a hydrolase"
    assert Retrieval(train + more).predict(far) == ["no"]


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs2 not installed")
def test_split_temporal_swaps_ec_and_reaction_to_the_temporal_sets(tmp_path, repo_root, capsys):
    ec_dir = require_shared_data() / "ec"
    new = [json.loads(line) for line in (ec_dir / "new392.jsonl").read_text().splitlines()[:3]]
    old = [json.loads(line) for line in (ec_dir / "clean_split10.jsonl").read_text().splitlines()[:60]]
    # a training twin of the first temporal protein, with an EC and reaction no other row has
    twin = {"accession": "TWIN", "sequence": new[0]["sequence"], "ec": ["9.9.9.9"], "reactions": {"9.9.9.9": ["A = B"]}}
    (tmp_path / "new.jsonl").write_text("\n".join(json.dumps(r) for r in new) + "\n")
    (tmp_path / "old.jsonl").write_text("\n".join(json.dumps(r) for r in old + [twin]) + "\n")
    out = tmp_path / "out"
    # the demo's test file: its protein_name / yes_no rows stay, EC and reaction come from the temporal sets
    args = ["--data", str(repo_root / "data" / "demo" / "test.jsonl"), "--split", "temporal", "--temporal_test", str(tmp_path / "new.jsonl"), "--temporal_train",
            str(tmp_path / "old.jsonl"), "--limit", "3", "--predictor", "retrieval_top1", "--predictor", "most_common",
            "--out", str(out), "--bootstrap", "20", "--no_progress", "--no_identity", "--no_meteor"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tasks = metrics["tasks"]
    assert set(tasks) == {"protein_name", "yes_no", "ec_number", "reaction"}
    assert metrics["header"]["split"] == "temporal" and "New-392" in tasks["ec_number"]["split"]
    assert tasks["protein_name"]["split"] == "all rows of --data" and tasks["ec_number"]["n"] == 3
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ec_rows = {r["id"]: r for r in rows if r["task"] == "ec_number"}
    assert set(ec_rows) == {r["accession"] for r in new}
    assert ec_rows[new[0]["accession"]]["predictions"]["retrieval_top1"] == "9.9.9.9"
    reaction = next(r for r in rows if r["task"] == "reaction" and r["id"] == new[0]["accession"])
    assert reaction["predictions"]["retrieval_top1"] == "A = B"
    most = Counter("; ".join(r["ec"]) for r in old + [twin]).most_common(1)[0][0]
    assert ec_rows[new[1]["accession"]]["predictions"]["most_common"] == most
    table = summarise_metrics(metrics, model_name="none")
    print_table(table)
    printed = capsys.readouterr().out
    assert "split of ec_number, reaction: temporal" in printed and table["split"] == "temporal"
    ec_line = next(line for line in printed.splitlines() if line.startswith("ec_number "))
    assert ec_line.split()[2] == "3"  # the rows column: tasks can have their own row counts
    with pytest.raises(SystemExit, match="has none"):
        main(args[:6] + ["--predictor", "most_common", "--task", "function_text", "--out", str(tmp_path / "x")])


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs2 not installed")
def test_retrieval_search_auto_is_exhaustive_for_small_databases_and_finds_what_mmseqs2_misses(repo_root, monkeypatch):
    """The committed demo split (protein names; test proteins <=30% identity to training): "auto" on this small
    database is the exhaustive Smith-Waterman search, and it finds a homolog for far more test proteins than MMseqs2
    -s 7.5 (25 against 7 of 115 when written); both tools give hits of one shape; an unknown tool is refused."""
    pytest.importorskip("pyswrd")
    from eval import baselines
    from eval.data import load_examples

    train = [e for e in load_examples(repo_root / "data" / "demo" / "train.jsonl") if e["task"] == "protein_name"]
    test = [e for e in load_examples(repo_root / "data" / "demo" / "test.jsonl") if e["task"] == "protein_name"]
    assert baselines.search_tool("auto", len(train)) == "smith-waterman"
    exhaustive, mmseqs = Retrieval(train, combine=False), Retrieval(train, combine=False, search="mmseqs2", sensitivity=7.5)
    exhaustive.predict(test), mmseqs.predict(test)
    assert exhaustive.tools == {"protein_name": "smith-waterman"} and mmseqs.tools == {"protein_name": "mmseqs2"}
    found, found_by_mmseqs = len(test) - exhaustive.no_hit, len(test) - mmseqs.no_hit
    assert found >= 2 * found_by_mmseqs > 0, (found, found_by_mmseqs)
    assert exhaustive.settings()["tool_by_task"] == {"protein_name": "smith-waterman"}
    query = {"q": baselines._first_seq(test[0])}
    hits = baselines.smith_waterman_search(query, {e["id"]: baselines._first_seq(e) for e in train[:50]}, max_evalue=10.0)
    assert hits and all(set(h) == {"query", "target", "identity", "evalue", "bits", "alnlen"} for h in hits)
    assert [h["bits"] for h in hits] == sorted((h["bits"] for h in hits), reverse=True)  # best first
    monkeypatch.setattr(baselines, "EXHAUSTIVE_MAX_TARGETS", 10)
    assert baselines.search_tool("auto", len(train)) == "mmseqs2"
    with pytest.raises(ValueError, match="retrieval search must be one of"):
        Retrieval(train, search="blast")
