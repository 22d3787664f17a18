"""The detector's rewrites (model/fast/detnet.py) equal its reference composition: the
channels-last path, the channels-first one and the low-resolution rewrite off, with and
without the image branch, on a batch of two; the 3×3 local mean of the peakiness."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import fast
from model.detnet import DetNet, local_mean3x3
from model.fast.detnet import shifted_sums_mean3x3


def test_local_mean_is_the_reflect_padded_average_pool():
    x = torch.randn(2, 5, 7, 9)
    expected = F.avg_pool2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), 3, stride=1)
    torch.testing.assert_close(shifted_sums_mean3x3(x), expected, rtol=0, atol=1e-6)
    assert torch.equal(local_mean3x3(x), expected)


@pytest.mark.parametrize("with_image", [True, False])
@pytest.mark.parametrize("channels_last, lowres", [(True, True), (False, True), (True, False)])
def test_inference_paths_equal_the_reference_composition(with_image, channels_last, lowres,
                                                         monkeypatch):
    torch.manual_seed(0)
    header = fast.attach(DetNet({"in_channels": 192}, with_image=with_image).eval(), fast.DEFAULT)
    with torch.no_grad():
        header.relu.weight.fill_(0.1)
    features = torch.rand(2, 192, 12, 20)
    image = torch.randn(2, 3, 48, 80) if with_image else None
    with torch.no_grad(), fast.reference_ops():
        expected = header(features, image)
    monkeypatch.setattr(fast.DEFAULT, "channels_last", channels_last)
    monkeypatch.setattr(fast.DEFAULT, "lowres_conv", lowres)
    with torch.no_grad():
        assert fast.DEFAULT.cpu_inference_path(features)
        got = header(features, image)
    assert got.shape == (2, 1, 48, 80)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
