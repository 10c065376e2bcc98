"""Thin wrapper around the MMseqs2 command-line tool (Debian package ``mmseqs2``).

The real binary is started with :mod:`subprocess`; nothing is reimplemented. Every function takes
plain ``{id: sequence}`` dicts and works in a private temporary directory (or ``workdir``) that is
removed afterwards.

Install: ``apt-get install mmseqs2`` (Debian/Ubuntu), ``conda install -c bioconda mmseqs2`` or a
static binary from https://github.com/soedinglab/MMseqs2/releases. Set ``MMSEQS`` to point at a
binary that is not on ``PATH``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "MMseqsError",
    "mmseqs_binary",
    "mmseqs_version",
    "easy_cluster",
    "easy_search",
    "nearest_identity",
    "write_fasta",
]

INSTALL_HINT = (
    "MMseqs2 is required but the `mmseqs` binary was not found. Install it with "
    "`apt-get install mmseqs2` (Debian/Ubuntu) or `conda install -c bioconda mmseqs2`, "
    "or set the MMSEQS environment variable to the binary's path."
)


class MMseqsError(RuntimeError):
    """MMseqs2 is missing or one of its runs failed."""


def mmseqs_binary() -> str:
    """Path of the ``mmseqs`` binary (``$MMSEQS`` first, then ``PATH``)."""
    env = os.environ.get("MMSEQS")
    if env:
        if Path(env).is_file() and os.access(env, os.X_OK):
            return env
        raise MMseqsError(f"MMSEQS={env!r} is not an executable file. " + INSTALL_HINT)
    found = shutil.which("mmseqs")
    if not found:
        raise MMseqsError(INSTALL_HINT)
    return found


@functools.lru_cache(maxsize=None)
def _version_of(binary: str) -> str:
    out = subprocess.run([binary, "version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise MMseqsError(f"`{binary} version` failed: {out.stderr.strip()}")
    return out.stdout.strip()


def mmseqs_version() -> str:
    """Version string reported by ``mmseqs version`` (e.g. ``14-7e284+ds-1+b2`` on Debian 12)."""
    return _version_of(mmseqs_binary())


def _run(args: list[str], cwd: Path) -> None:
    cmd = [mmseqs_binary(), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise MMseqsError(f"mmseqs failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _safe_ids(seqs: dict[str, str], prefix: str) -> tuple[dict[str, str], dict[str, str]]:
    """MMseqs2 ids must be whitespace-free; map arbitrary ids to ``{prefix}{n}`` and back."""
    fwd, back = {}, {}
    for n, key in enumerate(seqs):
        safe = f"{prefix}{n}"
        fwd[safe] = seqs[key]
        back[safe] = key
    return fwd, back


def write_fasta(sequences: dict[str, str], path: str | os.PathLike, width: int = 0) -> Path:
    """Write ``{id: sequence}`` as FASTA (one line per sequence unless ``width``)."""
    path = Path(path)
    with open(path, "w") as fh:
        for key, seq in sequences.items():
            seq = str(seq).strip().upper()
            if not seq:
                raise ValueError(f"empty sequence for {key!r}")
            fh.write(f">{key}\n")
            if width:
                for i in range(0, len(seq), width):
                    fh.write(seq[i : i + width] + "\n")
            else:
                fh.write(seq + "\n")
    return path


class _Workdir:
    def __init__(self, workdir):
        self.given = workdir

    def __enter__(self) -> Path:
        if self.given is not None:
            Path(self.given).mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix="mmseqs_", dir=self.given))
        else:
            self.path = Path(tempfile.mkdtemp(prefix="mmseqs_"))
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)
        return False


def easy_cluster(
    sequences: dict[str, str],
    min_seq_id: float = 0.3,
    coverage: float = 0.5,
    threads: int = 1,
    workdir=None,
    cov_mode: int = 0,
    cluster_mode: int | None = None,
    sensitivity: float | None = None,
) -> dict[str, str]:
    """Cluster with ``mmseqs easy-cluster``; return ``{member id: representative id}``.

    ``min_seq_id`` and ``coverage`` are fractions (``--min-seq-id``, ``-c``; ``--cov-mode 0`` =
    coverage of both query and target). Every input id appears in the result.
    """
    if not sequences:
        return {}
    safe, back = _safe_ids(sequences, "s")
    with _Workdir(workdir) as wd:
        write_fasta(safe, wd / "in.fasta")
        args = [
            "easy-cluster", "in.fasta", "res", "tmp",
            "--min-seq-id", str(min_seq_id), "-c", str(coverage), "--cov-mode", str(cov_mode),
            "--threads", str(threads), "-v", "1",
        ]
        if cluster_mode is not None:
            args += ["--cluster-mode", str(cluster_mode)]
        if sensitivity is not None:
            args += ["-s", str(sensitivity)]
        _run(args, wd)
        mapping: dict[str, str] = {}
        with open(wd / "res_cluster.tsv") as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 2:
                    mapping[back[parts[1]]] = back[parts[0]]
    for key in sequences:  # defensive: never lose an id
        mapping.setdefault(key, key)
    return mapping


_SEARCH_FIELDS = "query,target,fident,evalue,bits,alnlen"


def easy_search(
    queries: dict[str, str],
    targets: dict[str, str],
    threads: int = 1,
    workdir=None,
    max_seqs: int = 300,
    sensitivity: float | None = None,
    evalue: float | None = None,
) -> list[dict]:
    """Search ``queries`` against ``targets`` with ``mmseqs easy-search``.

    Returns hits ``{"query", "target", "identity" (0..1), "evalue", "bits", "alnlen"}``, grouped
    by query in input order, best (highest bit score) first within each query.
    """
    if not queries or not targets:
        return []
    q_safe, q_back = _safe_ids(queries, "q")
    t_safe, t_back = _safe_ids(targets, "t")
    order = {k: i for i, k in enumerate(queries)}
    hits: list[dict] = []
    with _Workdir(workdir) as wd:
        write_fasta(q_safe, wd / "q.fasta")
        write_fasta(t_safe, wd / "t.fasta")
        args = [
            "easy-search", "q.fasta", "t.fasta", "res.m8", "tmp",
            "--format-output", _SEARCH_FIELDS, "--max-seqs", str(max_seqs),
            "--threads", str(threads), "-v", "1",
        ]
        if sensitivity is not None:
            args += ["-s", str(sensitivity)]
        if evalue is not None:
            args += ["-e", str(evalue)]
        _run(args, wd)
        with open(wd / "res.m8") as fh:
            for line in fh:
                p = line.rstrip("\n").split("\t")
                if len(p) < 6:
                    continue
                hits.append(
                    {
                        "query": q_back[p[0]],
                        "target": t_back[p[1]],
                        "identity": float(p[2]),
                        "evalue": float(p[3]),
                        "bits": float(p[4]),
                        "alnlen": int(p[5]),
                    }
                )
    hits.sort(key=lambda h: (order[h["query"]], -h["bits"], h["evalue"]))
    return hits


def nearest_identity(queries: dict[str, str], targets: dict[str, str], **kw) -> dict[str, float]:
    """Maximum sequence identity (0..1) of each query to any target; 0.0 when MMseqs2 finds no hit.

    Keyword arguments go to :func:`easy_search` (a high ``sensitivity`` such as 7.5 finds more
    remote hits).
    """
    best = {k: 0.0 for k in queries}
    for h in easy_search(queries, targets, **kw):
        if h["identity"] > best[h["query"]]:
            best[h["query"]] = h["identity"]
    return best
