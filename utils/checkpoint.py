"""Checkpoint files: atomic writes and loads with clear errors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from utils.errors import SCFeatError


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename.

    A crash or a full disk leaves the previous file intact, never a half-written one.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, read-only or missing folder
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        previous = " (the previous file is intact)" if path.exists() else ""
        raise SCFeatError(f"cannot write '{path}': {exc.strerror or exc}{previous}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def load_state_dict_file(path: str | Path, map_location: str = "cpu") -> dict:
    """Read a ``state_dict`` saved with ``torch.save``; a clear error when absent or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"checkpoint file '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise SCFeatError(f"{path}: cannot read checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise SCFeatError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return state
