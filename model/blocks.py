"""Small building blocks shared by the F2R backbone (the reference composition; the CPU
rewrites are in :mod:`model.fast`)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    """Conv2d(k, stride 1, 'same' padding) → GroupNorm(32) → ELU.

    State-dict keys: ``conv.weight``, ``conv.bias``, ``gn.weight``, ``gn.bias``.
    """

    ops = None  # a model.fast.FastOps (its rewrites first), or None: the composition below

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1,
                              padding=(kernel_size - 1) // 2)
        self.gn = nn.GroupNorm(32, out_channels)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``x``: a map, or maps taken as their concatenation over channels."""
        if self.ops is not None and (y := self.ops.conv_block(self, x)) is not None:
            return y
        return self.activate(self.conv(x if isinstance(x, torch.Tensor) else torch.cat(list(x), 1)))

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        """GroupNorm → ELU of the convolution's output ``y``."""
        return F.elu(self.gn(y), inplace=True)

    def upsample_forward(self, x: torch.Tensor, size: tuple[int, int], align_corners: bool
                         ) -> torch.Tensor:
        """``forward(interpolate(x, size, bilinear))``."""
        if self.ops is not None and (
                y := self.ops.upsample_conv_block(self, x, size, align_corners)) is not None:
            return y
        return self(F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners))


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
