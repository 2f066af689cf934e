"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file personae writes for another process to read (manifests, cards, tokenizers, reports,
adapters, checkpoints) goes through :func:`atomic_path` (or its text/bytes shorthands), and whole
checkpoint folders through :func:`atomic_directory`. A write that fails midway leaves the target
as it was and no temporary file behind. This module sits below ``config`` in the dependency order
and imports nothing from personae.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic", "write_bytes_atomic", "atomic_directory", "remove_staging"]


def _read_umask() -> int:
    """The process umask (os.umask can only be read by setting it, so this is done once, at import)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# mkstemp/mkdtemp create 0o600/0o700; the renamed result gets the mode open()/mkdir() would give
_UMASK = _read_umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


@contextmanager
def atomic_path(path: str | PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on error removed.

    The caller writes the temporary file however it likes (``open``, ``save_file``, ``Image.save``);
    the parent folder is created if needed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.chmod(staging, _FILE_MODE)
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | PathLike[str], text: str) -> Path:
    """Write UTF-8 text with ``\\n`` line ends atomically; returns the path."""
    with atomic_path(path) as staging:
        staging.write_text(text, encoding="utf-8", newline="\n")
    return Path(path)


def write_bytes_atomic(path: str | PathLike[str], data: bytes) -> Path:
    """Write bytes atomically; returns the path."""
    with atomic_path(path) as staging:
        staging.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_directory(directory: str | PathLike[str], *, first: Sequence[str] = (),
                     last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty staging folder beside ``directory``; on success move its files into place.

    A new ``directory`` is renamed in one step. Into an existing one (a run's root) each file is
    renamed over the old one, the names in ``first`` before the others and those in ``last``
    after them, so a reader that checks the ``last`` file (trainer state) finds the rest already
    new. On error the staging folder is removed and ``directory`` is left as it was.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, _DIR_MODE)
        _move_into(staging, target, first, last)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into(staging: Path, target: Path, first: Sequence[str], last: Sequence[str]) -> None:
    """Rename the staging folder to ``target``, or its files into an existing ``target`` in order."""
    if not target.exists():
        os.replace(staging, target)
        return
    rank = {name: -len(first) + i for i, name in enumerate(first)} | {name: 1 + i for i, name in enumerate(last)}
    for path in sorted(staging.iterdir(), key=lambda p: rank.get(p.name, 0)):
        os.replace(path, target / path.name)
    staging.rmdir()


def remove_staging(folder: str | PathLike[str], name: str) -> list[Path]:
    """Remove what interrupted atomic writes of ``folder/name`` left: ``.{name}.XXXXXXXX.tmp`` entries.

    ``name`` may be a glob pattern (``"step_*"``). Only the exact shape this module creates is
    matched (``mkstemp``/``mkdtemp`` add eight characters), so no other file is touched; returns
    what was removed. Call it when no other process writes there (at the start of a run).
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.glob(f".{name}.{'?' * 8}.tmp")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
