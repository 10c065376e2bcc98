"""Replace a whole directory in one step: write into a hidden sibling, then swap it in.

A process killed while writing leaves `target` as it was (the previous complete folder, or absent) plus a hidden
`.<name>.tmp-*` sibling that nothing reads and the next write removes. Never a half-written `target`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_RENAME_EXCHANGE = 2  # linux/fs.h


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd = -100  # AT_FDCWD
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def publish_directory(staging: Path, target: Path) -> None:
    """Make `staging` (a complete folder) become `target`, replacing any previous `target` in one step."""
    # mkdtemp makes 0700 folders and some writers 0600 files: give everything the umask's permissions, as a plain
    # mkdir / open would, so colleagues can read a shared folder.
    mask = _umask()
    for root, dirs, files in os.walk(staging):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):  # staging now holds the previous folder
        shutil.rmtree(staging, ignore_errors=True)
        return
    # No atomic swap here (not Linux, or a file system without it): two renames, a microsecond without `target`.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "previous")
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_directory(target) -> Iterator[Path]:
    """Yield an empty hidden sibling of `target` to write into; when the block ends without error it replaces
    `target` (see `publish_directory`); on error it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed writer; never read
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
