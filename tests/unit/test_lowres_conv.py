"""The low-resolution "bilinear upsample → 3×3 convolution" (model/fast/lowres_conv.py) equals the
direct composition: per operator in float64 (1e-10) and float32 (round-off), values and
gradients, on awkward sizes; and the whole network with the rewrites equals the reference ops."""
from __future__ import annotations

import pytest
import torch

from model import fast
from model.fast.lowres_conv import (band_chunks, interpolation_matrix, upsample_conv3x3,
                               upsample_conv3x3_into, upsample_conv3x3_reference)

# (batch, Cin, Cout, h, w, size, align_corners): the network's four kinds of layer (×2 with
# align_corners=True as upconv2/3, ×2 and ×4 with False as side2/side3 and the detector) on odd,
# 1×1 and 2×2 maps, plus a non-integer resize.
CASES = [
    (2, 5, 4, 3, 5, (6, 10), True),
    (1, 3, 2, 1, 1, (2, 2), True),
    (2, 4, 3, 2, 2, (4, 4), True),
    (1, 4, 3, 7, 9, (14, 18), False),
    (2, 6, 3, 1, 1, (4, 4), False),
    (1, 6, 3, 2, 2, (8, 8), False),
    (2, 4, 5, 5, 3, (20, 12), False),
    (1, 3, 2, 5, 7, (12, 9), False),
]
CHUNKS = [None, (3, 5), (8, 4)]


def _inputs(case, dtype, seed=0, noncontiguous=False):
    batch, cin, cout, h, w, _, _ = case
    generator = torch.Generator().manual_seed(seed)
    if noncontiguous:  # a transposed view of a larger tensor, every other channel
        x = torch.randn(batch, 2 * cin, w, h, generator=generator, dtype=dtype)
        x = x.transpose(2, 3)[:, ::2]
    else:
        x = torch.randn(batch, cin, h, w, generator=generator, dtype=dtype)
    weight = torch.randn(cout, cin, 3, 3, generator=generator, dtype=dtype)
    bias = torch.randn(cout, generator=generator, dtype=dtype)
    return x, weight, bias


def _value_and_grads(fn, x, weight, bias, size, align_corners, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = fn(*leaves, size, align_corners)
    (out * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("case", CASES)
def test_float64_values_and_gradients_equal_the_direct_ops(case, chunk):
    x, weight, bias = _inputs(case, torch.float64, noncontiguous=case[0] == 2)
    size, align_corners = case[5], case[6]
    with torch.no_grad():
        expected = upsample_conv3x3_reference(x, weight, bias, size, align_corners)
        got = upsample_conv3x3(x, weight, bias, size, align_corners, chunk)
    assert got.shape == expected.shape == (case[0], case[2], *size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    reference = _value_and_grads(upsample_conv3x3_reference, x, weight, bias, size,
                                 align_corners, upstream)
    ours = _value_and_grads(lambda *a: upsample_conv3x3(*a, chunk), x, weight, bias, size,
                            align_corners, upstream)
    for name, a, b in zip(("value", "input grad", "weight grad", "bias grad"), ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("case", CASES)
def test_channels_last_form_writes_the_direct_ops_result(case, chunk):
    """:func:`upsample_conv3x3_into` (no autograd) writes the direct composition over a
    channels-last map: float64 to 1e-10, float32 within round-off."""
    x, weight, _ = _inputs(case, torch.float64, noncontiguous=case[0] == 2)
    size, align_corners = case[5], case[6]
    base = torch.randn(case[0], case[2], *size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(7))
    expected = upsample_conv3x3_reference(x, weight, None, size, align_corners)
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 2e-6)):
        out = base.to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            result = upsample_conv3x3_into(out, x.to(dtype), weight.to(dtype), align_corners,
                                           chunk)
        assert result is out
        torch.testing.assert_close(out.double(), expected, rtol=0,
                                   atol=atol * float(expected.abs().max()))
    with pytest.raises(ValueError, match="channels-last"):
        upsample_conv3x3_into(base.clone(), x, weight, align_corners, chunk)


@pytest.mark.parametrize("case", CASES[::2])
def test_float32_is_within_round_off(case):
    """float32 against the float64 truth: no worse than a few units of the float32 rounding of
    the direct ops (whose own error is measured on the same numbers)."""
    x, weight, bias = _inputs(case, torch.float32, seed=2)
    size, align_corners = case[5], case[6]
    truth = upsample_conv3x3_reference(x.double(), weight.double(), bias.double(), size,
                                       align_corners)
    direct = upsample_conv3x3_reference(x, weight, bias, size, align_corners)
    upstream = torch.randn(truth.shape, generator=torch.Generator().manual_seed(3))
    for chunk in (None, (3, 4)):
        got, gx, gw, gb = _value_and_grads(lambda *a: upsample_conv3x3(*a, chunk), x, weight,
                                           bias, size, align_corners, upstream)
        _, tx, tw, tb = _value_and_grads(upsample_conv3x3_reference, x.double(), weight.double(),
                                         bias.double(), size, align_corners, upstream.double())
        scale = float(truth.abs().max())
        assert float((got - truth).abs().max()) <= max(4 * float((direct - truth).abs().max()),
                                                       1e-6 * scale)
        for g, t in ((gx, tx), (gw, tw), (gb, tb)):
            assert float((g - t).abs().max()) <= 1e-5 * float(t.abs().max())


def test_interpolation_matrix_is_what_interpolate_does():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    for size, align_corners in (((10, 14), True), ((20, 28), False), ((6, 9), False)):
        u_h = interpolation_matrix(5, size[0], align_corners, torch.float64, torch.device("cpu"))
        u_w = interpolation_matrix(7, size[1], align_corners, torch.float64, torch.device("cpu"))
        expected = torch.nn.functional.interpolate(x, size=size, mode="bilinear",
                                                   align_corners=align_corners)
        torch.testing.assert_close(u_h @ x @ u_w.t(), expected, rtol=0, atol=1e-14)
        torch.testing.assert_close(u_h.sum(dim=1), torch.ones(size[0], dtype=torch.float64))


def test_band_chunks_read_few_low_resolution_samples():
    """×4, align_corners=False: a block of 16 outputs reads 4 samples plus one each side."""
    chunks = band_chunks(40, 160, False, 16)
    assert [c[:2] for c in chunks] == [(a, a + 16) for a in range(0, 160, 16)]
    assert chunks[0][2:] == (0, 5) and chunks[-1][2:] == (35, 40)
    assert all(hi - lo == 6 for _, _, lo, hi in chunks[1:-1])


def test_matrices_cached_under_inference_mode_serve_training():
    x, weight, bias = _inputs(CASES[3], torch.float32, seed=4)
    size = CASES[3][5]
    with torch.inference_mode():
        upsample_conv3x3(x, weight, bias, size, False, None)
    weight.requires_grad_()
    upsample_conv3x3(x, weight, bias, size, False, None).sum().backward()
    assert weight.grad is not None


def test_switch_selects_the_reference_ops():
    assert fast.DEFAULT.lowres_conv and fast.DEFAULT.channels_last and fast.DEFAULT.winograd_tile == 4
    x = torch.randn(1, 2, 3, 3)
    with fast.reference_ops():
        assert not fast.DEFAULT.lowres_conv and not fast.DEFAULT.fused
        assert not fast.DEFAULT.channels_last and not fast.DEFAULT.winograd_tile
        assert not fast.DEFAULT.lowres_conv_path(x)
        with fast.reference_ops(False):
            assert fast.DEFAULT.lowres_conv_path(x)
        assert not fast.DEFAULT.lowres_conv
    assert fast.DEFAULT.lowres_conv_path(x)
    assert fast.DEFAULT.fused == fast.fused.FUSED_AVAILABLE
    assert not fast.DEFAULT.lowres_conv_path(x.half())


# ----------------------------------------------------------------------------- whole network

@pytest.fixture(scope="module")
def network():
    from registry import build_model
    torch.manual_seed(0)
    model = build_model("SCFeatModel", {"backbone_config": {"pretrained": False},
                                        "align_local_grad": True})
    for module in model.modules():  # BatchNorm statistics other than the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, name: str) -> None:
    scale = float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=rel * max(scale, 1e-30), msg=name)


def test_network_eval_no_grad_equals_reference_ops(network):
    network.eval()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = network.extract(images)
        with fast.reference_ops():
            reference = network.extract(images)
    for name in reference:
        _close(ours[name], reference[name], 1e-5, name)


def test_network_train_mode_values_and_gradients_equal_reference_ops(network):
    """Train mode in float64 (BatchNorm batch statistics, autograd through every rewritten
    layer, the detector's gradient into the backbone): outputs and every parameter's gradient to 1e-9 of its size. Gradients that are zero but for rounding (biases before an instance
    or group norm) are compared against the largest gradient of the network instead."""
    import copy
    model = copy.deepcopy(network).double().train()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(6),
                         dtype=torch.float64)
    results = []
    for reference in (True, False):
        model.zero_grad(set_to_none=True)
        with fast.reference_ops(reference):
            out = model(images, with_detector=True)
        loss = out["local_point"].sum() + out["local_map"].pow(2).mean() + out["desc_map"].mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    (ref_out, ref_grads), (our_out, our_grads) = results
    for name in ref_out:
        _close(our_out[name], ref_out[name], 1e-10, name)
    assert ref_grads.keys() == our_grads.keys()
    for name in ("backbone.upconv3.conv.conv.weight", "backbone.upconv2.conv.conv.bias",
                 "backbone.side3.conv.conv.weight", "backbone.side2.conv.conv.weight",
                 "localheader.conv2.weight", "localheader.conv2.bias",
                 "backbone.layer1.0.conv1.weight"):
        assert name in ref_grads, name
    largest = max(float(g.abs().max()) for g in ref_grads.values())
    for name, expected in ref_grads.items():
        atol = 1e-9 * max(float(expected.abs().max()), 1e-6 * largest)
        torch.testing.assert_close(our_grads[name], expected, rtol=0, atol=atol, msg=name)
