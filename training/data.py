"""The training data: a resumable loader and the accounting of unusable pairs.

The dataset's collate function lists the causes of unusable pairs under ``skipped`` and the
items' notes under ``notes``; :class:`BatchSource` logs each note key once, counts the causes,
skips a batch with no usable pair (never replacing it by a stale one) and stops the run when
too large a share of the drawn pairs is unusable.
"""
from __future__ import annotations

import logging
import signal
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from dataloader.collate import NoteLog, summarize_skips
from dataloader.sampler import ResumableSampler
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.train")

MIN_PAIRS_FOR_LIMIT = 20  # the unusable share is judged after this many drawn pairs


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C (sent to the whole process group) to the main process,
    which finishes its step and saves; a worker dying of it would abort the run instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, data_conf: dict, seed: int, epoch: int, start_batch: int,
                rank: int, world_size: int, pin_memory: bool) -> DataLoader:
    """The loader of one epoch, starting after ``start_batch`` batches of this rank's shard."""
    batch_size, workers = data_conf["batch_size"], data_conf["workers"]
    sampler = ResumableSampler(len(dataset), seed=seed, shuffle=data_conf.get("shuffle", True),
                               rank=rank, world_size=world_size, start=start_batch * batch_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=dataset.collate_fn, pin_memory=pin_memory,
        # Its own generator: creating the iterator must not draw from the global RNG, or a
        # resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed + epoch),
        worker_init_fn=ignore_sigint, persistent_workers=False,
        prefetch_factor=2 if workers else None)


def validation_subset(dataset: Dataset, max_pairs: int | None, seed: int) -> Dataset:
    """``max_pairs`` items of ``dataset`` drawn with ``seed`` (in index order), or the whole
    dataset when ``max_pairs`` is ``None`` or not below its length."""
    if max_pairs is None or max_pairs >= len(dataset):
        return dataset
    indices = np.random.default_rng(seed).choice(len(dataset), size=max_pairs, replace=False)
    return Subset(dataset, np.sort(indices).tolist())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class BatchSource:
    """Usable batches from an iterator of collated batches, with the epoch's skip counts."""

    def __init__(self, max_unusable_fraction: float):
        self.max_unusable_fraction = max_unusable_fraction
        self.pairs_drawn = 0                       # in this epoch
        self.skip_causes: Counter[str] = Counter()  # unusable pairs in this epoch, by cause
        self.log_notes = NoteLog()                 # once per key over the run

    def next_batch(self, iterator) -> tuple[dict, int]:
        """``(batch, batches drawn)``: the next batch with at least one usable pair, and how
        many batches were taken from ``iterator`` to find it."""
        drawn = 0
        while True:
            batch = next(iterator)
            drawn += 1
            causes = batch.pop("skipped", [])
            self.log_notes(batch.pop("notes", []))
            self.pairs_drawn += len(causes) + (len(batch["im1"]) if "im1" in batch else 0)
            self.skip_causes.update(summarize_skips(causes))
            self.check_limit()
            if "im1" in batch:
                return batch, drawn
            log.warning("a whole batch was unusable and was skipped")

    def check_limit(self) -> None:
        unusable = sum(self.skip_causes.values())
        limit = self.max_unusable_fraction
        if self.pairs_drawn >= MIN_PAIRS_FOR_LIMIT and unusable > limit * self.pairs_drawn:
            raise SCFeatError(
                f"{unusable} of the {self.pairs_drawn} pairs drawn so far could not be used "
                f"(more than max_unusable_fraction={limit}): {self.summary()}. Check "
                f"data_config_train.data_path and the log for the files concerned")

    def summary(self) -> str:
        return ", ".join(f"{n} × {cause}" for cause, n in self.skip_causes.most_common()) or "none"

    def end_epoch(self, epoch: int) -> None:
        """Log the epoch's unusable pairs and reset the counts."""
        if self.skip_causes:
            log.warning("epoch %d: %d of %d drawn pairs were unusable (%s)", epoch,
                        sum(self.skip_causes.values()), self.pairs_drawn, self.summary())
        self.pairs_drawn, self.skip_causes = 0, Counter()
