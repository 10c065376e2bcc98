"""Retrieval-augmented ProtLLM: the database in the model folder, the search, the prompt block, training exclusion."""

import json
import random

import pytest

pytest.importorskip("pyswrd")

from protllm.training.retrieval import database_from_records, search_excluding  # noqa: E402
from retrieval_protllm import NO_NEIGHBOURS_TEXT, RetrievalDatabase, RetrievalError, render_neighbours  # noqa: E402
from tests.fresh_process import run_fresh_python  # noqa: E402

# Real Swiss-Prot sequences (data/demo): unrelated to each other.
LYSOZYME = "KVFGRCELAAAMKRHGLDNYRGYSLGNWVCAAKFESNFNTQATNRNTDGSTDYGILQINSRWWCNDGRTPGSRNLCNIPCSALLSSDITASVNCAKKIVSDGNGMNAWVAWRNRCKGTDVQAWIRGCRL"
UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"
MYOGLOBIN = "MVLSEGEWQLVLHVWAKVEADVAGHGQDILIRLFKSHPETLEKFDRFKHLKTEAEMKASEDLKKHGVTVLTALGAILKKKGHHEAELKPLAQSHATKHKIPIKYLEFISEAIIHVLHSRHPGDFGADAQGAMNKALELFRKDIAAKYKELGYQG"


def mutate(sequence: str, fraction: float, seed: int) -> str:
    """`sequence` with `fraction` of its residues substituted (seeded): identity about 1 - fraction."""
    rng = random.Random(seed)
    residues = list(sequence)
    for i in rng.sample(range(len(residues)), int(fraction * len(residues))):
        residues[i] = rng.choice([a for a in "ACDEFGHIKLMNPQRSTVWY" if a != residues[i]])
    return "".join(residues)


def residue_shuffled(sequence: str, seed: int = 0) -> str:
    """The same residues in a seeded random order: the composition of `sequence`, and no homology to it."""
    residues = list(sequence)
    random.Random(seed).shuffle(residues)
    return "".join(residues)


def database(**config) -> RetrievalDatabase:
    return RetrievalDatabase([
        {"id": "P1", "sequence": LYSOZYME, "annotations": {"protein_name": "Lysozyme C", "ec_number": "3.2.1.17"}},
        {"id": "P2", "sequence": UBIQUITIN, "annotations": {"protein_name": "Ubiquitin"}},
        {"id": "P3", "sequence": MYOGLOBIN, "annotations": {"protein_name": "Myoglobin"}},
    ], {"k": 2, "threads": 1, **config})


def training_row(accession, sequence, task, answer, question="Name this protein."):
    """A dataset row as data.build writes it: one protein, a question, the answer (same keys in every block)."""
    block = {"type": "protein", "sequence": sequence, "text": None, "chain": None, "structure": None}
    text = {"type": "text", "sequence": None, "text": question, "chain": None, "structure": None}
    return {"id": f"{accession}|{task}", "task": task, "answer": answer, "meta": "{}",
            "proteins": [{"accession": accession, "sequence": sequence}],
            "messages": [{"role": "user", "content": [block, text]},
                         {"role": "assistant", "content": [{**text, "text": answer}]}]}


def chat(sequence, question="Name this protein."):
    return [{"role": "user", "content": [{"type": "protein", "sequence": sequence}, {"type": "text", "text": question}]}]


def test_search_finds_the_homolog_with_identity_and_evalue():
    found = database().search([mutate(LYSOZYME, 0.3, 0), UBIQUITIN])
    assert [n["id"] for n in found[0]][:1] == ["P1"] and [n["id"] for n in found[1]][:1] == ["P2"]
    assert 0.6 < found[0][0]["identity"] < 0.8 and found[1][0]["identity"] == 1.0
    assert found[0][0]["evalue"] < 1e-10 and found[0][0]["annotations"]["ec_number"] == "3.2.1.17"


def test_leave_one_out_and_identity_threshold_exclusion():
    """Training neighbours never include the protein itself, nor anything above the identity threshold."""
    close, distant = mutate(LYSOZYME, 0.05, 1), mutate(LYSOZYME, 0.45, 2)
    db = RetrievalDatabase([
        {"id": "self", "sequence": LYSOZYME, "annotations": {"protein_name": "Lysozyme C"}},
        {"id": "close", "sequence": close, "annotations": {"protein_name": "Close copy"}},
        {"id": "distant", "sequence": distant, "annotations": {"protein_name": "Distant homolog"}},
        {"id": "other", "sequence": UBIQUITIN, "annotations": {"protein_name": "Ubiquitin"}},
    ], {"k": 5, "threads": 1})
    everything = [n["id"] for n in db.search([LYSOZYME])[0]]
    assert everything[:3] == ["self", "close", "distant"]
    leave_one_out = [n["id"] for n in search_excluding(db, [LYSOZYME], exclude=["self"])[0]]
    assert leave_one_out == ["close", "distant"]
    capped = search_excluding(db, [LYSOZYME], exclude=["self"], max_identity=0.9)[0]
    assert [n["id"] for n in capped] == ["distant"] and capped[0]["identity"] <= 0.9


def test_composition_fallback_only_for_a_protein_without_homolog():
    """A residue-shuffled myoglobin has no homolog but myoglobin's composition: with `fallback: composition` it gets
    myoglobin, marked and rendered as a composition match; a protein with a homolog gets its homologs only."""
    decoy = residue_shuffled(MYOGLOBIN, 2)  # (seeds 0 and 1 leave a chance local alignment at E < 0.01)
    plain, with_fallback = database(), database(fallback="composition")
    assert plain.search([decoy]) == [[]] and plain.find([decoy]) == [[]]
    found = with_fallback.find([decoy, mutate(LYSOZYME, 0.3, 0)])
    assert [n["id"] for n in found[0]][0] == "P3" and [n["method"] for n in found[0]] == ["composition"] * 2
    assert found[0][0]["similarity"] > 0.9 > found[0][1]["similarity"]
    assert [n["id"] for n in found[1]] == ["P1"] and "method" not in found[1][0] and found[1][0]["evalue"] < 1e-10
    text = render_neighbours(found[0][:1])
    assert text.endswith("- no homolog, similar composition; name: Myoglobin") and "identity" not in text
    assert with_fallback.composition_neighbours([decoy], k=1, exclude=[{"P3"}])[0][0]["id"] != "P3"
    with pytest.raises(RetrievalError, match="fallback must be one of"):
        database(fallback="kmers")


def test_composition_fallback_in_training_keeps_the_exclusions():
    """Training composition neighbours are never the protein itself, its cluster or a homolog above the identity cap,
    even when it has more such homologs than the search over-fetches (52 here): those are searched again in full."""
    copies = [{"id": f"copy{i}", "sequence": mutate(LYSOZYME, 0.05, i), "annotations": {"protein_name": "Close copy"}}
              for i in range(60)]
    db = RetrievalDatabase([
        {"id": "self", "sequence": LYSOZYME, "annotations": {"protein_name": "Lysozyme C"}, "cluster": "c1"},
        *copies,
        {"id": "twin", "sequence": residue_shuffled(LYSOZYME, 1), "annotations": {"protein_name": "Same composition"}},
        {"id": "other", "sequence": UBIQUITIN, "annotations": {"protein_name": "Ubiquitin"}},
    ], {"k": 1, "threads": 1, "fallback": "composition"})
    assert [n["id"] for n in db.find([LYSOZYME])[0]] == ["self"]
    homologs = db.search([LYSOZYME], k=100)[0]
    assert len(homologs) == 61 and all(n["identity"] > 0.9 for n in homologs)  # itself + 60 copies, all above the cap
    found = search_excluding(db, [LYSOZYME], exclude=["self"], max_identity=0.9)[0]
    assert [(n["id"], n["method"]) for n in found] == [("twin", "composition")]
    db.entries[-2]["cluster"] = "c1"  # the twin now shares the query's cluster
    assert [n["id"] for n in search_excluding(db, [LYSOZYME], exclude=["self"], max_identity=0.9,
                                              exclude_same_cluster=True)[0]] == ["other"]


def test_per_field_gives_each_field_its_own_closest_protein():
    """`per_field`: a lysozyme query gets the closest protein with a name (a homolog) and, though no homolog carries
    an EC number, the closest with one by composition; each neighbour shows only the field it was found for, and a
    protein found for two fields is listed once with both."""
    entries = [
        {"id": "named", "sequence": mutate(LYSOZYME, 0.3, 5), "annotations": {"protein_name": "Lysozyme C",
                                                                             "function_text": "Lyses walls."}},
        {"id": "enzyme", "sequence": residue_shuffled(LYSOZYME, 1),
         "annotations": {"ec_number": "3.2.1.17", "reaction": "A = B", "protein_name": "Unrelated"}},
        {"id": "other", "sequence": UBIQUITIN, "annotations": {"ec_number": "9.9.9.9", "function_text": "Tags."}},
    ]
    config = {"k": 1, "threads": 1, "fallback": "composition"}
    plain, per_field = RetrievalDatabase(entries, config), RetrievalDatabase(entries, {**config, "per_field": True})
    assert [n["id"] for n in plain.find([LYSOZYME])[0]] == ["named"]  # no EC number in the prompt
    found = per_field.find([LYSOZYME])[0]
    assert [(n["id"], n.get("method")) for n in found] == [("named", None), ("enzyme", "composition")]
    assert found[0]["annotations"] == {"protein_name": "Lysozyme C", "function_text": "Lyses walls."}
    assert found[1]["annotations"] == {"ec_number": "3.2.1.17", "reaction": "A = B"}  # not its name: "named" is closer
    assert list(per_field.field_views()) == ["protein_name", "ec_number", "reaction", "function_text"]
    # training: the protein itself is excluded from every field's view, and its cluster mates too
    training = search_excluding(per_field, [LYSOZYME], exclude=["named"])[0]
    assert "named" not in [n["id"] for n in training] and {"protein_name", "ec_number"} <= {
        field for n in training for field in n["annotations"]}
    per_field.entries[1]["cluster"] = per_field.entries[0]["cluster"] = "c1"
    per_field._field_views = None
    clustered = search_excluding(per_field, [LYSOZYME], exclude=["named"], exclude_same_cluster=True)[0]
    assert [n["id"] for n in clustered] == ["other"] and set(clustered[0]["annotations"]) == {"ec_number", "function_text"}
    with pytest.raises(RetrievalError, match="per_field must be true or false"):
        RetrievalDatabase(entries, {"per_field": "yes"})


def test_a_question_sees_the_closest_protein_that_carries_its_field():
    """`retrieval_field` / `task_fields`: an EC question about lysozyme sees the closest protein with an EC number
    (by composition: no homolog has one), showing only its EC number; a name question in the same batch sees the
    closest protein. Training searches the same view under the same exclusions."""
    entries = [
        {"id": "named", "sequence": mutate(LYSOZYME, 0.3, 5), "annotations": {"protein_name": "Lysozyme C"}},
        {"id": "enzyme", "sequence": residue_shuffled(LYSOZYME, 1),
         "annotations": {"ec_number": "3.2.1.17", "protein_name": "Unrelated"}},
        {"id": "other", "sequence": UBIQUITIN, "annotations": {"ec_number": "9.9.9.9"}},
    ]
    db = RetrievalDatabase(entries, {"k": 1, "threads": 1, "fallback": "composition",
                                     "task_fields": {"ec_number": "ec_number", "yes_no": "protein_name"}})
    assert db.field_for_task("ec_number") == "ec_number" and db.field_for_task("function_text") is None
    assert [n["id"] for n in db.find([LYSOZYME])[0]] == ["named"]
    found = db.find([LYSOZYME], field="ec_number")[0]
    assert [(n["id"], n["method"], n["annotations"]) for n in found] == [("enzyme", "composition", {"ec_number": "3.2.1.17"})]
    name_question, ec_question = db.augment([chat(LYSOZYME), chat(LYSOZYME, "Which EC number?")], field=[None, "ec_number"])
    assert name_question[0]["content"][1]["text"].endswith("identity; name: Lysozyme C")
    assert ec_question[0]["content"][1]["text"].endswith("- no homolog, similar composition; EC: 3.2.1.17")
    assert db.augment([chat(LYSOZYME, "Which EC number?")], field="ec_number") == [ec_question]
    # training: the protein itself (and its cluster) never comes back from its field's view
    assert [n["id"] for n in search_excluding(db, [LYSOZYME], exclude=["enzyme"], field="ec_number")[0]] == ["other"]
    db.entries[1]["cluster"] = db.entries[2]["cluster"] = "c1"
    assert search_excluding(db, [LYSOZYME], exclude=["enzyme"], field="ec_number", exclude_same_cluster=True) == [[]]
    with pytest.raises(RetrievalError, match="retrieval field 'go': no database protein carries it "
                                             r"\(fields: protein_name, ec_number\)"):
        db.find([LYSOZYME], field="go")
    with pytest.raises(RetrievalError, match="2 retrieval fields for 1 conversations"):
        db.augment([chat(LYSOZYME)], field=["ec_number", None])
    with pytest.raises(RetrievalError, match="task_fields must map task names to field names"):
        RetrievalDatabase(entries, {"task_fields": ["ec_number"]})


def test_training_rows_of_a_listed_task_search_the_carriers_of_its_field():
    """`task_fields` in training: lysozyme's EC row sees the closest *other* protein with an EC number, its name row the
    closest protein (a homolog without one); the mapping is saved with the database for evaluation."""
    datasets = pytest.importorskip("datasets")
    from protllm.training.retrieval import add_neighbours, build_database

    rows = [training_row("L1", LYSOZYME, "protein_name", "Lysozyme C"), training_row("L1", LYSOZYME, "ec_number", "3.2.1.17"),
            training_row("L2", mutate(LYSOZYME, 0.4, 5), "protein_name", "Lysozyme homolog"),
            training_row("E1", residue_shuffled(LYSOZYME, 1), "ec_number", "3.2.1.99"),
            training_row("U1", UBIQUITIN, "protein_name", "Ubiquitin")]
    spec = {"k": 1, "max_identity": 0.9, "fallback": "composition", "task_fields": {"ec_number": "ec_number"}}
    dataset = datasets.Dataset.from_list(rows)
    db = build_database(dataset, spec, ["test"])
    augmented, stats = add_neighbours(dataset, db, spec)
    texts = {r["id"]: r["messages"][0]["content"][1]["text"] for r in augmented}
    assert texts["L1|protein_name"].endswith("identity; name: Lysozyme homolog")
    assert texts["L1|ec_number"].endswith("- no homolog, similar composition; EC: 3.2.1.99")
    assert texts["E1|ec_number"].endswith("; EC: 3.2.1.17") and "3.2.1.99" not in texts["E1|ec_number"]
    assert stats["proteins"] == 5  # (field, protein) searches: L1, L2, U1 by any field; L1, E1 among EC carriers
    assert stats["with_composition_neighbours"] == 3  # U1 (no homolog at all), and both EC searches
    assert db.config["task_fields"] == {"ec_number": "ec_number"}


def test_records_merge_into_one_entry_per_protein_and_a_conflicting_sequence_is_named():
    db = database_from_records([
        {"id": "P1", "sequence": LYSOZYME.lower(), "field": "protein_name", "text": " Lysozyme C "},
        {"id": "P1", "sequence": LYSOZYME, "field": "ec_number", "text": "3.2.1.17", "cluster": "c1"},
        {"id": "P1", "sequence": LYSOZYME, "field": "protein_name", "text": "a later name"},
        {"id": "P2", "sequence": UBIQUITIN, "field": "yes_no", "text": None},
    ], {"k": 2})
    assert [e["id"] for e in db.entries] == ["P1", "P2"] and db.config["k"] == 2
    assert db.entries[0] == {"id": "P1", "sequence": LYSOZYME, "cluster": "c1",
                             "annotations": {"protein_name": "Lysozyme C", "ec_number": "3.2.1.17"}}
    with pytest.raises(RetrievalError, match="'P2' appears with two different sequences"):
        database_from_records([{"id": "P2", "sequence": UBIQUITIN, "field": "x", "text": "y"},
                               {"id": "P2", "sequence": LYSOZYME, "field": "x", "text": "y"}])


def test_identity_cap_compares_the_exact_identity(monkeypatch):
    """A neighbour at 30.04% identity is above a 0.3 cap, though it prints as 30% (search results are not rounded)."""
    db = RetrievalDatabase([{"id": "n", "sequence": LYSOZYME, "annotations": {}}], {"k": 2})
    found = [[{"id": "n", "identity": 0.3004, "evalue": 1e-5, "score": 50, "coverage": 1.0, "annotations": {}}]]
    monkeypatch.setattr(db, "search", lambda sequences, k=None: [list(f) for f in found])
    assert search_excluding(db, [UBIQUITIN], exclude=["self"], max_identity=0.3) == [[]]
    assert search_excluding(db, [UBIQUITIN], exclude=["self"], max_identity=0.31) == found
    assert isinstance(database().search([UBIQUITIN])[0][0]["identity"], float)


def test_cluster_exclusion_drops_the_whole_cluster():
    db = RetrievalDatabase([
        {"id": "a", "sequence": LYSOZYME, "annotations": {"protein_name": "A"}, "cluster": "c1"},
        {"id": "b", "sequence": mutate(LYSOZYME, 0.2, 3), "annotations": {"protein_name": "B"}, "cluster": "c1"},
        {"id": "c", "sequence": mutate(LYSOZYME, 0.5, 4), "annotations": {"protein_name": "C"}, "cluster": "c2"},
    ], {"k": 5, "threads": 1})
    assert [n["id"] for n in search_excluding(db, [LYSOZYME], exclude=["a"])[0]] == ["b", "c"]
    assert [n["id"] for n in search_excluding(db, [LYSOZYME], exclude=["a"], exclude_same_cluster=True)[0]] == ["c"]


def test_training_rows_get_leave_one_out_neighbours():
    """protllm.training.retrieval: each training row's block is searched without the row's own protein."""
    datasets = pytest.importorskip("datasets")
    from protllm.training.retrieval import add_neighbours, build_database

    rows = [training_row("L1", LYSOZYME, "protein_name", "Lysozyme C"),
            training_row("L2", mutate(LYSOZYME, 0.4, 5), "protein_name", "Lysozyme homolog"),
            training_row("L3", mutate(LYSOZYME, 0.02, 6), "protein_name", "Lysozyme copy"),
            training_row("U1", UBIQUITIN, "protein_name", "Ubiquitin")]
    dataset = datasets.Dataset.from_list(rows)
    spec = {"k": 3, "max_identity": 0.9}
    db = build_database(dataset, spec, ["test"])
    assert len(db) == 4
    augmented, stats = add_neighbours(dataset, db, spec)
    texts = {r["id"].split("|")[0]: r["messages"][0]["content"][1]["text"] for r in augmented}
    assert all(r["messages"][0]["content"][1]["type"] == "neighbours" for r in augmented)
    # L1's own name never appears in its block; its 98% copy is above the cap; the 60% homolog is shown.
    assert "Lysozyme C" not in texts["L1"] and "Lysozyme copy" not in texts["L1"] and "Lysozyme homolog" in texts["L1"]
    assert "Lysozyme C" in texts["L2"] and "Lysozyme homolog" not in texts["L2"]
    assert texts["U1"] == NO_NEIGHBOURS_TEXT
    assert stats["proteins"] == 4 and stats["with_neighbours"] == 3


def test_search_is_done_once_per_protein_and_settings(monkeypatch):
    """Evaluation asks again for the same proteins (the shuffled control): the second ask is answered from memory,
    with the same neighbours; another `k` searches again."""
    import retrieval_protllm

    calls = []
    real_search = retrieval_protllm.pyswrd.search

    def counting_search(queries, *args, **kwargs):
        calls.append(list(queries))
        return real_search(queries, *args, **kwargs)

    monkeypatch.setattr(retrieval_protllm.pyswrd, "search", counting_search)
    db = database()
    query = mutate(LYSOZYME, 0.3, 0)
    first = db.search([query, UBIQUITIN, query])
    assert calls == [[query, UBIQUITIN]] or calls == [[UBIQUITIN, query]]  # a repeated protein is searched once
    assert first[0] == first[2] and first[0][0]["id"] == "P1"
    assert db.search([UBIQUITIN, query]) == [first[1], first[0]] and len(calls) == 1
    first[0][0]["annotations"]["protein_name"] = "changed by the caller"
    assert db.search([query])[0][0]["annotations"]["protein_name"] == "Lysozyme C"  # callers get copies
    assert db.search([query], k=1)[0] == db.search([query])[0][:1] and len(calls) == 2  # another k: a new search


def test_train_rows_samples_the_training_rows_but_the_database_keeps_every_protein():
    datasets = pytest.importorskip("datasets")
    from protllm.training.retrieval import attach_retrieval

    class Holder:
        retrieval_database = None

    rows = [training_row("L1", LYSOZYME, "protein_name", "Lysozyme C"),
            training_row("L2", mutate(LYSOZYME, 0.4, 5), "protein_name", "Lysozyme homolog"),
            training_row("U1", UBIQUITIN, "protein_name", "Ubiquitin"), training_row("M1", MYOGLOBIN, "protein_name", "Myoglobin")]
    holder = Holder()
    sampled, stats = attach_retrieval(holder, datasets.Dataset.from_list(rows), {"k": 2, "train_rows": 2}, ["test"], seed=0)
    assert len(sampled) == 2 and len(holder.retrieval_database) == 4 and stats["proteins"] == 2
    again, _ = attach_retrieval(Holder(), datasets.Dataset.from_list(rows), {"k": 2, "train_rows": 2}, ["test"], seed=0)
    assert sampled["id"] == again["id"]  # seeded
    with pytest.raises(ValueError, match="train_rows"):
        attach_retrieval(Holder(), datasets.Dataset.from_list(rows), {"train_rows": 0}, ["test"])


def test_render_and_bad_neighbours():
    text = render_neighbours([{"identity": 0.42, "evalue": 1e-20,
                               "annotations": {"function_text": "Hydrolyses cell walls", "protein_name": "Lysozyme C",
                                               "ec_number": "3.2.1.17"}},
                              {"identity": 0.31, "annotations": {"reaction": "A + B = C"}}])
    # One line per neighbour, short fields first; no list number or E-value that a small model would copy into an
    # EC number.
    assert text.splitlines()[1:] == ["- 42% identity; name: Lysozyme C; EC: 3.2.1.17; function: Hydrolyses cell walls",
                                     "- 31% identity; reaction: A + B = C"]
    assert render_neighbours([]) == NO_NEIGHBOURS_TEXT
    with pytest.raises(RetrievalError, match="neighbour 1"):
        render_neighbours(["Lysozyme"])
    with pytest.raises(RetrievalError, match="duplicate id 'x'"):
        RetrievalDatabase([{"id": "x", "sequence": "MK"}, {"id": "x", "sequence": "MA"}])


@pytest.fixture(scope="module")
def folder_with_database(tmp_path_factory):
    pytest.importorskip("torch")
    from protllm.model_folder import save_model_folder
    from protllm.testing import build_tiny_protllm

    model, processor = build_tiny_protllm("llama", seed=0)
    processor.retrieval_database = database(fallback="composition")
    return save_model_folder(model, processor, tmp_path_factory.mktemp("retrieval") / "model")


def test_database_round_trip_through_auto_classes_in_a_clean_process(folder_with_database, tmp_path):
    folder = folder_with_database
    rows = [json.loads(line) for line in (folder / "retrieval" / "database.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["P1", "P2", "P3"]
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.bin"))
    out = run_fresh_python(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        query = [{{"role": "user", "content": [{{"type": "protein", "sequence": {LYSOZYME[:-3]!r}}},
                                               {{"type": "text", "text": "Name this protein."}}]}}]
        with_db = processor.apply_chat_template(query, add_generation_prompt=True)
        without = processor.apply_chat_template(query, add_generation_prompt=True, retrieval=False)
        query[0]["content"][0]["sequence"] = {residue_shuffled(MYOGLOBIN, 2)!r}  # no homolog in the database
        by_composition = processor.apply_chat_template(query, add_generation_prompt=True)
        ec_carrier = processor.apply_chat_template(query, add_generation_prompt=True, retrieval_field="ec_number")
        inputs = processor.apply_chat_template(query, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        print(json.dumps({{"size": len(processor.retrieval_database), "with": with_db, "without": without,
                          "by_composition": by_composition, "ec_carrier": ec_carrier,
                          "protein_tokens": int((inputs["input_ids"] == processor.protein_token_id).sum()),
                          "new_tokens": generated.shape[1] - inputs["input_ids"].shape[1]}}))
    """, cwd=tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["size"] == 3
    assert "name: Lysozyme C" in result["with"] and "EC: 3.2.1.17" in result["with"]
    assert "Lysozyme" not in result["without"] and "Similar proteins" not in result["without"]
    assert "- no homolog, similar composition; name: Myoglobin" in result["by_composition"]
    assert "- no homolog, similar composition; EC: 3.2.1.17" in result["ec_carrier"]  # the one protein with an EC
    assert result["protein_tokens"] > 0 and result["new_tokens"] == 3  # protein tokens stay beside the neighbours


def test_processor_class_loads_a_folder_without_asking_to_run_its_code(folder_with_database, capfd):
    """`ProtLLMProcessor.from_pretrained(folder)` reads a plain tokenizer: transformers must not prompt about the
    folder's `auto_map` (interactively it waits 15 s for an answer)."""
    from processing_protllm import ProtLLMProcessor

    processor = ProtLLMProcessor.from_pretrained(folder_with_database)
    captured = capfd.readouterr()
    assert "custom code" not in captured.out + captured.err and len(processor.retrieval_database) == 3


def test_user_neighbours_are_kept_and_retrieval_true_needs_a_database(folder_with_database):
    from processing_protllm import ProtLLMProcessor

    processor = ProtLLMProcessor.from_pretrained(folder_with_database)
    own = chat(LYSOZYME)
    own[0]["content"].insert(1, {"type": "neighbours", "neighbours": [{"identity": 0.3, "annotations": {"protein_name": "Mine"}}]})
    text = processor.apply_chat_template(own)
    assert "name: Mine" in text and "Lysozyme C" not in text
    processor.retrieval_database = None
    with pytest.raises(ValueError, match="no retrieval database"):
        processor.apply_chat_template(chat(LYSOZYME), retrieval=True)


def _recording_predictor(folder, **kwargs):
    """A ModelPredictor whose processor records every prompt it renders."""
    from eval.generate import ModelPredictor
    from processing_protllm import ProtLLMProcessor

    processor = ProtLLMProcessor.from_pretrained(folder)
    prompts = []
    original = processor.apply_chat_template

    def recording(conversation, **kw):
        asked = {key: kw[key] for key in ("retrieval", "retrieval_field") if key in kw}
        prompts.extend(original(conversation, tokenize=False, add_generation_prompt=True, **asked))
        return original(conversation, **kw)

    processor.apply_chat_template = recording
    predictor = ModelPredictor(str(folder), processor=processor, max_new_tokens=2, **kwargs)
    return predictor, prompts


def test_shuffled_proteins_are_shuffled_before_retrieval(folder_with_database):
    from eval.baselines import ShuffledProteins

    examples = [{"id": "lys", "task": "protein_name", "question": "Name this protein.", "proteins": [{"sequence": LYSOZYME}]},
                {"id": "ubi", "task": "protein_name", "question": "Name this protein.", "proteins": [{"sequence": UBIQUITIN}]}]
    predictor, prompts = _recording_predictor(folder_with_database)
    shuffled = ShuffledProteins(predictor, seed=0).fit(examples)
    shuffled.predict(examples[:1])  # the lysozyme question, asked with the ubiquitin protein
    assert "name: Ubiquitin" in prompts[-1] and "Lysozyme" not in prompts[-1]


def test_no_retrieval_tells_the_model_nothing_is_known(folder_with_database):
    example = {"id": "lys", "task": "protein_name", "question": "Name this protein.", "proteins": [{"sequence": LYSOZYME}]}
    predictor, prompts = _recording_predictor(folder_with_database)
    predictor.predict([example])
    assert "name: Lysozyme C" in prompts[-1]
    bare = predictor.without_retrieval()
    assert bare.name.endswith("+no_retrieval") and bare._model is predictor._model  # same weights
    bare.predict([example])
    assert NO_NEIGHBOURS_TEXT in prompts[-1] and "Lysozyme" not in prompts[-1]
    assert bare.settings()["retrieval"] is False and predictor.settings()["retrieval_database_size"] == 3


def test_evaluation_and_the_pipeline_ask_each_task_with_its_trained_field(folder_with_database, monkeypatch):
    """A database trained with `task_fields` is asked the same way: `python -m eval` passes each example's field (an EC
    question about ubiquitin sees lysozyme, the only protein with an EC number; a name question sees ubiquitin), and
    the pipeline takes `retrieval_field`; both match processor + generate."""
    from pipeline_protllm import ProteinFunctionPipeline

    examples = [{"id": "ubi-ec", "task": "ec_number", "question": "Which EC number?", "proteins": [{"sequence": UBIQUITIN}]},
                {"id": "ubi-name", "task": "protein_name", "question": "Name this protein.", "proteins": [{"sequence": UBIQUITIN}]}]
    predictor, prompts = _recording_predictor(folder_with_database)
    predictor._load()
    predictor._proc.retrieval_database.config["task_fields"] = {"ec_number": "ec_number"}
    predictor.predict(examples)
    assert "EC: 3.2.1.17" in prompts[-2] and "Ubiquitin" not in prompts[-2]
    assert "name: Ubiquitin" in prompts[-1]
    assert predictor.settings()["retrieval_task_fields"] == {"ec_number": "ec_number"}
    assert predictor.without_retrieval().settings()["retrieval_task_fields"] is None

    model, processor = predictor._model, predictor._proc
    pipe = ProteinFunctionPipeline(model=model, processor=processor, device="cpu")
    answer = pipe(UBIQUITIN, question="Which EC number?", retrieval_field="ec_number", max_new_tokens=3)
    assert "EC: 3.2.1.17" in prompts[-1]
    inputs = processor.apply_chat_template(chat(UBIQUITIN, "Which EC number?"), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", retrieval_field="ec_number")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert answer == [{"generated_text": expected}]

    # A list is checked input by input before it is answered: each protein is searched once, in the asked field.
    import retrieval_protllm

    searched = []
    real_search = retrieval_protllm.pyswrd.search
    monkeypatch.setattr(retrieval_protllm.pyswrd, "search",
                        lambda queries, *args, **kwargs: searched.extend(queries) or real_search(queries, *args, **kwargs))
    pipe([MYOGLOBIN, LYSOZYME[:-3]], question="Which EC number?", retrieval_field="ec_number", max_new_tokens=2)
    assert sorted(searched) == sorted([MYOGLOBIN, LYSOZYME[:-3]])


@pytest.mark.parametrize("retrieval, message", [
    ({"k": 2, "max_identiy": 0.3}, "model.retrieval.max_identiy`; did you mean `max_identity`"),
    ({"k": 0}, "model.retrieval.k` must be a positive integer"),
    ({"max_identity": 1.5}, r"model.retrieval.max_identity` must be in \(0, 1\]"),
    ({"exclusion": "none"}, "leave_one_out or cluster"),
    ({"train_rows": -5}, "model.retrieval.train_rows` must be a positive integer"),
    ({"fallback": "kmer"}, "model.retrieval.fallback` must be composition or absent"),
    ({"per_field": "yes"}, "model.retrieval.per_field` must be true or false"),
    ({"task_fields": {"yes_no": "keyword"}}, r"model.retrieval.task_fields.yes_no` is 'keyword', not one of the database's"),
    ({"task_fields": ["ec_number"]}, "model.retrieval.task_fields` must map task names to fields"),
])
def test_recipe_retrieval_keys_are_checked(retrieval, message):
    pytest.importorskip("trl")
    from protllm.training.recipe import RecipeError, validate_recipe

    with pytest.raises(RecipeError, match=message):
        validate_recipe({"model": {"retrieval": retrieval}, "stages": [{"name": "align"}]}, "demo.yaml")
