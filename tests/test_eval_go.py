"""GO scoring by the field's convention (eval/go.py): per ontology, by term id, CAFA protein-centric Fmax next to
micro F1, propagation to ancestors with an OBO file (a tiny one written here: no GO file exists offline)."""

import json

import numpy as np
import pytest

from eval.__main__ import main
from eval.go import GeneOntology, GOScores, GOVocabulary, load_vocabulary
from eval.report import score_predictor

# MF: root <- binding (11) <- zinc binding (12); metal ion binding (13) is_a binding.
# CC: root <- nucleus (21) <- nuclear lumen (22, part_of nucleus). BP: root <- transport (31).
TINY_OBO = """format-version: 1.2

[Term]
id: GO:0003674
name: molecular_function
namespace: molecular_function

[Term]
id: GO:0005575
name: cellular_component
namespace: cellular_component

[Term]
id: GO:0008150
name: biological_process
namespace: biological_process

[Term]
id: GO:0000011
name: binding
namespace: molecular_function
is_a: GO:0003674 ! molecular_function

[Term]
id: GO:0000012
name: zinc binding
namespace: molecular_function
alt_id: GO:0000099
synonym: "zinc ion binding" EXACT []
is_a: GO:0000011 ! binding

[Term]
id: GO:0000013
name: metal ion binding
namespace: molecular_function
is_a: GO:0000011 ! binding

[Term]
id: GO:0000021
name: nucleus
namespace: cellular_component
is_a: GO:0005575

[Term]
id: GO:0000022
name: nuclear lumen
namespace: cellular_component
relationship: part_of GO:0000021 ! nucleus

[Term]
id: GO:0000031
name: transport
namespace: biological_process
is_a: GO:0008150

[Typedef]
id: part_of
name: part of
"""


def _go_example(i, terms):
    """A go_terms example as eval.data builds it from a raw row: ids, ontologies and names in meta."""
    return {"id": f"p{i}", "task": "go_terms", "reference": "; ".join(n for _, _, n in terms),
            "meta": {"go_ids": [t for t, _, _ in terms], "aspects": [a for _, a, _ in terms],
                     "go_names": [n for _, _, n in terms]}}


A, B, C = ("GO:0000012", "MF", "zinc binding"), ("GO:0000013", "MF", "metal ion binding"), ("GO:0000011", "MF", "binding")


def test_fmax_and_micro_f1_hand_computed():
    # p0 truth {A, B}, p1 truth {C}; scores sweep the CAFA thresholds (see the derivation in each line)
    examples = [_go_example(0, [A, B]), _go_example(1, [C])]
    preds = ["GO:0000012 (0.9); binding (0.6); metal ion binding (0.3)", "zinc binding (0.5); GO:0000011 (0.4)"]
    res = score_predictor("go_terms", examples, {"p0": preds[0], "p1": preds[1]}, bootstrap=50)
    m = {k: v["value"] for k, v in res["metrics"].items()}
    # t <= 0.3: p0 prec 2/3 rec 1, p1 prec 1/2 rec 1 -> pr 7/12, rc 1 -> F = 14/19 (the max; 0.6 at t=0.4, 0.4 at 0.9)
    assert m["mf_fmax"] == pytest.approx(14 / 19)
    assert m["mf_fmax_threshold"] == pytest.approx(0.01) and m["mf_coverage"] == 1.0
    # every named term counts for micro F1: tp 3, predicted 5, true 3
    assert m["mf_micro_precision"] == pytest.approx(3 / 5) and m["mf_micro_recall"] == 1.0
    assert m["f1"] == pytest.approx(2 * 0.6 / 1.6) and "bp_fmax" not in m  # no protein has a BP term
    assert res["counts"]["mf_benchmark_proteins"] == 2 and res["counts"]["go_predictions_with_scores"] == 2
    lo, hi = res["metrics"]["mf_fmax"]["ci_low"], res["metrics"]["mf_fmax"]["ci_high"]
    assert lo <= m["mf_fmax"] <= hi
    assert any("not propagated: no ontology file" in n for n in res["notes"])


def test_set_predictor_fmax_is_f_at_the_single_threshold():
    examples = [_go_example(0, [A, B]), _go_example(1, [C])]
    res = score_predictor("go_terms", examples, {"p0": "zinc binding", "p1": "zinc binding; binding"}, bootstrap=0)
    m = {k: v["value"] for k, v in res["metrics"].items()}
    # p0: prec 1, rec 1/2; p1: prec 1/2, rec 1 -> pr 3/4, rc 3/4 -> F 3/4 at every threshold
    assert m["mf_fmax"] == pytest.approx(0.75) and res["counts"]["go_predictions_with_scores"] == 0


def test_ontologies_are_scored_apart_and_by_id_not_name():
    nucleus = ("GO:0000021", "CC", "nucleus")
    examples = [_go_example(0, [A, nucleus]), _go_example(1, [B])]  # p1 (no prediction) puts B in the dictionary
    # a right CC term written as an id, a wrong MF name, a name GO does not have
    res = score_predictor("go_terms", examples, {"p0": "GO:0000021; metal ion binding; a made-up term"}, bootstrap=0)
    m = {k: v["value"] for k, v in res["metrics"].items()}
    assert m["cc_micro_f1"] == 1.0 and m["cc_fmax"] == 1.0
    assert m["mf_micro_f1"] == 0.0 and m["mf_fmax"] == 0.0
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert res["counts"]["go_unknown_names"] == 1 and res["counts"]["go_terms_without_ontology"] == 1


def test_parser_scores_ids_names_and_names_ending_in_digits():
    vocabulary = GOVocabulary().add_examples([_go_example(0, [A, ("GO:0000041", "CC", "ATP synthase core F(1)")])])
    terms, unknown = vocabulary.parse("GO:0000013 (0.25)\nZinc binding.; ATP synthase core F(1); go_0000099 (1.0); x")
    assert terms == {"GO:0000013": 0.25, "GO:0000012": 1.0, "GO:0000041": 1.0, "GO:0000099": 1.0, "name:x": 1.0}
    assert unknown == 1


def test_obo_propagation_to_ancestors(tmp_path):
    obo = tmp_path / "tiny.obo"
    obo.write_text(TINY_OBO)
    onto = GeneOntology(obo)
    assert onto.ancestors("GO:0000022") == {"GO:0000022", "GO:0000021", "GO:0005575"}  # part_of, then is_a
    assert onto.aspect["GO:0000031"] == "bp" and onto.primary("GO:0000099") == "GO:0000012"
    examples = [_go_example(0, [("GO:0000012", "MF", "zinc binding"), ("GO:0000022", "CC", "nuclear lumen")])]
    vocabulary = load_vocabulary(examples, obo)
    # truth propagates to {zinc binding, binding, nuclear lumen, nucleus}; roots are dropped
    assert vocabulary.propagate({t: 1.0 for t in vocabulary.reference(examples[0])}) == {
        "GO:0000012": 1.0, "GO:0000011": 1.0, "GO:0000022": 1.0, "GO:0000021": 1.0}
    # the parent of a predicted term gets its highest-scored descendant's score
    assert vocabulary.propagate({"GO:0000012": 0.4, "GO:0000013": 0.7})["GO:0000011"] == 0.7
    # "binding" alone: half right once propagated, wrong by exact id without the ontology
    preds = {"p0": "binding; nucleus"}
    with_obo = GOScores([preds["p0"]], examples, vocabulary).weighted(np.ones((1, 1)))
    without = GOScores([preds["p0"]], examples, load_vocabulary(examples)).weighted(np.ones((1, 1)))
    assert with_obo["mf_micro_precision"][0] == 1.0 and with_obo["mf_micro_recall"][0] == 0.5
    assert with_obo["cc_micro_recall"][0] == 0.5 and without["f1"][0] == 0.0
    # a synonym and an alternative id map to the primary term
    assert vocabulary.parse("zinc ion binding; GO:0000099")[0] == {"GO:0000012": 1.0}


def test_bad_obo_is_refused_with_the_file_named(tmp_path):
    bad = tmp_path / "bad.obo"
    bad.write_text("[Term]\nname: orphan\n")
    with pytest.raises(ValueError, match="bad.obo:2"):
        GeneOntology(bad)
    (tmp_path / "empty.obo").write_text("format-version: 1.2\n")
    with pytest.raises(ValueError, match="not an OBO file"):
        GeneOntology(tmp_path / "empty.obo")


def test_cli_scores_raw_go_rows_per_ontology_with_and_without_ontology(tmp_path):
    rows = [{"accession": "P1", "sequence": "MKTAYIAKQR", "go": {"MF": [{"id": "GO:0000012", "name": "zinc binding"}],
                                                             "CC": [{"id": "GO:0000022", "name": "nuclear lumen"}]}},
            {"accession": "P2", "sequence": "MSTNPKPQRK", "go": {"BP": [{"id": "GO:0000031", "name": "transport"}]}}]
    data = tmp_path / "go.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": "P1", "prediction": "binding (0.8); nucleus (0.5)"}) + "\n"
                     + json.dumps({"id": "P2", "prediction": "GO:0000031"}) + "\n")
    obo = tmp_path / "tiny.obo"
    obo.write_text(TINY_OBO)
    results = {}
    for name, extra in (("plain", []), ("obo", ["--go_obo", str(obo)])):
        out = tmp_path / name
        assert main(["--data", str(data), "--task", "go", "--predictor", f"file:{preds}", "--out", str(out),
                     "--bootstrap", "20", "--no_progress", *extra]) == 0
        results[name] = json.loads((out / "metrics.json").read_text())
        report = (out / "report.md").read_text()
        assert ("not propagated: no ontology file" in report) == (name == "plain")
        assert "bp_fmax" in report and "mf_fmax" in report
    plain = results["plain"]["tasks"]["go_terms"]["predictors"]["preds"]["metrics"]
    obo_m = results["obo"]["tasks"]["go_terms"]["predictors"]["preds"]["metrics"]
    assert plain["bp_fmax"]["value"] == 1.0 and obo_m["bp_fmax"]["value"] == 1.0
    assert plain["mf_fmax"]["value"] == 0.0 and plain["cc_fmax"]["value"] == 0.0
    # propagated: truth {zinc binding, binding} vs predicted {binding} -> P 1, R 1/2, F 2/3
    assert obo_m["mf_fmax"]["value"] == pytest.approx(2 / 3) and obo_m["cc_fmax"]["value"] == pytest.approx(2 / 3)
    assert results["obo"]["header"]["go_obo"] == str(obo)
    with pytest.raises(SystemExit, match="--go_obo"):
        main(["--data", str(data), "--predictor", f"file:{preds}", "--out", str(tmp_path / "x"),
              "--go_obo", str(tmp_path / "missing.obo")])
