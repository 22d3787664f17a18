"""Checkpoint files: atomic writes and loads with clear errors.

A checkpoint is a folder (``<run>/<epoch:03d>/``) holding one ``state_dict`` per network part:
``backbone.pth`` and ``localheader.pth`` (the original's layout).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.atomic import atomic_open
from utils.errors import SCFeatError


CHECKPOINT_PARTS = ("backbone", "localheader")


def checkpoint_files(folder: str | Path) -> list[Path]:
    """``[<folder>/backbone.pth, <folder>/localheader.pth]``."""
    return [Path(folder) / f"{part}.pth" for part in CHECKPOINT_PARTS]


def is_checkpoint(folder: str | Path) -> bool:
    return all(path.is_file() for path in checkpoint_files(folder))


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


def save_checkpoint(model: nn.Module, folder: str | Path) -> None:
    """The model's ``backbone`` and ``localheader`` ``state_dict``s as a checkpoint folder
    (:func:`checkpoint_files`), each file written atomically."""
    for part, path in zip(CHECKPOINT_PARTS, checkpoint_files(folder)):
        atomic_save(getattr(model, part).state_dict(), path)


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


def load_strict(module: nn.Module, state: dict, path: Path) -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong_shape:
            parts.append("shape mismatch: " + show(
                [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape]))
        raise SCFeatError(f"{path}: checkpoint does not match the {module.__class__.__name__} "
                          f"architecture of the config; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
