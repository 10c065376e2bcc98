"""Test-session guards shared by every test.

- No network: HF_HUB_OFFLINE=1, and any socket connection to a non-loopback address fails the test.
- One CPU thread: tiny models are ~10x faster on this 2-core machine without thread overhead.
"""

import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from data import SHARED_DATA  # noqa: E402, F401  (../shared/data, or $PROTLLM_SHARED_DATA)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _is_loopback(address) -> bool:
    if isinstance(address, (tuple, list)) and address:
        host = str(address[0])
        return host in ("localhost", "::1", "0.0.0.0", "") or host.startswith("127.")
    return True  # AF_UNIX and other local families


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self, address):
    if not _is_loopback(address):
        raise RuntimeError(f"network access attempted during tests: {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_loopback(address):
        raise RuntimeError(f"network access attempted during tests: {address!r}")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def require_shared_data() -> Path:
    """The real data, read in place. Missing data is a failure that says where it was looked for, never a silent
    skip: the tests that need it are the ones that check real shapes."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data directory not found: {SHARED_DATA} (the tests read ../shared/data beside the "
                    "repository; set PROTLLM_SHARED_DATA to its location)", pytrace=False)
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def csa(shared_data) -> Path:
    """The 206 Catalytic Site Atlas enzyme structures (structures/csa_enzymes, with labels.tsv)."""
    directory = shared_data / "structures" / "csa_enzymes"
    if not (directory / "labels.tsv").is_file():
        pytest.fail(f"CSA structures not found: {directory / 'labels.tsv'} is missing from the real data", pytrace=False)
    return directory


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long checks at real model widths; deselect with -m 'not slow'")


def yeast_function_rows(shared_data: Path, max_residues: int, max_description_chars: int, count: int) -> list[dict]:
    """About `count` function-description instruction rows from real yeast training proteins of at most
    `max_residues` residues, descriptions cut to `max_description_chars` (short, so tiny training runs are quick)."""
    from data.builders import BuildStats, function_text
    from data.readers import read_yeast_function

    stats, rows = BuildStats(), []
    for protein in read_yeast_function(shared_data / "function" / "yeast_function.jsonl", stats):
        if len(protein["sequence"]) <= max_residues and protein.get("split") == "train" and protein.get("description"):
            protein["description"] = protein["description"][:max_description_chars]
            rows.extend(function_text(protein, "train", 0, "yeast_function", stats))
        if len(rows) >= count:
            break
    return rows


def write_jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
