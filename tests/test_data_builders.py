"""Task builders on real records: schema, templates, MCQA permutations, balanced yes/no, bad input counts."""

import json
from collections import Counter
from itertools import islice

from data import readers
from data.builders import (RECORD_KEYS, TASKS, TEMPLATES, BuildStats, build_records, go_mf_labels,
                           validate_proteins)

BLOCK_KEYS = {"type", "text", "sequence", "structure", "chain"}


def _check_row(r):
    assert tuple(sorted(r)) == tuple(sorted(RECORD_KEYS)) and r["task"] in TASKS
    user, asst = r["messages"]
    assert user["role"] == "user" and asst["role"] == "assistant"
    assert [b["type"] for b in user["content"]] == ["protein", "text"]
    assert all(set(b) == BLOCK_KEYS for b in user["content"] + asst["content"])
    assert user["content"][0]["sequence"] == r["proteins"][0]["sequence"]
    assert asst["content"][0]["text"] == r["answer"] and r["answer"]
    json.loads(r["meta"])


def test_yeast_all_tasks(shared_data):
    s = BuildStats()
    prots = validate_proteins(islice(readers.read_yeast_function(shared_data / "function/yeast_function.jsonl"), 400), s)
    tasks = ["function_text", "function_mcqa", "protein_name", "ec_number", "reaction", "yes_no"]
    rows = build_records(prots, "train", tasks, seed=1, source="yeast", stats=s)
    for r in rows:
        _check_row(r)
    c = Counter(r["task"] for r in rows)
    n_ec = sum(bool(p["ec"]) for p in prots)
    assert c["function_text"] == c["function_mcqa"] == c["protein_name"] == 400
    assert c["ec_number"] == n_ec and s.counts["empty_annotation:ec_number"] == 400 - n_ec
    assert c["yes_no"] > 0 and Counter(r["answer"] for r in rows if r["task"] == "yes_no")["yes"] == c["yes_no"] / 2
    # templates paraphrased, deterministic with the seed
    texts = {r["messages"][0]["content"][1]["text"] for r in rows if r["task"] == "function_text"}
    assert texts == set(TEMPLATES["function_text"])
    again = build_records(prots, "train", tasks, seed=1, source="yeast")
    assert again == rows
    other = build_records(prots, "train", ["function_text"], seed=2, source="yeast")
    assert [r["messages"][0]["content"][1]["text"] for r in other] != [r["messages"][0]["content"][1]["text"] for r in rows[:400]]
    his1 = next(r for r in rows if r["id"] == "P00498|reaction")
    assert "ATP" in his1["answer"] and json.loads(his1["meta"])["ec"] == ["2.4.2.17"]


def test_mcqa_shuffled_and_four_permutations(shared_data):
    prots = list(islice(readers.read_yeast_function(shared_data / "function/yeast_function.jsonl"), 200))
    one = build_records(prots, "test", ["function_mcqa"], seed=0)
    letters = Counter(r["answer"] for r in one)
    assert set(letters) == set("ABCD") and min(letters.values()) > 25
    for r in one:
        m = json.loads(r["meta"])
        assert m["options"]["ABCD".index(m["correct"])] == m["correct_text"]
        assert len(set(m["options"])) == 4 and f"{r['answer']}. {m['correct_text']}" in r["messages"][0]["content"][1]["text"]
    four = build_records(prots, "test", ["function_mcqa"], seed=0, mcqa_permutations=4)
    assert len(four) == 4 * len(prots)
    by_group = {}
    for r in four:
        by_group.setdefault(json.loads(r["meta"])["group"], []).append(r["answer"])
    assert all(sorted(v) == list("ABCD") for v in by_group.values())


def test_ec_sets_and_go(shared_data):
    s = BuildStats()
    ec = validate_proteins(readers.read_clean_ec(shared_data / "ec/new392.jsonl"), s)
    rows = build_records(ec, "test", ["ec_number", "reaction", "yes_no"], seed=0, source="new392", stats=s)
    c = Counter(r["task"] for r in rows)
    assert c["ec_number"] == 392 and c["reaction"] > 380
    multi = next(r for r in rows if r["id"] == "P47482|ec_number")
    assert multi["answer"] == "2.7.7.18; 3.6.1.41"
    yn = [r for r in rows if r["task"] == "yes_no"]
    per_label = Counter((json.loads(r["meta"])["label"], r["answer"]) for r in yn)
    for (lab, ans), n in per_label.items():
        assert per_label[(lab, "yes" if ans == "no" else "no")] == n  # balanced per question text
    go = list(islice(readers.read_go_jsonl(shared_data / "go/fapm_val.jsonl"), 300))
    rows = build_records(go, "validation", ["go_terms", "yes_no"], seed=0, yes_no_label_fn=go_mf_labels)
    g = next(r for r in rows if r["id"] == "P84782|go_terms")
    assert "GO:0004867" in json.loads(g["meta"])["go_ids"] and "serine-type endopeptidase inhibitor activity" in g["answer"]
    assert any(r["task"] == "yes_no" and "activity" in r["messages"][0]["content"][1]["text"] for r in rows)


def test_keywords_from_flat_file(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_tdr", Path(__file__).with_name("test_data_readers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    REAL_DAT = mod.REAL_DAT

    f = tmp_path / "his1.dat"
    f.write_text(REAL_DAT)
    rows = build_records(list(readers.read_swissprot_dat(f)), "train", ["keywords", "go_terms", "protein_name"], seed=0)
    assert [r["task"] for r in rows] == ["keywords", "go_terms", "protein_name"]
    assert "Histidine biosynthesis" in rows[0]["answer"]


def test_bad_inputs_counted(shared_data):
    good = list(islice(readers.read_yeast_function(shared_data / "function/yeast_function.jsonl"), 5))
    bad = [dict(good[0]),  # duplicate
           readers.protein("X1", "MKV1LL*"),  # digits/stop are stripped -> valid
           readers.protein("X2", "MKV#LL"),  # invalid letter
           readers.protein("X3", ""),  # empty
           readers.protein("", "MKVLL"),  # no accession
           readers.protein("X4", "MKVXLL", description=""),  # non-standard letter kept, empty description
           readers.protein("X5", "M" * 6000)]
    s = BuildStats()
    kept = validate_proteins(good + bad, s, max_length=5000)
    assert s.counts["duplicate_accession"] == 1 and s.counts["invalid_letters"] == 1
    assert s.counts["empty_sequence"] == 1 and s.counts["missing_accession"] == 1
    assert s.counts["nonstandard_letters"] == 1 and s.counts["too_long"] == 1
    assert [p["accession"] for p in kept][-2:] == ["X1", "X4"] and kept[-2]["sequence"] == "MKVLL"
    build_records(kept, "train", ["function_text"], stats=s)
    assert s.counts["empty_annotation:function_text"] == 2
    assert len(kept) + sum(s.counts[k] for k in ("duplicate_accession", "invalid_letters", "empty_sequence",
                                                  "missing_accession", "too_long")) == len(good + bad)


def test_shard_written_in_arrow_batches_equals_row_by_row_dataset(tmp_path, shared_data):
    """A streaming build's worker writes columnar batches (`ArrowWriter.write_batch`); the table must be the one
    `datasets` builds row by row (`Features.encode_example`), across batch boundaries and for an empty shard."""
    import datasets

    from data.builders import ec_and_go_mf_labels, write_shard_arrow
    from data.card import FEATURES

    proteins = validate_proteins(islice(readers.read_yeast_function(shared_data / "function/yeast_function.jsonl"), 60),
                                 BuildStats())
    tasks = ["function_text", "function_mcqa", "protein_name", "ec_number", "reaction", "yes_no"]
    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps(p) + "\n" for p in proteins))
    rows, stats = write_shard_arrow(str(shard), str(tmp_path / "shard.arrow"), "train", "yeast", tasks, seed=3,
                                    batch_rows=7)
    assert not shard.exists()  # the spilled proteins are deleted once written
    expected_stats = BuildStats()
    records = build_records(proteins, "train", tasks, seed=3, source="yeast", stats=expected_stats,
                            yes_no_label_fn=ec_and_go_mf_labels)
    assert rows == len(records) > 7 * 10 and stats == expected_stats.as_dict()
    batched = datasets.Dataset.from_file(str(tmp_path / "shard.arrow"))
    row_by_row = datasets.Dataset.from_generator(lambda: iter(records), features=FEATURES,
                                                 cache_dir=str(tmp_path / "cache"))
    assert batched.features == row_by_row.features == FEATURES
    assert batched.data.table.equals(row_by_row.data.table)

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(dict(proteins[0], description="", name="", ec=[])) + "\n")
    assert write_shard_arrow(str(empty), str(tmp_path / "empty.arrow"), "train", "yeast", ["function_text"])[0] == 0
    assert datasets.Dataset.from_file(str(tmp_path / "empty.arrow")).features == FEATURES
