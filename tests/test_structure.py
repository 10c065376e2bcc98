"""Structure featuriser (structure_protllm.py) on the real CSA enzyme structures in ../shared/data.

Label policy (checked on all 452 chains): the label sequence equals the chain's resolved sequence, or the
chain has extra resolved terminal residues the label lacks (5 chains: 1CM0-B, 1GZ6-A/B, 1H54-A, 1X9D-A have
one extra C-terminal residue), so the label is a substring of the parsed sequence. Either way
``load_structure(file, chain, sequence=label)`` aligns and returns exactly the label length.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import sys
import warnings

import numpy as np
import pytest

import saprot_protllm as saprot
import structure_files_protllm as structure_files
import structure_protllm as sp
from structure_protllm import StructureError

@pytest.fixture(scope="module")
def labels(csa):
    with open(csa / "labels.tsv") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def a05(csa):
    return csa / "1A05.pdb.gz"


def _label_seq(labels, key):
    return next(r["sequence"] for r in labels if r["pdb_chain"] == key)


# ---------------------------------------------------------------------------------------------- all files
def test_every_labelled_chain_comes_out_of_its_file(csa, labels):
    assert len(labels) == 452
    files = sorted(csa.glob("*.pdb.gz"))
    assert len(files) == 206
    chains = {f.name.split(".")[0]: sp.parse_structure_chains(f) for f in files}
    exact = substring = 0
    for row in labels:
        pdb_id, chain = row["pdb_chain"].split("-", 1)
        label = row["sequence"]
        parsed = chains[pdb_id][chain]
        if parsed == label:
            exact += 1
        else:
            assert label in parsed and len(parsed) - len(label) <= 2, row["pdb_chain"]
            substring += 1
        s = sp.load_structure(csa / f"{pdb_id}.pdb.gz", chain=chain, sequence=label)
        assert s.sequence == label and len(s) == len(label) == int(row["seq_len"])
        assert s.coords.shape == (len(label), 4, 3) and s.coords.dtype == np.float32
        assert s.coord_mask.mean() > 0.95, row["pdb_chain"]
        assert np.isfinite(s.coords[s.coord_mask][:, :3]).all()
        assert s.plddt is None  # experimental structures: B-factors are not pLDDT
        assert s.chain_id == chain
    assert exact >= 440 and exact + substring == 452


def test_default_chain_and_sequence_based_chain_choice(a05, labels):
    s = sp.load_structure(a05)
    assert s.chain_id == "A"
    assert s.sequence == _label_seq(labels, "1A05-A")
    assert s.source == "1A05.pdb.gz"


def test_chain_picked_by_sequence(csa):
    chains = sp.parse_structure_chains(csa / "1A05.pdb.gz")
    # find a multi-chain file whose chains differ, and ask for the second by sequence only
    for f in sorted(csa.glob("*.pdb.gz"))[:80]:
        ch = sp.parse_structure_chains(f)
        seqs = list(ch.items())
        if len(seqs) >= 2 and seqs[0][1] != seqs[-1][1] and len(seqs[-1][1]) > 30:
            s = sp.load_structure(f, sequence=seqs[-1][1])
            assert s.sequence == seqs[-1][1]
            assert ch[s.chain_id] == seqs[-1][1]
            return
    assert chains  # pragma: no cover


# ---------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["cif", "bcif"])
@pytest.mark.parametrize("gz", [False, True])
def test_mmcif_and_bcif_round_trip(a05, tmp_path, fmt, gz):
    biotite = pytest.importorskip("biotite")
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    ref = sp.load_structure(a05, chain="B")
    with gzip.open(a05, "rt") as fh:
        atoms = pdb.PDBFile.read(fh).get_structure(model=1, extra_fields=["b_factor"])
    f = pdbx.BinaryCIFFile() if fmt == "bcif" else pdbx.CIFFile()
    pdbx.set_structure(f, atoms)
    buf = io.BytesIO() if fmt == "bcif" else io.StringIO()
    f.write(buf)
    raw = buf.getvalue() if fmt == "bcif" else buf.getvalue().encode()
    path = tmp_path / (f"x.{fmt}.gz" if gz else f"x.{fmt}")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    assert biotite is not None
    got = sp.load_structure(path, chain="B")
    assert got.sequence == ref.sequence
    np.testing.assert_allclose(got.coords, ref.coords, atol=1e-3, equal_nan=True)
    np.testing.assert_array_equal(got.coord_mask, ref.coord_mask)
    assert sp.parse_structure_chains(path) == sp.parse_structure_chains(a05)
    # bytes input, format sniffed
    got_b = sp.load_structure(path.read_bytes(), chain="B")
    np.testing.assert_allclose(got_b.coords, ref.coords, atol=1e-3, equal_nan=True)
    assert got_b.source == "<bytes>"


def test_plain_pdb_bytes_and_pathlike(a05):
    raw = gzip.decompress(a05.read_bytes())
    s1 = sp.load_structure(raw, chain="A", file_format="pdb")
    s2 = sp.load_structure(str(a05), chain="A")
    np.testing.assert_array_equal(s1.coords, s2.coords)


# ---------------------------------------------------------------------------------------------- alignment
def _pdb_lines(a05):
    return gzip.decompress(a05.read_bytes()).decode().splitlines()


def test_missing_loop_is_aligned_and_masked(a05, labels, tmp_path):
    lines = _pdb_lines(a05)
    # delete residues 100-109 of chain A
    kept = [ln for ln in lines if not (ln.startswith("ATOM") and ln[21] == "A" and 100 <= int(ln[22:26]) <= 109)]
    p = tmp_path / "loop.pdb"
    p.write_text("\n".join(kept) + "\n")
    label = _label_seq(labels, "1A05-A")
    assert len(sp.parse_structure_chains(p)["A"]) == len(label) - 10
    s = sp.load_structure(p, chain="A", sequence=label)
    assert s.sequence == label
    ref = sp.load_structure(a05, chain="A", sequence=label)
    gap = np.zeros(len(label), bool)
    gap[99:109] = True
    assert not s.coord_mask[gap].any() and np.isnan(s.coords[gap]).all()
    np.testing.assert_array_equal(s.coords[~gap], ref.coords[~gap])
    assert s.residue_ids[98] == "99" and s.residue_ids[99] == ""
    # renumbered file (numbering no longer in register) goes through the DP alignment and agrees
    renum = []
    for ln in kept:
        if ln.startswith("ATOM") and ln[21] == "A" and int(ln[22:26]) > 109:
            ln = ln[:22] + f"{int(ln[22:26]) - 10:4d}" + ln[26:]
        renum.append(ln)
    p2 = tmp_path / "renum.pdb"
    p2.write_text("\n".join(renum) + "\n")
    s2 = sp.load_structure(p2, chain="A", sequence=label)
    np.testing.assert_array_equal(s2.coord_mask, s.coord_mask)
    np.testing.assert_array_equal(s2.coords, s.coords)


def test_sequence_with_extra_residues_and_mutation(a05, labels):
    label = _label_seq(labels, "1A05-A")
    seq = "MGSSHHHHHH" + label[:50] + ("W" if label[50] != "W" else "A") + label[51:]
    s = sp.load_structure(a05, chain="A", sequence=seq)
    assert len(s) == len(seq)
    assert not s.coord_mask[:10].any()
    assert s.coord_mask[10:].mean() > 0.99  # the mutated residue keeps its coordinates


def test_modified_residue_maps_to_parent(a05, labels, tmp_path):
    lines = _pdb_lines(a05)
    out = []
    for ln in lines:  # MET 1 of chain A -> HETATM MSE (selenomethionine)
        if ln.startswith("ATOM") and ln[21] == "A" and ln[17:20] == "MET" and int(ln[22:26]) == 1:
            ln = "HETATM" + ln[6:17] + "MSE" + ln[20:]
            ln = ln.replace(" SD ", "SE  ") if ln[12:16] == " SD " else ln
        out.append(ln)
    p = tmp_path / "mse.pdb"
    p.write_text("\n".join(out) + "\n")
    label = _label_seq(labels, "1A05-A")
    assert sp.parse_structure_chains(p)["A"] == label
    s = sp.load_structure(p, chain="A", sequence=label)
    assert s.coord_mask[0]


def test_altlocs_take_first(a05, tmp_path):
    lines = _pdb_lines(a05)
    out = []
    for ln in lines:
        if ln.startswith("ATOM") and ln[21] == "A" and int(ln[22:26]) == 5:
            a = ln[:16] + "A" + ln[17:]
            shifted = f"{float(ln[30:38]) + 5.0:8.3f}"
            b = ln[:16] + "B" + ln[17:30] + shifted + ln[38:]
            out += [a, b]
        else:
            out.append(ln)
    p = tmp_path / "alt.pdb"
    p.write_text("\n".join(out) + "\n")
    s = sp.load_structure(p, chain="A")
    ref = sp.load_structure(a05, chain="A")
    np.testing.assert_array_equal(s.coords, ref.coords)
    assert s.sequence == ref.sequence


def test_wrong_sequence_raises(a05):
    rng = np.random.default_rng(0)
    wrong = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 300))
    with pytest.raises(StructureError, match=r"1A05\.pdb\.gz.*'A'.*identity"):
        sp.load_structure(a05, chain="A", sequence=wrong)
    with pytest.raises(StructureError, match=r"1A05\.pdb\.gz"):
        sp.load_structure(a05, sequence=wrong)


def test_crop_and_reload_existing_structure(a05, labels):
    s = sp.load_structure(a05, chain="A")
    c = s.crop(10, 60)
    assert len(c) == 50 and c.sequence == s.sequence[10:60]
    np.testing.assert_array_equal(c.coords, s.coords[10:60])
    assert sp.load_structure(s) is s
    r = sp.load_structure(s, sequence="MGSS" + s.sequence)
    assert len(r) == len(s) + 4 and not r.coord_mask[:4].any()
    np.testing.assert_array_equal(r.coords[4:], s.coords)


def test_dict_input(a05):
    s = sp.load_structure(a05, chain="A")
    d = sp.load_structure({"coords": s.coords, "sequence": s.sequence})
    np.testing.assert_array_equal(d.coords, s.coords)
    ca = sp.load_structure({"coords": s.coords[:, 1], "sequence": s.sequence, "plddt": np.full(len(s), 90.0)})
    assert ca.coord_mask.all() and ca.plddt is not None
    assert set(saprot.three_di_tokens(ca)) == {"#"}  # no N/C: 3Di unknown


# ---------------------------------------------------------------------------------------------- 3Di / SaProt
def test_three_di_tokens(a05):
    s = sp.load_structure(a05, chain="A")
    t1 = saprot.three_di_tokens(s)
    t2 = saprot.three_di_tokens(sp.load_structure(a05, chain="A"))
    assert t1 == t2 and len(t1) == len(s)
    assert set(t1) <= set(saprot.SAPROT_STRUC_VOCAB)
    assert t1 == t1.lower()
    assert len(set(t1)) > 8  # a real protein uses many states
    # gaps -> '#', the rest is still encoded
    seq = "MGSS" + s.sequence
    g = saprot.three_di_tokens(sp.load_structure(s, sequence=seq))
    assert g[:4] == "####" and len(g) == len(seq) and "#" not in g[4:]


def test_saprot_vocab_and_format(a05):
    v = saprot.SAPROT_VOCAB
    assert len(v) == 446 and v[:5] == ["<cls>", "<pad>", "<eos>", "<unk>", "<mask>"]
    assert v[5:8] == ["Ap", "Ay", "An"] and v[-1] == "##" and len(set(v)) == 446
    s = sp.load_structure(a05, chain="A")
    sa = saprot.structure_to_saprot(s)
    assert len(sa) == 2 * len(s)
    assert sa[0::2] == s.sequence and sa[1::2] == saprot.three_di_tokens(s)
    assert all(sa[i : i + 2] in v for i in range(0, len(sa), 2))
    assert saprot.saprot_sequence("MKX", "dp#") == "MdKp##"
    with pytest.raises(StructureError):
        saprot.saprot_sequence("MK", "d")


def test_plddt_from_predicted_model_and_masking(a05, tmp_path):
    lines = _pdb_lines(a05)
    rng = np.random.default_rng(1)
    out = []
    for ln in lines:
        if ln.startswith("ATOM") and ln[21] == "A":
            res = int(ln[22:26])
            b = 40.0 if res <= 20 else 90.0 + (res % 7)
            out.append(ln[:60] + f"{b:6.2f}" + ln[66:])
    p = tmp_path / "AF-P00000-F1-model_v4.pdb"
    p.write_text("HEADER    ALPHAFOLD MODEL\n" + "\n".join(out) + "\n")
    s = sp.load_structure(p)
    assert s.plddt is not None and s.plddt.shape == (len(s),)
    assert np.all(s.plddt[:20] == 40.0) and np.all(s.plddt[20:] >= 90)
    sa = saprot.structure_to_saprot(s)
    assert sa[1:40:2] == "#" * 20 and "#" not in sa[41::2]
    # the same file under a neutral name: no hint, so no pLDDT unless asked for
    q = tmp_path / "model.pdb"
    q.write_text("\n".join(out) + "\n")
    assert sp.load_structure(q).plddt is None
    assert sp.load_structure(q, is_predicted=True).plddt is not None
    assert sp.load_structure(p, is_predicted=False).plddt is None
    # experimental B-factors outside 0..100 are refused as pLDDT
    del rng


def test_all_low_plddt_falls_back_with_warning(a05):
    s = sp.load_structure(a05, chain="A")
    tdi = saprot.three_di_tokens(s)
    with pytest.warns(sp.StructureWarning, match="pLDDT"):
        sa = saprot.saprot_sequence(s.sequence, tdi, np.full(len(s), 30.0))
    assert sa[1::2] == "#" * len(s) and sa[0::2] == s.sequence
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saprot.saprot_sequence(s.sequence, tdi, np.full(len(s), 95.0))


# ---------------------------------------------------------------------------------------------- bad input
def _bad(path_or_bytes, match, **kw):
    with pytest.raises(StructureError, match=match) as ei:
        sp.load_structure(path_or_bytes, **kw)
    return str(ei.value)


def test_bad_inputs_raise_structure_error_naming_the_file(a05, tmp_path):
    raw = a05.read_bytes()
    text = gzip.decompress(raw)

    def w(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    _bad(w("empty.pdb", b""), r"empty\.pdb.*empty")
    _bad(w("empty2.pdb.gz", gzip.compress(b"")), r"empty2\.pdb\.gz.*empty")
    _bad(w("trunc.pdb.gz", raw[: len(raw) // 2]), r"trunc\.pdb\.gz.*truncated")
    _bad(w("corrupt.pdb.gz", raw[:20] + bytes(200) + raw[220:]), r"corrupt\.pdb\.gz.*(corrupt|gzip)")
    _bad(w("notgz.pdb.gz", text), r"notgz\.pdb\.gz.*not gzip")
    _bad(w("random.pdb", np.random.default_rng(0).bytes(5000)), r"random\.pdb")
    _bad(w("random.cif", np.random.default_rng(1).bytes(5000)), r"random\.cif")
    _bad(w("random.bcif", np.random.default_rng(2).bytes(5000)), r"random\.bcif")
    _bad(w("fasta.pdb", b">sp|P1\nMKTAYIAKQR\n"), r"fasta\.pdb.*no protein chain")
    _bad(w("cut.pdb", text[: text.index(b"\n", 5000) + 40]), r"cut\.pdb.*truncated")
    _bad(w("wrong.cif", text), r"wrong\.cif.*(wrong format|PDB)")
    _bad(w("wrong.bcif", text), r"wrong\.bcif.*wrong format")
    _bad(np.random.default_rng(3).bytes(300), r"<bytes>")
    _bad(tmp_path / "missing.pdb", r"missing\.pdb.*not found")
    _bad(tmp_path, r"directory")
    # text that is not PDB under an unknown name
    _bad(w("notes.txt", b"hello world\n"), r"notes\.txt.*format")
    # a file whose only chain is DNA / ligands: no protein chain
    dna = (
        "ATOM      1  P    DA B   1      10.000  10.000  10.000  1.00 20.00           P\n"
        "ATOM      2  C1'  DA B   1      11.000  10.000  10.000  1.00 20.00           C\n"
        "HETATM    3  O   HOH W   1       1.000   1.000   1.000  1.00 20.00           O\n"
    )
    _bad(w("dna.pdb", dna.encode()), r"dna\.pdb.*no protein chain")
    # non-numeric coordinates
    bad_line = text.replace(b"  21.670  74.626", b"  21.6x0  74.626", 1)
    _bad(w("nan.pdb", bad_line), r"nan\.pdb.*malformed")


def test_missing_chain_lists_available(a05):
    msg = _bad(a05, r"1A05\.pdb\.gz.*chain 'Z' not found", chain="Z")
    assert "'A'" in msg and "'B'" in msg


def test_nan_coordinates(a05):
    s = sp.load_structure(a05, chain="A")
    coords = s.coords.copy()
    coords[:] = np.nan
    with pytest.raises(StructureError, match="NaN"):
        sp.load_structure({"coords": coords, "sequence": s.sequence})
    coords = s.coords.copy()
    coords[5] = np.nan
    part = sp.load_structure({"coords": coords, "sequence": s.sequence})
    assert not part.coord_mask[5] and part.coord_mask.sum() == len(s) - 1
    assert saprot.three_di_tokens(part)[5] == "#"
    coords[7, 1, 0] = np.inf
    with pytest.raises(StructureError, match="infinite"):
        sp.load_structure({"coords": coords, "sequence": s.sequence})
    with pytest.raises(StructureError, match="shape"):
        sp.load_structure({"coords": s.coords[:-1], "sequence": s.sequence})
    with pytest.raises(StructureError):
        sp.load_structure(12345)


def test_size_bound(monkeypatch, a05):
    monkeypatch.setattr(structure_files, "MAX_STRUCTURE_FILE_BYTES", 1000)  # the reader's cap
    _bad(a05, r"1A05\.pdb\.gz.*MAX_STRUCTURE_FILE_BYTES")
    monkeypatch.setattr(structure_files, "MAX_STRUCTURE_FILE_BYTES", len(a05.read_bytes()) + 10)
    _bad(a05, r"1A05\.pdb\.gz.*decompressed")  # gzip bomb guard


@pytest.mark.parametrize("module", ["structure_protllm.py", "structure_files_protllm.py", "saprot_protllm.py"])
def test_module_imports_only_numpy_and_stdlib(repo_root, module):
    import ast

    tree = ast.parse((repo_root / module).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert top - {"numpy"} <= set(sys.stdlib_module_names), top


def test_free_amino_acid_ligand_is_not_part_of_the_chain(a05, tmp_path):
    lines = [ln for ln in _pdb_lines(a05) if ln.startswith("ATOM")]
    lig = [
        "HETATM90001  N   GLU A 901      30.000  30.000  30.000  1.00 20.00           N",
        "HETATM90002  CA  GLU A 901      31.400  30.000  30.000  1.00 20.00           C",
        "HETATM90003  C   GLU A 901      32.000  31.300  30.000  1.00 20.00           C",
        "HETATM90004  O   HOH A 902      10.000  10.000  10.000  1.00 20.00           O",
    ]
    p = tmp_path / "lig.pdb"
    p.write_text("\n".join(lines + lig) + "\n")
    assert sp.parse_structure_chains(p) == sp.parse_structure_chains(a05)


def test_mmcif_without_gemmi_uses_biotite(a05, tmp_path, monkeypatch):
    pytest.importorskip("biotite")
    import sys

    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    with gzip.open(a05, "rt") as fh:
        atoms = pdb.PDBFile.read(fh).get_structure(model=1, extra_fields=["b_factor"])
    f = pdbx.CIFFile()
    pdbx.set_structure(f, atoms)
    path = tmp_path / "x.cif"
    f.write(str(path))
    with_gemmi = sp.load_structure(path, chain="A")
    monkeypatch.setitem(sys.modules, "gemmi", None)  # import gemmi -> ImportError
    without = sp.load_structure(path, chain="A")
    assert without.sequence == with_gemmi.sequence
    np.testing.assert_array_equal(without.coords, with_gemmi.coords)


def test_vendored_3di_matches_mini3di_public_encoder(csa):
    """The vendored 3Di geometry gives mini3di's own letters (public Encoder.encode_atoms + build_sequence) on real
    chains: every 10th CSA file, with the file's C-beta atoms and with none (virtual C-beta for every residue)."""
    mini3di = pytest.importorskip("mini3di")
    enc = mini3di.Encoder()
    n_chains = 0
    for f in sorted(csa.glob("*.pdb.gz"))[::10]:
        for ch in sp.parse_structure_chains(f):
            s = sp.load_structure(f, chain=ch)
            m = s.coord_mask
            x = s.coords[m].astype(np.float64)
            for cb in (s.cb[m].astype(np.float64), np.full((int(m.sum()), 3), np.nan)):
                ref = enc.build_sequence(enc.encode_atoms(ca=x[:, 1], cb=cb, n=x[:, 0], c=x[:, 2]))
                s.cb = None if np.isnan(cb).all() else s.cb
                assert saprot.three_di_tokens(s).replace("#", "") == ref.lower(), (f.name, ch)
            n_chains += 1
    assert n_chains >= 40


# ---------------------------------------------------------------------------------------------- one residue rule
def test_one_residue_rule_for_processor_and_structure_reader(a05, labels):
    from processing_protllm import ProteinInputError, clean_sequence

    # the same rule: whitespace and a final stop dropped, lower case accepted, the ESM-2 alphabet only
    assert clean_sequence(" mkt\nbzuox* ", 0) == sp.clean_sequence(" mkt\nbzuox* ") == "MKTBZUOX"
    with pytest.raises(ProteinInputError, match=r"^protein 4: invalid residue 'J' at position 3 "):
        clean_sequence("MKJA", 4)
    label = _label_seq(labels, "1A05-A")
    with_j = label[:10] + "J" + label[11:]
    with pytest.raises(StructureError, match=r"^1A05\.pdb\.gz: sequence: invalid residue 'J' at position 11 "):
        sp.load_structure(a05, chain="A", sequence=with_j)
    s = sp.load_structure(a05, chain="A")
    with pytest.raises(StructureError, match=r"invalid residue 'J' at position 11 "):
        sp.load_structure({"coords": s.coords, "sequence": with_j})
    with pytest.raises(StructureError, match=r"invalid residue 'ß' at position 2 "):
        sp.load_structure(s, sequence="Mß" + label)


# ---------------------------------------------------------------------------------------------- special files
def _finishes_within(seconds: float, function):
    """Run ``function`` in a daemon thread; return what it raised (or None), or fail if it is still running."""
    import threading

    outcome = {}

    def target():
        try:
            function()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            outcome["error"] = error
        outcome["done"] = True

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome.get("done"), f"still running after {seconds} s"
    return outcome.get("error")


def test_special_files_are_refused_within_seconds(tmp_path):
    fifo = tmp_path / "model.pdb"
    os.mkfifo(fifo)
    cases = {"/dev/zero": "character device", "/dev/null": "character device", str(fifo): r"FIFO", str(tmp_path): "directory"}
    for path, what in cases.items():
        error = _finishes_within(10, lambda: sp.load_structure(path))
        assert isinstance(error, StructureError), (path, error)
        assert re.search(rf"^{re.escape(path)}: .*{what}.*only regular files", str(error)), str(error)


def test_reading_is_capped_while_reading(tmp_path, monkeypatch):
    """The cap holds even when the size seen before reading is small: a file that grows meanwhile."""
    path = tmp_path / "grows.pdb"
    path.write_bytes(b"ATOM  " * 10)
    real_fstat = os.fstat

    def fstat_before_growth(fd):
        status = real_fstat(fd)
        with open(path, "ab") as handle:  # the file grows after fstat looked at it
            handle.write(b"X" * 5000)
        return status

    monkeypatch.setattr(structure_files, "MAX_STRUCTURE_FILE_BYTES", 1000)
    monkeypatch.setattr(structure_files.os, "fstat", fstat_before_growth)
    with pytest.raises(StructureError, match=r"grows\.pdb: file grew past MAX_STRUCTURE_FILE_BYTES=1000"):
        sp.load_structure(path)


def test_special_files_are_refused_from_a_chat_block_and_the_pipeline(tmp_path):
    from pipeline_protllm import ProteinFunctionPipeline
    from processing_protllm import ProteinInputError
    from protllm.testing import build_tiny_protllm

    model, processor = build_tiny_protllm("llama", use_structure_bias=True, structure_num_kernels=16)
    messages = [{"role": "user", "content": [{"type": "protein", "structure": "/dev/zero"}, {"type": "text", "text": "?"}]}]
    error = _finishes_within(20, lambda: processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                                      return_dict=True, return_tensors="pt"))
    assert isinstance(error, ProteinInputError) and "/dev/zero: is a character device" in str(error), error
    fifo = tmp_path / "x.pdb"
    os.mkfifo(fifo)
    pipe = ProteinFunctionPipeline(model=model, processor=processor, device="cpu")
    error = _finishes_within(20, lambda: pipe({"structure": str(fifo)}, max_new_tokens=2))
    assert isinstance(error, ValueError) and "is a FIFO" in str(error), error


# ---------------------------------------------------------------------------------------------- text and long messages
def test_structure_text_is_read_as_text_and_messages_stay_short(a05, tmp_path):
    text = gzip.decompress(a05.read_bytes()).decode()
    ref = sp.load_structure(a05, chain="B")
    got = sp.load_structure(text, chain="B")
    assert got.source == "<text>" and got.sequence == ref.sequence
    np.testing.assert_array_equal(got.coords, ref.coords)
    cif = tmp_path / "x.cif"
    import gemmi

    gemmi.read_pdb_string(text).make_mmcif_document().write_file(str(cif))
    got = sp.load_structure(cif.read_text(), chain="B")
    np.testing.assert_allclose(got.coords, ref.coords, atol=1e-3)
    # text that is neither a path nor a structure: a short message, not the text echoed back
    with pytest.raises(StructureError, match=r"^<text>: a structure string of \d+ characters .* not look like PDB or mmCIF") as ei:
        sp.load_structure("hello\n" * 30000)
    assert len(str(ei.value)) < 300
    # a huge single-line string is taken as a path: refused with the path cut short
    with pytest.raises(StructureError, match="structure file not found|cannot open") as ei:
        sp.load_structure("x" * 185_000)
    assert len(str(ei.value)) < 600
    # a broken record is quoted, but cut
    bad = text.replace("  21.670  74.626", "  21.6x0  74.626", 1)
    with pytest.raises(StructureError, match=r"malformed ATOM/HETATM record on line \d+") as ei:
        sp.load_structure(bad)
    assert len(str(ei.value)) < 300
