"""One training step: the loss composition, the optimiser step and the non-finite guard.

    outputs1, outputs2 = forward(im1, im2)            # two separate batches (BatchNorm)
    processed = preprocess(batch, outputs1, outputs2, epoch)
    loss = Σ weight·loss_fn(batch, outputs1, outputs2, processed, epoch)

The step knows nothing of specific losses; the benchmark (``tools/benchmark.py``) times
:meth:`TrainStep.__call__` itself.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from registry import LOSSES, PREPROCESSORS
from training.setup import all_ranks_agree
from utils.checkpoint import atomic_save
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.train")

NONFINITE_BATCH_FILE = "nonfinite_batch.pth"


class LossComposer(nn.Module):
    """The optional preprocess step and the weighted losses named by a training config."""

    def __init__(self, conf: dict):
        super().__init__()
        self.names = list(conf["losses"])
        self.preprocess = None
        if conf["preprocess_train"] is not None:
            self.preprocess = PREPROCESSORS[conf["preprocess_train"]](conf["preprocess_train_config"])
        self.losses = nn.ModuleList(LOSSES[name](conf[f"{name}_config"]) for name in self.names)
        self.weights = conf["losses_weight"] or [1.0] * len(self.losses)
        self.needs_detector = any(loss.needs_detector for loss in self.losses)

    def forward(self, batch: dict, forward: Callable, epoch: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total loss, components)`` of ``batch``; ``forward(im1, im2, with_detector)`` runs
        the network; ``epoch`` is 1-based, as the original passes it (temperature schedules)."""
        outputs1, outputs2 = forward(batch["im1"], batch["im2"], self.needs_detector)
        processed = {}
        if self.preprocess is not None:
            processed = self.preprocess(batch, outputs1, outputs2, epoch)
        total = 0.0
        components: dict[str, torch.Tensor] = {}
        for name, loss_fn, weight in zip(self.names, self.losses, self.weights):
            value, parts = loss_fn(batch, outputs1, outputs2, processed, epoch)
            total = total + weight * value
            components[name] = value.detach()
            components.update({k: torch.as_tensor(v).detach() for k, v in parts.items()})
        return total, components


class NonFiniteGuard:
    """Counts consecutive non-finite losses, saves the first offending batch (rank 0), and
    stops the run after ``max_steps`` in a row."""

    def __init__(self, max_steps: int, run_dir: Path, is_main: bool):
        self.max_steps = max_steps
        self.run_dir = run_dir
        self.is_main = is_main
        self.streak = 0
        self.saved_batch = False

    def ok(self) -> None:
        self.streak = 0

    def failed(self, batch: dict, loss: torch.Tensor, where: str) -> None:
        self.streak += 1
        log.warning("non-finite loss (%s) at %s: step skipped (pairs %s)", loss.item(), where,
                    batch.get("name1"))
        path = self.run_dir / NONFINITE_BATCH_FILE
        if self.is_main and not self.saved_batch:
            atomic_save({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}, path)
            log.warning("saved the offending batch to %s for debugging", path)
            self.saved_batch = True
        if self.streak > self.max_steps:
            raise SCFeatError(
                f"{self.streak} consecutive steps had a non-finite loss (more than "
                f"max_nonfinite_steps={self.max_steps}); stopping. The first offending batch is "
                f"in {path}; the last good state is in the run folder {self.run_dir}")


class TrainStep:
    """One optimiser step: zero the gradients, compute the loss, skip the step on every rank
    when it is not finite, backward, clip each optimised module on its own (as the original),
    step."""

    def __init__(self, composer: LossComposer, forward: Callable, optimizer: torch.optim.Optimizer,
                 clip_modules: list[nn.Module], clip_norm: float | None, guard: NonFiniteGuard,
                 device: torch.device):
        self.composer = composer
        self.forward = forward
        self.optimizer = optimizer
        self.clip_modules = clip_modules
        self.clip_norm = clip_norm
        self.guard = guard
        self.device = device

    def __call__(self, batch: dict, epoch: int, where: str = ""
                 ) -> tuple[float, dict[str, float]] | None:
        """``(loss, components)`` of the step on ``batch`` (on the device), or ``None`` when
        the loss was not finite and the step was skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, components = self.composer(batch, self.forward, epoch)
        if not all_ranks_agree(bool(torch.isfinite(loss).item()), self.device):
            self.guard.failed(batch, loss, where)
            return None
        self.guard.ok()
        loss.backward()
        if self.clip_norm is not None:
            for module in self.clip_modules:
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.clip_norm)
        self.optimizer.step()
        return loss.item(), {k: float(v) for k, v in components.items()}
