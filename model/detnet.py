"""The detection network with peakiness measurements (config name ``DetNet``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import blocks
from model.blocks import cpu_inference_path, instance_norm_, lowres_conv_path
from model.lowres_conv import upsample_conv3x3


def peakiness(x: torch.Tensor) -> torch.Tensor:
    """Peakiness score ``B×1×H×W`` of a ``B×C×H×W`` map.

    ``x`` is divided by its per-sample maximum; ``α = softplus(x − avgpool3×3(x))`` (reflect
    padding) measures spatial peakiness, ``β = softplus(x − mean_c(x))`` channel peakiness, and
    the score is the maximum of ``α·β`` over channels.
    """
    x = x / x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    local_mean = F.avg_pool2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), 3, stride=1)
    alpha = F.softplus(x - local_mean)
    beta = F.softplus(x - x.mean(dim=1, keepdim=True))
    return (alpha * beta).max(dim=1, keepdim=True).values


class DetNet(nn.Module):
    """Detector head: features ``B×in_channels×H/4×W/4`` and image ``B×3×H×W`` → score
    ``B×1×H×W``.

    ``f = PReLU(IN(conv1(p_f·features)))`` upsampled to the image, ``g = PReLU(IN(convimg(p_i·image)))``,
    ``h = PReLU(IN(conv2([f, g])))``, ``s = softplus(IN(conv3(h)))``,
    ``score = up(p_f)·p_i·s``. One PReLU (a single parameter) serves all three.
    With ``with_image=False`` (``local_with_img: false``) the image branch is dropped:
    ``h`` is computed from ``f`` alone and ``score = up(p_f)·s``.
    """

    default_conf = {"in_channels": 192}

    def __init__(self, conf: dict | None = None, with_image: bool = True):
        super().__init__()
        conf = {**self.default_conf, **(conf or {})}
        self.conf = conf
        self.with_image = with_image
        in_ch = conf["in_channels"]
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(in_ch + (64 if with_image else 0), 128, 3, padding=1)
        self.conv3 = nn.Conv2d(128, 1, 1)
        self.relu = nn.PReLU()
        if with_image:
            self.convimg = nn.Conv2d(3, 64, 3, padding=1)

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if cpu_inference_path(features) and self.relu.weight.numel() == 1:
            return self.forward_inference(features, image)
        size = image.shape[-2:] if image is not None else tuple(4 * s for s in features.shape[-2:])
        p_f = peakiness(features)
        f = self.relu(F.instance_norm(self.conv1(p_f * features)))
        p_f_up = F.interpolate(p_f, size=size, mode="bilinear", align_corners=False)
        g = None
        if self.with_image:
            p_i = peakiness(image)
            g = self.relu(F.instance_norm(self.convimg(p_i * image)))
        if lowres_conv_path(f):
            h = self.conv2_upsampled(f, size, g)
        else:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            h = self.conv2(f if g is None else torch.cat([f, g], dim=1))
        p_f = p_f_up
        h = self.relu(F.instance_norm(h))
        s = F.softplus(F.instance_norm(self.conv3(h)))
        score = p_f * s
        return score * p_i if self.with_image else score

    def conv2_upsampled(self, f: torch.Tensor, size: tuple[int, int], g: torch.Tensor | None,
                        fused: bool = False) -> torch.Tensor:
        """``conv2(cat([up(f), g]))`` (``up``: bilinear to ``size``, align_corners=False) with
        the ``up(f)`` part computed at ``f``'s resolution
        (:func:`model.lowres_conv.upsample_conv3x3`): ``f`` ``B×C×h×w``, ``g`` ``B×64×H×W`` or
        ``None`` → ``B×128×H×W``. ``fused``: the ``g`` convolution adds the ``f`` part as a
        oneDNN post-op (no autograd)."""
        weight, bias = self.conv2.weight, self.conv2.bias
        channels = f.shape[1]
        if g is None:
            return upsample_conv3x3(f, weight, bias, size, False, blocks.LOWRES_CHUNK)
        up = upsample_conv3x3(f, weight[:, :channels], None, size, False, blocks.LOWRES_CHUNK)
        weight_g = weight[:, channels:]
        if fused:
            conv = self.conv2
            return torch.ops.mkldnn._convolution_pointwise.binary(
                g, up, weight_g.contiguous(), bias, conv.padding, conv.stride, conv.dilation,
                conv.groups, "add", 1.0, None, [], None)
        return F.conv2d(g, weight_g, bias, padding=1) + up

    def forward_inference(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` without autograd, with fewer full-resolution passes and allocations:
        instance norms and PReLUs (a single slope: ``leaky_relu``) in place, ``conv2``'s
        ``up(f)`` part computed at ``f``'s resolution and added to the ``g`` part by oneDNN
        (:meth:`conv2_upsampled`; with :data:`model.blocks.LOWRES_CONV` off, ``up(f)`` and
        ``IN(g)`` are written straight into ``conv2``'s input), and ``conv3`` (1×1 to one
        channel) as a matrix product. Equal to :meth:`forward` up to float32 rounding."""
        slope = float(self.relu.weight)
        size = image.shape[-2:] if self.with_image else tuple(4 * s for s in features.shape[-2:])
        p_f = peakiness(features)
        f = F.leaky_relu_(instance_norm_(self.conv1(p_f * features).contiguous()), slope)
        p_f = F.interpolate(p_f, size=size, mode="bilinear", align_corners=False)
        p_i = g = None
        if self.with_image:
            p_i = peakiness(image)
            g = self.convimg(p_i * image).contiguous()
        if lowres_conv_path(f):
            if g is not None:
                g = F.leaky_relu_(instance_norm_(g), slope)
            h = self.conv2_upsampled(f, size, g, fused=True)
        else:
            h = self.conv2_reference_inference(f, g, size, slope)
        del f, g
        h = F.leaky_relu_(instance_norm_(h.contiguous()), slope)
        s = torch.matmul(self.conv3.weight.view(1, -1), h.flatten(2))  # B×1×HW
        del h
        s = s.view(-1, 1, *size).add_(self.conv3.bias.view(1, -1, 1, 1))
        score = p_f.mul_(F.softplus(instance_norm_(s)))
        return score.mul_(p_i) if self.with_image else score

    def conv2_reference_inference(self, f: torch.Tensor, g: torch.Tensor | None,
                                  size: tuple[int, int], slope: float) -> torch.Tensor:
        """``conv2`` of ``[up(f), PReLU(IN(g))]`` at full resolution (``g``: ``convimg``'s
        output), ``up(f)`` and ``IN(g)`` written straight into ``conv2``'s input (the fused
        path with :data:`model.blocks.LOWRES_CONV` off)."""
        if g is not None:
            channels = f.shape[1]
            stacked = f.new_empty(f.shape[0], channels + g.shape[1], *size)
            for b in range(f.shape[0]):  # one sample's channel slices are contiguous
                torch._C._nn.upsample_bilinear2d(f[b:b + 1], list(size), False, None, None,
                                                 out=stacked[b:b + 1, :channels])
                instance_norm_(g[b:b + 1], out=stacked[b:b + 1, channels:])
            F.leaky_relu_(stacked[:, channels:], slope)
        else:
            stacked = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        return self.conv2(stacked)
