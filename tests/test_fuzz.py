"""Property-based fuzz tests on the real entry points (hypothesis).

- ProtLLMProcessor / clean_sequence on random strings, unicode, huge and empty inputs, wrong types and mixed
  batches: the only exception that may escape is ProteinInputError (a ValueError) naming the protein or text.
- load_structure / parse_structure_chains on truncated, bit-flipped, spliced and random-byte versions of the
  real CSA enzyme structures in ../shared/data (read in place, mutated in memory, written to a temp dir so the
  reader sees a file name): only StructureError naming the file may escape; files over
  MAX_STRUCTURE_FILE_BYTES (and gzip bombs) are refused before parsing.
- data.readers on malformed records: nothing escapes; every non-empty line is either yielded or counted as
  malformed (the readers' documented contract: malformed input is never silently dropped).

- validate_recipe (the recipe loader) on configs/demo.yaml with misspelt keys, replaced values, dropped and added
  keys at every level, and on arbitrary YAML values: only RecipeError escapes, and a misspelt key is always refused.
- eval.data.load_examples (the eval data loader) on torn, junk and wrong-typed rows: examples or counted skips.
- the web app's input path (app.ProtLLMDemo.protein_block: sequence box, FASTA, upload, chain): only InputProblem.

Case counts: the defaults in each @settings (a few hundred; what CI runs), or PROTLLM_FUZZ_EXAMPLES for all of them
(`make fuzz`: 10,000 per property; the 3-million-residue property is capped at 300).
Every test counts the cases it tried (CASES); the counts are printed at the end of the module and, when
PROTLLM_FUZZ_REPORT names a file, written there as JSON. Examples are derandomized (the same cases on every
run, so CI is reproducible) and no example database is written; set PROTLLM_FUZZ_SEED to explore new cases.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing_protllm import VALID_RESIDUES, ProteinInputError, ProtLLMProcessor, clean_sequence
from protllm.processors import build_processor, build_protein_tokenizer
from structure_protllm import MAX_STRUCTURE_FILE_BYTES, ProteinStructure, StructureError, load_structure, parse_structure_chains

CASES: Counter = Counter()
_SEED = os.environ.get("PROTLLM_FUZZ_SEED")
# Cases per property: the defaults below (a few hundred, what CI runs) unless PROTLLM_FUZZ_EXAMPLES sets them all,
# e.g. `make fuzz` (10,000 per entry point). `_examples(default, cap)` keeps very slow properties at `cap`.
_EXAMPLES = os.environ.get("PROTLLM_FUZZ_EXAMPLES")


def _examples(default: int, cap: int | None = None) -> int:
    if not _EXAMPLES:
        return default
    return int(_EXAMPLES) if cap is None else min(int(_EXAMPLES), cap)


FUZZ = dict(
    deadline=None,  # per-example time is bounded by explicit checks below (one slow CI example must not flake)
    database=None,  # no .hypothesis/ directory in the repository
    derandomize=_SEED is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
CSA = Path(os.environ.get("PROTLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "structures" / "csa_enzymes"
MAX_SECONDS_PER_CASE = 10.0  # no hang: every single case must finish well within this


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\nfuzz cases tried:", json.dumps(dict(sorted(CASES.items()))))
    target = os.environ.get("PROTLLM_FUZZ_REPORT")
    if target:
        Path(target).write_text(json.dumps(dict(sorted(CASES.items())), indent=1) + "\n")


def _timed(start: float, what: str):
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS_PER_CASE, f"{what} took {elapsed:.1f} s (a hang?)"


# =============================================================================================== processor


@pytest.fixture(scope="module")
def processor():
    from protllm.local_weights import smollm2_path

    return build_processor(str(smollm2_path(tokenizer_only=True)), build_protein_tokenizer("esm"),
                           processor_class=ProtLLMProcessor, max_protein_length=64)


@pytest.fixture(scope="module")
def structure_processor():
    """The processor of models that read structures: it parses the fuzzed structure bytes and text."""
    from protllm.local_weights import smollm2_path
    from structure_processing_protllm import ProtLLMStructureProcessor

    return build_processor(str(smollm2_path(tokenizer_only=True)), processor_class=ProtLLMStructureProcessor,
                           max_protein_length=64)


# Characters chosen to hit the residue policy's edges: valid letters (both cases), the ESM specials that are
# not residues (. - J), digits, unicode letters whose upper case is ASCII (ß -> SS, ı -> I, ſ -> S, ﬃ -> FFI),
# unicode white space, a terminal stop, NUL, surrogate-free astral characters, combining marks.
_RESIDUE_SOUP = st.sampled_from(list("ACDEFGHIKLMNPQRSTVWYBZUOXacdefghiklmnpqrstvwybzuox") + list(" \t\n\r*.-J0#<>|")
                                + ["ß", "ı", "ſ", "ﬃ", "é", "\u00a0", "\u2003", "\u200b", "\x00", "\x1c", "😀", "\u0301", "Å"])
RANDOM_SEQUENCES = st.one_of(
    st.text(_RESIDUE_SOUP, max_size=200),
    st.text(max_size=100),  # any unicode
    st.text(st.sampled_from(list("ACDEFGHIKLMNPQRSTVWY")), min_size=1, max_size=300),  # valid, some above the cap
)
NOT_STRINGS = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=20), st.lists(st.integers(), max_size=3),
                        st.booleans())


def _policy(sequence: str) -> str | None:
    """Oracle for the documented residue policy, restricted to ASCII: the cleaned sequence, or None when invalid.

    Only ASCII white space is dropped by this oracle and only ASCII letters are residues; a non-ASCII character
    that the processor turns into residues (e.g. 'ß'.upper() == 'SS') is a policy violation the test reports.
    """
    import re

    cleaned = re.sub(r"\s+", "", sequence).upper()
    cleaned = cleaned[:-1] if cleaned.endswith("*") else cleaned
    ascii_ok = all(ch.isascii() or ch.isspace() for ch in sequence)
    if not cleaned or not ascii_ok or any(ch not in VALID_RESIDUES for ch in cleaned):
        return None
    return cleaned


@settings(max_examples=_examples(400), **FUZZ)
@given(sequence=st.one_of(RANDOM_SEQUENCES, NOT_STRINGS), index=st.integers(0, 10**6))
def test_clean_sequence_accepts_policy_or_names_the_protein(sequence, index):
    CASES["clean_sequence"] += 1
    try:
        cleaned = clean_sequence(sequence, index)
    except ProteinInputError as error:
        assert f"protein {index}" in str(error)
        assert not isinstance(sequence, str) or _policy(sequence) is None, f"valid sequence {sequence!r} refused: {error}"
        return
    assert isinstance(sequence, str)
    assert cleaned and set(cleaned) <= VALID_RESIDUES
    assert _policy(sequence) == cleaned, f"{sequence!r} accepted as {cleaned!r}, outside the documented residue policy"


_UNICODE_CASE_TRAPS = ["ß", "ı", "ſ", "ﬃ", "ﬀ", "ﬆ", "ǰ", "ŉ"]  # letters whose str.upper() is (or contains) ASCII


@settings(max_examples=_examples(50), **FUZZ)
@given(left=st.text(st.sampled_from(list("ACDEFGHIKLMNPQRSTVWY")), max_size=20), trap=st.sampled_from(_UNICODE_CASE_TRAPS),
       right=st.text(st.sampled_from(list("ACDEFGHIKLMNPQRSTVWY")), max_size=20))
def test_clean_sequence_refuses_non_ascii_letters(left, trap, right):
    CASES["clean_sequence_unicode_case_traps"] += 1
    with pytest.raises(ProteinInputError, match="protein 0: invalid residue"):
        clean_sequence(left + trap + right, 0)


PROTEIN_SPECS = st.one_of(
    RANDOM_SEQUENCES,
    st.builds(dict, sequence=RANDOM_SEQUENCES),
    st.fixed_dictionaries({}, optional={"sequence": st.one_of(RANDOM_SEQUENCES, NOT_STRINGS),
                                        "structure": st.one_of(st.binary(max_size=64), st.just(b""), st.text(max_size=10)),
                                        "chain": st.one_of(st.none(), st.text(max_size=2))}),
    NOT_STRINGS,
)
TEXT_PIECES = st.one_of(st.text(st.characters(blacklist_characters="<"), max_size=30), st.just("<protein>"),
                        st.sampled_from(["<|protein_start|>", "<|protein_end|>", "protein>", "<prot", "\x00", "😀" * 3]))


@st.composite
def mixed_batches(draw):
    """1-4 texts, each with a random number of '<protein>' placeholders and (usually) as many protein specs."""
    texts, proteins = [], []
    for _ in range(draw(st.integers(1, 4))):
        pieces = draw(st.lists(TEXT_PIECES, max_size=6))
        text = "".join(pieces)
        n = text.count("<protein>")
        if draw(st.integers(0, 9)) == 0:  # sometimes the wrong number of proteins
            n = max(0, n + draw(st.sampled_from([-1, 1])))
        texts.append(text)
        proteins.append(draw(st.lists(PROTEIN_SPECS, min_size=n, max_size=n)))
    return texts, proteins


@settings(max_examples=_examples(250), **FUZZ)
@pytest.mark.parametrize("which", ["processor", "structure_processor"])
@given(batch=mixed_batches(), as_single=st.booleans())
def test_processor_mixed_batches_only_raise_protein_input_error(request, which, batch, as_single):
    """Both processors: the core one refuses every structure input, the structure one parses it; either way only
    ProteinInputError naming the protein or text."""
    processor = request.getfixturevalue(which)
    CASES[f"{which}_mixed_batches"] += 1
    texts, proteins = batch
    if as_single:
        texts, proteins = texts[0], proteins[0]
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = processor(text=texts, proteins=proteins, return_tensors="pt")
    except ProteinInputError as error:
        message = str(error)
        assert message.startswith(("protein ", "text ")) or message.startswith("got "), message
        _timed(start, "processor")
        return
    _timed(start, "processor")
    flat = [p for ps in ([proteins] if as_single else proteins) for p in ps]
    rows = out["input_ids"]
    n_tokens = int((rows == processor.protein_token_id).sum())
    if flat:
        assert out["protein_input_ids"].shape[0] == len(flat)
        lengths = out["protein_attention_mask"].sum(dim=1) - 2  # residues without <cls>/<eos>
        assert int(lengths.max()) <= processor.max_protein_length
        assert n_tokens == int(lengths.sum())
        assert out["protein_input_ids"].max() < len(processor.protein_tokenizer)
        assert not (out["protein_input_ids"] == processor.protein_tokenizer.unk_token_id).any()
    else:
        assert n_tokens == 0 and "protein_input_ids" not in out


@settings(max_examples=_examples(30, cap=300), **FUZZ)
@given(length=st.integers(10**5, 3 * 10**6), overflow=st.sampled_from(["crop", "error"]), bad_at_end=st.booleans())
def test_huge_protein_is_cropped_or_refused_quickly(processor, length, overflow, bad_at_end):
    """Up to 3 million residues: cropped to max_protein_length (with a warning) or refused, in bounded time."""
    CASES["processor_huge_protein"] += 1
    sequence = "M" * (length - 1) + ("J" if bad_at_end else "K")
    processor.protein_overflow = overflow
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = processor(text="<protein> what is it?", proteins=[sequence])
    except ProteinInputError as error:
        assert str(error).startswith("protein 0:")
        assert bad_at_end or (overflow == "error" and f"{length} residues exceed" in str(error))
        return
    finally:
        processor.protein_overflow = "crop"
        _timed(start, f"a {length}-residue protein")
    assert not bad_at_end and overflow == "crop"
    assert len(out["protein_input_ids"][0]) == processor.max_protein_length + 2
    assert any("cropped to max_protein_length" in str(w.message) for w in caught)


def test_text_with_a_lone_surrogate_is_refused(processor):
    """Found by `make fuzz` (10,000 cases): '\\ud800' in a text made the tokenizer raise a TypeError."""
    CASES["processor_lone_surrogate"] += 1
    with pytest.raises(ProteinInputError, match="text 1: not valid Unicode text"):
        processor(text=["fine", "bad \ud800 text"], proteins=None)


def test_empty_and_whitespace_inputs(processor):
    CASES["processor_empty_inputs"] += 1
    for bad in ["", " ", "\n\t", "*", " * "]:
        with pytest.raises(ProteinInputError, match="protein 0: empty sequence"):
            processor(text="<protein>", proteins=[bad])
    with pytest.raises(ProteinInputError, match="protein 0: give a sequence, a structure, or both"):
        processor(text="<protein>", proteins=[{}])
    out = processor(text="", proteins=None)
    assert "protein_input_ids" not in out
    with pytest.raises(ValueError, match="needs `text`"):
        processor(text=None)


# =============================================================================================== structures


def _csa_files(n=12):
    if not CSA.is_dir():
        pytest.skip(f"real structures not found: {CSA}")
    return sorted(CSA.glob("*.pdb.gz"))[:: max(1, len(list(CSA.glob("*.pdb.gz"))) // n)][:n]


_RAW: dict = {}


def _raw(path: Path) -> tuple[bytes, bytes]:
    if path not in _RAW:
        gz = path.read_bytes()
        _RAW[path] = (gz, gzip.decompress(gz))
    return _RAW[path]


def _to_cif(text: bytes) -> bytes:
    import gemmi

    key = ("cif", hash(text))
    if key not in _RAW:
        structure = gemmi.read_pdb_string(text.decode("latin-1"))
        structure.setup_entities()
        _RAW[key] = structure.make_mmcif_document().as_string().encode()
    return _RAW[key]


def _check_structure(s: ProteinStructure):
    L = len(s.sequence)
    assert L > 0 and s.coords.shape == (L, 4, 3) and s.coord_mask.shape == (L,)
    assert s.coord_mask.any()
    assert np.isfinite(s.coords[s.coord_mask][:, :3]).all(), "masked-in residues must have finite N, CA, C"
    assert set(s.sequence) <= set("ACDEFGHIKLMNPQRSTVWYBZUOX")


@st.composite
def mutated_structures(draw):
    """(bytes, file name) derived from a real CSA structure by one of several corruptions."""
    files = _csa_files()
    path = draw(st.sampled_from(files))
    gz, text = _raw(path)
    stem = path.name[: -len(".pdb.gz")]
    kind = draw(st.sampled_from(["truncate_gz", "flip_gz", "truncate_text", "flip_text", "splice_text", "cif_mutated",
                                 "random_bytes", "wrong_extension", "text_as_gz", "nul_bytes"]))
    if kind == "truncate_gz":
        return gz[: draw(st.integers(0, len(gz) - 1))], f"{stem}_{kind}.pdb.gz", kind
    if kind == "flip_gz":
        data = bytearray(gz)
        for position in draw(st.lists(st.integers(0, len(gz) - 1), min_size=1, max_size=8)):
            data[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(data), f"{stem}_{kind}.pdb.gz", kind
    if kind == "truncate_text":
        return text[: draw(st.integers(0, len(text) - 1))], f"{stem}_{kind}.pdb", kind
    if kind in ("flip_text", "cif_mutated"):
        base = _to_cif(text) if kind == "cif_mutated" else text
        data = bytearray(base)
        for position in draw(st.lists(st.integers(0, len(base) - 1), min_size=1, max_size=64)):
            data[position] ^= 1 << draw(st.integers(0, 7))
        if kind == "cif_mutated" and draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return bytes(data), f"{stem}_{kind}." + ("cif" if kind == "cif_mutated" else "pdb"), kind
    if kind == "splice_text":
        lines = text.split(b"\n")
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(lines) - 1))
            op = draw(st.sampled_from(["garbage", "delete", "duplicate", "shorten", "nan"]))
            if op == "garbage":
                lines[i] = draw(st.binary(max_size=90))
            elif op == "delete":
                del lines[i]
            elif op == "duplicate":
                lines.insert(i, lines[i])
            elif op == "shorten":
                lines[i] = lines[i][: draw(st.integers(0, 80))]
            elif lines[i].startswith(b"ATOM"):
                lines[i] = lines[i][:30] + draw(st.sampled_from([b"     nan", b"     inf", b"1e400000", b"********", b"  -0.0e0"])) + lines[i][38:]
            if not lines:
                break
        return b"\n".join(lines), f"{stem}_{kind}.pdb", kind
    if kind == "random_bytes":
        return draw(st.binary(max_size=2048)), f"random.{draw(st.sampled_from(['pdb', 'cif', 'bcif', 'pdb.gz', 'ent', 'dat']))}", kind
    if kind == "wrong_extension":
        return text, f"{stem}_{kind}." + draw(st.sampled_from(["cif", "bcif", "cif.gz"])), kind
    if kind == "text_as_gz":
        return text[:2000], f"{stem}_{kind}.pdb.gz", kind
    data = bytearray(text)
    data[draw(st.integers(0, len(data) - 1))] = 0
    return bytes(data), f"{stem}_{kind}.pdb", kind


_TMP = tempfile.TemporaryDirectory(prefix="protllm_fuzz_")


@settings(max_examples=_examples(300), **FUZZ)
@given(case=mutated_structures(), as_bytes=st.booleans(), chain=st.sampled_from([None, "A", "B", "Z"]),
       give_sequence=st.booleans())
def test_structure_reader_on_corrupted_real_files(case, as_bytes, chain, give_sequence):
    data, name, kind = case
    CASES["structure_reader"] += 1
    CASES[f"structure_reader:{kind}"] += 1
    path = Path(_TMP.name) / name
    path.write_bytes(data)
    source = data if as_bytes else path
    shown = "<bytes>" if as_bytes else name
    sequence = None
    if give_sequence:  # a real chain's sequence (of the first file): the alignment path, matching or not
        sequence = next(iter(parse_structure_chains(_raw(_csa_files()[0])[1]).values()))[5:120]
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = load_structure(source, chain=chain, sequence=sequence)
    except StructureError as error:
        _timed(start, f"load_structure({name})")
        assert shown in str(error) or str(path) in str(error), f"message does not name the input: {error}"
        CASES["structure_reader:refused"] += 1
        return
    _timed(start, f"load_structure({name})")
    _check_structure(result)
    try:
        chains = parse_structure_chains(source)
    except StructureError as error:  # pragma: no cover - load_structure succeeded on the same input
        raise AssertionError(f"parse_structure_chains refused what load_structure read: {error}")
    assert chains and all(isinstance(k, str) and v for k, v in chains.items())


@settings(max_examples=_examples(40), **FUZZ)
@given(data=st.binary(max_size=512), fmt=st.sampled_from([None, "pdb", "cif", "bcif", "mmcif", "gz", "xyz"]))
def test_structure_reader_on_random_bytes_with_format(data, fmt):
    CASES["structure_random_bytes_with_format"] += 1
    try:
        load_structure(data, file_format=fmt)
    except StructureError as error:
        assert "<bytes>" in str(error)
    else:  # pragma: no cover - random bytes are never a protein
        raise AssertionError("random bytes parsed as a protein structure")


def test_structure_reader_refuses_oversized_inputs_before_parsing(tmp_path):
    """Files above MAX_STRUCTURE_FILE_BYTES (sparse file: no disk used) and gzip bombs are refused, quickly."""
    CASES["structure_oversized"] += 1
    big = tmp_path / "huge.pdb"
    with open(big, "wb") as handle:
        handle.truncate(MAX_STRUCTURE_FILE_BYTES + 1)
    start = time.perf_counter()
    with pytest.raises(StructureError, match="huge.pdb: file of .* bytes exceeds MAX_STRUCTURE_FILE_BYTES"):
        load_structure(big)
    assert time.perf_counter() - start < 1.0  # refused from the size, not read
    # gzip bomb: ~260 KB that inflates past the limit
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"ATOM  " + b" " * (1 << 20)
    bomb = b"".join(compressor.compress(chunk) for _ in range(MAX_STRUCTURE_FILE_BYTES // len(chunk) + 2)) + compressor.flush()
    assert len(bomb) < 2 << 20
    (tmp_path / "bomb.pdb.gz").write_bytes(bomb)
    with pytest.raises(StructureError, match="bomb.pdb.gz: decompressed content exceeds MAX_STRUCTURE_FILE_BYTES"):
        load_structure(tmp_path / "bomb.pdb.gz")


# =============================================================================================== data readers


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8,
)
FIELDS = ["accession", "sequence", "protein_name", "description", "ec", "reactions", "split", "go", "id",
          "conversations", "instruction", "input", "output", "primaryAccession", "results", "comments",
          "proteinDescription", "uniProtKBCrossReferences", "keywords", "organism", "entryAudit", "structure", "task"]


@st.composite
def malformed_jsonl(draw, good_line: str, kinds=("good", "not_object", "torn", "junk", "blank")):
    """Lines: real records, records with fields of the wrong type, non-objects, torn JSON and binary junk."""
    lines = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(kinds))
        if kind == "good":
            lines.append(good_line.encode())
        elif kind == "wrong_types":
            record = json.loads(good_line)
            for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4)):
                record[field] = draw(JSON_VALUES)
            lines.append(json.dumps(record).encode())
        elif kind == "not_object":
            lines.append(json.dumps(draw(JSON_VALUES)).encode())
        elif kind == "torn":
            lines.append(good_line[: draw(st.integers(1, len(good_line) - 1))].encode())
        elif kind == "junk":
            lines.append(draw(st.binary(max_size=60)).replace(b"\n", b" "))
        else:
            lines.append(b"   ")
    return lines


def _good_lines():
    yeast = json.dumps({"accession": "P00498", "protein_name": "ATP phosphoribosyltransferase", "gene": "HIS1",
                        "description": "Catalyzes ATP + PRPP", "sequence": "MDLVNHLTDRLLFAIPKKGRLYSKSVSILNGA",
                        "ec": ["2.4.2.17"], "reactions": {"2.4.2.17": ["ATP + PRPP"]}, "split": "train"})
    go = json.dumps({"accession": "P84782", "sequence": "MKTAYIAKQR", "go": {"MF": [{"id": "GO:0004867", "name": "x"}]},
                     "organism_genus": "Homo", "split": "valid"})
    sepit = json.dumps({"id": "Q1", "sequence": "MKTAYIAKQR", "conversations": [{"from": "human", "value": "<protein>\nQ?"},
                                                                        {"from": "gpt", "value": "Yes"}]})
    uniprot = json.dumps({"primaryAccession": "P1", "sequence": {"value": "MKTAYIAKQR"},
                          "proteinDescription": {"recommendedName": {"fullName": {"value": "Kinase"},
                                                                     "ecNumbers": [{"value": "2.7.1.1"}]}},
                          "comments": [{"commentType": "FUNCTION", "texts": [{"value": "Phosphorylates."}]}],
                          "uniProtKBCrossReferences": [{"database": "GO", "id": "GO:1",
                                                        "properties": [{"key": "GoTerm", "value": "F:kinase"}]}],
                          "keywords": [{"name": "Kinase"}]})
    alpaca = json.dumps({"instruction": "Describe", "input": "MKTAYIAKQRQISFVKSHFSRQ", "output": "A kinase"})
    return {"yeast": yeast, "clean_ec": yeast, "go": go, "sepit": sepit, "uniprot_json": uniprot, "instruction": alpaca}


def _run_reader(name: str, path: Path, stats):
    from data import readers

    if name == "yeast":
        return list(readers.read_yeast_function(path, stats))
    if name == "clean_ec":
        return list(readers.read_clean_ec(path, stats))
    if name == "go":
        return list(readers.read_go_jsonl(path, stats))
    if name == "sepit":
        return list(readers.read_sepit_jsonl(path, stats=stats))
    if name == "uniprot_json":
        return list(readers.read_uniprot_json(path, stats))
    return list(readers.read_instruction_file(path, stats))


JSONL_READERS = ["yeast", "clean_ec", "go", "sepit", "uniprot_json", "instruction"]


@settings(max_examples=_examples(120), **FUZZ)
@given(data=st.data(), name=st.sampled_from(JSONL_READERS), gz=st.booleans())
def test_jsonl_readers_on_malformed_lines_count_never_crash(data, name, gz):
    """Torn JSON, binary junk, non-object JSON values and blank lines between real records."""
    _check_jsonl_reader(data, name, gz, ("good", "not_object", "torn", "junk", "blank"), "data_readers_jsonl_lines")


@settings(max_examples=_examples(60), **FUZZ)
@given(data=st.data(), name=st.sampled_from(JSONL_READERS), gz=st.booleans())
def test_jsonl_readers_on_records_with_wrong_field_types(data, name, gz):
    _check_jsonl_reader(data, name, gz, ("good", "wrong_types"), "data_readers_jsonl_wrong_types")


def _check_jsonl_reader(data, name, gz, kinds, counter):
    from data.builders import BuildStats

    CASES[counter] += 1
    CASES[f"{counter}:{name}"] += 1
    lines = data.draw(malformed_jsonl(_good_lines()[name], kinds))
    if name in ("uniprot_json", "instruction"):  # a valid first line keeps JSON-vs-JSONL detection out of this property (tested below)
        lines.insert(0, _good_lines()[name].encode())
    payload = b"\n".join(lines) + b"\n"
    path = Path(_TMP.name) / f"fuzz_{name}.jsonl" if not gz else Path(_TMP.name) / f"fuzz_{name}.jsonl.gz"
    path.write_bytes(gzip.compress(payload) if gz else payload)
    stats = BuildStats()
    try:
        out = _run_reader(name, path, stats)
    except Exception as error:  # noqa: BLE001 - the property is that nothing escapes
        raise AssertionError(f"{name} reader raised {type(error).__name__}: {error} on lines {lines!r}") from None
    import io

    # lines as a text file reads them (universal newlines: \n, \r, \r\n; not str.splitlines' \x0b, \x1c, ...)
    non_empty = sum(1 for line in io.TextIOWrapper(io.BytesIO(payload), encoding="utf-8", errors="replace") if line.strip())
    malformed = sum(v for k, v in stats.counts.items() if k.startswith("malformed"))
    if name != "sepit":  # sepit yields one record per conversation turn pair, not per line
        assert len(out) + malformed == non_empty, \
            f"silently dropped lines: {non_empty} lines, {len(out)} yielded, {dict(stats.counts)} counted"
    for item in out:
        assert isinstance(item, dict)


@settings(max_examples=_examples(60), **FUZZ)
@given(blob=st.binary(max_size=400), text=st.text(max_size=400), gz=st.booleans(),
       reader=st.sampled_from(["fasta", "swissprot", "uniprot_tsv"]))
def test_text_readers_on_random_and_truncated_files(blob, text, gz, reader):
    from data import readers
    from data.builders import BuildStats

    CASES["data_readers_text"] += 1
    CASES[f"data_readers_text:{reader}"] += 1
    record = readers.format_swissprot_record({"accession": "P00498", "sequence": "MDLVNHLTDRLLFAIPKKGRLYSKSVSILNGA" * 3,
                                              "name": "HIS1", "ec": ["2.4.2.17"], "description": "Catalyzes x."})
    fasta = ">sp|P00498|HIS1_YEAST ATP-PRT OS=Saccharomyces cerevisiae GN=HIS1 PE=1 SV=2\nMDLVNHLTDRLL\nFAIPKK\n"
    tsv = "Entry\tSequence\tProtein names\nP00498\tMDLVNHLTDRLL\tATP-PRT (EC 2.4.2.17)\n"
    good = {"fasta": fasta, "swissprot": record, "uniprot_tsv": tsv}[reader]
    cut = len(text) % max(1, len(good))
    payload = (good + good[:cut] + text + good).encode() + blob
    path = Path(_TMP.name) / (f"fuzz.{reader}" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(payload) if gz else payload)
    stats = BuildStats()
    fn = {"fasta": readers.read_fasta, "swissprot": readers.read_swissprot_dat, "uniprot_tsv": readers.read_uniprot_tsv}[reader]
    try:
        out = list(fn(path, stats))
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"{reader} reader raised {type(error).__name__}: {error}") from None
    assert out, "the intact first record must survive garbage after it"
    assert all(isinstance(p["accession"], str) and isinstance(p["sequence"], str) for p in out)


@pytest.mark.parametrize("name, first", [("uniprot_json", None), ("instruction", "[]")])
def test_jsonl_with_a_bad_first_line_keeps_the_valid_records(tmp_path, name, first):
    from data.builders import BuildStats

    CASES[f"data_readers_bad_first_line:{name}"] += 1
    good = _good_lines()[name]
    path = tmp_path / "records.jsonl"
    path.write_text((first or good[:25]) + "\n" + "\n".join([good] * 3) + "\n")
    stats = BuildStats()
    assert len(_run_reader(name, path, stats)) == 3 and sum(stats.counts.values()) == 1


def test_corrupt_gzip_container_is_an_error_naming_the_file(tmp_path):
    """A truncated .gz is not 'malformed records': it must fail loudly, and the message must say which file."""
    from data import readers

    CASES["data_readers_corrupt_gzip"] += 1
    payload = gzip.compress(("\n".join([_good_lines()["yeast"]] * 200) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises((OSError, EOFError, ValueError)) as caught:
        list(readers.read_yeast_function(path))
    assert "cut.jsonl.gz" in str(caught.value), f"error does not name the file: {caught.value!r}"


# =============================================================================================== recipe loader


def _demo_recipe() -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())


def _typo(draw, key: str) -> str:
    """A misspelling of `key`: a character dropped, doubled, swapped or replaced."""
    if not key:
        return "x"
    i = draw(st.integers(0, len(key) - 1))
    op = draw(st.sampled_from(["drop", "double", "swap", "replace"]))
    if op == "drop":
        return key[:i] + key[i + 1:] or "x"
    if op == "double":
        return key[:i] + key[i] + key[i:]
    if op == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2:]
    return key[:i] + draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_")) + key[i + 1:]


def _checked_levels(recipe) -> list[tuple[tuple, set | None]]:
    """(path to a mapping the validator checks, its valid keys; None: SFTConfig / ProtLLMConfig fields)."""
    from protllm.training import recipe as r

    levels = [((), r.TOP_LEVEL_KEYS), (("model",), r.MODEL_KEYS), (("model", "config"), None), (("data",), r.DATA_KEYS),
              (("training",), None), (("evaluate",), r.EVALUATE_KEYS), (("model", "retrieval"), r.RETRIEVAL_KEYS)]
    stages = recipe.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        levels += [(("stages", i), r.STAGE_KEYS), (("stages", i, "training"), None)]
        if isinstance(stage, dict) and stage.get("lora"):
            levels.append((("stages", i, "lora"), r.LORA_KEYS))
        if isinstance(stage, dict) and stage.get("loss_weights"):
            levels.append((("stages", i, "loss_weights"), r.LOSS_WEIGHT_KEYS))
    return levels


def _at(tree, path):
    for step in path:
        tree = tree[step]
    return tree


@st.composite
def mutated_recipes(draw):
    """configs/demo.yaml with 1-4 mutations: a key misspelt, a value replaced by random YAML, a key dropped, random
    keys added; returns (recipe, the misspelt keys introduced at checked levels)."""
    import copy

    recipe = copy.deepcopy(_demo_recipe())
    typos = []
    for _ in range(draw(st.integers(1, 4))):
        levels = [(path, keys) for path, keys in _checked_levels(recipe) if _exists(recipe, path)]
        path, keys = draw(st.sampled_from(levels))
        node = _at(recipe, path)
        op = draw(st.sampled_from(["typo", "value", "drop", "add", "typo"]))
        if not node and op != "add":
            op = "add"
        if op == "add":
            # copies: a drawn value must not be mutated by a later step (hypothesis replays draws)
            node[draw(st.one_of(st.text(max_size=12), st.integers(), st.booleans()))] = copy.deepcopy(draw(JSON_VALUES))
            continue
        key = draw(st.sampled_from(sorted(node, key=str)))
        if op == "typo":
            wrong = _typo(draw, str(key))
            valid = keys if keys is not None else set()
            if wrong not in node and keys is not None and wrong not in valid:
                node[wrong] = node.pop(key)
                typos.append((path, wrong))
        elif op == "value":
            node[key] = copy.deepcopy(draw(JSON_VALUES))
        else:
            del node[key]
    return recipe, typos


def _exists(recipe, path) -> bool:
    try:
        return isinstance(_at(recipe, path), dict)
    except (KeyError, IndexError, TypeError):
        return False


@settings(max_examples=_examples(300), **FUZZ)
@given(case=mutated_recipes())
def test_recipe_validator_refuses_typos_by_name_and_never_crashes(case):
    """Only RecipeError may escape validate_recipe, and a misspelt key at a checked level is always refused by name."""
    from protllm.training.recipe import RecipeError, validate_recipe

    recipe, typos = case
    CASES["recipe_loader"] += 1
    try:
        validate_recipe(recipe, "fuzz.yaml")
    except RecipeError as error:
        CASES["recipe_loader:refused"] += 1
        assert str(error).startswith("fuzz.yaml: "), error
        return
    except Exception as error:  # noqa: BLE001 - the property is that nothing else escapes
        raise AssertionError(f"validate_recipe raised {type(error).__name__}: {error} on {recipe!r}") from None
    # a later mutation may have replaced or dropped the mapping that held the typo
    surviving = [(path, key) for path, key in typos if _exists(recipe, path) and key in _at(recipe, path)]
    assert not surviving, f"misspelt keys {surviving} were accepted"


@settings(max_examples=_examples(100), **FUZZ)
@given(recipe=JSON_VALUES)
def test_recipe_validator_on_arbitrary_yaml_values(recipe):
    from protllm.training.recipe import RecipeError, validate_recipe

    CASES["recipe_loader_random"] += 1
    try:
        validate_recipe(recipe, "fuzz.yaml")
    except RecipeError:
        return
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"validate_recipe raised {type(error).__name__}: {error} on {recipe!r}") from None


# =============================================================================================== eval data loader


def _eval_good_lines() -> list[str]:
    lines = _good_lines()
    dataset_row = json.dumps({"id": "row1", "task": "function_text", "messages": [
        {"role": "user", "content": [{"type": "protein", "sequence": "MKTAYIAKQR"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A kinase"}]}], "answer": "A kinase"})
    return [lines["yeast"], lines["go"], dataset_row]


@settings(max_examples=_examples(120), **FUZZ)
@given(data=st.data(), task=st.sampled_from(["auto", "function_text", "ec,reaction", "go", "protein_name"]),
       split=st.sampled_from([None, "train", "valid", "test"]), limit=st.sampled_from([None, 1, 3]))
def test_eval_data_loader_on_malformed_rows(data, task, split, limit):
    """eval.data.load_examples on torn, junk and wrong-typed rows: examples or counted skips, nothing escapes."""
    from eval.data import TASKS, load_examples

    CASES["eval_data_loader"] += 1
    lines = []
    for good in _eval_good_lines():
        lines += data.draw(malformed_jsonl(good, ("good", "wrong_types", "not_object", "torn", "junk", "blank")))
    path = Path(_TMP.name) / "fuzz_eval.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stats: dict = {}
    try:
        examples = load_examples(path, task, split=split, limit=limit, stats=stats)
    except Exception as error:  # noqa: BLE001 - the property is that nothing escapes
        raise AssertionError(f"load_examples raised {type(error).__name__}: {error} on lines {lines!r}") from None
    assert stats["examples"] == len(examples)
    keys = [(ex["task"], ex["id"]) for ex in examples]
    assert len(keys) == len(set(keys)), "duplicate ids"
    for ex in examples:
        assert isinstance(ex["id"], str) and ex["task"] in TASKS and isinstance(ex["proteins"], list)
        assert isinstance(ex["question"], str)


# =============================================================================================== web app input


@pytest.fixture(scope="module")
def app_demo(processor):
    """The app's input path (`ProtLLMDemo.protein_block`) on the fuzz processor: no model is needed to check input."""
    pytest.importorskip("gradio")
    import app

    demo = app.ProtLLMDemo.__new__(app.ProtLLMDemo)
    demo.processor = processor  # a sequence model's: the app parses uploads itself and hands over the structure
    return app, demo


@settings(max_examples=_examples(200), **FUZZ)
@given(sequence=st.one_of(st.none(), RANDOM_SEQUENCES, st.builds(lambda h, s: f">{h}\n{s}", st.text(max_size=20), RANDOM_SEQUENCES),
                          st.builds(lambda a, b: f">a\n{a}\n>b\n{b}", RANDOM_SEQUENCES, RANDOM_SEQUENCES)),
       structure=st.one_of(st.none(), st.sampled_from(["missing.pdb", "/dev/null", "."]), st.binary(max_size=200)),
       chain=st.one_of(st.none(), st.text(max_size=2)))
def test_app_input_only_raises_input_problem(app_demo, sequence, structure, chain):
    """The app's text box, file upload and chain field: an answerable protein block, or InputProblem."""
    app, demo = app_demo
    CASES["app_input"] += 1
    if isinstance(structure, bytes):
        path = Path(_TMP.name) / "upload.pdb"
        path.write_bytes(structure)
        structure = str(path)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block, description = demo.protein_block(sequence, structure, chain)
    except app.InputProblem as error:
        assert str(error).startswith(("Sequence", "Structure file", "Give a protein")), error
        return
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"protein_block raised {type(error).__name__}: {error}") from None
    finally:
        _timed(start, "app input")
    assert block["type"] == "protein" and set(block["sequence"]) <= VALID_RESIDUES and description


@pytest.mark.parametrize("name", [["align"], {"align": 1}])
def test_recipe_stage_name_that_is_not_a_string_is_a_recipe_error(name):
    """Found by the recipe fuzz target: an unhashable stage name raised TypeError instead of naming the key."""
    from protllm.training.recipe import RecipeError, validate_recipe

    CASES["recipe_loader_unhashable_stage_name"] += 1
    with pytest.raises(RecipeError, match=r"stages\[0\]\.name"):
        validate_recipe({"stages": [{"name": name}]}, "fuzz.yaml")
