"""Distributed set-up, the model as training runs it, and the optimiser groups."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.cli import resolve_device


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """Rank, world size and device; initialises the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = resolve_device(device_choice)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (so all ranks skip a step together)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(value)
    return value.item() == 0.0


class PairModel(nn.Module):
    """Runs the model on image 1 and image 2 as two separate batches in one call, so that
    DistributedDataParallel sees one forward per backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, im1: torch.Tensor, im2: torch.Tensor, with_detector: bool):
        return self.model(im1, with_detector=with_detector), self.model(im2, with_detector=with_detector)


def wrap_distributed(module: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    if world_size == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def freeze_all_but(model: nn.Module, trainable: list[str], parts: tuple[str, ...]) -> None:
    """``requires_grad`` on the parts named in ``trainable`` only."""
    for name in parts:
        getattr(model, name).requires_grad_(name in trainable)


def set_train_mode(model: nn.Module, trainable: list[str], parts: tuple[str, ...]) -> None:
    """Train mode, except the frozen parts: their BatchNorm keeps its statistics."""
    model.train()
    for name in parts:
        if name not in trainable:
            getattr(model, name).eval()


def build_optimizer(model: nn.Module, conf: dict):
    """One parameter group per ``optimal_modules`` entry with its ``optimal_lrs`` rate, and the
    step decay (``lr_decay_step`` epochs, ``lr_decay_factor``): ``(optimizer, scheduler)``."""
    optimizer_cls = getattr(torch.optim, conf["optimizer"])  # a choice of the schema
    groups = [{"params": list(getattr(model, name).parameters()), "lr": lr}
              for name, lr in zip(conf["optimal_modules"], conf["optimal_lrs"])]
    optimizer = optimizer_cls(groups)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=conf["lr_decay_step"],
                                                gamma=conf["lr_decay_factor"])
    return optimizer, scheduler
