"""Reading protein structure files for ProtLLM: bytes -> per-chain residue arrays (no sequence alignment yet).

PDB, mmCIF and BinaryCIF files (plain or gzipped), or PDB/mmCIF text: the size cap, gzip, format detection and
the gemmi / biotite readers (first model, first altloc, backbone N/CA/C/O and CB). ``structure_protllm.py`` picks a
chain from these and aligns it to a sequence; it re-exports the public names defined here.

Remote code like ``structure_protllm.py``: numpy and the standard library at module level, gemmi and biotite
imported lazily. Every failure on user input raises :class:`StructureError` naming the source.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
import zlib
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: Files, text and gzip payloads (once decompressed) larger than this are refused. The cap holds while
#: reading, so a device or pipe (size 0 to ``stat``) cannot stream past it. 256 MiB holds the largest PDB
#: entries in mmCIF form, while keeping an upload or a gzip bomb from exhausting a data loader's memory.
MAX_STRUCTURE_FILE_BYTES = 256 * 1024 * 1024

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


def _require(module: str, pip_name: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError(f"{what} needs the '{pip_name}' package: pip install {pip_name}") from exc


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
