"""An endless, resumable, distributed-aware index stream for training."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Endless stream of dataset indices: pass ``p`` is a permutation seeded by ``seed + p``
    (or ``0..n-1`` without ``shuffle``), split across ranks as ``DistributedSampler`` does
    (padded to a multiple of ``world_size``, rank ``r`` takes every ``world_size``-th index).

    ``start`` skips the first ``start`` indices of this rank's stream without loading them,
    so a resumed run sees exactly the data an uninterrupted run would.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        if length <= 0:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_rank = -(-length // world_size)

    def pass_indices(self, pass_index: int) -> list[int]:
        """This rank's indices for one pass over the data."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + pass_index)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        order += order[: self.per_rank * self.world_size - self.length]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        pass_index, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.pass_indices(pass_index)[offset:]
            pass_index, offset = pass_index + 1, 0

    def __len__(self) -> int:  # one pass; the stream itself is endless
        return self.per_rank
