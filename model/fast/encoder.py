"""The F2R encoder in eval mode without autograd: BatchNorm folded into every convolution, ReLU
and the residual additions run inside them (:mod:`model.fast.fused`), optionally on
channels-last maps (oneDNN's convolutions run faster on them)."""
from __future__ import annotations

import torch
import torch.nn as nn

from model.fast.fused import bottleneck_inference, fused_conv_bn
from model.fast.profiling import region


def encode_fused(backbone: nn.Module, x: torch.Tensor, channels_last: bool
                 ) -> tuple[torch.Tensor, ...]:
    """``backbone.encode(x)`` (stem after max-pool, layer1, layer2, layer3) with the fused
    convolutions; the maps are channels-last with ``channels_last``."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with region("stem"):
        x_first = backbone.firstmaxpool(
            fused_conv_bn(x, backbone.firstconv, backbone.firstbn, relu=True))
    maps = [x_first]
    for name in ("layer1", "layer2", "layer3"):
        with region(name):
            y = maps[-1]
            for block in getattr(backbone, name):
                y = bottleneck_inference(block, y)
        maps.append(y)
    return tuple(maps)
