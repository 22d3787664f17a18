"""Checkpoint files: atomic writes and loads with clear errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.atomic import atomic_open
from utils.errors import SCFeatError


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename.

    A crash or a full disk leaves the previous file intact, never a half-written one.
    """
    path = Path(path)
    try:
        with atomic_open(path) as f:
            torch.save(obj, f)
    except OSError as exc:  # disk full, read-only or missing folder
        previous = " (the previous file is intact)" if path.exists() else ""
        raise SCFeatError(f"cannot write '{path}': {exc.strerror or exc}{previous}") from None


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
