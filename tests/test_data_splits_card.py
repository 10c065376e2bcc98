"""MMseqs2 splits (leakage), temporal split, dataset card, atomic save, push_to_hub (mocked), demo, CLI."""

import json
from itertools import islice
from unittest import mock

import datasets
import pytest

from data import load_demo_dataset, readers
from data.builders import build_records
from data.card import FEATURES, make_card, push_to_hub, save_atomic, to_dataset_dict
from data.mmseqs import easy_cluster, mmseqs_version, nearest_identity
from data.splits import cluster_split, identity_report, purge_leakage, temporal_split


@pytest.fixture(scope="module")
def yeast300(shared_data):
    return list(islice(readers.read_yeast_function(shared_data / "function/yeast_function.jsonl"), 300))


def test_mmseqs_wrapper(yeast300):
    assert mmseqs_version()
    seqs = {p["accession"]: p["sequence"] for p in yeast300[:60]}
    seqs["P00498 copy"] = seqs["P00498"]  # ids with spaces are mapped safely
    cl = easy_cluster(seqs, min_seq_id=0.9)
    assert set(cl) == set(seqs) and cl["P00498 copy"] == cl["P00498"]
    ident = nearest_identity({"q": seqs["P00498"], "none": "WWWWWWWWWWWWWWWWWWWW"}, seqs)
    assert ident == {"q": 1.0, "none": 0.0}


def test_cluster_split_no_leakage(yeast300):
    fr = {"train": 0.7, "validation": 0.1, "test": 0.2}
    assign, clusters = cluster_split(yeast300, fr, seed=3, min_seq_id=0.3, coverage=0.5)
    # deterministic given the seed and clusters; another seed gives another split
    assert cluster_split(yeast300, fr, seed=3, clusters=clusters)[0] == assign
    assert cluster_split(yeast300, fr, seed=4, clusters=clusters)[0] != assign
    for rep in set(clusters.values()):  # whole clusters
        assert len({assign[a] for a, r in clusters.items() if r == rep}) == 1
    assert 0.1 < sum(v == "test" for v in assign.values()) / len(assign) < 0.3
    assign, moved = purge_leakage(yeast300, assign, threshold=0.3, sensitivity=5.7)  # mmseqs default -s
    seq = {p["accession"]: p["sequence"] for p in yeast300}
    tr = {a: seq[a] for a, s in assign.items() if s == "train"}
    te = {a: seq[a] for a, s in assign.items() if s == "test"}
    rep = identity_report(tr, te, threshold=0.3, sensitivity=5.7)
    assert rep["above_threshold"] == 0 and rep["max"] <= 0.3 and rep["n_test"] == len(te)
    assert sum(rep["histogram"].values()) == len(te)


def test_splits_do_not_depend_on_mmseqs_threads(yeast300):
    """`python -m data.build_demo --tasks` runs MMseqs2 on every core: the clusters, the leakage pass and the identity
    report must be those of one thread, or the demo's data would change with the machine."""
    fr, proteins = {"train": 0.8, "test": 0.2}, yeast300[:150]
    seq = {p["accession"]: p["sequence"] for p in proteins}
    results = []
    for threads in (1, 2):
        assign, clusters = cluster_split(proteins, fr, seed=3, min_seq_id=0.3, coverage=0.5, threads=threads)
        assign, moved = purge_leakage(proteins, assign, threshold=0.3, threads=threads)
        tr = {a: seq[a] for a, s in assign.items() if s == "train"}
        te = {a: seq[a] for a, s in assign.items() if s == "test"}
        results.append((clusters, assign, moved, identity_report(tr, te, threshold=0.3, threads=threads)))
    assert results[0] == results[1]


def test_temporal_split():
    ps = [{"accession": "A", "date": "2020-05-01"}, {"accession": "B", "date": "2023-01-02"}, {"accession": "C"}]
    assert temporal_split(ps, "2022-01-01") == {"A": "train", "B": "test", "C": "undated"}


def _small_dd(yeast300):
    rows = {s: build_records(yeast300[i:i + 40], s, ["function_text", "ec_number"], seed=0, source="yeast")
            for s, i in (("train", 0), ("test", 100))}
    return to_dataset_dict(rows)


def test_card_atomic_save_and_push(tmp_path, yeast300):
    dd = _small_dd(yeast300)
    card = make_card(dd, pretty_name="Yeast test", split_method="MMseqs2 clusters at 30% identity",
                     sources=[{"name": "yeast_function", "version": "2014-11", "licence": "CC BY 4.0", "url": ""}],
                     mmseqs_version=mmseqs_version(), summary={"counts": {"invalid_letters": 2}},
                     identity={"max": 0.29, "per_protein": {"x": 0.1}}, command="python -m data.build ...")
    text = str(card)
    assert card.data.license == "cc-by-4.0" and "protein" in card.data.tags
    for needle in ("yeast_function", "CC BY 4.0", "function_text", "ec_number", "| train |", "MMseqs2 clusters at 30%",
                   mmseqs_version(), "invalid_letters", '"max": 0.29', "python -m data.build"):
        assert needle in text, needle
    assert '"x": 0.1' not in text
    out = tmp_path / "ds"
    # failure mid-build: nothing at the final path, no temp dirs left
    with pytest.raises(RuntimeError):
        save_atomic(dd, out, {"README.md": text}, _fail_after_write=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    save_atomic(dd, out, {"README.md": text})
    back = datasets.load_from_disk(str(out))
    assert back["train"].features == FEATURES and back["train"][0] == dd["train"][0]
    assert (out / "README.md").read_text() == text
    # a failed rebuild keeps the previous dataset intact
    with pytest.raises(RuntimeError):
        save_atomic(_small_dd(yeast300[50:]), out, _fail_after_write=True)
    assert datasets.load_from_disk(str(out))["train"][0] == dd["train"][0]
    with mock.patch("data.card.HfApi") as api:
        assert push_to_hub(out, "me/yeast", private=True) == "me/yeast"
        api.return_value.create_repo.assert_called_once_with("me/yeast", repo_type="dataset", private=True, exist_ok=True)
        kw = api.return_value.upload_folder.call_args.kwargs
        assert kw["folder_path"] == str(out) and kw["repo_type"] == "dataset" and kw["repo_id"] == "me/yeast"


def test_demo_dataset():
    dd = load_demo_dataset()
    assert set(dd) == {"train", "validation", "test"} and dd["train"].features == FEATURES
    assert 1500 <= len(dd["train"]) <= 2500 and 100 <= len(dd["test"]) <= 250
    assert set(dd["train"]["task"]) == {"protein_name", "yes_no"}
    for s in dd:
        assert max(len(p[0]["sequence"]) for p in dd[s]["proteins"]) <= 256
        yn = [a for a, t in zip(dd[s]["answer"], dd[s]["task"]) if t == "yes_no"]
        assert yn.count("yes") == yn.count("no")
    tr = {p[0]["accession"] for p in dd["train"]["proteins"]}
    assert not tr & {p[0]["accession"] for p in dd["test"]["proteins"]}
    summary = json.loads((__import__("data").build_demo.DEMO_DIR / "build_summary.json").read_text())
    assert summary["identity"]["above_threshold"] == 0


def test_build_cli_given_split(tmp_path, shared_data):
    from data.build import main

    yeast = tmp_path / "y.jsonl"
    lines = (shared_data / "function/yeast_function.jsonl").read_text().splitlines()
    yeast.write_text("\n".join(lines[:300] + ["{broken"]) + "\n")
    out = tmp_path / "out"
    assert main(["--yeast", str(yeast), "--clean-test", str(shared_data / "ec/new392.jsonl"),
                 "--out", str(out), "--mcqa-permutations", "4"]) == 0
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "validation", "test"}
    summ = json.loads((out / "build_summary.json").read_text())
    assert summ["stats"]["counts"]["yeast:malformed:yeast_function"] == 1
    assert "function_mcqa" in (out / "README.md").read_text()
    assert set(dd["test"]["source"]) == {"yeast_function", "new392"}
