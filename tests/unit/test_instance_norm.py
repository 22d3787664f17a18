"""Instance norms of channels-last maps (model/fast/instance_norm.py) equal F.instance_norm: float64
to 1e-12, float32 at least as close to the float64 truth as PyTorch's channels-first kernel
(its channels-last kernel is not), with several bands, a batch and a large mean."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.fast import instance_norm
from model.fast.instance_norm import instance_stats, normalize_activate_, normalize_activate_project


@pytest.fixture
def small_bands(monkeypatch):
    monkeypatch.setattr(instance_norm, "BAND_ELEMENTS", 1000)  # several bands, one partial


def _map(dtype, batch=2, channels=8, mean=0.0, seed=0, size=(23, 31)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=generator, dtype=dtype) * 2 + mean
    x = x + torch.randn(batch, channels, 1, 1, generator=generator, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last)


def test_float64_equals_instance_norm(small_bands):
    x = _map(torch.float64)
    weight = torch.randn(1, 8, 1, 1, dtype=torch.float64)
    expected = F.leaky_relu(F.instance_norm(x), 0.25)
    torch.testing.assert_close(normalize_activate_(x.clone(), 0.25), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(normalize_activate_project(x, 0.25, weight),
                               F.conv2d(expected, weight), rtol=0, atol=1e-12)
    mean, rstd = instance_stats(x)
    torch.testing.assert_close(mean, x.mean(dim=(2, 3)), rtol=0, atol=1e-12)
    var = x.var(dim=(2, 3), unbiased=False)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-5), rtol=1e-12, atol=0)


@pytest.mark.parametrize("band", [4096, instance_norm.BAND_ELEMENTS])
@pytest.mark.parametrize("mean", [0.0, 30.0])
def test_float32_is_as_close_as_the_channels_first_kernel(mean, band, monkeypatch):
    """A map 15 standard deviations off zero, in many bands or one: the statistics in float32
    must not lose what the channels-first kernel keeps (PyTorch's channels-last batch norm
    errs by ~50× more)."""
    monkeypatch.setattr(instance_norm, "BAND_ELEMENTS", band)
    x = _map(torch.float32, batch=1, channels=16, mean=mean, seed=1, size=(240, 320))
    truth = F.instance_norm(x.double())
    channels_first = float((F.instance_norm(x.contiguous()) - truth).abs().max())
    ours = float((normalize_activate_(x.clone(), 1.0) - truth).abs().max())  # slope 1: identity
    assert ours <= max(2 * channels_first, 1e-6)


def test_maps_must_be_channels_last():
    with pytest.raises(ValueError, match="channels-last"):
        instance_stats(torch.randn(1, 4, 5, 6))
