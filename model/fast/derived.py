"""Tensors derived from parameters for inference (BatchNorm folded into a convolution, Winograd
filter transforms), computed once and reused until a source tensor changes.

A source has changed when its in-place version counter, storage, shape or dtype differ from
when the entry was made (an optimiser step, ``load_state_dict``, ``.to()`` all do); entries
are dropped with their first source.
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, Sequence

import torch


def _state(tensor: torch.Tensor) -> tuple:
    return tensor._version, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.device


class DerivedCache:
    """``get(sources, tag, compute)``: ``compute()`` (run without autograd), cached per first
    source and ``tag``."""

    def __init__(self):
        self._entries: dict[tuple[int, Hashable], tuple] = {}

    def get(self, sources: Sequence[torch.Tensor], tag: Hashable,
            compute: Callable[[], object]) -> object:
        ident = (id(sources[0]), tag)
        state = tuple(_state(s) for s in sources)
        entry = self._entries.get(ident)
        if entry is None or entry[0]() is not sources[0] or entry[1] != state:
            with torch.inference_mode(False), torch.no_grad():
                value = compute()
            ref = weakref.ref(sources[0], lambda _, ident=ident: self._entries.pop(ident, None))
            entry = self._entries[ident] = (ref, state, value)
        return entry[2]

    def __len__(self) -> int:
        return len(self._entries)


CACHE = DerivedCache()
