"""Instance normalisation of channels-last maps, for the detector's full-resolution layers
without autograd.

A channels-last ``B×C×H×W`` map is, per sample, an ``(H·W)×C`` matrix with the channels
contiguous. The statistics are those of ``F.instance_norm`` (per sample and channel, biased
variance, ``eps`` inside the square root), computed in one pass over memory, band by band: a
band of rows stays in the cache while its mean is taken and its values, centred on that mean,
are summed (which corrects the float32 mean) and squared and summed; the bands' means and
second moments are then combined in float64 (Chan, Golub and LeVeque's pairwise update).
PyTorch's own channels-last batch norm sums each channel sequentially in float32, which at
480×640 errs by ~1e-4 of the normalised values, against ~1e-6 for this and for the
channels-first kernel.

The normalisation is then applied band by band as well, with what follows it fused in the
same pass over memory: :func:`normalize_activate_` (in place, then leaky ReLU) and
:func:`normalize_activate_project` (leaky ReLU, then a 1×1 convolution to one channel, so the
normalised map is never written).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import model.fast.workspace as workspace

# rows × channels per band: 4 MiB of float32, half of it per thread on two cores, so that a
# band read from memory stays in the cache (2 MiB of L2 per core on the AMD EPYC host of
# docs/performance.md) for the passes that follow (centring, sums, squares; leaky ReLU and
# the projection). Larger bands make fewer operations but every pass after the first goes to
# memory: 64 MiB bands took twice the time (statistics of the detector's 128-channel map at
# 480×640, one thread: 65 ms against 29). The band's temporary is in reused memory
# (model/fast/workspace.py).
BAND_ELEMENTS = 1 << 20


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Sample ``n`` of a channels-last ``B×C×H×W`` map as an ``(H·W)×C`` view."""
    if not x.permute(0, 2, 3, 1).is_contiguous():
        raise ValueError("expected a channels-last map")
    return x[n].permute(1, 2, 0).reshape(-1, x.shape[1])


def _bands(rows: int, channels: int) -> tuple[range, int]:
    step = max(1, BAND_ELEMENTS // max(channels, 1))
    return range(0, rows, step), step


def _scratch(rows: torch.Tensor, step: int) -> torch.Tensor:
    """Memory for one band of ``rows`` (:mod:`model.fast.workspace`)."""
    return workspace.buffer("band", (min(step, rows.shape[0]), rows.shape[1]), rows)


def instance_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``1/√(var + eps)`` (``B×C`` each, ``x``'s dtype) of a channels-last
    ``B×C×H×W`` map over ``H×W``, per sample and channel (biased variance)."""
    batch, channels = x.shape[:2]
    means, rstds = [], []
    for n in range(batch):
        rows = _rows(x, n)
        starts, step = _bands(rows.shape[0], channels)
        scratch = _scratch(rows, step)
        # per band: its float32 mean, the centred values' sum (the mean's rounding error, from
        # small numbers) and sum of squares
        sums = x.new_empty(3, len(starts), channels)
        counts = torch.tensor([min(step, rows.shape[0] - s) for s in starts], dtype=torch.float64,
                              device=x.device)[:, None]
        for i, start in enumerate(starts):
            band = rows[start:start + step]
            torch.sum(band, dim=0, out=sums[0, i]).div_(band.shape[0])
            centred = torch.sub(band, sums[0, i], out=scratch[:band.shape[0]])
            torch.sum(centred, dim=0, out=sums[1, i])
            torch.sum(centred.mul_(centred), dim=0, out=sums[2, i])
        band_means, residual, squares = sums.double()
        band_means = band_means + residual / counts
        # Chan et al.: the bands' second moments plus the spread of their means
        mean = (counts * band_means).sum(dim=0) / rows.shape[0]
        second = (squares - residual * residual / counts + counts * (band_means - mean) ** 2).sum(0)
        means.append(mean.to(x.dtype))
        rstds.append(torch.rsqrt(second / rows.shape[0] + eps).to(x.dtype))
    return torch.stack(means), torch.stack(rstds)


def normalize_activate_(x: torch.Tensor, slope: float, eps: float = 1e-5) -> torch.Tensor:
    """``leaky_relu(instance_norm(x), slope)`` in place on a channels-last ``B×C×H×W`` map."""
    mean, rstd = instance_stats(x, eps)
    for n in range(x.shape[0]):
        rows = _rows(x, n)
        starts, step = _bands(rows.shape[0], x.shape[1])
        for start in starts:
            band = rows[start:start + step]
            F.leaky_relu_(band.sub_(mean[n]).mul_(rstd[n]), slope)
    return x


def normalize_activate_project(x: torch.Tensor, slope: float, weight: torch.Tensor,
                               eps: float = 1e-5) -> torch.Tensor:
    """``conv1x1(leaky_relu(instance_norm(x), slope), weight)`` (no bias) for a channels-last
    ``B×C×H×W`` map and a ``1×C×1×1`` weight → ``B×1×H×W``, without writing the normalised
    map (each band is normalised in a temporary and projected at once)."""
    batch, channels, height, width = x.shape
    mean, rstd = instance_stats(x, eps)
    out = x.new_empty(batch, height * width)
    for n in range(batch):
        # leaky_relu(a·r) = r·leaky_relu(a) for r > 0: the scale goes into the weights
        vector = (weight.reshape(channels) * rstd[n]).view(channels, 1)
        rows = _rows(x, n)
        starts, step = _bands(rows.shape[0], channels)
        scratch = _scratch(rows, step)
        for start in starts:
            band = rows[start:start + step]
            band = F.leaky_relu_(torch.sub(band, mean[n], out=scratch[:band.shape[0]]), slope)
            torch.mm(band, vector, out=out[n, start:start + step, None])
    return out.view(batch, 1, height, width)
