"""Epipolar line search: where a query's line crosses the image and its best match along it.

Lines are ``a·x + b·y + c = 0`` in pixels; samples and centres are normalised coordinates
(``utils/geometry.py``). ``B`` batch, ``N`` queries, ``L`` samples per line, ``C`` channels.
"""
from __future__ import annotations

import torch

from losses.sampled_correlation import bilinear_taps, sampled_correlation


def line_border_intersections(lines: torch.Tensor, height: int, width: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where lines ``a·x + b·y + c = 0`` (``B×N×3``, pixels) cross the image borders.

    The line is cut with ``x = 0``, ``x = W−1``, ``y = 0``, ``y = H−1``; a cut point counts when
    it lies inside ``[0, W−1]×[0, H−1]`` (a cut with a parallel border is infinite or NaN and
    never counts). The line is valid when exactly two cut points count. A line through a
    corner has two coinciding cuts there, so it is valid only if it touches the image at that
    corner alone (both end points equal). Returns the end points ``B×N×2×2`` (the first two
    counting cuts in the order left, right, top, bottom; zeros where invalid) and ``valid``
    ``B×N``.
    """
    a, b, c = lines.unbind(-1)
    x_max, y_max = width - 1.0, height - 1.0
    zero = torch.zeros_like(a)
    cut_x = torch.stack([zero, zero + x_max, -c / a, -(c + b * y_max) / a], -1)  # B×N×4
    cut_y = torch.stack([-c / b, -(c + a * x_max) / b, zero, zero + y_max], -1)
    inside = (cut_x >= 0) & (cut_x <= x_max) & (cut_y >= 0) & (cut_y <= y_max)
    valid = inside.sum(-1) == 2
    # The first two counting cuts: a stable sort puts them first in border order.
    order = torch.sort((~inside).to(torch.uint8), dim=-1, stable=True).indices[..., :2]
    cuts = torch.stack([cut_x, cut_y], -1)  # B×N×4×2
    ends = torch.gather(cuts, 2, order.unsqueeze(-1).expand(*order.shape, 2))
    ends = torch.where(valid[..., None, None], ends, torch.zeros_like(ends))  # no inf/NaN out
    return ends, valid


def sample_along_lines(ends: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``num_steps`` evenly spaced points from ``ends[..., 0, :]`` to ``ends[..., 1, :]``.

    ends ``B×N×2×2`` → points ``B×N×L×2`` (same units), both end points included.
    """
    steps = torch.linspace(0, 1, num_steps, device=ends.device, dtype=ends.dtype)[:, None]
    start, stop = ends[..., :1, :], ends[..., 1:, :]
    return start + steps * (stop - start)


def line_search_centres(desc1: torch.Tensor, table2: torch.Tensor, map_hw: tuple[int, int],
                        line_points_n: torch.Tensor, use_nn: bool) -> torch.Tensor:
    """Best match of each query along its epipolar line (call without gradient).

    desc1 ``B×N×C``, table2 ``padded_table(map2, temperature)`` of a ``map_hw`` map,
    line_points_n ``B×N×L×2`` (normalised) → centres ``B×N×2`` (normalised). With ``use_nn``
    the original's "nearest" sample: the *sum* of the samples whose probability equals the
    largest (one sample unless there is an exact tie); otherwise the probability-weighted
    mean of the samples. Samples take border padding.
    """
    batch, num, steps = line_points_n.shape[:3]
    rows, weights = bilinear_taps(line_points_n, *map_hw, "border")
    tap_corr = sampled_correlation(desc1.reshape(batch * num, -1), table2,
                                   rows.reshape(batch * num, steps * 4))
    logits = (tap_corr.view(weights.shape) * weights).sum(-1)  # B×N×L
    prob = torch.softmax(logits, dim=-1)
    if use_nn:  # ties are compared on the probabilities, as in the original
        prob = (prob == prob.amax(-1, keepdim=True)).to(prob.dtype)
    return (prob.unsqueeze(-1) * line_points_n).sum(2)
