"""Soft-argmax of a descriptor over a small window of samples around a centre.

``B`` batch, ``N`` queries, ``K`` window samples, ``C`` channels; normalised coordinates.
"""
from __future__ import annotations

import math

import torch

from losses.sampled_correlation import (PAD_AFTER, PAD_BEFORE, bilinear_cells, bilinear_weights,
                                        sampled_correlation, tap_offsets)
from losses.soft_argmax import soft_spread


def window_offsets(window_size: float, feat_height: int, feat_width: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Regular grid of normalised offsets spanning ``±window_size`` → ``K×2`` (``x, y``).

    ``int(window_size·h_f)`` rows × ``int(window_size·w_f)`` columns (at least 1 each), laid out
    with ``torch.linspace(-window_size, window_size, n)`` per axis, rows outer.
    """
    rows = max(int(window_size * feat_height), 1)
    cols = max(int(window_size * feat_width), 1)
    ys = torch.linspace(-window_size, window_size, rows, device=device)
    xs = torch.linspace(-window_size, window_size, cols, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], -1).reshape(-1, 2)


def window_patch_size(window_size: float, size: int) -> int:
    """Cells per axis of a patch that holds every tap of a window: ``⌊ws·size⌋ + 3``.

    The samples span ``s = window_size·size`` cells, so their floors differ by at most
    ``⌊s⌋ + 1`` (with float rounding margin) and the second tap adds a cell. Capped at the
    padded map size.
    """
    return min(int(math.floor(window_size * size + 1e-3)) + 3, size + PAD_BEFORE + PAD_AFTER)


def window_correspondence(desc1: torch.Tensor, table2: torch.Tensor, map_hw: tuple[int, int],
                          centres_n: torch.Tensor, offsets: torch.Tensor, window_size: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax of ``desc1`` over a window of samples around ``centres_n``.

    desc1 ``B×N×C``, table2 ``padded_table(map2, temperature)`` of a ``map_hw`` map,
    centres_n ``B×N×2``, offsets ``K×2`` (``window_offsets(window_size, h, w)``) → expected
    location ``B×N×2`` (normalised) and spread ``B×N`` (``soft_spread`` with the original's
    floor 1e-10 on the variance; no gradient: it only weights the loss). Samples beyond the
    border are zero. Each descriptor is dotted once with the small patch of cells under its
    window; the samples interpolate those scalars.
    """
    batch, num = centres_n.shape[:2]
    height, width = map_hw
    row_length = width + PAD_BEFORE + PAD_AFTER
    batch_rows = (height + PAD_BEFORE + PAD_AFTER) * row_length
    coords_n = centres_n.unsqueeze(2) + offsets  # B×N×K×2
    x0, y0, fx, fy = bilinear_cells(coords_n, height, width, "zeros")  # B×N×K
    patch_h = window_patch_size(window_size, height)
    patch_w = window_patch_size(window_size, width)
    # Patch corner: the smallest tap, moved back so the patch stays inside the padded map.
    corner_x = x0.amin(-1, keepdim=True).clamp(max=row_length - patch_w)  # B×N×1
    corner_y = y0.amin(-1, keepdim=True).clamp(max=height + PAD_BEFORE + PAD_AFTER - patch_h)
    batch_start = torch.arange(batch, device=x0.device).view(-1, 1, 1) * batch_rows
    in_patch = (torch.arange(patch_h, device=x0.device).view(-1, 1) * row_length
                + torch.arange(patch_w, device=x0.device)).view(1, 1, -1)
    cells = batch_start + corner_y * row_length + corner_x + in_patch  # B×N×P
    taps = ((y0 - corner_y) * patch_w + (x0 - corner_x)).unsqueeze(-1) \
        + tap_offsets(patch_w, x0.device)  # B×N×K×4, positions in the patch
    patch_corr = sampled_correlation(desc1.reshape(batch * num, -1), table2,
                                     cells.reshape(batch * num, -1)).view(batch, num, -1)
    tap_corr = torch.gather(patch_corr, 2, taps.reshape(batch, num, -1)).view(*taps.shape)
    logits = (tap_corr * bilinear_weights(fx, fy)).sum(-1)  # B×N×K
    prob = torch.softmax(logits, dim=-1)
    location = (prob.unsqueeze(-1) * coords_n).sum(2)
    return location, soft_spread(prob, coords_n, location.detach(), 1e-10)
