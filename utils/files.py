"""Fingerprints of input files, for caches that must never be reused stale."""
from __future__ import annotations

import hashlib
from pathlib import Path


def files_signature(paths: list[Path], header: str = "") -> str:
    """sha1 over ``header`` and the files' resolved paths, sizes and modification times.

    Any rewritten, added or removed file changes it, so a stale cache is never reused.
    """
    digest = hashlib.sha1(f"{header}\n".encode())
    for path in sorted(Path(p) for p in paths):
        stat = path.stat()
        digest.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
