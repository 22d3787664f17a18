"""oneDNN's fused convolutions for inference: BatchNorm folded into the preceding convolution,
ReLU and residual additions done as post-ops of the convolution, a convolution added into an
existing map; instance norms written in place. ``torch.ops.mkldnn._convolution_pointwise`` is a
private op of PyTorch's CPU build (:data:`FUSED_AVAILABLE` says whether this build has it); its
FLOPs are registered with ``torch.utils.flop_counter`` here, which does not know it."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula

from model.fast.derived import CACHE

FUSED_AVAILABLE = (hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                   and hasattr(torch.ops.mkldnn, "_convolution_pointwise_"))


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
    statistic changes, :data:`model.fast.derived.CACHE`)."""
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


def _fused_conv_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``mkldnn._convolution_pointwise`` (and ``.binary``, whose second argument is
    the added tensor, and the in-place ``_convolution_pointwise_.binary``, whose first is) for
    ``torch.utils.flop_counter`` (only the batch size is read from the first argument)."""
    weight_shape = args[1] if len(args) > 9 else args[0]
    return conv_flop_count(x_shape, weight_shape, out_shape, transposed=False)


if FUSED_AVAILABLE and torch.ops.mkldnn._convolution_pointwise not in flop_registry:
    register_flop_formula(torch.ops.mkldnn._convolution_pointwise)(_fused_conv_flops)
    register_flop_formula(torch.ops.mkldnn._convolution_pointwise_)(_fused_conv_flops)
