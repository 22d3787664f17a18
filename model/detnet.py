"""The detection network with peakiness measurements (config name ``DetNet``)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def peakiness(x: torch.Tensor, local_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
    """Peakiness score ``B×1×H×W`` of a ``B×C×H×W`` map.

    ``x`` is divided by its per-sample maximum; ``α = softplus(x − avgpool3×3(x))`` (reflect
    padding) measures spatial peakiness, ``β = softplus(x − mean_c(x))`` channel peakiness, and
    the score is the maximum of ``α·β`` over channels. ``local_mean``: another form of that
    3×3 mean (default :func:`local_mean3x3`).
    """
    x = x / x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    alpha = F.softplus(x - (local_mean or local_mean3x3)(x))
    beta = F.softplus(x - x.mean(dim=1, keepdim=True))
    return (alpha * beta).max(dim=1, keepdim=True).values


def local_mean3x3(x: torch.Tensor) -> torch.Tensor:
    """``avg_pool2d(pad(x, 1, reflect), 3, stride=1)``."""
    return F.avg_pool2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), 3, stride=1)


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
    ops = None  # a model.fast.FastOps (its rewrites first), or None: the composition below

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
        if self.ops is not None and (score := self.ops.detnet(self, features, image)) is not None:
            return score
        size = image.shape[-2:] if image is not None else tuple(4 * s for s in features.shape[-2:])
        p_f = peakiness(features)
        f = self.relu(F.instance_norm(self.conv1(p_f * features)))
        f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        if self.with_image:
            p_i = peakiness(image)
            g = self.relu(F.instance_norm(self.convimg(p_i * image)))
            f = torch.cat([f, g], dim=1)
        s = self.conv3(self.relu(F.instance_norm(self.conv2(f))))
        score = F.interpolate(p_f, size=size, mode="bilinear", align_corners=False)
        score = score * F.softplus(F.instance_norm(s))
        return score * p_i if self.with_image else score
