"""Winograd F(m×m, 3×3) convolutions (model/fast/winograd.py) equal the direct convolution: float64
values to 1e-10, float32 within a stated multiple of the direct convolution's
own rounding, on awkward sizes; the operator refuses autograd; the filter cache follows weight
changes; the network's layers take it only where the switch and the layer allow."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import blocks, fast
from model.fast import winograd
from model.fast.derived import CACHE
from model.fast.winograd import cached_filter, conv3x3, transform_filter

# (batch, Cin, Cout, H, W): whole tiles, partial tiles, 1×1 and 2×3 maps, a batch of two
CASES = [(1, 5, 4, 7, 9), (2, 8, 3, 6, 6), (1, 16, 8, 13, 17), (2, 3, 2, 1, 1), (1, 4, 4, 2, 3),
         (1, 6, 5, 8, 8)]


def _inputs(case, dtype, seed=0, noncontiguous=False):
    batch, cin, cout, h, w = case
    generator = torch.Generator().manual_seed(seed)
    if noncontiguous:  # a transposed view of a larger tensor, every other channel
        x = torch.randn(batch, 2 * cin, w, h, generator=generator, dtype=dtype).transpose(2, 3)[:, ::2]
    else:
        x = torch.randn(batch, cin, h, w, generator=generator, dtype=dtype)
    weight = torch.randn(cout, cin, 3, 3, generator=generator, dtype=dtype) / (3 * cin ** 0.5)
    bias = torch.randn(cout, generator=generator, dtype=dtype)
    return x, weight, bias


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("case", CASES)
def test_float64_values_equal_the_direct_convolution(case, m):
    x, weight, bias = _inputs(case, torch.float64, noncontiguous=case[0] == 2)
    expected = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(conv3x3(x, weight, bias, m), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(conv3x3(x, None, None, m, transform_filter(weight, m)),
                               F.conv2d(x, weight, None, padding=1), rtol=0, atol=1e-10)


def test_autograd_is_refused():
    x, weight, bias = _inputs(CASES[0], torch.float64)
    for leaf in (x, weight, bias):
        leaf.requires_grad_()
        with pytest.raises(ValueError, match="inference operator"):
            conv3x3(x, weight, bias)
        with torch.no_grad():
            conv3x3(x, weight, bias)
        leaf.requires_grad_(False)


def test_several_inputs_are_their_concatenation():
    x, weight, bias = _inputs((2, 8, 3, 7, 5), torch.float64, seed=3)
    parts = [x[:, :3], x[:, 3:].contiguous(memory_format=torch.channels_last)]
    for m in winograd.TILES:
        torch.testing.assert_close(conv3x3(parts, weight, bias, m), conv3x3(x, weight, bias, m),
                                   rtol=0, atol=1e-13)


@pytest.mark.parametrize("m, factor", [(2, 4), (4, 40)])
def test_float32_error_is_a_small_multiple_of_the_direct_convolutions(m, factor):
    """F(2): a few units of the direct convolution's own float32 rounding; F(4) (coefficients
    up to 8 and 1/24) a few tens of units, still below 3e-5 of the output's largest value."""
    for case in [(1, 64, 32, 13, 17), (1, 256, 16, 12, 20)]:
        x, weight, bias = _inputs(case, torch.float64, seed=2)
        truth = F.conv2d(x, weight, bias, padding=1)
        scale = float(truth.abs().max())
        direct = float((F.conv2d(x.float(), weight.float(), bias.float(), padding=1) - truth)
                       .abs().max())
        ours = float((conv3x3(x.float(), weight.float(), bias.float(), m) - truth).abs().max())
        assert ours <= max(factor * direct, 1e-6 * scale)
        assert ours <= 3e-5 * scale


def test_cached_filter_follows_the_weight():
    weight = torch.randn(4, 3, 3, 3)
    first = cached_filter(weight, 4)
    assert cached_filter(weight, 4) is first
    torch.testing.assert_close(first, transform_filter(weight, 4))
    with torch.no_grad():
        weight.mul_(2)  # an in-place change (an optimiser step, load_state_dict)
    second = cached_filter(weight, 4)
    torch.testing.assert_close(second, 2 * first)
    assert cached_filter(weight, 2).shape == (16, 4, 3)  # one entry per tile size


def test_unknown_tile_size_is_refused():
    with pytest.raises(ValueError, match="tile size"):
        conv3x3(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3), None, 3)


def test_layers_take_winograd_only_where_allowed():
    wide = torch.nn.Conv2d(fast.DEFAULT.winograd_min_channels, 4, 3, padding=1)
    x = torch.randn(1, fast.DEFAULT.winograd_min_channels, 5, 5)
    with torch.no_grad():
        assert fast.DEFAULT.winograd_tile_for(x, wide) == fast.DEFAULT.winograd_tile == 4
        assert fast.DEFAULT.winograd_tile_for(x.double(), wide) == 4
        assert fast.DEFAULT.winograd_tile_for(x.half(), wide) == 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast.DEFAULT.winograd_tile_for(x, wide) == 0
        for other in (torch.nn.Conv2d(fast.DEFAULT.winograd_min_channels - 1, 4, 3, padding=1),
                      torch.nn.Conv2d(fast.DEFAULT.winograd_min_channels, 4, 3, padding=1, stride=2),
                      torch.nn.Conv2d(fast.DEFAULT.winograd_min_channels, 4, 1),
                      torch.nn.Conv2d(fast.DEFAULT.winograd_min_channels, 4, 3, padding=1,
                                      padding_mode="reflect")):
            assert fast.DEFAULT.winograd_tile_for(torch.randn(1, other.in_channels, 5, 5), other) == 0
        with fast.reference_ops():
            assert fast.DEFAULT.winograd_tile_for(x, wide) == 0
        assert fast.DEFAULT.winograd_tile_for(x, wide) == 4
    # where autograd records the layer (its weight trains, or its input needs a gradient), it
    # stays direct, small and large maps alike
    large = torch.randn(1, fast.DEFAULT.winograd_min_channels, 120, 160)
    assert fast.DEFAULT.winograd_tile_for(x, wide) == fast.DEFAULT.winograd_tile_for(large, wide) == 0
    wide.requires_grad_(False)
    assert fast.DEFAULT.winograd_tile_for(large, wide) == 4
    assert fast.DEFAULT.winograd_tile_for(large.requires_grad_(), wide) == 0


@pytest.mark.parametrize("grad", [False, True])
def test_conv_block_equals_the_direct_convolution(grad):
    """:class:`model.blocks.ConvBlock` against the same block with the reference ops, in
    float64, given its input as two parts: Winograd with its cached filters without autograd,
    the direct convolution with it (nothing cached)."""
    torch.manual_seed(0)
    block = fast.attach(blocks.ConvBlock(fast.DEFAULT.winograd_min_channels, 32, 3).double(),
                        fast.DEFAULT)
    parts = [torch.randn(2, fast.DEFAULT.winograd_min_channels // 2, 6, 9, dtype=torch.float64)
             for _ in range(2)]
    outputs, cached = [], len(CACHE)
    for reference in (True, False):
        block.zero_grad()
        with fast.reference_ops(reference), torch.set_grad_enabled(grad):
            out = block(parts)
            if grad:
                out.pow(2).sum().backward()
        outputs.append((out.detach(), block.conv.weight.grad))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=0, atol=1e-10)
    if grad:  # the weight's own transform, in the graph: nothing cached
        torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=0, atol=1e-9)
        assert len(CACHE) == cached
    else:
        assert len(CACHE) == cached + 1
