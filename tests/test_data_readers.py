"""Readers on real records from ../shared/data (and Debian's mmseqs2-examples when installed)."""

import gzip
import json
from itertools import islice
from pathlib import Path

import pytest

from data import readers
from data.builders import BuildStats


def _yeast(shared_data, n=50):
    return list(islice(readers.read_yeast_function(shared_data / "function/yeast_function.jsonl"), n))


def test_shared_jsonl_readers(shared_data):
    s = BuildStats()
    y = list(readers.read_yeast_function(shared_data / "function/yeast_function.jsonl", s))
    assert len(y) == 5927 and not s.counts
    assert {p["split"] for p in y} == {"train", "valid", "test"}
    his1 = next(p for p in y if p["accession"] == "P00498")
    assert his1["ec"] == ["2.4.2.17"] and "histidine" in his1["description"]
    c = list(readers.read_clean_ec(shared_data / "ec/new392.jsonl"))
    assert len(c) == 392 and all(p["ec"] for p in c)
    assert next(p for p in c if p["accession"] == "P47482")["ec"] == ["2.7.7.18", "3.6.1.41"]
    g = list(islice(readers.read_go_jsonl(shared_data / "go/fapm_val.jsonl"), 20))
    assert g[0]["accession"] == "P84782" and g[0]["go"]["MF"][0]["id"] == "GO:0004867"


def test_malformed_jsonl_counted(tmp_path, shared_data):
    lines = (shared_data / "function/yeast_function.jsonl").read_text().splitlines()[:3]
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join([lines[0], "{not json", '{"accession": "X"}', lines[1]]) + "\n")
    s = BuildStats()
    assert len(list(readers.read_yeast_function(f, s))) == 2
    assert s.counts["malformed:yeast_function"] == 2


def test_swissprot_flat_roundtrip_and_gzip(tmp_path, shared_data):
    prots = _yeast(shared_data, 30)
    go = list(islice(readers.read_go_jsonl(shared_data / "go/fapm_val.jsonl"), 5))
    for p, q in zip(prots, go):
        p["go"] = q["go"]
        p["keywords"] = ["Reference proteome", "Hydrolase"]
    f = tmp_path / "sprot.dat.gz"
    with gzip.open(f, "wt") as fh:
        for p in prots:
            fh.write(readers.format_swissprot_record(p))
        fh.write("ID   BROKEN_YEAST   Reviewed;   5 AA.\nAC   Q99999;\n//\n")  # no sequence
        fh.write("ID   TRUNC\nAC   Q88888;\nSQ   SEQUENCE\n     MKV\n")  # no terminator
    s = BuildStats()
    back = list(readers.read_swissprot_dat(f, s))
    assert [p["accession"] for p in back] == [p["accession"] for p in prots]
    for a, b in zip(prots, back):
        assert b["sequence"] == a["sequence"] and b["name"] == a["protein_name" if "protein_name" in a else "name"]
        assert b["description"] == a["description"] and b["ec"] == a["ec"]
        assert b["date"] == "1986-07-21"
    assert back[1]["reactions"] == prots[1]["reactions"]
    assert back[0]["go"]["MF"][0]["id"] == prots[0]["go"]["MF"][0]["id"]
    assert back[0]["keywords"] == ["Reference proteome", "Hydrolase"]
    assert s.counts["malformed:swissprot"] == 2


REAL_DAT = """ID   HIS1_YEAST              Reviewed;         297 AA.
AC   P00498; D6VTB4;
DT   01-NOV-1986, integrated into UniProtKB/Swiss-Prot.
DT   23-JAN-2007, sequence version 2.
DE   RecName: Full=ATP phosphoribosyltransferase {ECO:0000303|PubMed:1};
DE            Short=ATP-PRT;
DE            Short=ATP-PRTase;
DE            EC=2.4.2.17 {ECO:0000269|PubMed:2};
GN   Name=HIS1; OrderedLocusNames=YER055C;
OS   Saccharomyces cerevisiae (strain ATCC 204508 / S288c) (Baker's yeast).
CC   -!- FUNCTION: Catalyzes the condensation of ATP and 5-phosphoribose 1-
CC       diphosphate to form N'-(5'-phosphoribosyl)-ATP (PR-ATP). Has a crucial
CC       role in the pathway because the rate of histidine biosynthesis seems
CC       to be controlled primarily by regulation of HisG enzymatic activity
CC       (PubMed:123). {ECO:0000250|UniProtKB:P60757}.
CC   -!- CATALYTIC ACTIVITY:
CC       Reaction=1-(5-phospho-beta-D-ribosyl)-ATP + diphosphate = 5-phospho-
CC         alpha-D-ribose 1-diphosphate + ATP; Xref=Rhea:RHEA:18473; EC=2.4.2.17;
CC   -----------------------------------------------------------------------
CC   Copyrighted by the UniProt Consortium, see https://www.uniprot.org/terms
CC   Distributed under the Creative Commons Attribution (CC BY 4.0) License
CC   -----------------------------------------------------------------------
DR   AlphaFoldDB; P00498; -.
DR   GO; GO:0005737; C:cytoplasm; IDA:SGD.
DR   GO; GO:0003879; F:ATP phosphoribosyltransferase activity; IDA:SGD.
KW   Amino-acid biosynthesis; ATP-binding; Cytoplasm; Glycosyltransferase;
KW   Histidine biosynthesis; Reference proteome; Transferase.
SQ   SEQUENCE   297 AA;  32236 MW;  D2B8E2F22A8D2D8B CRC64;
     MDLVNHLTDR LLFAIPKKGR LYSKSVSILN GADITFHRSQ RLDIALSTSL PVALVFLPAA
//
"""


def test_swissprot_real_layout(tmp_path):
    f = tmp_path / "his1.dat"
    f.write_text(REAL_DAT)
    (p,) = readers.read_swissprot_dat(f)
    assert p["accession"] == "P00498" and p["secondary_accessions"] == ["D6VTB4"]
    assert p["name"] == "ATP phosphoribosyltransferase" and p["ec"] == ["2.4.2.17"]
    assert p["description"].startswith("Catalyzes the condensation") and "ECO:" not in p["description"]
    assert "Copyrighted" not in p["description"]
    assert p["go"]["CC"][0]["name"] == "cytoplasm" and p["go"]["MF"][0]["id"] == "GO:0003879"
    assert "Histidine biosynthesis" in p["keywords"] and p["date"] == "1986-11-01"
    assert p["alphafold"] == "P00498" and p["sequence"].startswith("MDLVNHLTDR") and len(p["sequence"]) == 60
    assert list(p["reactions"]) == ["2.4.2.17"]


def test_uniprot_tsv_and_json(tmp_path, shared_data):
    prots = _yeast(shared_data, 10)
    f = tmp_path / "uniprot.tsv"
    with open(f, "w") as fh:
        fh.write("Entry\tEntry Name\tProtein names\tOrganism\tSequence\tFunction [CC]\tEC number\tGene Ontology (GO)\tKeywords\tDate of creation\n")
        for p in prots:
            fh.write(f"{p['accession']}\tX_YEAST\t{p['name']} (Short name)\tSaccharomyces cerevisiae\t{p['sequence']}\t"
                     f"FUNCTION: {p['description']} {{ECO:0000269|PubMed:1}}.\t{'; '.join(p['ec'])}\t"
                     f"cytoplasm [GO:0005737]; ATP binding [GO:0005524]\tReference proteome; Transferase\t1986-07-21\n")
        fh.write("BROKEN\n")
    s = BuildStats()
    got = list(readers.read_uniprot_tsv(f, s))
    assert [p["accession"] for p in got] == [p["accession"] for p in prots]
    assert got[1]["name"] == prots[1]["name"] and got[1]["ec"] == prots[1]["ec"]
    assert got[0]["go"]["GO"][1]["id"] == "GO:0005524" and got[0]["keywords"][1] == "Transferase"
    assert s.counts["malformed:uniprot_tsv"] == 1
    entries = [{"primaryAccession": p["accession"], "uniProtkbId": "X_YEAST",
                "proteinDescription": {"recommendedName": {"fullName": {"value": p["name"]},
                                                           "ecNumbers": [{"value": e} for e in p["ec"]]}},
                "sequence": {"value": p["sequence"]},
                "comments": [{"commentType": "FUNCTION", "texts": [{"value": p["description"]}]}],
                "keywords": [{"name": "Reference proteome"}],
                "uniProtKBCrossReferences": [{"database": "GO", "id": "GO:0005737",
                                              "properties": [{"key": "GoTerm", "value": "C:cytoplasm"}]}],
                "entryAudit": {"firstPublicDate": "1986-07-21"}} for p in prots]
    j = tmp_path / "u.json"
    j.write_text(json.dumps({"results": entries + [{"bad": 1}]}))
    s = BuildStats()
    got = list(readers.read_uniprot_json(j, s))
    assert len(got) == 10 and got[1]["ec"] == prots[1]["ec"] and got[0]["go"]["CC"][0]["name"] == "cytoplasm"
    assert s.counts["malformed:uniprot_json"] == 1
    jl = tmp_path / "u.jsonl"
    jl.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    assert [p["accession"] for p in readers.read_uniprot_json(jl)] == [p["accession"] for p in prots]


def test_fasta_uniprot_headers(tmp_path, shared_data):
    prots = _yeast(shared_data, 5)
    f = tmp_path / "x.fasta"
    with open(f, "w") as fh:
        fh.write("ORPHAN\n")
        for p in prots:
            fh.write(f">sp|{p['accession']}|X_YEAST {p['name']} OS=Saccharomyces cerevisiae OX=559292 GN=ABC PE=1 SV=2\n")
            for i in range(0, len(p["sequence"]), 60):
                fh.write(p["sequence"][i:i + 60] + "\n")
    s = BuildStats()
    got = list(readers.read_fasta(f, s))
    assert [(g["accession"], g["sequence"], g["name"]) for g in got] == [(p["accession"], p["sequence"], p["name"]) for p in prots]
    assert got[0]["organism"] == "Saccharomyces cerevisiae" and got[0]["gene"] == "ABC"
    assert s.counts["malformed:fasta"] == 1


def test_fasta_mmseqs2_examples():
    f = Path("/usr/share/doc/mmseqs2/example-data/QUERY.fasta.gz")
    if not f.exists():
        pytest.skip("apt-get install mmseqs2-examples")
    got = list(readers.read_fasta(f))
    assert len(got) == 500 and got[0]["accession"] == "A7TBS3" and got[0]["name"] == "Predicted protein"
    assert got[0]["fragment"] is True


def test_instruction_and_sepit(tmp_path, shared_data):
    p = _yeast(shared_data, 3)
    alp = [{"instruction": "Describe the function of this protein.", "input": f"```\n{p[0]['sequence']}\n```",
            "output": p[0]["description"]}, {"instruction": "no protein", "input": "", "output": "x"}, {"x": 1}]
    f = tmp_path / "opi_function.json"
    f.write_text(json.dumps(alp))
    s = BuildStats()
    (r,) = readers.read_instruction_file(f, s, task="function_text")
    assert r["proteins"][0]["sequence"] == p[0]["sequence"] and r["answer"] == p[0]["description"]
    assert r["messages"][0]["content"][1]["text"] == "Describe the function of this protein."
    assert s.counts["malformed:instruction_no_sequence"] == 1 and s.counts["malformed:instruction"] == 1
    coords = tmp_path / "coords"
    coords.mkdir()
    (coords / f"{p[0]['accession']}.pdb").write_text("ATOM\n")
    conv = [{"id": q["accession"], "sequence": q["sequence"], "conversations": [
        {"from": "human", "value": "<protein>\nWhat is the function?"}, {"from": "gpt", "value": q["description"]},
        {"from": "human", "value": "Is it an enzyme?"}, {"from": "gpt", "value": "Yes"}]} for q in p[:2]]
    sf = tmp_path / "sepit.jsonl"
    sf.write_text("\n".join(json.dumps(c) for c in conv) + "\n")
    s = BuildStats()
    rows = list(readers.read_sepit_jsonl(sf, coords, s))
    assert len(rows) == 4 and rows[1]["task"] == "yes_no" and rows[1]["answer"] == "Yes"
    assert rows[0]["proteins"][0]["structure"].endswith(".pdb") and rows[2]["proteins"][0]["structure"] is None
    assert s.counts["missing_structure"] == 1


def test_structures_attached_and_missing_counted(tmp_path, shared_data):
    csa = shared_data / "structures/csa_enzymes"
    labels = (csa / "labels.tsv").read_text().splitlines()
    header = labels[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in labels[1:6]]
    m = tmp_path / "map.tsv"
    lines = []
    prots = []
    for r in rows:
        pdb, chain = r["pdb_chain"].split("-")[0], r["pdb_chain"].split("-")[-1]
        lines.append(f"{r['pdb_chain']}\t{csa / (pdb + '.pdb.gz')}\t{chain}")
        prots.append(readers.protein(r["pdb_chain"], r["sequence"]))
    lines.append("GHOST_A\t/nonexistent/ghost.pdb\tA")
    prots += [readers.protein("GHOST_A", "MKV"), readers.protein("NOENTRY", "MKV")]
    m.write_text("accession\tpath\tchain\n" + "\n".join(lines) + "\n")
    af = tmp_path / "af"
    af.mkdir()
    for v in (2, 4):
        (af / f"AF-P00498-F1-model_v{v}.pdb").write_text("ATOM\n")
    idx = readers.structure_index(af, m)
    assert idx["P00498"].endswith("model_v4.pdb")
    s = BuildStats()
    out = list(readers.attach_structures(prots, idx, s))
    assert all(o["structure"] and Path(o["structure"]).exists() for o in out[:5])
    assert out[0]["chain"] == rows[0]["pdb_chain"].split("-")[-1]
    assert s.counts["missing_structure_file"] == 1 and s.counts["missing_structure"] == 1
