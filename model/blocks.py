"""Small building blocks shared by the F2R backbone."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula


class ConvBlock(nn.Module):
    """Conv2d(k, stride 1, 'same' padding) → GroupNorm(32) → ELU.

    State-dict keys: ``conv.weight``, ``conv.bias``, ``gn.weight``, ``gn.bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1,
                              padding=(kernel_size - 1) // 2)
        self.gn = nn.GroupNorm(32, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.gn(self.conv(x)), inplace=True)


class UpBlock(nn.Module):
    """Bilinear ×2 upsampling (align_corners=True), then a 3×3 :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBlock(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(x)


class ResizeBlock(nn.Module):
    """Bilinear resize (align_corners=False) to a given size, then a 3×3 :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBlock(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.conv(x)


def join_skip(upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Pad ``skip`` to ``upsampled``'s size (split ``diff//2``, ``diff - diff//2``), concatenate
    ``[upsampled, skip]`` over channels."""
    diff_y = upsampled.shape[-2] - skip.shape[-2]
    diff_x = upsampled.shape[-1] - skip.shape[-1]
    if diff_x or diff_y:
        skip = F.pad(skip, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
    return torch.cat([upsampled, skip], dim=1)


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
# tests in tests/test_model.py run this path); training, autograd, autocast and CUDA always take
# the reference ops.

# Switch for A/B comparisons (tools/benchmark.py, tests); off when this torch build lacks the
# private oneDNN fused-convolution op (it is not a public API).
FUSED_CPU_INFERENCE = hasattr(torch.ops.mkldnn, "_convolution_pointwise")


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
    """``relu?(bn(conv(x)) [+ residual])`` in one oneDNN convolution (eval-mode ``bn``)."""
    weight, bias = fold_batchnorm(conv, bn)
    args = (conv.padding, conv.stride, conv.dilation, conv.groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args,
                                                       "relu" if relu else "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *args, "add",
                                                          1.0, "relu" if relu else None, [], None)


def _fused_conv_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``mkldnn._convolution_pointwise`` (and ``.binary``, whose second argument is
    the added tensor) for ``torch.utils.flop_counter``, which does not know these ops."""
    weight_shape = args[1] if len(args) > 9 else args[0]
    return conv_flop_count(x_shape, weight_shape, out_shape, transposed=False)


if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._convolution_pointwise not in flop_registry:
    register_flop_formula(torch.ops.mkldnn._convolution_pointwise)(_fused_conv_flops)


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
