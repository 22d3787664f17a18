"""Train SCFeat: ``python train.py --config FILE [--resume] [--amp] [--compile] [KEY=VALUE ...]``.

Stage 1 (``config/train_desc.yaml``) trains the backbone with the line-to-window epipolar loss;
stage 2 (``config/train_det.yaml``) trains the detector by REINFORCE with a frozen backbone.
The trainer knows nothing of specific losses: it builds the model, the data, the optional
preprocess step and the losses named in the config, and runs

    outputs1, outputs2 = model(im1), model(im2)      # two separate batches (BatchNorm)
    processed = preprocess(batch, outputs1, outputs2, epoch)
    loss = Σ weight·loss_fn(batch, outputs1, outputs2, processed, epoch)

Multi-GPU: ``torchrun --nproc_per_node K train.py --config ...`` (NCCL on GPUs, gloo on CPU).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from dataloader.megadepth import summarize_skips
from dataloader.sampler import ResumableSampler
from model.scfeat import SCFeatModel
from registry import (DATASETS, LOSSES, MODELS, PREPROCESSORS, build_model, class_section,
                      inherit_model_config, lookup, model_schema)
from utils import acceleration
from utils.acceleration import accelerated
from utils.atomic import remove_stale_temporaries
from utils.checkpoint import atomic_save
from utils.config import Dynamic, Spec, load_config, report_inert_keys, save_config
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.train")

STATE_FILE = "training_state.pth"
TRAINABLE_MODULES = ("backbone", "localheader")


def val_schema(root: dict, raw: dict) -> dict:
    """``val_config``, the original's layout: ``data_config_val`` (a dataset config of the
    training ``data`` class; validation runs after each epoch when it is given) and the
    original's visualisation keys, accepted and unused."""
    if not raw:
        return {}
    data_schema = class_section(DATASETS, "data")
    return {
        "data_config_val": Dynamic(lambda root, raw: data_schema(root, raw) if raw else {}, default=None),
        "detector": Spec(None, types=(str, type(None)), inert=True),
        "detector_config": Spec({}, types=(dict,), inert=True),
        "loss_distance": Spec("cos", choices=("cos", "euc"), inert=True),
        "vis_topk": Spec(50, inert=True),
        "vis_err_thr": Spec(5.0, inert=True),
    }


TRAIN_SCHEMA = {
    "checkpoint_name": Spec(types=(str,)),
    "output_root": "ckpts",
    "epoch": 10,
    "epoch_step": 10000,
    "lr_decay_step": 9,
    "lr_decay_factor": 0.1,
    "log_freq": 1000,
    "save_freq": Spec(100, doc="refresh the current epoch's weight folder every N steps (the "
                               "original's fixed 100)"),
    "grad_clip": False,
    "clip_norm": 10.0,
    "test_kp": Spec(False, inert=True),
    "no_cuda": Spec([], types=(list,), inert=True),
    "optimal_modules": Spec(["backbone"], types=(list,)),
    "optimal_lrs": Spec([1e-4], types=(list,)),
    "optimizer": Spec("Adam", choices=("Adam", "AdamW", "SGD")),
    "model": Spec("SCFeatModel", choices=tuple(MODELS)),
    "model_config": Dynamic(lambda root, raw: model_schema(raw)),
    "data": Spec("MegaDepth_SIFT", choices=tuple(DATASETS)),
    "data_config_train": Dynamic(class_section(DATASETS, "data")),
    "val_config": Dynamic(val_schema, default=None),
    "preprocess_train": Spec(None, types=(str, type(None))),
    "preprocess_train_config": Dynamic(class_section(PREPROCESSORS, "preprocess_train")),
    "losses": Spec(types=(list,)),
    "losses_weight": Spec(None, types=(list, type(None))),
    "tb_component": Spec([], types=(list,)),
    "load_path": Spec(None, types=(str, type(None))),
    # Our additions (README, "Config keys").
    "seed": 0,
    "device": Spec("auto", choices=("auto", "cpu", "cuda")),
    "deterministic": False,
    "max_nonfinite_steps": 10,
    "max_steps_this_run": Spec(None, types=(int, type(None))),
    "max_unusable_fraction": 0.5,
    "amp": Spec(False, doc="bf16 autocast for the network (CUDA; see utils/acceleration.py)"),
    "compile": Spec(False, doc="torch.compile the network (CUDA; see utils/acceleration.py)"),
}


def loss_sections(conf: dict) -> dict:
    """``<LossName>_config`` keys for the losses the config names."""
    return {f"{name}_config": lookup(LOSSES, name, "losses").default_conf for name in conf["losses"]}


def load_train_config(path: str | Path, overrides: list[str] | tuple = (),
                      inert_keys: list[str] | None = None) -> dict:
    """The training config of ``path`` with ``KEY=VALUE`` overrides, validated (the loss
    sections from ``losses``; with ``load_path``, model settings left open inherited from the
    checkpoint's run). ``inert_keys`` receives the keys accepted only for compatibility."""
    return load_config(path, overrides, TRAIN_SCHEMA, loss_sections, prepare=inherit_model_config,
                       inert_keys=inert_keys)


def check_config(conf: dict, origin: str) -> None:
    """Cross-key rules that a per-key schema cannot express."""
    def fail(message: str) -> None:
        raise SCFeatError(f"{origin}: {message}")

    if not conf["losses"]:
        fail("key 'losses' must name at least one loss")
    weights = conf["losses_weight"]
    if weights is not None and len(weights) != len(conf["losses"]):
        fail(f"key 'losses_weight' has {len(weights)} entries for {len(conf['losses'])} losses")
    bad = [m for m in conf["optimal_modules"] if m not in TRAINABLE_MODULES]
    if bad or not conf["optimal_modules"]:
        fail(f"key 'optimal_modules' must list modules from {list(TRAINABLE_MODULES)}, got "
             f"{conf['optimal_modules']}")
    if len(conf["optimal_lrs"]) != len(conf["optimal_modules"]):
        fail(f"key 'optimal_lrs' has {len(conf['optimal_lrs'])} entries for "
             f"{len(conf['optimal_modules'])} optimal_modules")
    if conf["preprocess_train"] is not None:
        lookup(PREPROCESSORS, conf["preprocess_train"], "preprocess_train")
    for key in ("epoch", "epoch_step", "lr_decay_step", "log_freq", "save_freq"):
        if conf[key] <= 0:
            fail(f"key '{key}' must be positive, got {conf[key]}")
    if conf["load_path"] is not None:
        folder = Path(conf["load_path"])
        for part in ("backbone.pth", "localheader.pth"):
            if not (folder / part).is_file():
                fail(f"key 'load_path': '{folder / part}' does not exist (expected a checkpoint "
                     f"folder such as ckpts/descriptor-100k/010)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in ckpts/<checkpoint_name> from its training state")
    acceleration.add_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, values parsed as YAML")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------

def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """Rank, world size and device; initialises the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SCFeatError("device: cuda was asked for but CUDA is not available")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
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


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------

def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C (sent to the whole process group) to the main process,
    which finishes its step and saves; a worker dying of it would abort the run instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, conf: dict, config_path: str, resume: bool):
        self.conf = conf
        self.rank, self.world_size, self.device = setup_distributed(conf["device"])
        self.is_main = self.rank == 0
        self.run_dir = Path(conf["output_root"]) / conf["checkpoint_name"]
        self.state_path = self.run_dir / STATE_FILE
        self.check_run_dir(resume, config_path)
        setup_logging(self.run_dir, self.is_main)  # from here on, train.log has every line
        if resume and self.is_main:
            for stale in remove_stale_temporaries(self.run_dir):
                log.info("removed %s, left by a write that was interrupted", stale)

        # Data first: a wrong data path fails before the (slow) model is built.
        self.dataset = DATASETS[conf["data"]](conf["data_config_train"])
        self.batch_size = conf["data_config_train"]["batch_size"]
        self.workers = conf["data_config_train"]["workers"]

        torch.manual_seed(conf["seed"] + self.rank)
        np.random.seed(conf["seed"] + self.rank)
        random.seed(conf["seed"] + self.rank)
        if conf["deterministic"]:
            torch.use_deterministic_algorithms(True)

        self.model = self.build_model().to(self.device)
        if self.is_main and not self.state_path.is_file():
            # After build_model: with load_path, the model settings are the loaded run's, and
            # extraction reads them from this file.
            save_config(self.conf, self.run_dir / "config.yaml")
            # The starting weights, as the original writes them (its train_det.yaml loads 000).
            self.save_weights(0)
        self.trainable = list(conf["optimal_modules"])
        for name in TRAINABLE_MODULES:
            getattr(self.model, name).requires_grad_(name in self.trainable)
        groups = [{"params": [p for p in getattr(self.model, name).parameters()], "lr": lr}
                  for name, lr in zip(self.trainable, conf["optimal_lrs"])]
        self.optimizer = getattr(torch.optim, conf["optimizer"])(groups)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=conf["lr_decay_step"], gamma=conf["lr_decay_factor"])

        self.pair_model: nn.Module = PairModel(self.model)
        if self.world_size > 1:
            self.pair_model = nn.parallel.DistributedDataParallel(
                self.pair_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # The network's forward as training runs it: bf16 autocast and/or compiled on request,
        # outputs in float32 so the losses compute as in float32 eager.
        self.forward = accelerated(self.pair_model, self.device, conf["amp"], conf["compile"])

        self.preprocess = None
        if conf["preprocess_train"] is not None:
            self.preprocess = PREPROCESSORS[conf["preprocess_train"]](conf["preprocess_train_config"])
        self.losses = nn.ModuleList(LOSSES[name](conf[f"{name}_config"]) for name in conf["losses"])
        self.loss_weights = conf["losses_weight"] or [1.0] * len(self.losses)
        self.with_detector = any(loss.needs_detector for loss in self.losses)

        self.epoch = 0              # epochs completed
        self.step_in_epoch = 0      # optimiser steps (or skipped non-finite steps) in this epoch
        self.global_step = 0
        self.batches_drawn = 0      # batches taken from the sampler, including dropped ones
        self.nonfinite_streak = 0
        self.saved_bad_batch = False
        self.pairs_drawn = 0                       # in this epoch
        self.skip_causes: Counter[str] = Counter()  # unusable pairs in this epoch, by cause
        self.stop_requested = False
        if resume and self.state_path.is_file():
            self.load_state()

        self.writer = None
        if self.is_main:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.global_step or None)

    # -- set-up ---------------------------------------------------------------------------------

    def check_run_dir(self, resume: bool, config_path: str) -> None:
        if resume:
            if self.state_path.is_file():
                return
            if not self.run_dir.is_dir():
                raise SCFeatError(f"--resume: there is no run folder '{self.run_dir}' (check "
                                  f"checkpoint_name and output_root); start a new run without "
                                  f"--resume")
            # Stopped before its first saved state: nothing to resume, nothing worth keeping.
            log.warning("--resume: '%s' has no training state yet (the run stopped before its "
                        "first save); starting from the beginning", self.run_dir)
            return
        exists = self.run_dir.exists() and any(self.run_dir.iterdir())
        if dist.is_initialized():
            dist.barrier()  # every rank has looked before rank 0 creates the folder
        if exists:
            raise SCFeatError(
                f"run folder '{self.run_dir}' already exists. Continue it with "
                f"`python train.py --config {config_path} --resume`, or start a new run with "
                f"checkpoint_name=<new name> (or delete the folder)")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()

    def build_model(self) -> nn.Module:
        """The model of ``model_config``; with ``load_path`` (stage 2) its weights come from
        that folder (its model settings were inherited by :func:`inherit_model_config`)."""
        conf = self.conf
        if conf["load_path"] is None:
            return build_model(conf["model"], conf["model_config"])
        model = SCFeatModel.from_checkpoint(conf["load_path"], "cpu", conf["model_config"])
        log.info("loaded weights from %s", conf["load_path"])
        return model

    def make_loader(self) -> torch.utils.data.DataLoader:
        sampler = ResumableSampler(len(self.dataset), seed=self.conf["seed"],
                                   shuffle=self.conf["data_config_train"].get("shuffle", True),
                                   rank=self.rank, world_size=self.world_size,
                                   start=self.batches_drawn * self.batch_size)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.workers,
            collate_fn=self.dataset.collate_fn, pin_memory=self.device.type == "cuda",
            # Its own generator: creating the iterator must not draw from the global RNG, or a
            # resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.conf["seed"] + self.epoch),
            worker_init_fn=ignore_sigint, persistent_workers=False,
            prefetch_factor=2 if self.workers else None)

    # -- state ----------------------------------------------------------------------------------

    def save_state(self) -> None:
        if not self.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "losses": self.losses.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "batches_drawn": self.batches_drawn,
            "rng": rng_state(),
        }
        atomic_save(state, self.state_path)

    def load_state(self) -> None:
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise SCFeatError(f"{self.state_path}: cannot read the training state ({exc}); the "
                              f"epoch folders hold the last complete weights") from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.losses.load_state_dict(state["losses"])
        for key in ("epoch", "step_in_epoch", "global_step", "batches_drawn"):
            setattr(self, key, state[key])
        if self.world_size == 1:  # per-rank RNG streams are re-seeded under DDP
            set_rng_state(state["rng"])
        log.info("resumed %s at epoch %d, step %d", self.run_dir, self.epoch + 1, self.step_in_epoch)

    def save_weights(self, epoch: int) -> None:
        """``<run>/<epoch:03d>/{backbone,localheader}.pth``: 000 the starting weights, then
        epoch e's folder, refreshed every ``save_freq`` steps and at the epoch's end."""
        if not self.is_main:
            return
        folder = self.run_dir / f"{epoch:03d}"
        for part in ("backbone", "localheader"):
            atomic_save(getattr(self.model, part).state_dict(), folder / f"{part}.pth")

    # -- steps ----------------------------------------------------------------------------------

    def validate(self) -> None:
        """Mean loss and components over the ``val_config`` data (eval mode, no jitter), with
        the same query points every epoch so that epochs compare."""
        data_conf = (self.conf["val_config"] or {}).get("data_config_val")
        if not data_conf or not self.is_main:
            return
        dataset = DATASETS[self.conf["data"]]({**data_conf, "mode": "val"})
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=data_conf["batch_size"], shuffle=False,
            num_workers=data_conf["workers"], collate_fn=dataset.collate_fn)
        model = self.pair_model.module if hasattr(self.pair_model, "module") else self.pair_model
        sums: dict[str, float] = {}
        count = 0
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                torch.no_grad():
            torch.manual_seed(self.conf["seed"])
            for batch in loader:
                batch.pop("skipped", None)
                if "im1" not in batch:
                    continue
                batch = to_device(batch, self.device)
                loss, components = self.compute_loss(batch, model)
                for name, value in {"loss": loss, **components}.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                count += 1
        if count == 0:
            log.warning("validation: no usable pair in val_config data")
            return
        means = {k: v / count for k, v in sums.items()}
        log.info("validation after epoch %d (%d batches): %s", self.epoch, count,
                 " ".join(f"{k}={v:.4g}" for k, v in means.items()))
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"val/{name}", value, self.global_step)

    def set_train_mode(self) -> None:
        self.model.train()
        for name in TRAINABLE_MODULES:
            if name not in self.trainable:
                getattr(self.model, name).eval()  # frozen: BatchNorm keeps its statistics

    def compute_loss(self, batch: dict, pair_model: nn.Module | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        forward = pair_model or self.forward
        outputs1, outputs2 = forward(batch["im1"], batch["im2"], self.with_detector)
        epoch = self.epoch + 1  # the original passes its 1-based epoch (temperature schedules)
        processed = {}
        if self.preprocess is not None:
            processed = self.preprocess(batch, outputs1, outputs2, epoch)
        total = 0.0
        components: dict[str, torch.Tensor] = {}
        for name, loss_fn, weight in zip(self.conf["losses"], self.losses, self.loss_weights):
            value, parts = loss_fn(batch, outputs1, outputs2, processed, epoch)
            total = total + weight * value
            components[name] = value.detach()
            components.update({k: torch.as_tensor(v).detach() for k, v in parts.items()})
        return total, components

    def train_step(self, batch: dict) -> tuple[float, dict[str, float]] | None:
        """One optimiser step; ``None`` when the loss was not finite (step skipped)."""
        batch = to_device(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss, components = self.compute_loss(batch)
        finite = all_ranks_agree(bool(torch.isfinite(loss).item()), self.device)
        if not finite:
            self.handle_nonfinite(batch, loss)
            return None
        self.nonfinite_streak = 0
        loss.backward()
        if self.conf["grad_clip"]:
            for name in self.trainable:  # each optimised module on its own, as the original
                torch.nn.utils.clip_grad_norm_(getattr(self.model, name).parameters(),
                                               self.conf["clip_norm"])
        self.optimizer.step()
        return loss.item(), {k: float(v) for k, v in components.items()}

    def handle_nonfinite(self, batch: dict, loss: torch.Tensor) -> None:
        self.nonfinite_streak += 1
        log.warning("non-finite loss (%s) at epoch %d step %d: step skipped (pairs %s)",
                    loss.item(), self.epoch + 1, self.step_in_epoch, batch.get("name1"))
        if self.is_main and not self.saved_bad_batch:
            path = self.run_dir / "nonfinite_batch.pth"
            atomic_save({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}, path)
            log.warning("saved the offending batch to %s for debugging", path)
            self.saved_bad_batch = True
        if self.nonfinite_streak > self.conf["max_nonfinite_steps"]:
            raise SCFeatError(
                f"{self.nonfinite_streak} consecutive steps had a non-finite loss (more than "
                f"max_nonfinite_steps={self.conf['max_nonfinite_steps']}); stopping. The first "
                f"offending batch is in {self.run_dir / 'nonfinite_batch.pth'}; the last good state "
                f"is in {self.state_path}")

    def log_scalars(self, loss: float, components: dict[str, float]) -> None:
        if self.writer is None:
            return
        step = self.global_step
        self.writer.add_scalar("loss/total", loss, step)
        for name in self.conf["losses"]:
            if name in components:
                self.writer.add_scalar(f"loss/{name}", components[name], step)
        for name in self.conf["tb_component"]:
            if name not in components:
                raise SCFeatError(f"tb_component: '{name}' is not reported by the losses "
                                  f"{self.conf['losses']}; available: {sorted(components)}")
            self.writer.add_scalar(f"component/{name}", components[name], step)
        self.writer.add_scalar("lr", self.optimizer.param_groups[0]["lr"], step)

    def next_batch(self, iterator) -> dict:
        """The next usable batch. Unusable pairs (the collate function lists their causes under
        ``skipped``) are counted; a batch with no usable pair is skipped, never replaced by a
        stale one. Stops the run when too large a share of the drawn pairs is unusable."""
        while True:
            batch = next(iterator)
            self.batches_drawn += 1
            causes = batch.pop("skipped", [])
            self.pairs_drawn += len(causes) + (len(batch["im1"]) if "im1" in batch else 0)
            self.skip_causes.update(summarize_skips(causes))
            unusable = sum(self.skip_causes.values())
            limit = self.conf["max_unusable_fraction"]
            if self.pairs_drawn >= 20 and unusable > limit * self.pairs_drawn:
                raise SCFeatError(
                    f"{unusable} of the {self.pairs_drawn} pairs drawn so far could not be used "
                    f"(more than max_unusable_fraction={limit}): {self.skip_summary()}. Check "
                    f"data_config_train.data_path and the log for the files concerned")
            if "im1" in batch:
                return batch
            log.warning("a whole batch was unusable and was skipped")

    def skip_summary(self) -> str:
        return ", ".join(f"{n} × {cause}" for cause, n in self.skip_causes.most_common()) or "none"

    def request_stop(self, signum, frame) -> None:
        """SIGINT: finish the current step, save the state, exit cleanly. A second SIGINT
        stops at once (the last saved state stays valid: every write is atomic)."""
        if self.stop_requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        log.warning("interrupt received: saving the training state after this step "
                    "(press Ctrl-C again to stop at once)")
        self.stop_requested = True

    def fit(self) -> None:
        from tqdm import tqdm

        conf = self.conf
        log_freq = conf["log_freq"]
        steps_this_run = 0
        previous_handler = signal.signal(signal.SIGINT, self.request_stop)
        try:
            while self.epoch < conf["epoch"]:
                iterator = iter(self.make_loader())
                self.set_train_mode()
                bar = tqdm(total=conf["epoch_step"], initial=self.step_in_epoch,
                           desc=f"epoch {self.epoch + 1}/{conf['epoch']}", disable=not self.is_main,
                           dynamic_ncols=True)
                tick, pairs = time.perf_counter(), 0
                while self.step_in_epoch < conf["epoch_step"]:
                    batch = self.next_batch(iterator)
                    result = self.train_step(batch)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    pairs += len(batch["im1"]) * self.world_size
                    if result is not None:
                        loss, components = result
                        self.log_scalars(loss, components)
                        rate = pairs / max(time.perf_counter() - tick, 1e-9)
                        bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{rate:.2f}")
                    bar.update(1)
                    steps_this_run += 1
                    if steps_this_run == conf["max_steps_this_run"]:
                        self.stop_requested = True
                    if self.global_step % conf["save_freq"] == 0:
                        self.save_weights(self.epoch + 1)
                    if self.global_step % log_freq == 0 or self.stop_requested:
                        # Log before saving: a kill in between repeats the step's line on
                        # resume rather than losing it.
                        if result is not None and self.is_main:
                            log.info("epoch %d step %d loss %.5f %s", self.epoch + 1,
                                     self.step_in_epoch, result[0],
                                     " ".join(f"{k}={v:.4g}" for k, v in result[1].items()))
                        self.save_state()
                    if self.stop_requested:
                        bar.close()
                        return
                bar.close()
                del iterator
                if self.skip_causes:
                    log.warning("epoch %d: %d of %d drawn pairs were unusable (%s)", self.epoch + 1,
                                sum(self.skip_causes.values()), self.pairs_drawn, self.skip_summary())
                self.pairs_drawn, self.skip_causes = 0, Counter()
                self.epoch += 1
                self.step_in_epoch = 0
                self.scheduler.step()
                self.save_weights(self.epoch)
                self.save_state()
                self.validate()
                if self.is_main:
                    log.info("epoch %d done: weights in %s", self.epoch, self.run_dir / f"{self.epoch:03d}")
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            if self.writer is not None:
                self.writer.close()


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and is_main and run_dir.is_dir():
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(None, int(os.environ.get("RANK", 0)) == 0)
    try:
        overrides = list(args.overrides) + acceleration.flag_overrides(args)
        inert: list[str] = []
        conf = load_train_config(args.config, overrides, inert)
        check_config(conf, args.config)
        report_inert_keys(args.config, inert)
        trainer = Trainer(conf, args.config, args.resume)
        trainer.fit()
        if trainer.stop_requested:
            print(f"stopped at step {trainer.global_step}: training state saved in "
                  f"{trainer.state_path}; continue with --resume", file=sys.stderr)
    except SCFeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (or one before training started)
        print("interrupted: the last saved training state (if any) is intact; continue with "
              "--resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
