"""Reused inference memory (model/fast/workspace.py): a slot's tensors share its memory, which
grows when needed; threads have their own; usable under no_grad after inference_mode."""
from __future__ import annotations

import threading

import torch

from model.fast import workspace


def test_slots_reuse_and_grow():
    like = torch.zeros(1)
    a = workspace.buffer("test", (4, 5), like)
    b = workspace.buffer("test", (2, 3), like)
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 3)  # the same memory
    c = workspace.buffer("test", (10, 10), like)  # larger: new memory
    assert c.numel() == 100 and workspace.buffer("test", (3,), like).data_ptr() == c.data_ptr()
    assert workspace.buffer("other", (2, 3), like).data_ptr() != c.data_ptr()
    nhwc = workspace.buffer("test", (2, 3, 4, 5), like, channels_last=True)
    assert nhwc.shape == (2, 3, 4, 5) and nhwc.is_contiguous(memory_format=torch.channels_last)
    assert workspace.buffer("test", (2,), like.double()).dtype == torch.float64
    workspace.release()
    assert workspace.buffer("test", (3,), like).data_ptr() != c.data_ptr()


def test_threads_have_their_own_memory():
    like, ptrs = torch.zeros(1), []
    ptrs.append(workspace.buffer("thread", (8,), like).data_ptr())
    worker = threading.Thread(target=lambda: ptrs.append(
        workspace.buffer("thread", (8,), like).data_ptr()))
    worker.start()
    worker.join()
    assert ptrs[0] != ptrs[1]


def test_memory_taken_under_inference_mode_serves_no_grad():
    like = torch.zeros(1)
    workspace.release()
    with torch.inference_mode():
        workspace.buffer("mode", (4,), like).fill_(1)
    with torch.no_grad():
        workspace.buffer("mode", (4,), like).add_(1)  # would raise for an inference tensor
