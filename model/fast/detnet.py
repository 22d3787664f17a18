"""The detector's rewrites (:class:`model.detnet.DetNet`): ``conv2`` on ``up(f)`` computed at
``f``'s resolution (also under autograd), and without autograd fewer full-resolution passes
and allocations: the single-slope PReLU as ``leaky_relu``, instance norms in place, the 3×3
mean of the peakiness as shifted sums, ``conv3`` (1×1 to one channel) as a matrix product and,
with channels-last maps, the full-resolution layers in reused memory. Equal to the reference
forward up to float32 rounding."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.detnet import peakiness
import model.fast.workspace as workspace
from model.fast.fused import conv3x3_add_, instance_norm_
from model.fast.instance_norm import normalize_activate_, normalize_activate_project
from model.fast.lowres_conv import upsample_conv3x3, upsample_conv3x3_into
from model.fast.profiling import region


def forward(ops, det: nn.Module, features: torch.Tensor, image: torch.Tensor | None
            ) -> torch.Tensor | None:
    """``det(features, image)`` by the rewrites ``ops`` (a :class:`model.fast.FastOps`)
    allows on ``features``, or ``None`` where none applies."""
    if ops.cpu_inference_path(features):
        return forward_inference(ops, det, features, image)
    if ops.lowres_conv_path(features):
        return forward_lowres(ops, det, features, image)
    return None


def shifted_sums_mean3x3(x: torch.Tensor) -> torch.Tensor:
    """``avg_pool2d(pad(x, 1, reflect), 3, stride=1)`` as the sums of three shifted rows, then
    of three shifted columns (the same sum in another order, faster on the CPU than PyTorch's
    channels-first 3×3 average pool)."""
    padded = F.pad(x, [1, 1, 1, 1], mode="reflect")
    rows = padded[..., :-2] + padded[..., 1:-1]
    rows += padded[..., 2:]
    out = rows[..., :-2, :] + rows[..., 1:-1, :]
    out += rows[..., 2:, :]
    return out.div_(9)


def output_size(det: nn.Module, features: torch.Tensor, image: torch.Tensor | None):
    return image.shape[-2:] if det.with_image else tuple(4 * s for s in features.shape[-2:])


def conv2_upsampled(ops, det: nn.Module, f: torch.Tensor, size: tuple[int, int],
                    g: torch.Tensor | None) -> torch.Tensor:
    """``conv2(cat([up(f), g]))`` (``up``: bilinear to ``size``, align_corners=False), the
    ``up(f)`` part computed at ``f``'s resolution where ``ops.lowres_conv_path`` allows it
    (:func:`model.fast.lowres_conv.upsample_conv3x3`): ``f`` ``B×C×h×w``, ``g`` ``B×64×H×W``
    or ``None`` → ``B×128×H×W``."""
    if not ops.lowres_conv_path(f):
        f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        return det.conv2(f if g is None else torch.cat([f, g], dim=1))
    weight, bias = det.conv2.weight, det.conv2.bias
    channels = f.shape[1]
    chunk = ops.lowres_chunk_for(f, det.conv2)
    if g is None:
        return upsample_conv3x3(f, weight, bias, size, False, chunk)
    up = upsample_conv3x3(f, weight[:, :channels], None, size, False, chunk)
    return F.conv2d(g, weight[:, channels:], bias, padding=1) + up


def forward_lowres(ops, det: nn.Module, features: torch.Tensor, image: torch.Tensor | None
                   ) -> torch.Tensor:
    """The reference forward with ``conv2`` by :func:`conv2_upsampled` (autograd may be on)."""
    size = output_size(det, features, image)
    with region("peakiness"):
        p_f = peakiness(features)
        p_i = peakiness(image) if det.with_image else None
    with region("conv1"):
        f = det.relu(F.instance_norm(det.conv1(p_f * features)))
    g = None
    if det.with_image:
        with region("convimg"):
            g = det.relu(F.instance_norm(det.convimg(p_i * image)))
    with region("conv2"):
        h = conv2_upsampled(ops, det, f, size, g)
    with region("conv3"):
        s = det.conv3(det.relu(F.instance_norm(h)))
    with region("score"):
        score = F.interpolate(p_f, size=size, mode="bilinear", align_corners=False)
        score = score * F.softplus(F.instance_norm(s))
        return score * p_i if det.with_image else score


def forward_inference(ops, det: nn.Module, features: torch.Tensor, image: torch.Tensor | None
                      ) -> torch.Tensor:
    """The forward without autograd. With the low-resolution rewrite and channels-last maps
    see :func:`full_resolution_channels_last`; otherwise instance norms and PReLUs run in
    place, ``conv2`` is :func:`conv2_upsampled` and ``conv3`` a matrix product."""
    slope = float(det.relu.weight)  # DetNet's PReLU has a single slope
    size = output_size(det, features, image)
    with region("peakiness"):
        p_f = peakiness(features, shifted_sums_mean3x3)
        p_i = peakiness(image, shifted_sums_mean3x3) if det.with_image else None
        image = p_i * image if det.with_image else None
    if ops.lowres_conv_path(features) and ops.channels_last:
        with region("conv1"):
            f = det.conv1((p_f * features).contiguous(memory_format=torch.channels_last))
            f = normalize_activate_(f.contiguous(memory_format=torch.channels_last), slope)
        s = full_resolution_channels_last(ops, det, f, image, size, slope)
    else:
        with region("conv1"):
            f = F.leaky_relu_(instance_norm_(det.conv1(p_f * features).contiguous()), slope)
        g = None
        if det.with_image:
            with region("convimg"):
                g = F.leaky_relu_(instance_norm_(det.convimg(image).contiguous()), slope)
        with region("conv2"):
            h = conv2_upsampled(ops, det, f, size, g)
            del f, g
        with region("conv3"):
            h = F.leaky_relu_(instance_norm_(h.contiguous()), slope)
            s = torch.matmul(det.conv3.weight.view(1, -1), h.flatten(2)).view(-1, 1, *size)
            del h
    with region("score"):
        s = s.add_(det.conv3.bias.view(1, -1, 1, 1))
        score = F.interpolate(p_f, size=size, mode="bilinear", align_corners=False)
        score = score.mul_(F.softplus(instance_norm_(s)))
        return score.mul_(p_i) if det.with_image else score


def full_resolution_channels_last(ops, det: nn.Module, f: torch.Tensor,
                                  image: torch.Tensor | None, size: tuple[int, int],
                                  slope: float) -> torch.Tensor:
    """``conv3(PReLU(IN(conv2([up(f), PReLU(IN(convimg(image)))]))))`` without its bias,
    ``B×1×H×W``, every full-resolution map channels-last (oneDNN's direct convolutions run
    near the GEMM's speed on them, and a pixel's channels are contiguous for the products
    below) and in reused memory (:mod:`model.fast.workspace`): ``conv2``'s ``up(f)`` part
    computed from ``f``'s resolution into ``h``
    (:func:`model.fast.lowres_conv.upsample_conv3x3_into`), ``g`` normalised in place
    (:func:`model.fast.instance_norm.normalize_activate_`), ``conv2``'s ``g`` part with its
    bias added into ``h`` by the convolution itself, then ``h`` normalised, activated and
    projected by ``conv3`` band by band
    (:func:`model.fast.instance_norm.normalize_activate_project`)."""
    channels = f.shape[1]
    weight, bias = det.conv2.weight, det.conv2.bias
    h = workspace.buffer("h", (f.shape[0], weight.shape[0], *size), f, channels_last=True)
    with region("conv2_up"):
        upsample_conv3x3_into(h, f, weight[:, :channels], False, ops.lowres_channels_last_chunk)
    if image is None:
        h += bias.view(1, -1, 1, 1)
    else:
        with region("convimg"):
            g = workspace.buffer("g", (f.shape[0], det.convimg.out_channels, *size), f,
                                 channels_last=True)
            g = conv3x3_add_(g.zero_(), image.contiguous(memory_format=torch.channels_last),
                             det.convimg)
            normalize_activate_(g, slope)
        with region("conv2"):
            weight_g = weight[:, channels:].contiguous(memory_format=torch.channels_last)
            conv3x3_add_(h, g, det.conv2, weight_g)
    with region("conv3"):
        return normalize_activate_project(h, slope, det.conv3.weight)
