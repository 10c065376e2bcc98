"""Protein structure featuriser for ProtLLM (STELLA / SEPIT structure paths).

Reads PDB, mmCIF and BinaryCIF files (plain or gzipped), or PDB/mmCIF text, picks a protein chain, and returns
per-residue backbone coordinates (N, CA, C, O) aligned to a protein sequence, a residue mask and pLDDT for
predicted models (3Di and SaProt tokens of a structure: ``saprot_protllm.py``). Residues follow the processor's
one residue rule (``processing_protllm.clean_residues``).

Reading the file itself (size cap, gzip, format detection, the gemmi / biotite readers) lives in
``structure_files_protllm.py``; this module picks the chain, aligns it to the sequence and reads pLDDT.

This file is shipped to the Hugging Face Hub as remote code with models that read structures (through
``structure_processing_protllm.py``), so it imports only numpy, the standard library and the core processor module
at module level. The structure libraries are imported lazily:

* ``gemmi``   -- reads PDB and mmCIF (preferred);
* ``biotite`` -- reads BinaryCIF, reads PDB/mmCIF when gemmi is absent, and runs the global sequence
  alignment (BLOSUM62, affine gaps) used when sequence and structure differ.

Every failure on user input raises :class:`StructureError` (a ``ValueError``, message at most ~1 KB) that
names the source (file name, ``'<bytes>'`` or ``'<text>'``), and where relevant the chain and residue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from .processing_protllm import VALID_RESIDUES, clean_residues
    from .structure_files_protllm import MAX_STRUCTURE_FILE_BYTES, StructureError, _Chain, _parse_chains, _require, _shorten
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from processing_protllm import VALID_RESIDUES, clean_residues
    from structure_files_protllm import MAX_STRUCTURE_FILE_BYTES, StructureError, _Chain, _parse_chains, _require, _shorten

__all__ = [
    "StructureError", "StructureWarning", "ProteinStructure", "clean_sequence", "load_structure", "parse_structure_chains",
    "VALID_RESIDUES", "MAX_STRUCTURE_FILE_BYTES", "MIN_ALIGNMENT_IDENTITY", "MIN_ALIGNMENT_COVERAGE",
]

#: A given sequence must share at least this identity with the chain over aligned positions ...
MIN_ALIGNMENT_IDENTITY = 0.5
#: ... and the aligned positions must cover this share of the shorter of (sequence, resolved chain).
MIN_ALIGNMENT_COVERAGE = 0.5


class StructureWarning(UserWarning):
    """A documented fallback was taken (e.g. every residue below the pLDDT threshold)."""


def clean_sequence(sequence: Any, context: str = "sequence", error_class: type = StructureError) -> str:
    """The one residue rule (``processing_protllm.clean_residues``), raising :class:`StructureError` by default."""
    return clean_residues(sequence, context, error_class)


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
