"""Protein structure featuriser for ProtLLM (STELLA / SEPIT structure paths).

Reads PDB, mmCIF and BinaryCIF files (plain or gzipped), or PDB/mmCIF text, picks a protein chain, and returns
per-residue backbone coordinates (N, CA, C, O) aligned to a protein sequence, a residue mask and pLDDT for
predicted models (3Di and SaProt tokens of a structure: ``saprot_protllm.py``). It also holds the one residue
rule (:func:`clean_sequence`) that the processor uses too.

This file is shipped to the Hugging Face Hub as remote code next to the model, so it imports only numpy and
the standard library at module level. The structure libraries are imported lazily:

* ``gemmi``   -- reads PDB and mmCIF (preferred);
* ``biotite`` -- reads BinaryCIF, reads PDB/mmCIF when gemmi is absent, and runs the global sequence
  alignment (BLOSUM62, affine gaps) used when sequence and structure differ.

Every failure on user input raises :class:`StructureError` (a ``ValueError``, message at most ~1 KB) that
names the source (file name, ``'<bytes>'`` or ``'<text>'``), and where relevant the chain and residue.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "StructureError", "StructureWarning", "ProteinStructure", "clean_sequence", "load_structure", "parse_structure_chains",
    "VALID_RESIDUES", "MAX_STRUCTURE_FILE_BYTES", "MIN_ALIGNMENT_IDENTITY", "MIN_ALIGNMENT_COVERAGE",
]

#: Files, text and gzip payloads (once decompressed) larger than this are refused. The cap holds while
#: reading, so a device or pipe (size 0 to ``stat``) cannot stream past it. 256 MiB holds the largest PDB
#: entries in mmCIF form, while keeping an upload or a gzip bomb from exhausting a data loader's memory.
MAX_STRUCTURE_FILE_BYTES = 256 * 1024 * 1024
#: A given sequence must share at least this identity with the chain over aligned positions ...
MIN_ALIGNMENT_IDENTITY = 0.5
#: ... and the aligned positions must cover this share of the shorter of (sequence, resolved chain).
MIN_ALIGNMENT_COVERAGE = 0.5
#: The residue rule of every ProtLLM input: the ESM-2 alphabet (20 amino acids plus B, Z, U, O, X).
VALID_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYBZUOX")

_BACKBONE = ("N", "CA", "C", "O")
# The 20 amino acids and common modified residues (for biotite; gemmi's table covers the CCD it ships)
_THREE_TO_ONE = dict(zip(
    "ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL SEC PYL MSE SEP TPO PTR CSO "
    "CME CSD OCS HYP MLY M3L KCX LLP PCA CAS CSS NLE FME CGU SAC MEN ASX GLX UNK".split(),
    "ARNDCQEGHILKMFPSTWYVUOMSTYCCCCPKKKKQCCLMESNBZX",
))
_PREDICTED_NAME_RE = re.compile(r"(^|[^a-z0-9])(af-|af2|alphafold|esmfold|colabfold|omegafold|unrelaxed|relaxed_rank|rank_\d|pred)", re.I)


def _shorten(text: Any, limit: int = 200) -> str:
    """``text`` cut to about ``limit`` characters, so that no message echoes a whole file or path."""
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 40]}... [{len(text) - limit + 40} more characters]"


class StructureError(ValueError):
    """Bad or unusable structure input; the message names the file/chain/residue (and is at most ~1 KB)."""

    def __init__(self, message: str):
        super().__init__(_shorten(message, 1000))


class StructureWarning(UserWarning):
    """A documented fallback was taken (e.g. every residue below the pLDDT threshold)."""


def _require(module: str, pip_name: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError(f"{what} needs the '{pip_name}' package: pip install {pip_name}") from exc


def clean_sequence(sequence: Any, context: str = "sequence", error_class: type = StructureError) -> str:
    """The residue rule shared by the processor and the structure reader.

    Whitespace is removed and one trailing stop ``'*'`` dropped; every residue must be an ASCII letter of
    :data:`VALID_RESIDUES`, in either case. Returns the upper-case sequence. Raises ``error_class`` with a message
    that starts with ``context`` (``"protein 2"``, a file name) and names the first bad residue and its 1-based
    position."""
    if not isinstance(sequence, str):
        raise error_class(f"{context}: sequence must be a string, got {type(sequence).__name__}")
    cleaned = "".join(sequence.split())
    cleaned = cleaned[:-1] if cleaned.endswith("*") else cleaned
    if not cleaned:
        raise error_class(f"{context}: empty sequence")
    # Checked before upper-casing: str.upper maps some non-ASCII letters to residues ('ß' -> 'SS', 'ı' -> 'I').
    upper = cleaned.upper()
    if not (cleaned.isascii() and VALID_RESIDUES.issuperset(upper)):
        position, residue = next((i, r) for i, r in enumerate(cleaned) if not r.isascii() or r.upper() not in VALID_RESIDUES)
        raise error_class(f"{context}: invalid residue {residue!r} at position {position + 1} (allowed: 20 amino acids and B, Z, U, O, X)")
    return upper


# --------------------------------------------------------------------------------------------------------
# the result type
# --------------------------------------------------------------------------------------------------------
@dataclass
class ProteinStructure:
    """One protein chain, residue-aligned to ``sequence`` (length ``L``).

    ``coords`` ``(L, 4, 3)`` float32 holds N, CA, C, O (NaN where absent); ``coord_mask`` ``(L,)`` is True where
    the residue has N, CA and C coordinates (for CA-only dict input, where CA is present; 3Di then reports
    ``'#'`` for those residues because Foldseek needs N and C). ``plddt`` ``(L,)`` for predicted models.
    ``cb`` (optional, ``(L, 3)``) keeps real C-beta positions from files so 3Di matches Foldseek, which uses a
    real C-beta where there is one; ``residue_ids`` (optional) are the author residue numbers with insertion
    codes (``"57"``, ``"57A"``), ``""`` for residues without a structure match.
    """

    sequence: str
    coords: np.ndarray
    coord_mask: np.ndarray
    plddt: np.ndarray | None
    chain_id: str
    source: str
    cb: np.ndarray | None = None
    residue_ids: list[str] | None = None

    def __post_init__(self) -> None:
        L = len(self.sequence)
        for field, shape, dtype in (("coords", (L, 4, 3), np.float32), ("coord_mask", (L,), bool),
                                    ("plddt", (L,), np.float32), ("cb", (L, 3), np.float32)):
            if getattr(self, field) is not None:
                value = np.asarray(getattr(self, field), dtype=dtype)
                if value.shape != shape:
                    raise StructureError(f"{self.source}: chain {self.chain_id!r}: {field} has shape {value.shape}, expected {shape}")
                setattr(self, field, value)
        if self.residue_ids is not None and len(self.residue_ids) != L:
            raise StructureError(f"{self.source}: chain {self.chain_id!r}: {len(self.residue_ids)} residue ids for {L} residues")

    def __len__(self) -> int:
        return len(self.sequence)

    def crop(self, start: int, end: int) -> "ProteinStructure":
        """Residues ``start:end`` (Python slice semantics, 0-based) as a new structure."""
        sl = slice(*slice(start, end).indices(len(self))[:2])

        def part(a):
            return None if a is None else a[sl].copy() if isinstance(a, np.ndarray) else list(a[sl])

        return ProteinStructure(self.sequence[sl], part(self.coords), part(self.coord_mask), part(self.plddt), self.chain_id,
                                self.source, part(self.cb), part(self.residue_ids))

    @property
    def ca(self) -> np.ndarray:
        """``(L, 3)`` CA coordinates (NaN where absent)."""
        return self.coords[:, 1]


class _Chain(NamedTuple):
    """Internal: the ``n`` residues of one chain as read from a file (no alignment yet)."""

    chain_id: str
    letters: str  # one letter per residue
    coords: np.ndarray  # (n, 4, 3) float32, NaN where absent
    cb: np.ndarray  # (n, 3) float32
    bfac: np.ndarray  # (n,) float32, CA B-factor (or the residue's first atom's)
    resids: Any  # (n,) author numbers with insertion codes, as str


# --------------------------------------------------------------------------------------------------------
# reading bytes and sniffing the format
# --------------------------------------------------------------------------------------------------------
_FORMATS = {"pdb": "pdb", "ent": "pdb", "cif": "cif", "mmcif": "cif", "bcif": "bcif"}
_NOT_REGULAR = ((stat.S_ISDIR, "is a directory"), (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"),
                (stat.S_ISFIFO, "is a FIFO (named pipe)"), (stat.S_ISSOCK, "is a socket"))


def _format_from_name(name: str) -> str | None:
    low = name.lower().removesuffix(".gz")
    return _FORMATS.get(low.rsplit(".", 1)[-1]) if "." in low else None


def _normalise_format(file_format: str | None, name: str) -> str | None:
    f = None if file_format is None else str(file_format).lower().lstrip(".").removesuffix(".gz")
    if f in (None, "gz", "gzip", ""):
        return None
    if f not in _FORMATS:
        raise StructureError(f"{name}: unknown file_format {_shorten(repr(file_format), 60)}; use one of pdb, cif, mmcif, bcif")
    return _FORMATS[f]


def _gunzip(data: bytes, name: str) -> bytes:
    d = zlib.decompressobj(wbits=47)  # gzip or zlib header, auto-detected
    try:
        out = d.decompress(data, MAX_STRUCTURE_FILE_BYTES + 1)
    except zlib.error as exc:
        raise StructureError(f"{name}: corrupt gzip data: {exc}") from None
    if len(out) > MAX_STRUCTURE_FILE_BYTES:
        raise StructureError(f"{name}: decompressed content exceeds MAX_STRUCTURE_FILE_BYTES={MAX_STRUCTURE_FILE_BYTES}")
    if not d.eof:
        raise StructureError(f"{name}: gzip stream is truncated (unexpected end of compressed data)")
    return out


def _read_file_capped(path: str, shown: str, name: str) -> bytes:
    """The bytes of the regular file ``path``, at most MAX_STRUCTURE_FILE_BYTES of them.

    Opened non-blocking and checked with fstat on the open descriptor, so that a FIFO cannot hang the open and
    nothing can be swapped in after the check; then read with the cap enforced by the read itself."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise StructureError(f"{shown}: structure file not found") from None
    except IsADirectoryError:
        raise StructureError(f"{shown}: is a directory, not a structure file") from None
    except OSError as exc:
        raise StructureError(f"{shown}: cannot open structure file: {exc.strerror or exc}") from None
    try:
        status = os.fstat(fd)
        problem = next((what for test, what in _NOT_REGULAR if test(status.st_mode)), None)
        if problem or not stat.S_ISREG(status.st_mode):
            raise StructureError(f"{shown}: {problem or 'is not a regular file'}, not a structure file (only regular files are read)")
        if status.st_size > MAX_STRUCTURE_FILE_BYTES:  # early refusal; the capped read below is what guarantees it
            raise StructureError(f"{name}: file of {status.st_size} bytes exceeds MAX_STRUCTURE_FILE_BYTES={MAX_STRUCTURE_FILE_BYTES}")
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read(status.st_size + 1)  # read(n) allocates n bytes up front: ask for what fstat saw
            if len(data) > status.st_size:  # the file grew meanwhile: read on, still capped
                data += handle.read(MAX_STRUCTURE_FILE_BYTES + 1 - len(data))
    except OSError as exc:
        raise StructureError(f"{shown}: cannot read structure file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_STRUCTURE_FILE_BYTES:
        raise StructureError(f"{name}: file grew past MAX_STRUCTURE_FILE_BYTES={MAX_STRUCTURE_FILE_BYTES} while being read")
    return data


def _read_source_bytes(source: Any) -> tuple[bytes, str, str | None]:
    """Returns (raw bytes, display name, format hint from the name)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
    elif isinstance(source, str) and ("\n" in source or "\r" in source):  # no path has a line break: file content
        data, name = source.encode("utf-8", "surrogateescape"), "<text>"
        if _sniff(data) not in ("pdb", "cif"):
            raise StructureError(f"<text>: a structure string of {len(source)} characters with line breaks is not a file path and "
                                 "does not look like PDB or mmCIF text; pass a path, bytes, or the text of a PDB/mmCIF file")
    else:
        try:
            path = os.fspath(source)
        except TypeError:
            raise StructureError(f"unsupported structure source of type {type(source).__name__}: pass a path, bytes, PDB/mmCIF "
                                 "text, a ProteinStructure or a dict with 'coords' and 'sequence'") from None
        path = os.fsdecode(path)
        name = _shorten(os.path.basename(path) or path)
        return _read_file_capped(path, _shorten(path), name), name, _format_from_name(name)
    if len(data) > MAX_STRUCTURE_FILE_BYTES:
        raise StructureError(f"{name}: {len(data)} bytes exceeds MAX_STRUCTURE_FILE_BYTES={MAX_STRUCTURE_FILE_BYTES}")
    return data, name, None


def _sniff(data: bytes) -> str | None:
    if not data:
        return None
    if 0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF):  # msgpack map: BinaryCIF
        return "bcif"
    head = data[:4096].lstrip()
    if head.startswith(b"data_") or b"\ndata_" in head[:2048] or b"\n_atom_site." in head or b"loop_" in head[:2048]:
        return "cif"
    for line in head.splitlines()[:50]:
        if line[:6] in (b"ATOM  ", b"HETATM", b"HEADER", b"MODEL ", b"REMARK", b"CRYST1", b"TITLE ", b"COMPND", b"EXPDTA"):
            return "pdb"
    return None


# --------------------------------------------------------------------------------------------------------
# readers -> atom table -> list[_Chain]
# --------------------------------------------------------------------------------------------------------
def _letter_for_name(name: str, cache: dict = {}) -> str | None:  # noqa: B006 - deliberate module cache
    """One-letter parent code for an amino-acid residue name (MSE -> M, ...); None for non-amino acids."""
    if name not in cache:
        letter = _THREE_TO_ONE.get(name)
        if letter is None and name not in ("HOH", "WAT", "DOD", ""):
            try:  # gemmi ships a table of the CCD components, biotite another
                try:
                    import gemmi

                    info = gemmi.find_tabulated_residue(name)
                    code = info.one_letter_code if info is not None and info.is_amino_acid() else None
                except ImportError:
                    import biotite.structure.info as binfo

                    code = binfo.one_letter_code(name) or None
                letter = None if code is None else code.upper() if code.isalpha() else "X"
            except Exception:
                letter = None
        cache[name] = letter
    return cache[name]


# An atom table is a dict of equal-length numpy arrays, first model only, atoms N/CA/C/O/CB only: het (bool),
# atom, alt, res, chain (bytes or str), seq (int), icode (bytes or str), xyz (n, 3) float64, b (float64).
_WANTED_ATOMS = (*_BACKBONE, "CB")
_WANTED_ATOM_CODES = np.frombuffer(b"".join(a.encode().ljust(8, b"\0") for a in _WANTED_ATOMS), dtype="<u8")


def _check_pdb_coordinate_fields(data: bytes, name: str) -> None:
    """Refuse ATOM/HETATM records whose x, y, z fields (columns 31-54) are not plain decimal numbers.

    gemmi reads these fields leniently: blanks or ``'********'`` become 0.0 and ``'21.6x0'`` becomes 21.6, which
    would silently misplace atoms. This checks the fields' characters, for all records at once; the numbers
    themselves come from gemmi."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if len(buf) < 54:
        return
    starts = np.flatnonzero(buf[:-54] == 10) + 1  # shorter last records: gemmi refuses them as too short
    if buf[:6].tobytes() in (b"ATOM  ", b"HETATM"):
        starts = np.concatenate([[0], starts])
    starts = starts[(buf[starts] == 65) | (buf[starts] == 72)]  # 'A' or 'H' first: the rest is checked next
    record = sliding_window_view(buf, 6)[starts].view("S6").reshape(-1)
    starts = starts[(record == b"ATOM  ") | (record == b"HETATM")]
    fields = sliding_window_view(buf, 24)[starts + 30]  # (n, 24): x, y, z as 8 characters each
    digit = (fields - np.uint8(48)) < 10
    allowed = digit | (fields == 32) | (fields == 45) | (fields == 46)  # space, '-', '.'
    # per 8-byte field, as one uint64: every character allowed, and at least one digit
    ok = (allowed.view("<u8") == 0x0101010101010101).all(axis=1) & (digit.view("<u8") != 0).all(axis=1)
    if not ok.all():
        start = int(starts[np.argmin(ok)])
        line_number = int(np.count_nonzero(buf[:start] == 10)) + 1
        end = data.find(b"\n", start)
        line = data[start : end if end >= 0 else len(data)].rstrip().decode("latin-1")
        raise StructureError(f"{name}: malformed ATOM/HETATM record on line {line_number} (x, y, z are not numbers): {_shorten(line, 90)!r}")


def _atoms_from_gemmi(data: bytes, fmt: str, name: str) -> tuple[dict, bool]:
    """PDB or mmCIF text -> (atom table, has mmCIF pLDDT records) with gemmi."""
    import gemmi

    has_qa = False
    try:
        if fmt == "pdb":
            structure = gemmi.read_pdb_string(data)
        else:
            document = gemmi.cif.read_string(data)
            if len(document) == 0:
                return {}, False
            has_qa = len(document[0].find_values("_ma_qa_metric_local.metric_value")) > 0
            structure = gemmi.make_structure_from_block(document[0])
        flat = gemmi.FlatStructure(structure)
    except Exception as exc:
        detail = _shorten(" ".join(str(exc).split()))
        what = "truncated ATOM/HETATM record" if "too short" in detail else "could not parse as " + ("PDB" if fmt == "pdb" else "mmCIF")
        raise StructureError(f"{name}: {what}: {type(exc).__name__}: {detail}") from None
    if fmt == "pdb":
        _check_pdb_coordinate_fields(data, name)
    if len(flat) == 0:
        return {}, has_qa
    flat.strings_as_numbers = True  # (n, 8) int8 arrays: a name of up to 8 characters is one uint64

    def packed(chars: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(chars).view("<u8").reshape(-1)

    names, model = packed(flat.atom_names), flat.model_num
    keep = np.flatnonzero(np.isin(names, _WANTED_ATOM_CODES) & (model == model[0]))
    return {
        "het": flat.het_flags[keep] == ord("H"), "atom": names[keep].view("S8"), "alt": flat.altlocs[keep].view("S1"),
        "res": packed(flat.residue_names)[keep].view("S8"), "chain": packed(flat.chain_ids)[keep].view("S8"),
        "seq": flat.resnums[keep].astype(np.int64), "icode": flat.icodes[keep].view("S1"), "xyz": flat.pos[keep],
        "b": flat.b_iso[keep].astype(np.float64),
    }, has_qa


def _atoms_from_biotite(data: bytes, fmt: str, name: str) -> tuple[dict, bool]:
    """BinaryCIF (or PDB / mmCIF when gemmi is absent) -> (atom table, has mmCIF pLDDT records) with biotite."""
    what = {"pdb": "PDB", "cif": "mmCIF", "bcif": "BinaryCIF"}[fmt]
    _require("biotite", "biotite", f"reading {what} structures" + ("" if fmt == "bcif" else " (or install gemmi)"))
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    has_qa = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "pdb":
                atoms = pdb.PDBFile.read(io.StringIO(data.decode("latin-1"))).get_structure(model=1, altloc="all", extra_fields=["b_factor"])
            else:
                file = pdbx.BinaryCIFFile.read(io.BytesIO(data)) if fmt == "bcif" else pdbx.CIFFile.read(io.StringIO(data.decode("latin-1")))
                has_qa = "ma_qa_metric_local" in file.block
                if "atom_site" not in file.block:
                    return {}, has_qa
                atoms = pdbx.get_structure(file, model=1, altloc="all", extra_fields=["b_factor"])
    except Exception as exc:
        raise StructureError(f"{name}: could not parse as {what}: {type(exc).__name__}: {_shorten(' '.join(str(exc).split()))}") from None
    keep = np.isin(atoms.atom_name, _WANTED_ATOMS)
    alt = atoms.altloc_id
    table = {
        "het": atoms.hetero, "atom": atoms.atom_name, "alt": np.where(np.isin(alt, [".", "?", " "]), "", alt),
        "res": atoms.res_name, "chain": atoms.chain_id, "seq": atoms.res_id.astype(np.int64), "icode": atoms.ins_code,
        "xyz": atoms.coord.astype(np.float64), "b": atoms.b_factor.astype(np.float64),
    }
    return {key: value[keep] for key, value in table.items()}, has_qa


def _as_str(arr: np.ndarray) -> np.ndarray:
    return np.char.strip(arr.astype(str)) if arr.dtype.kind == "S" else np.char.strip(arr)


def _chains_from_atoms(atoms: dict, name: str) -> list[_Chain]:
    if not atoms or len(atoms["xyz"]) == 0:
        return []
    n = len(atoms["xyz"])
    chain, seq, icode, alt = atoms["chain"], atoms["seq"], atoms["icode"], atoms["alt"]
    # residue boundaries: a change of chain, number or insertion code between consecutive atoms
    new = np.ones(n, dtype=bool)
    new[1:] = (chain[1:] != chain[:-1]) | (seq[1:] != seq[:-1]) | (icode[1:] != icode[:-1])
    rid = np.cumsum(new) - 1
    # altlocs: per residue keep blank-altloc atoms and those of the residue's first altloc id
    blank_alt = (b"", b" ") if alt.dtype.kind == "S" else ("", " ")
    has_alt = (alt != blank_alt[0]) & (alt != blank_alt[1])
    if has_alt.any():
        first_alt = np.full(rid[-1] + 1, "", dtype=alt.dtype)
        idx = np.nonzero(has_alt)[0]
        r_alt, first_pos = np.unique(rid[idx], return_index=True)
        first_alt[r_alt] = alt[idx[first_pos]]
        keep = ~has_alt | (alt == first_alt[rid])
        atoms = {k: v[keep] for k, v in atoms.items()}
        rid = rid[keep]
        _, rid = np.unique(rid, return_inverse=True)
        new = np.ones(len(rid), dtype=bool)
        new[1:] = rid[1:] != rid[:-1]
    starts = np.nonzero(new)[0]
    R, aname = len(starts), atoms["atom"]
    coords = np.full((R, 5, 3), np.nan, dtype=np.float32)  # N, CA, C, O, CB
    bca = np.full(R, np.nan, dtype=np.float64)
    for k, nm in enumerate(("N", "CA", "C", "O", "CB")):
        m = np.nonzero(aname == (nm.encode() if aname.dtype.kind == "S" else nm))[0][::-1]  # reversed: the first atom of a name wins
        coords[rid[m], k] = atoms["xyz"][m]
        if nm == "CA":
            bca[rid[m]] = atoms["b"][m]
    bfac = np.where(np.isnan(bca), atoms["b"][starts], bca).astype(np.float32)
    het, chains_r = atoms["het"][starts], _as_str(atoms["chain"][starts])
    has_ca = ~np.isnan(coords[:, 1, 0])
    has_bb = has_ca & ~np.isnan(coords[:, 0, 0]) & ~np.isnan(coords[:, 2, 0])
    uniq_names, inv = np.unique(_as_str(atoms["res"][starts]), return_inverse=True)
    uniq_letters = [_letter_for_name(str(rn)) for rn in uniq_names.tolist()]
    is_aa = np.array([x is not None for x in uniq_letters], dtype=bool)[inv]
    letter_codes = np.frombuffer("".join(x or "X" for x in uniq_letters).encode("ascii"), dtype=np.uint8)[inv]
    # Polymer residues: ATOM amino acids; HETATM amino acids (MSE, SEP, ...) and unknown components with a
    # full backbone only when peptide-bonded (C(i-1)-N(i) or C(i)-N(i+1) < 2 A) to a neighbour in the same
    # chain, so that free amino-acid ligands (a HETATM GLU substrate) and other hetero groups stay out.
    link_prev = np.zeros(R, dtype=bool)
    with np.errstate(invalid="ignore"):
        link_prev[1:] = (chains_r[1:] == chains_r[:-1]) & (np.linalg.norm(coords[1:, 0] - coords[:-1, 2], axis=1) < 2.0)
    linked = link_prev | np.append(link_prev[1:], False)
    keep_r = np.where(is_aa, has_ca & (~het | linked) | (~het & ~has_ca), has_bb & (~het | linked))
    resids = np.char.add(atoms["seq"][starts].astype(str), _as_str(atoms["icode"][starts]))
    kept = np.nonzero(keep_r)[0]
    chain_of = chains_r[kept]
    uniq_c, first_idx = np.unique(chain_of, return_index=True)
    chains = []
    for cid in uniq_c[np.argsort(first_idx)].tolist():
        rows = kept[chain_of == cid]
        chains.append(_Chain(str(cid), letter_codes[rows].tobytes().decode("ascii"), coords[rows, :4], coords[rows, 4], bfac[rows], resids[rows]))
    return chains


def _parse_chains(source: Any, file_format: str | None):
    """Returns (chains, name, predicted_hint: bool)."""
    data, name, name_fmt = _read_source_bytes(source)
    if not data.strip():
        raise StructureError(f"{name}: empty structure file")
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, name)
        if not data.strip():
            raise StructureError(f"{name}: empty structure file (after gzip decompression)")
    elif name.lower().endswith(".gz"):
        raise StructureError(f"{name}: file name ends in .gz but the content is not gzip data (corrupt or mislabelled file)")
    fmt = _normalise_format(file_format, name) or name_fmt or _sniff(data)
    if fmt is None:
        raise StructureError(f"{name}: cannot tell the structure format (not PDB, mmCIF or BinaryCIF); pass file_format")
    sniffed, label = _sniff(data), {"pdb": "PDB", "cif": "mmCIF", "bcif": "BinaryCIF"}
    if fmt == "bcif" and sniffed in ("cif", "pdb"):
        raise StructureError(f"{name}: expected BinaryCIF but the content is text (wrong format)")
    if fmt != "bcif" and b"\x00" in data[:65536]:
        raise StructureError(f"{name}: binary data where a text {fmt.upper()} file was expected (wrong format or corrupt file)")
    if fmt != "bcif" and sniffed not in (None, fmt):
        raise StructureError(f"{name}: expected {label[fmt]} but the content looks like {label[sniffed]} (wrong format)")
    try:
        import gemmi  # noqa: F401 - the preferred reader for PDB and mmCIF
    except ImportError:
        gemmi = None
    reader = _atoms_from_gemmi if fmt != "bcif" and gemmi is not None else _atoms_from_biotite
    atoms, has_qa = reader(data, fmt, name)
    if atoms and not np.isfinite(atoms["xyz"]).all():
        bad = int(np.argmin(np.isfinite(atoms["xyz"]).all(axis=1)))
        atom, chain = (_as_str(atoms[key][bad : bad + 1])[0] for key in ("atom", "chain"))
        raise StructureError(f"{name}: non-finite or non-numeric coordinates: atom {atom} of residue {atoms['seq'][bad]}, chain {chain!r}")
    try:
        chains = _chains_from_atoms(atoms, name)
    except StructureError:
        raise
    except Exception as exc:  # defensive: inconsistent columns in a damaged file
        raise StructureError(f"{name}: could not read residues: {type(exc).__name__}: {_shorten(exc)}") from None
    head = data[:8192].upper() if fmt == "pdb" else b""
    hint = has_qa or bool(_PREDICTED_NAME_RE.search(name)) or b"ALPHAFOLD" in head or b"ESMFOLD" in head
    if fmt == "bcif" and not has_qa:
        hint = hint or b"ma_qa_metric" in data
    if not chains:
        raise StructureError(f"{name}: no protein chain found (no amino-acid residues with backbone atoms; corrupt, empty or non-protein file?)")
    return chains, name, hint


def parse_structure_chains(source, file_format: str | None = None) -> dict[str, str]:
    """Chain id -> one-letter sequence of every protein chain (first model, first altloc, modified residues
    mapped to their parent amino acid, unknown ones as ``X``). Only residues present in the file appear:
    unresolved residues (in SEQRES but without coordinates) are not in these sequences."""
    if isinstance(source, ProteinStructure):
        return {source.chain_id: source.sequence}
    chains, _, _ = _parse_chains(source, file_format)
    return {c.chain_id: c.letters for c in chains}


# --------------------------------------------------------------------------------------------------------
# alignment
# --------------------------------------------------------------------------------------------------------
def _numbering_fast_path(chain: _Chain, seq: str) -> np.ndarray | None:
    """Map chain residues to sequence positions without DP when the chain is an exact, in-register subset
    of ``seq`` (identical, or missing loops with consistent author numbering). None if not applicable."""
    letters = chain.letters
    n = len(letters)
    if letters == seq:
        return np.arange(n)
    k = min(n, 12)
    first = letters[:k]
    pos0 = seq.find(first)
    if pos0 < 0 or seq.find(first, pos0 + 1) >= 0:
        return None
    try:
        nums = np.asarray(chain.resids).astype(np.int64)  # fails on insertion codes -> DP
    except ValueError:
        return None
    idx = nums - nums[0] + pos0
    if idx[-1] >= len(seq) or np.any(np.diff(idx) <= 0) or idx[0] < 0:
        return None
    arr = np.frombuffer(seq.encode(), dtype=np.uint8)[idx]
    if not np.array_equal(arr, np.frombuffer(letters.encode(), dtype=np.uint8)):
        return None
    return idx


_ALIGN_CACHE: dict = {}


def _dp_align(chain_letters: str, seq: str) -> np.ndarray:
    """Global alignment (BLOSUM62, gap open -10 / extend -1, free end gaps) with biotite.
    Returns for every chain residue the sequence index, or -1."""
    _require("biotite", "biotite", "aligning a sequence to a structure")
    from biotite.sequence import ProteinSequence
    from biotite.sequence.align import SubstitutionMatrix, align_optimal

    if "matrix" not in _ALIGN_CACHE:
        _ALIGN_CACHE.update(matrix=SubstitutionMatrix.std_protein_matrix(), alphabet=set(ProteinSequence.alphabet.get_symbols()))
    a, b = (ProteinSequence("".join(ch if ch in _ALIGN_CACHE["alphabet"] else "X" for ch in s)) for s in (chain_letters, seq))
    ali = align_optimal(a, b, _ALIGN_CACHE["matrix"], gap_penalty=(-10, -1), terminal_penalty=False, max_number=1)[0]
    out = np.full(len(chain_letters), -1, dtype=np.int64)
    tr = ali.trace
    ok = (tr[:, 0] >= 0) & (tr[:, 1] >= 0)
    out[tr[ok, 0]] = tr[ok, 1]
    return out


def _alignment_stats(letters: str, seq: str, mapping: np.ndarray, resolved: np.ndarray) -> tuple[float, float, int]:
    matched = np.nonzero(mapping >= 0)[0]
    if len(matched) == 0:
        return 0.0, 0.0, 0
    a = np.frombuffer(letters.encode(), dtype=np.uint8)[matched]
    b = np.frombuffer(seq.encode(), dtype=np.uint8)[mapping[matched]]
    known = (a != ord("X")) & (b != ord("X"))
    identity = float((a[known] == b[known]).mean()) if known.any() else 0.0
    n_res = int(resolved.sum()) or len(letters)
    coverage = len(matched) / max(1, min(len(seq), n_res))
    return identity, min(coverage, 1.0), len(matched)


def _map_chain(chain: _Chain, seq: str) -> tuple[np.ndarray, float, float]:
    mapping = _numbering_fast_path(chain, seq)
    if mapping is not None:
        return mapping, 1.0, 1.0
    # align only residues that have some coordinates: a residue with no atoms of ours carries nothing
    resolved = ~np.isnan(chain.coords[:, 1]).any(axis=1) | ~np.isnan(chain.coords[:, 0]).any(axis=1)
    mapping = _dp_align(chain.letters, seq)
    identity, coverage, _ = _alignment_stats(chain.letters, seq, mapping, resolved)
    return mapping, identity, coverage


# --------------------------------------------------------------------------------------------------------
# building ProteinStructure
# --------------------------------------------------------------------------------------------------------
def _backbone_mask(coords: np.ndarray) -> np.ndarray:
    return np.isfinite(coords[:, :3]).all(axis=(1, 2))


def _plddt_from_bfac(bfac: np.ndarray, is_predicted: bool | None, hint: bool, name: str, chain_id: str) -> np.ndarray | None:
    finite = bfac[np.isfinite(bfac)]
    in_range = finite.size > 0 and float(finite.min()) >= 0.0 and float(finite.max()) <= 100.0
    if is_predicted is None:
        if not (hint and in_range):
            return None
    elif not is_predicted:
        return None
    elif not in_range:
        raise StructureError(
            f"{name}: chain {chain_id!r}: is_predicted=True but B-factors are outside 0..100 "
            f"(min {finite.min() if finite.size else float('nan'):.2f}, max {finite.max() if finite.size else float('nan'):.2f}), so they are not pLDDT"
        )
    plddt = bfac.astype(np.float32, copy=True)
    if finite.size and float(finite.max()) <= 1.0:
        plddt *= 100.0  # ESMFold / some pipelines store pLDDT as 0..1
    return plddt


def _from_chain(chain: _Chain, name: str, sequence: str | None, is_predicted, hint) -> ProteinStructure:
    plddt_chain = _plddt_from_bfac(chain.bfac, is_predicted, hint, name, chain.chain_id)
    if sequence is None:
        coords = chain.coords
        mask = _backbone_mask(coords)
        if not mask.any():
            raise StructureError(f"{name}: chain {chain.chain_id!r}: no residue has N, CA and C coordinates (NaN or absent coordinates)")
        return ProteinStructure(chain.letters, coords, mask, plddt_chain, chain.chain_id, name, chain.cb, np.asarray(chain.resids).tolist())
    seq = clean_sequence(sequence, f"{name}: sequence")
    mapping, identity, coverage = _map_chain(chain, seq)
    if identity < MIN_ALIGNMENT_IDENTITY or coverage < MIN_ALIGNMENT_COVERAGE:
        raise StructureError(
            f"{name}: chain {chain.chain_id!r} does not match the given sequence: identity {identity:.2f} over aligned "
            f"positions (need >= {MIN_ALIGNMENT_IDENTITY}), coverage {coverage:.2f} (need >= {MIN_ALIGNMENT_COVERAGE}); "
            f"chain length {len(chain.letters)}, sequence length {len(seq)}"
        )
    return _scatter(chain, name, seq, mapping, plddt_chain)


def _scatter(chain: _Chain, name: str, seq: str, mapping: np.ndarray, plddt_chain) -> ProteinStructure:
    """Chain residues moved to their sequence positions (``mapping``: chain index -> sequence index or -1)."""
    src = np.nonzero(mapping >= 0)[0]
    dst = mapping[src]

    def scattered(values, shape, dtype=np.float32, fill=np.nan):
        out = np.full(shape, fill, dtype=dtype)
        out[dst] = values[src]
        return out

    L, chain_resids = len(seq), np.asarray(chain.resids, dtype=str)
    coords, cb = scattered(chain.coords, (L, 4, 3)), scattered(chain.cb, (L, 3))
    plddt = None if plddt_chain is None else scattered(plddt_chain, (L,))
    resids = scattered(chain_resids, (L,), chain_resids.dtype if len(chain_resids) else "U1", "").tolist()
    mask = _backbone_mask(coords)
    if not mask.any():
        raise StructureError(f"{name}: chain {chain.chain_id!r}: no residue aligned to the sequence has N, CA and C coordinates")
    return ProteinStructure(seq, coords, mask, plddt, chain.chain_id, name, cb, resids)


def _quick_score(chain: _Chain, seq: str) -> float:
    """Cheap ranking of chains against a sequence: exact / substring hits first, then 3-mer overlap."""
    if chain.letters == seq:
        return 3.0
    if chain.letters in seq or seq in chain.letters:
        return 2.0
    ks = {chain.letters[i : i + 3] for i in range(len(chain.letters) - 2)}
    kq = {seq[i : i + 3] for i in range(len(seq) - 2)}
    return len(ks & kq) / max(1, min(len(ks), len(kq)))


def _from_dict(d: dict, sequence, name: str, is_predicted) -> ProteinStructure:
    if "coords" not in d:
        raise StructureError(f"{name}: structure dict needs a 'coords' array of shape (L, 4, 3) or (L, 3)")
    try:
        coords = np.array(d["coords"], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise StructureError(f"{name}: 'coords' is not a numeric array: {exc}") from None
    seq_in = d.get("sequence", sequence)
    if seq_in is None:
        raise StructureError(f"{name}: structure dict needs a 'sequence' (or pass sequence=...)")
    seq_in = clean_sequence(seq_in, f"{name}: sequence")
    L = len(seq_in)
    ca_only = coords.ndim == 2
    if ca_only and coords.shape == (L, 3):
        coords = np.stack([np.full_like(coords, np.nan), coords, np.full_like(coords, np.nan), np.full_like(coords, np.nan)], axis=1)
    elif coords.shape != (L, 4, 3):
        raise StructureError(f"{name}: 'coords' has shape {coords.shape}; expected ({L}, 4, 3) or ({L}, 3) for a sequence of length {L}")
    if np.isinf(coords).any():
        bad = int(np.nonzero(np.isinf(coords).any(axis=(1, 2)))[0][0])
        raise StructureError(f"{name}: 'coords' has infinite values (first at residue {bad + 1})")
    mask = np.isfinite(coords[:, 1]).all(axis=1) if ca_only else _backbone_mask(coords)
    if not mask.any():
        raise StructureError(f"{name}: every residue has NaN or absent coordinates")
    plddt = d.get("plddt")
    if plddt is not None:
        plddt = np.array(plddt, dtype=np.float32)
        if plddt.shape != (L,):
            raise StructureError(f"{name}: 'plddt' has shape {plddt.shape}, expected ({L},)")
        if is_predicted is False:
            plddt = None
    s = ProteinStructure(seq_in, coords, mask, plddt, str(d.get("chain_id", "A")), name)
    if sequence is not None and clean_sequence(sequence, f"{name}: sequence") != seq_in:
        return _realign(s, sequence)
    return s


def _realign(s: ProteinStructure, sequence: str) -> ProteinStructure:
    seq = clean_sequence(sequence, f"{s.source}: sequence")
    if seq == s.sequence:
        return s
    has_any = np.isfinite(s.coords[:, 1]).all(axis=1) | s.coord_mask
    keep = np.nonzero(has_any)[0]
    cb = s.cb[keep] if s.cb is not None else np.full((len(keep), 3), np.nan, dtype=np.float32)
    bfac = s.plddt[keep] if s.plddt is not None else np.full(len(keep), np.nan, dtype=np.float32)
    resids = [s.residue_ids[i] for i in keep] if s.residue_ids is not None else [str(i + 1) for i in keep]
    chain = _Chain(s.chain_id, "".join(s.sequence[i] for i in keep), s.coords[keep], cb, bfac, resids)
    mapping = _dp_align(chain.letters, seq) if chain.letters != seq else np.arange(len(seq))
    identity, coverage, _ = _alignment_stats(chain.letters, seq, mapping, np.ones(len(keep), bool))
    if identity < MIN_ALIGNMENT_IDENTITY or coverage < MIN_ALIGNMENT_COVERAGE:
        raise StructureError(
            f"{s.source}: chain {s.chain_id!r} does not match the given sequence: identity {identity:.2f}, coverage {coverage:.2f}"
        )
    out = _scatter(chain, s.source, seq, mapping, bfac if s.plddt is not None else None)
    out.cb = None if s.cb is None else out.cb
    if not np.isfinite(s.coords[:, 0]).any() and np.isfinite(s.coords[:, 1]).any():  # keep the CA-only convention
        out.coord_mask = np.isfinite(out.coords[:, 1]).all(axis=1)
    return out


def load_structure(source, chain: str | None = None, sequence: str | None = None, file_format: str | None = None,
                   is_predicted: bool | None = None) -> ProteinStructure:
    """Load one protein chain as a :class:`ProteinStructure`.

    source: a path (``str``/``PathLike``) to a regular ``.pdb``/``.ent``/``.cif``/``.mmcif``/``.bcif`` file,
    optionally ``.gz`` (devices, FIFOs and directories are refused); ``bytes`` (format from ``file_format`` or
    sniffed; gzip detected by magic); PDB or mmCIF text (a ``str`` with line breaks); an existing
    ``ProteinStructure`` (returned as is, or re-aligned when ``sequence`` differs); or a dict
    ``{"coords": (L, 4, 3) or (L, 3) CA-only, "sequence": str, optional "plddt", optional "chain_id"}``.

    chain: author chain id (case-sensitive). None: the chain that best matches ``sequence`` if given, else
    the first protein chain.

    sequence: when given, the chain's residues are aligned to it (exact / in-register fast path, else
    global BLOSUM62 alignment); residues of ``sequence`` without a structure residue get NaN coordinates
    and ``coord_mask`` False. Identity below ``MIN_ALIGNMENT_IDENTITY`` over aligned positions or coverage
    below ``MIN_ALIGNMENT_COVERAGE`` raises StructureError.

    is_predicted: True/False forces reading (or not) the B-factor column as pLDDT; None decides
    automatically: all B-factors in 0..100 and a hint that the file is a predicted model (file name with
    ``AF-``/``alphafold``/``esmfold``/``colabfold``/..., an ``ALPHAFOLD`` header, or mmCIF
    ``ma_qa_metric_local`` records). pLDDT stored as 0..1 is rescaled to 0..100.
    """
    if isinstance(source, ProteinStructure):
        if chain is not None and chain != source.chain_id:
            raise StructureError(f"{source.source}: chain {chain!r} requested but the structure holds chain {source.chain_id!r}")
        out = source if sequence is None else _realign(source, sequence)
        if is_predicted is False and out.plddt is not None:
            out = ProteinStructure(out.sequence, out.coords, out.coord_mask, None, out.chain_id, out.source, out.cb, out.residue_ids)
        return out
    if isinstance(source, dict):
        return _from_dict(source, sequence, "<dict>", is_predicted)

    chains, name, hint = _parse_chains(source, file_format)
    if chain is not None:
        picked = [c for c in chains if c.chain_id == str(chain)]
        if not picked:
            raise StructureError(f"{name}: chain {_shorten(str(chain), 40)!r} not found; protein chains available: "
                                 f"{', '.join(repr(c.chain_id) for c in chains)}")
        return _from_chain(picked[0], name, sequence, is_predicted, hint)
    if sequence is None:
        return _from_chain(chains[0], name, None, is_predicted, hint)
    seq = clean_sequence(sequence, f"{name}: sequence")
    ranked = sorted(chains, key=lambda c: -_quick_score(c, seq))
    errors = []
    for c in ranked[:4]:
        try:
            return _from_chain(c, name, seq, is_predicted, hint)
        except StructureError as exc:
            errors.append(str(exc))
    raise StructureError(
        f"{name}: no protein chain matches the given sequence (chains {', '.join(repr(c.chain_id) for c in chains)}); "
        + ("best attempt: " + errors[0] if errors else "")
    )
