"""Small building blocks shared by the F2R backbone."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
