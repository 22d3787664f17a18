"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash, a full disk or an interrupt leaves the previous file (or none) in place, never a
half-written one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (for writers that want a file name, such as
    h5py or matplotlib); renamed to ``path`` when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A handle on a temporary file beside ``path``, flushed to disk and renamed to ``path``
    when the block succeeds."""
    with atomic_target(path) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | Path, value, indent: int | None = 1, default=None) -> None:
    """``value`` as JSON in ``path``, atomically (``default``: as for ``json.dump``)."""
    with atomic_open(path, "w") as handle:
        json.dump(value, handle, indent=indent, default=default)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder`` and its
    sub-folders (a SIGKILL or power loss skips the clean-up); returns their paths."""
    removed = []
    for tmp in sorted(Path(folder).rglob(".*.tmp")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
