"""The training loop: epochs of steps, logging, periodic saves, validation, Ctrl-C.

:func:`run_training` is what ``train.py`` and the demo call with a loaded config
(:func:`schemas.load_train_config`).
"""
from __future__ import annotations

import logging
import signal
import time

import torch
import torch.nn as nn

from registry import DATASETS, build_model
from model.scfeat import SCFeatModel
from training.data import BatchSource, make_loader, to_device, validation_subset
from training.run_state import Progress, RunFolder, seed_everything
from training.setup import (PairModel, build_optimizer, freeze_all_but, set_train_mode,
                            setup_distributed, wrap_distributed)
from training.step import LossComposer, NonFiniteGuard, TrainStep
from utils.acceleration import accelerated
from utils.checkpoint import CHECKPOINT_PARTS
from utils.cli import setup_logging
from utils.config import save_config
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.train")


def build_training_model(conf: dict) -> nn.Module:
    """The model of ``model_config``; with ``load_path`` (stage 2) its weights come from that
    folder (its model settings were inherited by :func:`model.checkpoint_config.inherit_model_config`)."""
    if conf["load_path"] is None:
        return build_model(conf["model"], conf["model_config"])
    model = SCFeatModel.from_checkpoint(conf["load_path"], "cpu", conf["model_config"])
    log.info("loaded weights from %s", conf["load_path"])
    return model


def validation_means(model: nn.Module, composer: LossComposer, loader, seed: int, epoch: int,
                     device: torch.device, log_notes=None) -> tuple[dict[str, float], int, int]:
    """``(mean loss and components, pairs, batches)`` of ``composer`` over ``loader``'s usable
    batches, ``model`` in eval mode without gradients, the global generator seeded with
    ``seed`` (fixed query points, so that networks and epochs compare) and restored after;
    ``epoch`` (1-based) goes to the losses. ``log_notes`` receives the batches' notes."""
    pair_model = PairModel(model)
    sums: dict[str, float] = {}
    batches = pairs = 0
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.no_grad():
        torch.manual_seed(seed)
        for batch in loader:
            batch.pop("skipped", None)
            notes = batch.pop("notes", [])
            if log_notes is not None:
                log_notes(notes)
            if "im1" not in batch:
                continue
            loss, components = composer(to_device(batch, device), pair_model, epoch)
            for name, value in {"loss": loss, **components}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            batches += 1
            pairs += len(batch["im1"])
    return {k: v / batches for k, v in sums.items()} if batches else {}, pairs, batches


class Trainer:
    """Builds everything a (validated) training config names, then :meth:`fit` runs it."""

    def __init__(self, conf: dict, config_path: str, resume: bool):
        self.conf = conf
        self.rank, self.world_size, self.device = setup_distributed(conf["device"])
        self.is_main = self.rank == 0
        self.run = RunFolder(conf["output_root"], conf["checkpoint_name"], self.is_main)
        self.run.prepare(resume, config_path)
        log_file = self.run.path / "train.log" if self.is_main and self.run.path.is_dir() else None
        setup_logging(log_file, quiet=not self.is_main)  # from here on, train.log has every line
        if resume:
            self.run.remove_stale_temporaries()

        # Data first: a wrong data path fails before the (slow) model is built.
        self.dataset = DATASETS[conf["data"]](conf["data_config_train"])
        seed_everything(conf["seed"] + self.rank, conf["deterministic"])
        self.model = build_training_model(conf).to(self.device)
        if self.is_main and not self.run.state_path.is_file():
            # After the model: with load_path, the model settings are the loaded run's, and
            # extraction reads them from this file.
            save_config(conf, self.run.path / "config.yaml")
            # The starting weights, as the original writes them (its train_det.yaml loads 000).
            self.run.save_weights(self.model, 0)
        self.trainable = list(conf["optimal_modules"])
        freeze_all_but(self.model, self.trainable, CHECKPOINT_PARTS)
        self.optimizer, self.scheduler = build_optimizer(self.model, conf)
        self.pair_model = wrap_distributed(PairModel(self.model), self.world_size, self.device)
        # The network's forward as training runs it: bf16 autocast and/or compiled on request,
        # outputs in float32 so the losses compute as in float32 eager.
        forward = accelerated(self.pair_model, self.device, conf["amp"], conf["compile"])
        self.composer = LossComposer(conf)
        guard = NonFiniteGuard(conf["max_nonfinite_steps"], self.run.path, self.is_main)
        self.step = TrainStep(self.composer, forward, self.optimizer,
                              [getattr(self.model, name) for name in self.trainable],
                              conf["clip_norm"] if conf["grad_clip"] else None, guard, self.device)
        self.batches = BatchSource(conf["max_unusable_fraction"])
        self.progress = Progress()
        self._val_loader = None
        self.stop_requested = False
        if resume and self.run.state_path.is_file():
            self.run.load_state(self.state_modules(), self.progress,
                                restore_rng=self.world_size == 1)
        self.writer = None
        if self.is_main:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(self.run.path / "tb"),
                                        purge_step=self.progress.global_step or None)

    @property
    def state_path(self):
        return self.run.state_path

    def state_modules(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "losses": self.composer.losses}

    def save_state(self) -> None:
        self.run.save_state(self.state_modules(), self.progress)

    # -- logging --------------------------------------------------------------------------------

    def log_scalars(self, loss: float, components: dict[str, float]) -> None:
        if self.writer is None:
            return
        step = self.progress.global_step
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

    # -- validation -----------------------------------------------------------------------------

    def validation_loader(self) -> torch.utils.data.DataLoader | None:
        """The ``val_config`` pairs (built at the first validation, then reused): the dataset in
        ``val`` mode, cut to ``max_pairs`` by a seeded subset, the same pairs every epoch.
        ``None`` when the config asks for no validation."""
        val = self.conf["val_config"] or {}
        data_conf = val.get("data_config_val")
        if not data_conf or val["max_pairs"] == 0:
            return None
        if self._val_loader is None:
            dataset = DATASETS[self.conf["data"]]({**data_conf, "mode": "val"})
            subset = validation_subset(dataset, val["max_pairs"], self.conf["seed"])
            log.info("validation pairs: %d of the %d of %s (val_config.max_pairs: %s)",
                     len(subset), len(dataset), data_conf["data_path"], val["max_pairs"])
            self._val_loader = torch.utils.data.DataLoader(
                subset, batch_size=data_conf["batch_size"], shuffle=False,
                num_workers=data_conf["workers"], collate_fn=dataset.collate_fn)
        return self._val_loader

    def validate(self) -> None:
        """Mean loss and components over the validation pairs (:meth:`validation_loader`; eval
        mode, no jitter), with the same query points every epoch so that epochs compare."""
        if not self.is_main:
            return
        loader = self.validation_loader()
        if loader is None:
            return
        means, pairs, batches = validation_means(self.model, self.composer, loader,
                                                 self.conf["seed"], self.progress.epoch + 1,
                                                 self.device, self.batches.log_notes)
        if batches == 0:
            log.warning("validation: no usable pair in val_config data")
            return
        log.info("validation after epoch %d (%d pairs, %d batches): %s", self.progress.epoch,
                 pairs, batches, " ".join(f"{k}={v:.4g}" for k, v in means.items()))
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"val/{name}", value, self.progress.global_step)

    # -- the loop -------------------------------------------------------------------------------

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
        """Train until ``epoch`` epochs are done, ``max_steps_this_run`` steps were taken or
        Ctrl-C was pressed (then the state is saved and the method returns)."""
        previous_handler = signal.signal(signal.SIGINT, self.request_stop)
        try:
            steps_this_run = 0
            while self.progress.epoch < self.conf["epoch"]:
                steps_this_run = self.run_epoch(steps_this_run)
                if self.stop_requested:
                    return
                self.end_epoch()
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            if self.writer is not None:
                self.writer.close()

    def run_epoch(self, steps_this_run: int) -> int:
        """The steps left in the current epoch (fewer when a stop is requested); returns the
        number of steps this run has taken."""
        from tqdm import tqdm

        conf, progress = self.conf, self.progress
        loader = make_loader(self.dataset, conf["data_config_train"], conf["seed"], progress.epoch,
                             progress.batches_drawn, self.rank, self.world_size,
                             pin_memory=self.device.type == "cuda")
        iterator = iter(loader)
        set_train_mode(self.model, self.trainable, CHECKPOINT_PARTS)
        bar = tqdm(total=conf["epoch_step"], initial=progress.step_in_epoch,
                   desc=f"epoch {progress.epoch + 1}/{conf['epoch']}", disable=not self.is_main,
                   dynamic_ncols=True)
        tick, pairs = time.perf_counter(), 0
        with bar:
            # Exactly epoch_step steps (the original breaks after step epoch_step: one more).
            while progress.step_in_epoch < conf["epoch_step"]:
                batch, drawn = self.batches.next_batch(iterator)
                progress.batches_drawn += drawn
                result = self.step(to_device(batch, self.device), progress.epoch + 1,
                                   f"epoch {progress.epoch + 1} step {progress.step_in_epoch}")
                progress.step_in_epoch += 1
                progress.global_step += 1
                steps_this_run += 1
                pairs += len(batch["im1"]) * self.world_size
                if result is not None:
                    self.log_scalars(*result)
                    rate = pairs / max(time.perf_counter() - tick, 1e-9)
                    bar.set_postfix(loss=f"{result[0]:.4f}", pairs_s=f"{rate:.2f}")
                bar.update(1)
                if steps_this_run == conf["max_steps_this_run"]:
                    self.stop_requested = True
                self.after_step(result)
                if self.stop_requested:
                    break
        return steps_this_run

    def after_step(self, result: tuple[float, dict[str, float]] | None) -> None:
        """Refresh the epoch's weights every ``save_freq`` steps; log and save the state every
        ``log_freq`` steps and when stopping."""
        progress = self.progress
        if progress.global_step % self.conf["save_freq"] == 0:
            self.run.save_weights(self.model, progress.epoch + 1)
        if progress.global_step % self.conf["log_freq"] == 0 or self.stop_requested:
            # Log before saving: a kill in between repeats the step's line on resume rather
            # than losing it.
            if result is not None and self.is_main:
                log.info("epoch %d step %d loss %.5f %s", progress.epoch + 1,
                         progress.step_in_epoch, result[0],
                         " ".join(f"{k}={v:.4g}" for k, v in result[1].items()))
            self.save_state()

    def end_epoch(self) -> None:
        self.batches.end_epoch(self.progress.epoch + 1)
        self.progress.epoch += 1
        self.progress.step_in_epoch = 0
        self.scheduler.step()
        self.run.save_weights(self.model, self.progress.epoch)
        self.save_state()
        self.validate()
        if self.is_main:
            log.info("epoch %d done: weights in %s", self.progress.epoch,
                     self.run.path / f"{self.progress.epoch:03d}")


def run_training(conf: dict, config_path: str, resume: bool = False) -> Trainer:
    """Train with a loaded config (``schemas.load_train_config``); returns the trainer
    (``stop_requested`` tells whether it stopped early, ``state_path`` where it saved)."""
    trainer = Trainer(conf, config_path, resume)
    trainer.fit()
    return trainer
