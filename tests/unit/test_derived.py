"""Tensors derived from parameters (model/fast/derived.py) are computed once, recomputed when a
source changes, and dropped with their first source; the fused encoder's folded BatchNorm
follows its parameters and running statistics."""
from __future__ import annotations

import gc

import torch

from model import fast
from model.fast.derived import DerivedCache


def test_entries_follow_their_sources():
    cache, calls = DerivedCache(), []
    a, b = torch.randn(3), torch.randn(3)

    def compute():
        calls.append(1)
        return a + b

    first = cache.get([a, b], "sum", compute)
    assert cache.get([a, b], "sum", compute) is first and len(calls) == 1
    assert not first.requires_grad and not torch.is_inference(first)
    with torch.no_grad():
        b.add_(1)  # the second source changes in place
    torch.testing.assert_close(cache.get([a, b], "sum", compute), first + 1)
    assert len(calls) == 2
    cache.get([a, b], "other tag", compute)
    assert len(cache) == 2
    del a, first
    gc.collect()
    assert len(cache) == 0  # dropped with the first source


def test_folded_batchnorm_follows_running_statistics():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6).eval()
    x = torch.randn(1, 4, 5, 5)
    for _ in range(2):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)  # e.g. load_state_dict, or a train-mode forward
            bn.running_var.uniform_(0.5, 2)
            fused = fast.fused.fused_conv_bn(x, conv, bn, relu=True)
            torch.testing.assert_close(fused, torch.relu(bn(conv(x))), rtol=0, atol=1e-5)
