"""SaProt structure-aware protein tokens for ProtLLM: Foldseek 3Di letters and SaProt's amino acid x 3Di vocabulary.

Shipped to the Hugging Face Hub as remote code next to the model (the processor's ``protein_encoder_input="saprot"``
path), so it imports only numpy and the standard library at module level; ``mini3di`` (``pip install mini3di``)
provides Foldseek's 3Di network weights when 3Di tokens are computed.
"""

from __future__ import annotations

import warnings

import numpy as np

try:
    from .structure_protllm import ProteinStructure, StructureError, StructureWarning
except ImportError:  # loaded as a top-level module (repository checkout, not remote code)
    from structure_protllm import ProteinStructure, StructureError, StructureWarning

__all__ = ["SAPROT_AA_VOCAB", "SAPROT_STRUC_VOCAB", "SAPROT_VOCAB", "saprot_sequence", "structure_to_saprot", "three_di_tokens"]

# SaProt vocabulary as in SaProt's code (westlake-repl/SaProt utils/constants.py): 5 special tokens, then
# amino acid x 3Di letter for seq "ACDEFGHIKLMNPQRSTVWY#" and struc "pynwrqhgdlvtmfsaeikc#": 446 tokens in the
# order of the Hub tokenizer of westlake-repl/SaProt_650M_AF2, so ids match a SaProt checkpoint's embedding
# rows. Written out here because the featuriser must work offline and without the tokenizer files.
SAPROT_AA_VOCAB = "ACDEFGHIKLMNPQRSTVWY#"
SAPROT_STRUC_VOCAB = "pynwrqhgdlvtmfsaeikc#"
SAPROT_SPECIAL_TOKENS = ["<cls>", "<pad>", "<eos>", "<unk>", "<mask>"]
SAPROT_VOCAB: list[str] = SAPROT_SPECIAL_TOKENS + [a + s for a in SAPROT_AA_VOCAB for s in SAPROT_STRUC_VOCAB]
_STANDARD_AA = frozenset("ACDEFGHIKLMNPQRSTVWY")

# Foldseek 3Di: the geometry below is vendored from mini3di 0.2.1 (mini3di/encoder.py: VirtualCenterEncoder,
# PartnerIndexEncoder, FeatureEncoder; BSD-3-Clause, (c) Martin Larralde; a NumPy port of Foldseek by Martin
# Steinegger's lab), rewritten without numpy.ma: the caller passes only residues with N, CA and C, so nothing
# is masked, and masked arrays made mini3di's public ``Encoder.encode_atoms`` several times slower. The network
# and its weights stay in mini3di (``Encoder().vae_encoder``, a public attribute). test_structure.py checks the
# letters against mini3di's public ``Encoder.build_sequence(Encoder.encode_atoms(...))`` on real CSA chains.
_ENCODER: list = []
_CA_CB_DISTANCE = 1.5336  # mini3di DISTANCE_ALPHA_BETA: Foldseek's virtual C-beta
_CA_VIRTUAL_CENTER_DISTANCE = 2.0  # Foldseek's virtual centre: |V - CA| = 2.0, theta = 270 deg, tau = 0 deg
_INVALID_STATE = 2  # mini3di Encoder._INVALID_STATE: Foldseek's 'D' for the ends, which lack a full descriptor
_3DI_LOWER = np.frombuffer(b"acdefghiklmnpqrstvwyx", dtype=np.uint8)  # mini3di/Foldseek 3Di alphabet, lowercased


def _three_di_encoder():
    if not _ENCODER:
        try:
            import mini3di
        except ImportError as exc:  # pragma: no cover - exercised only without the package
            raise ImportError("computing Foldseek 3Di tokens needs the 'mini3di' package: pip install mini3di") from exc
        _ENCODER.append(mini3di.Encoder())
    return _ENCODER[0]


def _normalize(x: np.ndarray) -> np.ndarray:
    """mini3di.utils.normalize(x, inplace=True): rows to unit length, zero rows left as they are."""
    norm = np.linalg.norm(x, axis=-1).reshape(*x.shape[:-1], 1)
    return np.divide(x, norm, out=x, where=norm != 0)


def _rotate(v: np.ndarray, axis: np.ndarray, cos: float, sin: float) -> np.ndarray:
    """Rodrigues rotation of the rows of ``v`` about the unit rows of ``axis``."""
    return v * cos + np.cross(axis, v) * sin + axis * (axis * v).sum(axis=-1).reshape(-1, 1) * (1 - cos)


def _virtual_center(ca: np.ndarray, cb: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``(R, 3)`` Foldseek virtual centres from CA, CB (real or virtual) and N (mini3di ``_compute_virtual_center``)."""
    theta = np.deg2rad(270.0)
    v = _rotate(cb - ca, _normalize(np.cross(cb - ca, n - ca, axis=-1)), np.cos(theta), np.sin(theta))
    # mini3di then rotates by tau about N-CA; Foldseek's tau is 0, so that rotation is the identity
    return v * _CA_VIRTUAL_CENTER_DISTANCE + ca


def _virtual_cb(ca: np.ndarray, n: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``(R, 3)`` ideal C-beta positions from the backbone (mini3di ``_approximate_cb_position``)."""
    v1 = _normalize(c - ca)
    v2 = _normalize(n - ca)
    v3 = v1 / 3.0
    b1 = np.add(v2, v3, out=v2)
    b2 = np.cross(v1, b1, axis=-1)
    u1, u2 = _normalize(b1), _normalize(b2)
    return ((np.sqrt(8) / 3.0) * ((-u1 / 2.0) - (u2 * np.sqrt(3) / 2.0)) - v3) * _CA_CB_DISTANCE + ca


def _conformation_descriptors(ca: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """``(R, 10)`` float32 Foldseek descriptors of each residue and its partner (mini3di ``_calc_conformation_descriptors``)."""
    i = np.arange(1, len(ca) - 1)
    j = partner[i]
    u1, u2 = _normalize(ca[i] - ca[i - 1]), _normalize(ca[i + 1] - ca[i])
    u3, u4 = _normalize(ca[j] - ca[j - 1]), _normalize(ca[j + 1] - ca[j])
    u5 = _normalize(ca[j] - ca[i])
    desc = np.zeros((len(ca), 10), dtype=np.float32)
    for k, (a, b) in enumerate(((u1, u2), (u3, u4), (u1, u5), (u3, u5), (u1, u4), (u2, u3), (u1, u3))):
        desc[i, k] = np.sum(a * b, axis=-1)
    desc[i, 7] = np.linalg.norm(ca[i] - ca[j], axis=-1)
    desc[i, 8] = np.clip(j - i, -4, 4)
    desc[i, 9] = np.copysign(np.log(np.abs(j - i) + 1), j - i)
    return desc


def _three_di_states(encoder, ca: np.ndarray, cb: np.ndarray, n: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``(R,)`` 3Di state indices for ``R`` residues that all have N, CA and C (float64 ``(R, 3)`` each; ``cb`` NaN
    where the file has no C-beta). Same arithmetic as mini3di's ``Encoder.encode_atoms``."""
    missing_cb = np.isnan(cb)
    if missing_cb.any():
        cb = np.where(missing_cb, _virtual_cb(ca, n, c), cb)
    vc = _virtual_center(ca, cb, n)
    # partner: nearest virtual centre, never itself, never the first or last residue;
    # argmin_j |v_i - v_j|^2 = argmin_j (|v_j|^2 - 2 v_i.v_j): the row term |v_i|^2 cannot change the argmin
    r = np.sum(vc * vc, axis=-1)
    r[0] = r[-1] = np.inf
    distance = vc @ vc.T
    distance *= -2.0
    distance += r[None, :]
    distance[np.diag_indices_from(distance)] = np.inf
    partner = distance.argmin(axis=1)  # rows 0 and R-1 are unused (no descriptor at the ends)
    if not hasattr(encoder, "vae_encoder"):  # a mini3di release without it: its public (slower) path
        return np.asarray(encoder.encode_atoms(ca=ca, cb=cb, n=n, c=c).filled(), dtype=np.int64)
    states = np.asarray(encoder.vae_encoder(_conformation_descriptors(ca, partner)), dtype=np.int64)
    states[0] = states[-1] = _INVALID_STATE
    return states


def three_di_tokens(structure: ProteinStructure) -> str:
    """Foldseek 3Di letters (lowercase, as SaProt uses them), one per residue; ``'#'`` where the residue
    lacks N, CA or C coordinates.

    Like Foldseek run on the file, the encoder sees only the residues that have coordinates, in order
    (chain breaks are not special), and uses the real C-beta where the file has one, else a virtual one
    built from the backbone. Residues at the ends of that resolved stretch get Foldseek's invalid state
    ``'d'``, as Foldseek outputs."""
    if not isinstance(structure, ProteinStructure):
        raise StructureError(f"three_di_tokens expects a ProteinStructure, got {type(structure).__name__}")
    L = len(structure)
    idx = np.nonzero(np.isfinite(structure.coords[:, :3]).all(axis=(1, 2)))[0]  # residues with N, CA and C
    if len(idx) == 0:
        return "#" * L
    x = structure.coords[idx].astype(np.float64)
    cb = structure.cb[idx].astype(np.float64) if structure.cb is not None else np.full((len(idx), 3), np.nan)
    try:
        with np.errstate(all="ignore"):
            states = _three_di_states(_three_di_encoder(), ca=x[:, 1], cb=cb, n=x[:, 0], c=x[:, 2])
    except ImportError:
        raise
    except Exception as exc:
        raise StructureError(f"{structure.source}: chain {structure.chain_id!r}: 3Di encoding failed: {type(exc).__name__}: {exc}") from None
    out = np.full(L, ord("#"), dtype=np.uint8)
    out[idx] = _3DI_LOWER[states]
    return out.tobytes().decode("ascii")


def saprot_sequence(sequence: str, three_di: str, plddt: np.ndarray | None = None, plddt_threshold: float = 70.0) -> str:
    """SaProt structure-aware sequence: per residue the amino acid (uppercase) then the 3Di letter
    (lowercase), e.g. ``"MdKpTa#..."``; ``'#'`` as the structure letter where it is unknown: missing
    coordinates (``'#'`` in ``three_di``), pLDDT below ``plddt_threshold`` or NaN (SaProt masks pLDDT < 70).
    Amino acids outside SaProt's 20 (X, U, B, ...) become ``'#'`` so every pair is in :data:`SAPROT_VOCAB`.

    Fallback: when pLDDT is given and *every* residue is below the threshold, the structure part is all
    ``'#'`` (the sequence-only input SaProt was trained to accept) and a :class:`StructureWarning` is
    issued."""
    seq = "".join(str(sequence).split()).upper()
    tdi = str(three_di)
    if len(seq) != len(tdi):
        raise StructureError(f"saprot_sequence: sequence length {len(seq)} != 3Di length {len(tdi)}")
    struc = [ch if ch in SAPROT_STRUC_VOCAB else ("#" if ch == "#" else ch.lower()) for ch in tdi]
    bad = sorted({ch for ch in struc if ch not in SAPROT_STRUC_VOCAB})
    if bad:
        raise StructureError(f"saprot_sequence: 3Di string has letters outside {SAPROT_STRUC_VOCAB!r}: {''.join(bad)!r}")
    if plddt is not None:
        p = np.asarray(plddt, dtype=np.float32).reshape(-1)
        if p.shape != (len(seq),):
            raise StructureError(f"saprot_sequence: plddt has {p.size} values for {len(seq)} residues")
        low = ~(p >= plddt_threshold)  # NaN counts as low
        if len(seq) and low.all():
            warnings.warn(
                f"every residue has pLDDT below {plddt_threshold} (max {np.nanmax(p) if np.isfinite(p).any() else float('nan'):.1f}): "
                "structure tokens are all '#' (sequence-only SaProt input)",
                StructureWarning,
                stacklevel=2,
            )
        for i in np.nonzero(low)[0]:
            struc[i] = "#"
    aa = [ch if ch in _STANDARD_AA else "#" for ch in seq]
    return "".join(a + s for a, s in zip(aa, struc))


def structure_to_saprot(structure: ProteinStructure, plddt_threshold: float = 70.0) -> str:
    """``saprot_sequence(structure.sequence, three_di_tokens(structure), structure.plddt, plddt_threshold)``."""
    return saprot_sequence(structure.sequence, three_di_tokens(structure), structure.plddt, plddt_threshold)
