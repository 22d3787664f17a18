"""The run folder and what makes a run resumable.

``<output_root>/<checkpoint_name>/`` holds ``config.yaml``, ``train.log``, ``tb/``, the weight
folders ``<epoch:03d>/{backbone,localheader}.pth`` (``000``: the starting weights) and
``training_state.pth`` (model, optimiser, scheduler, losses, counters, RNG states). Every write
is atomic, so a crash leaves the previous files intact.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from utils.atomic import remove_stale_temporaries
from utils.checkpoint import atomic_save, save_checkpoint
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.train")

STATE_FILE = "training_state.pth"


@dataclass
class Progress:
    """Counters saved with the state: epochs completed, steps (optimiser steps or skipped
    non-finite steps) in the current epoch and in all, batches taken from the sampler
    (including dropped ones: the resumed sampler starts after them)."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    batches_drawn: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


class RunFolder:
    """The run folder of one training run; only rank 0 (``is_main``) writes."""

    def __init__(self, output_root: str | Path, name: str, is_main: bool):
        self.path = Path(output_root) / name
        self.state_path = self.path / STATE_FILE
        self.is_main = is_main

    def prepare(self, resume: bool, config_path: str) -> None:
        """Check the folder against ``--resume`` and create it; a new run refuses a folder
        that holds anything."""
        if resume:
            if self.state_path.is_file():
                return
            if not self.path.is_dir():
                raise SCFeatError(f"--resume: there is no run folder '{self.path}' (check "
                                  f"checkpoint_name and output_root); start a new run without "
                                  f"--resume")
            # Stopped before its first saved state: nothing to resume, nothing worth keeping.
            log.warning("--resume: '%s' has no training state yet (the run stopped before its "
                        "first save); starting from the beginning", self.path)
            return
        exists = self.path.exists() and any(self.path.iterdir())
        if dist.is_initialized():
            dist.barrier()  # every rank has looked before rank 0 creates the folder
        if exists:
            raise SCFeatError(
                f"run folder '{self.path}' already exists. Continue it with "
                f"`python train.py --config {config_path} --resume`, or start a new run with "
                f"checkpoint_name=<new name> (or delete the folder)")
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()

    def remove_stale_temporaries(self) -> None:
        if self.is_main:
            for stale in remove_stale_temporaries(self.path):
                log.info("removed %s, left by a write that was interrupted", stale)

    def save_weights(self, model: nn.Module, epoch: int) -> None:
        """``<run>/<epoch:03d>/{backbone,localheader}.pth``: 000 the starting weights, then
        epoch e's folder, refreshed every ``save_freq`` steps and at the epoch's end."""
        if not self.is_main:
            return
        save_checkpoint(model, self.path / f"{epoch:03d}")

    def save_state(self, modules: dict[str, nn.Module | torch.optim.Optimizer | object],
                   progress: Progress) -> None:
        """``training_state.pth``: each entry's ``state_dict()``, the counters, the RNGs."""
        if not self.is_main:
            return
        state = {name: module.state_dict() for name, module in modules.items()}
        atomic_save({**state, **progress.as_dict(), "rng": rng_state()}, self.state_path)

    def load_state(self, modules: dict, progress: Progress, restore_rng: bool) -> None:
        """Restore what :meth:`save_state` wrote (the RNGs only with ``restore_rng``: per-rank
        streams are re-seeded under DDP)."""
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise SCFeatError(f"{self.state_path}: cannot read the training state ({exc}); the "
                              f"epoch folders hold the last complete weights") from None
        for name, module in modules.items():
            module.load_state_dict(state[name])
        for f in fields(progress):
            setattr(progress, f.name, state[f.name])
        if restore_rng:
            set_rng_state(state["rng"])
        log.info("resumed %s at epoch %d, step %d", self.path, progress.epoch + 1,
                 progress.step_in_epoch)
