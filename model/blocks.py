"""Small building blocks shared by the F2R backbone."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

from model import winograd
from model.derived import CACHE
from model.lowres_conv import upsample_conv3x3


class ConvBlock(nn.Module):
    """Conv2d(k, stride 1, 'same' padding) → GroupNorm(32) → ELU.

    State-dict keys: ``conv.weight``, ``conv.bias``, ``gn.weight``, ``gn.bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1,
                              padding=(kernel_size - 1) // 2)
        self.gn = nn.GroupNorm(32, out_channels)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``x``: a map, or maps taken as their concatenation over channels (formed only when
        the convolution is direct)."""
        parts = [x] if isinstance(x, torch.Tensor) else list(x)
        tile = winograd_tile(parts[0], self.conv)
        if not tile:
            return self.activate(self.conv(parts[0] if len(parts) == 1 else torch.cat(parts, 1)))
        weight = self.conv.weight  # not recorded by autograd here (winograd_tile)
        u = winograd.cached_filter(weight, tile)
        return self.activate(winograd.conv3x3(parts, weight, self.conv.bias, tile, u))

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        """GroupNorm → ELU of the convolution's output ``y``."""
        return F.elu(self.gn(y), inplace=True)

    def upsample_forward(self, x: torch.Tensor, size: tuple[int, int], align_corners: bool
                         ) -> torch.Tensor:
        """``forward(interpolate(x, size, bilinear))``; the 3×3 convolution of the upsampled
        map computed at ``x``'s resolution (:func:`model.lowres_conv.upsample_conv3x3`) where
        :func:`lowres_conv_path` allows it."""
        if lowres_conv_path(x) and self.conv.kernel_size == (3, 3):
            return self.activate(upsample_conv3x3(x, self.conv.weight, self.conv.bias, size,
                                                  align_corners, LOWRES_CHUNK))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
        return self.forward(x)


class UpBlock(nn.Module):
    """Bilinear ×2 upsampling (align_corners=True), then a 3×3 :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBlock(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (2 * x.shape[-2], 2 * x.shape[-1])  # what scale_factor=2 gives
        return self.conv.upsample_forward(x, size, align_corners=True)


class ResizeBlock(nn.Module):
    """Bilinear resize (align_corners=False) to a given size, then a 3×3 :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBlock(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(size):
            return self.conv.upsample_forward(x, tuple(size), align_corners=False)
        return self.conv(x)


def join_skip(upsampled: torch.Tensor, skip: torch.Tensor) -> list[torch.Tensor]:
    """``[upsampled, skip]`` with ``skip`` padded to ``upsampled``'s size (split ``diff//2``,
    ``diff - diff//2``): their concatenation over channels, as :meth:`ConvBlock.forward`
    takes it."""
    diff_y = upsampled.shape[-2] - skip.shape[-2]
    diff_x = upsampled.shape[-1] - skip.shape[-1]
    if diff_x or diff_y:
        skip = F.pad(skip, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
    return [upsampled, skip]


class PositionwiseNorm(nn.Module):
    """Position-wise normalisation (PN) of the coupling bridge.

    Each pixel is normalised over channels (mean, unbiased variance, ``eps`` added before the
    square root); the result is modulated by two 7×7 convolutions of the channel-mean map
    ``m`` (``B×1×H×W``): ``PN(x) = x̂ · conv1(m) + conv2(m)``.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.conv1 = nn.Conv2d(1, 1, 7, padding=3)
        self.conv2 = nn.Conv2d(1, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        std = (x.var(dim=1, keepdim=True, unbiased=True) + self.eps).sqrt()
        return (x - mean) / std * self.conv1(mean) + self.conv2(mean)


def channelwise_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Channel-wise normalisation (CN): per sample and channel over H×W, biased variance,
    no parameters and no running statistics (an affine-free instance norm)."""
    return F.instance_norm(x, eps=eps)


# --------------------------------------------------------------------------- CPU inference path
#
# Where no gradient is needed, the networks replace some reference ops by equivalent fused ones
# on the CPU (``cpu_inference_path``): BatchNorm folded into the preceding convolution, ReLU and
# residual additions done by oneDNN as post-ops of the convolution, instance norms and PReLUs
# applied in place. The results equal the reference ops' up to float32 rounding (the fixture
# tests in tests/parity/test_model.py run this path); training, autograd, autocast and CUDA always take
# the reference ops.

# Switch for A/B comparisons (tools/benchmark.py, tests); off when this torch build lacks the
# private oneDNN fused-convolution op (it is not a public API).
_FUSED_AVAILABLE = (hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                    and hasattr(torch.ops.mkldnn, "_convolution_pointwise_"))
FUSED_CPU_INFERENCE = _FUSED_AVAILABLE

# Every "bilinear upsample → 3×3 convolution" (UpBlock, ResizeBlock, the detector's conv2 on
# up(f)) computed at the low resolution (model/lowres_conv.py), in eval and train mode, forward
# and backward: the same numbers up to floating-point reassociation, 1.5–9× faster per layer on
# the CPU (docs/performance.md). CPU only: on CUDA the direct ops stay until measured there.
LOWRES_CONV = True
# Output blocks (rows, columns) of the banded interpolation products: one block for the
# decoder's maps (≤ 120×160 at 480×640), 20 for the detector's full-resolution map.
LOWRES_CHUNK = (120, 160)
# Blocks of the channels-last form (model.lowres_conv.upsample_conv3x3_into) that the
# detector's inference path writes conv2's up(f) part with: small blocks waste fewer
# multiplications by the banded matrices' zeros, large ones make fewer operations (each one
# a meeting point for the threads).
LOWRES_CHANNELS_LAST_CHUNK = (32, 128)


# 3×3 convolutions with at least WINOGRAD_MIN_CHANNELS input channels (the decoder's iconv3 and
# iconv2) by Winograd's F(4×4, 3×3) (model/winograd.py) on the CPU where autograd does not
# record them (inference, stage 2's frozen backbone): 4× fewer multiplications, the same
# numbers up to floating-point reassociation (float32: ~1e-5 of the output's largest value).
# Narrower layers stay direct: there the transforms cost more than the products save (docs,
# Performance). Under autograd they stay direct too: the transforms' backward (copies and the
# overlapping patches' sums) costs more than the products save, at every training size (forward
# and backward of iconv2 at 60×80 and 120×160: 1.2× the direct convolution's time).
# 0 turns it off.
WINOGRAD_TILE = 4
WINOGRAD_MIN_CHANNELS = 512
# The CPU inference path runs the encoder and the detector's full-resolution layers on
# channels-last maps (oneDNN's convolutions run faster on them; the detector's instance norms
# and products are written for them, model/instance_norm.py, model/lowres_conv.py).
CHANNELS_LAST = True

_SWITCHES = ("FUSED_CPU_INFERENCE", "LOWRES_CONV", "WINOGRAD_TILE", "CHANNELS_LAST")
_DEFAULTS = {name: globals()[name] for name in _SWITCHES}


def use_reference_ops(flag: bool = True) -> None:
    """Select the original composition of ops (``True``: no fused CPU inference path, every
    upsampled map convolved at full resolution, direct convolutions, channels-first maps) or
    this implementation's rewrites (``False``, the default: every switch above at its
    default). For before/after comparisons (``tools/benchmark.py --reference-ops``) and the
    command-line tools; both give the same outputs up to float32 rounding."""
    reference = {"FUSED_CPU_INFERENCE": False, "LOWRES_CONV": False, "WINOGRAD_TILE": 0,
                 "CHANNELS_LAST": False}
    globals().update(reference if flag else _DEFAULTS)


@contextmanager
def reference_ops(flag: bool = True) -> Iterator[None]:
    """:func:`use_reference_ops` for the ``with`` block, the previous settings restored after."""
    saved = {name: globals()[name] for name in _SWITCHES}
    use_reference_ops(flag)
    try:
        yield
    finally:
        globals().update(saved)


def lowres_conv_path(x: torch.Tensor) -> bool:
    """Whether the low-resolution "upsample → 3×3 convolution" may run on ``x``: a float32 or
    float64 CPU tensor, CPU autocast off (bf16 rounding of the interpolation weights would
    differ from the direct ops'), and :data:`LOWRES_CONV` set. Autograd may be on."""
    return (LOWRES_CONV and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu"))


def winograd_tile(x: torch.Tensor, conv: nn.Conv2d) -> int:
    """F(m×m, 3×3)'s ``m`` for ``conv`` on ``x``, or 0 for the direct convolution: a stride-1,
    padding-1, ungrouped 3×3 ``conv`` with at least :data:`WINOGRAD_MIN_CHANNELS` input
    channels on a float32 or float64 CPU tensor outside autocast and ``torch.compile``, where
    autograd does not record it."""
    if not (WINOGRAD_TILE and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.in_channels >= WINOGRAD_MIN_CHANNELS and conv.padding_mode == "zeros"):
        return 0
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
        return 0
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return 0
    return WINOGRAD_TILE


def cpu_inference_path(x: torch.Tensor) -> bool:
    """Whether the fused CPU inference ops may run on ``x``: a float32 CPU tensor, autograd and
    CPU autocast off, not being traced by ``torch.compile`` (which fuses by itself), oneDNN
    available and :data:`FUSED_CPU_INFERENCE` set."""
    return (FUSED_CPU_INFERENCE and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available())


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (``bn`` with running statistics):
    ``w·γ/√(σ²+ε)`` and ``β + (b − μ)·γ/√(σ²+ε)``."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


def fused_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """``relu?(bn(conv(x)) [+ residual])`` in one oneDNN convolution (eval-mode ``bn``; the
    folded weight and bias are computed once and reused until a parameter or running
    statistic changes, :data:`model.derived.CACHE`)."""
    sources = [t for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                           bn.running_var) if t is not None]
    weight, bias = CACHE.get(sources, ("batchnorm", bn.eps), lambda: fold_batchnorm(conv, bn))
    args = (conv.padding, conv.stride, conv.dilation, conv.groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args,
                                                       "relu" if relu else "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *args, "add",
                                                          1.0, "relu" if relu else None, [], None)


def conv3x3_add_(out: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """``out += conv(x)`` (with ``conv``'s bias; ``weight`` in place of ``conv.weight`` if
    given) written by oneDNN into ``out`` itself, no autograd: no output is allocated."""
    weight = conv.weight if weight is None else weight
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x, weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "add",
        1.0, None, [], None)


def _fused_conv_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``mkldnn._convolution_pointwise`` (and ``.binary``, whose second argument is
    the added tensor, and the in-place ``_convolution_pointwise_.binary``, whose first is) for
    ``torch.utils.flop_counter``, which does not know these ops (only the batch size is read
    from the first argument)."""
    weight_shape = args[1] if len(args) > 9 else args[0]
    return conv_flop_count(x_shape, weight_shape, out_shape, transposed=False)


if _FUSED_AVAILABLE and torch.ops.mkldnn._convolution_pointwise not in flop_registry:
    register_flop_formula(torch.ops.mkldnn._convolution_pointwise)(_fused_conv_flops)
    register_flop_formula(torch.ops.mkldnn._convolution_pointwise_)(_fused_conv_flops)


def bottleneck_inference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ``Bottleneck`` in eval mode, each conv+BN(+ReLU)(+residual) fused."""
    out = fused_conv_bn(x, block.conv1, block.bn1, relu=True)
    out = fused_conv_bn(out, block.conv2, block.bn2, relu=True)
    identity = x
    if block.downsample is not None:
        identity = fused_conv_bn(x, block.downsample[0], block.downsample[1], relu=False)
    return fused_conv_bn(out, block.conv3, block.bn3, relu=True, residual=identity)


def instance_norm_(x: torch.Tensor, eps: float = 1e-5, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``F.instance_norm(x)`` written in place (or into ``out``, a contiguous tensor of ``x``'s
    shape) for a contiguous ``B×C×H×W`` ``x``: the same kernel, hence the same values, as the
    out-of-place op."""
    batch, channels = x.shape[:2]
    flat = x.view(1, batch * channels, *x.shape[2:])
    target = flat if out is None else out.view(flat.shape)
    stats = x.new_empty(2, batch * channels)
    torch.native_batch_norm(flat, None, None, None, None, True, 0.0, eps,
                            out=(target, stats[0], stats[1]))
    return x if out is None else out
