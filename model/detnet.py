"""The detection network with peakiness measurements (config name ``DetNet``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import blocks, workspace
from model.blocks import conv3x3_add_, cpu_inference_path, instance_norm_, lowres_conv_path
from model.instance_norm import normalize_activate_, normalize_activate_project
from model.lowres_conv import upsample_conv3x3, upsample_conv3x3_into
from model.profiling import region


def peakiness(x: torch.Tensor) -> torch.Tensor:
    """Peakiness score ``B×1×H×W`` of a ``B×C×H×W`` map.

    ``x`` is divided by its per-sample maximum; ``α = softplus(x − avgpool3×3(x))`` (reflect
    padding) measures spatial peakiness, ``β = softplus(x − mean_c(x))`` channel peakiness, and
    the score is the maximum of ``α·β`` over channels.
    """
    x = x / x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    alpha = F.softplus(x - local_mean3x3(x))
    beta = F.softplus(x - x.mean(dim=1, keepdim=True))
    return (alpha * beta).max(dim=1, keepdim=True).values


def local_mean3x3(x: torch.Tensor) -> torch.Tensor:
    """``avg_pool2d(pad(x, 1, reflect), 3, stride=1)``; on the CPU inference path
    (:func:`model.blocks.cpu_inference_path`) as the sums of three shifted rows, then of three
    shifted columns (the same sum in another order: PyTorch's channels-first 3×3 average pool
    is several times slower than these passes)."""
    padded = F.pad(x, [1, 1, 1, 1], mode="reflect")
    if not cpu_inference_path(x):
        return F.avg_pool2d(padded, 3, stride=1)
    rows = padded[..., :-2] + padded[..., 1:-1]
    rows += padded[..., 2:]
    out = rows[..., :-2, :] + rows[..., 1:-1, :]
    out += rows[..., 2:, :]
    return out.div_(9)


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
        with region("peakiness"):
            p_f = peakiness(features)
            p_i = peakiness(image) if self.with_image else None
        with region("conv1"):
            f = self.relu(F.instance_norm(self.conv1(p_f * features)))
        g = None
        if self.with_image:
            with region("convimg"):
                g = self.relu(F.instance_norm(self.convimg(p_i * image)))
        with region("conv2"):
            h = self.conv2_upsampled(f, size, g)
        with region("conv3"):
            s = self.conv3(self.relu(F.instance_norm(h)))
        with region("score"):
            score = F.interpolate(p_f, size=size, mode="bilinear", align_corners=False)
            score = score * F.softplus(F.instance_norm(s))
            return score * p_i if self.with_image else score

    def conv2_upsampled(self, f: torch.Tensor, size: tuple[int, int], g: torch.Tensor | None
                        ) -> torch.Tensor:
        """``conv2(cat([up(f), g]))`` (``up``: bilinear to ``size``, align_corners=False), the
        ``up(f)`` part computed at ``f``'s resolution where :func:`model.blocks.lowres_conv_path`
        allows it (:func:`model.lowres_conv.upsample_conv3x3`): ``f`` ``B×C×h×w``, ``g``
        ``B×64×H×W`` or ``None`` → ``B×128×H×W``."""
        if not lowres_conv_path(f):
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            return self.conv2(f if g is None else torch.cat([f, g], dim=1))
        weight, bias = self.conv2.weight, self.conv2.bias
        channels = f.shape[1]
        if g is None:
            return upsample_conv3x3(f, weight, bias, size, False, blocks.LOWRES_CHUNK)
        up = upsample_conv3x3(f, weight[:, :channels], None, size, False, blocks.LOWRES_CHUNK)
        return F.conv2d(g, weight[:, channels:], bias, padding=1) + up

    def forward_inference(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` without autograd, with fewer full-resolution passes and allocations
        (PReLUs with a single slope as ``leaky_relu``). With the low-resolution rewrite and
        channels-last maps (:data:`model.blocks.LOWRES_CONV`, :data:`model.blocks.CHANNELS_LAST`)
        see :meth:`full_resolution_channels_last`. Otherwise instance norms and PReLUs run in
        place, ``conv2`` is :meth:`conv2_upsampled` and ``conv3`` (1×1 to one channel) a
        matrix product. Equal to :meth:`forward` up to float32 rounding."""
        slope = float(self.relu.weight)
        size = image.shape[-2:] if self.with_image else tuple(4 * s for s in features.shape[-2:])
        with region("peakiness"):
            p_f = peakiness(features)
            p_i = peakiness(image) if self.with_image else None
            image = p_i * image if self.with_image else None
        if lowres_conv_path(features) and blocks.CHANNELS_LAST:
            with region("conv1"):
                f = self.conv1((p_f * features).contiguous(memory_format=torch.channels_last))
                f = normalize_activate_(f.contiguous(memory_format=torch.channels_last), slope)
            s = self.full_resolution_channels_last(f, image, size, slope)
        else:
            with region("conv1"):
                f = F.leaky_relu_(instance_norm_(self.conv1(p_f * features).contiguous()), slope)
            g = None
            if self.with_image:
                with region("convimg"):
                    g = F.leaky_relu_(instance_norm_(self.convimg(image).contiguous()), slope)
            with region("conv2"):
                h = self.conv2_upsampled(f, size, g)
                del f, g
            with region("conv3"):
                h = F.leaky_relu_(instance_norm_(h.contiguous()), slope)
                s = torch.matmul(self.conv3.weight.view(1, -1), h.flatten(2)).view(-1, 1, *size)
                del h
        with region("score"):
            s = s.add_(self.conv3.bias.view(1, -1, 1, 1))
            score = F.interpolate(p_f, size=size, mode="bilinear", align_corners=False)
            score = score.mul_(F.softplus(instance_norm_(s)))
            return score.mul_(p_i) if self.with_image else score

    def full_resolution_channels_last(self, f: torch.Tensor, image: torch.Tensor | None,
                                      size: tuple[int, int], slope: float) -> torch.Tensor:
        """``conv3(PReLU(IN(conv2([up(f), PReLU(IN(convimg(image)))]))))`` without its bias,
        ``B×1×H×W``, every full-resolution map channels-last (oneDNN's direct convolutions
        run near the GEMM's speed on them, and a pixel's channels are contiguous for the
        products below) and in reused memory (:mod:`model.workspace`): ``conv2``'s ``up(f)``
        part computed from ``f``'s resolution into ``h``
        (:func:`model.lowres_conv.upsample_conv3x3_into`), ``g`` normalised in place
        (:func:`model.instance_norm.normalize_activate_`), ``conv2``'s ``g`` part with its bias
        added into ``h`` by the convolution itself, then ``h`` normalised, activated and
        projected by ``conv3`` band by band
        (:func:`model.instance_norm.normalize_activate_project`)."""
        channels = f.shape[1]
        weight, bias = self.conv2.weight, self.conv2.bias
        h = workspace.buffer("h", (f.shape[0], weight.shape[0], *size), f, channels_last=True)
        with region("conv2_up"):
            upsample_conv3x3_into(h, f, weight[:, :channels], False,
                                  blocks.LOWRES_CHANNELS_LAST_CHUNK)
        if image is None:
            h += bias.view(1, -1, 1, 1)
        else:
            with region("convimg"):
                g = workspace.buffer("g", (f.shape[0], self.convimg.out_channels, *size), f,
                                     channels_last=True)
                g = conv3x3_add_(g.zero_(), image.contiguous(memory_format=torch.channels_last),
                                 self.convimg)
                normalize_activate_(g, slope)
            with region("conv2"):
                weight_g = weight[:, channels:].contiguous(memory_format=torch.channels_last)
                conv3x3_add_(h, g, self.conv2, weight_g)
        with region("conv3"):
            return normalize_activate_project(h, slope, self.conv3.weight)
