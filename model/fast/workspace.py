"""Reused memory for the large intermediate maps of the CPU inference path.

A tensor above the C allocator's mmap threshold (32 MiB with glibc) gets fresh pages from the
kernel at every allocation: each forward at 480×640 would fault in about a gigabyte, zeroed
page by page, some 15% of its time on two cores. The inference path's own intermediates (the
Winograd transforms, the low-resolution channel mixes, the detector's full-resolution maps)
are therefore written into buffers kept between calls: one growing buffer per named slot and
thread, viewed at the size asked for. A slot is used by one intermediate at a time and its
tensors never leave the function that took them. :func:`release` frees the current thread's
buffers.
"""
from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()


def buffer(slot: str, shape: tuple[int, ...], like: torch.Tensor,
           channels_last: bool = False) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, in the memory of
    ``slot`` (grown when too small); ``channels_last``: a 4-D ``B×C×H×W`` tensor with
    channels-last strides. Not for autograd or for tensors that outlive the caller's use."""
    slots = getattr(_LOCAL, "slots", None)
    if slots is None:
        slots = _LOCAL.slots = {}
    numel = 1
    for n in shape:
        numel *= n
    key = (slot, like.dtype, like.device)
    flat = slots.get(key)
    if flat is None or flat.numel() < numel:
        with torch.inference_mode(False):  # usable under no_grad as well as inference_mode
            flat = slots[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    if channels_last:
        b, c, h, w = shape
        return flat[:numel].view(b, h, w, c).permute(0, 3, 1, 2)
    return flat[:numel].view(shape)


def release() -> None:
    """Free the buffers of the current thread."""
    _LOCAL.slots = {}
