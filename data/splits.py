"""Leakage-aware splits: MMseqs2 cluster splits, temporal splits, and a test-to-train identity report."""

from __future__ import annotations

import hashlib
import statistics

from .mmseqs import easy_cluster, nearest_identity


def _order_key(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def cluster_split(
    proteins: list[dict],
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    min_seq_id: float = 0.3,
    coverage: float = 0.5,
    threads: int = 1,
    clusters: dict[str, str] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Assign whole MMseqs2 clusters to splits.

    Clusters (``easy-cluster --min-seq-id min_seq_id -c coverage --cov-mode 0``) are ordered by a
    seeded hash of the representative id and filled greedily into the splits in the order given
    by ``fractions`` (default train 0.8 / validation 0.1 / test 0.1), the non-first splits first so
    that small held-out sets reach their target size. Deterministic given ``seed`` and the input.
    Returns ``(accession -> split, accession -> cluster representative)``.
    """
    fractions = fractions or {"train": 0.8, "validation": 0.1, "test": 0.1}
    total = sum(fractions.values())
    if clusters is None:
        clusters = easy_cluster({p["accession"]: p["sequence"] for p in proteins},
                                min_seq_id=min_seq_id, coverage=coverage, threads=threads)
    members: dict[str, list[str]] = {}
    for p in proteins:
        members.setdefault(clusters.get(p["accession"], p["accession"]), []).append(p["accession"])
    reps = sorted(members, key=lambda r: _order_key(seed, r))
    n = len(proteins)
    names = list(fractions)
    first, rest = names[0], names[1:]
    target = {s: fractions[s] / total * n for s in names}
    filled = {s: 0 for s in names}
    assign: dict[str, str] = {}
    for rep in reps:
        size = len(members[rep])
        dest = first
        for s in rest:
            if filled[s] + size / 2 <= target[s]:
                dest = s
                break
        filled[dest] += size
        for acc in members[rep]:
            assign[acc] = dest
    return assign, clusters


def temporal_split(proteins: list[dict], cutoff: str, date_key: str = "date",
                   before: str = "train", after: str = "test") -> dict[str, str]:
    """Split by release/creation date (ISO ``YYYY-MM-DD``): ``< cutoff`` -> before, else after.

    Proteins without a date are assigned ``"undated"`` (counted by the caller, never guessed).
    """
    out = {}
    for p in proteins:
        d = p.get(date_key)
        out[p["accession"]] = "undated" if not d else (before if str(d) < cutoff else after)
    return out


def identity_report(train: dict[str, str], test: dict[str, str], threshold: float | None = None,
                    sensitivity: float = 7.5, threads: int = 1) -> dict:
    """Max identity (MMseqs2 easy-search, fraction 0..1) of each test protein to any train protein.

    Returns summary statistics plus the per-protein values; ``above_threshold`` counts test
    proteins whose nearest train neighbour is above ``threshold`` (should be 0 for a clean split
    at that threshold, up to the coverage criterion of the clustering).
    """
    ident = nearest_identity(test, train, sensitivity=sensitivity, threads=threads) if test and train else {k: 0.0 for k in test}
    vals = sorted(ident.values())
    rep = {
        "n_test": len(vals),
        "n_train": len(train),
        "search": f"mmseqs easy-search -s {sensitivity}",
        "max": max(vals) if vals else 0.0,
        "mean": statistics.fmean(vals) if vals else 0.0,
        "median": statistics.median(vals) if vals else 0.0,
        "no_hit": sum(v == 0.0 for v in vals),
        "histogram": {f"{lo:.1f}-{lo + 0.1:.1f}": sum(lo <= v < lo + 0.1 or (lo >= 0.9 and v == 1.0) for v in vals)
                      for lo in [i / 10 for i in range(10)]},
        "per_protein": ident,
    }
    if threshold is not None:
        rep["threshold"] = threshold
        rep["above_threshold"] = sum(v > threshold for v in vals)
    return rep


def purge_leakage(
    proteins: list[dict], assign: dict[str, str], threshold: float = 0.3, train: str = "train",
    sensitivity: float = 7.5, threads: int = 1, max_rounds: int = 5,
) -> tuple[dict[str, str], dict[str, int]]:
    """Move held-out proteins whose best MMseqs2 hit in train exceeds ``threshold`` identity to train.

    Clustering uses a coverage criterion, so a short local alignment above the identity threshold
    can still cross clusters; this pass makes "no held-out protein above ``threshold`` to train"
    true for the same search used by :func:`identity_report`. Repeats until nothing moves.
    Returns the new assignment and the number moved per split (report it; nothing is hidden).
    """
    assign = dict(assign)
    seq = {p["accession"]: p["sequence"] for p in proteins}
    moved: dict[str, int] = {}
    for _ in range(max_rounds):
        tr = {a: seq[a] for a, s in assign.items() if s == train}
        held = {a: seq[a] for a, s in assign.items() if s != train}
        ident = nearest_identity(held, tr, sensitivity=sensitivity, threads=threads)
        bad = [a for a, v in ident.items() if v > threshold]
        if not bad:
            break
        for a in bad:
            moved[assign[a]] = moved.get(assign[a], 0) + 1
            assign[a] = train
    return assign, moved
