"""Stage-2 reward ingredients: the good pairs (each keypoint within a threshold of the other's
epipolar line), found densely or by walking the proposal grid along each line, the threshold
scales of ``rescale_thr`` (mean epipolar distances), and the F-error (best-of-K 8-point
estimates of ``F2`` from random sets of good pairs).

Shapes: ``B`` image pairs, ``N``/``M`` keypoints (proposals) of image 1/2, ``K`` trials.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.geometry import (epipolar_distance_matrix, eight_point_design_matrix,
                            eight_point_fundamental, epipolar_lines, normalize_points_hartley,
                            to_homogeneous)

EIGHT = 8  # correspondences per 8-point solve

_FAR = 1e30  # the offset of a line that no pixel is near (rejected keypoints)
_GRID_MARGIN = 1e-2  # pixels added to the walked band, against rounding at its edges
_DISTANCE_ROWS = 1024  # lines per block of the mean-distance sums (bounded memory)


def _scaled_lines(fmat: torch.Tensor, points: torch.Tensor, threshold: float | torch.Tensor,
                  accepted: torch.Tensor | None) -> torch.Tensor:
    """Lines ``F·x̃`` (``B×N×3``) scaled so that ``|l·x̃'| < 1`` ⇔ distance < ``threshold``.

    ``threshold``: pixels, a number or one per batch element (``B``). A degenerate line
    (``l[:2] = 0``) keeps ``point_line_distance``'s clamp; lines of rejected points become
    ``(0, 0, 1e30)``, which no point is near.
    """
    lines = epipolar_lines(fmat, points)
    if torch.is_tensor(threshold):
        threshold = threshold.to(lines)[:, None, None]
    lines = lines / (threshold * lines[..., :2].norm(dim=-1, keepdim=True).clamp(min=1e-8))
    if accepted is not None:
        far = lines.new_tensor([0.0, 0.0, _FAR])
        lines = torch.where(accepted[..., None], lines, far)
    return lines


@torch.no_grad()
def mean_epipolar_distance(fmat: torch.Tensor, points1: torch.Tensor,
                           points2: torch.Tensor) -> torch.Tensor:
    """Mean over all ``N×M`` pairs of the distance of ``points2[j]`` to the line
    ``F·points1[i]`` → ``B`` (pixels of the image of ``points2``; no gradient). Summed in
    blocks of lines, so no ``B×N×M`` tensor is held."""
    total = points1.new_zeros(points1.shape[0])
    for block in points1.split(_DISTANCE_ROWS, dim=1):
        total += epipolar_distance_matrix(fmat, block, points2).sum((1, 2))
    return total / (points1.shape[1] * points2.shape[1])


@torch.no_grad()
def threshold_scales(keypoints1: torch.Tensor, keypoints2: torch.Tensor, fmat1: torch.Tensor,
                     fmat2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rescale_thr``'s scales ``scale1, scale2`` (``B`` each), the original's definition.

    ``m1`` = the mean distance in image 1 of the image-1 keypoints (``B×N×2``) to the lines
    ``F2·x̃2`` of the image-2 keypoints (``B×M×2``) over all ``N×M`` pairs, ``m2`` the same in
    image 2 (``F1·x̃1``); ``scale_k = m_k / min(m1, m2)``, so the image with the smaller mean
    has scale 1. Where ``min(m1, m2)`` is 0 or not finite both scales are 1.
    """
    mean1 = mean_epipolar_distance(fmat2, keypoints2, keypoints1)
    mean2 = mean_epipolar_distance(fmat1, keypoints1, keypoints2)
    low = torch.minimum(mean1, mean2)
    usable = (low > 0) & torch.isfinite(low) & torch.isfinite(mean1) & torch.isfinite(mean2)
    low = torch.where(usable, low, torch.ones_like(low))
    ones = torch.ones_like(low)
    return torch.where(usable, mean1 / low, ones), torch.where(usable, mean2 / low, ones)


def grid_walk_size(threshold: float, grid_size: int, rows: int, cols: int) -> int:
    """Cells :func:`grid_candidates` examines per line: ``max(rows, cols)·R``."""
    return max(rows, cols) * _grid_reach(threshold, grid_size)


def _grid_reach(threshold: float, grid_size: int) -> int:
    """Cell rows (or columns) one step of the walk may touch: the band spans at most
    ``(g − 1)·1 + 2·(√2·threshold + margin)`` across a step of width ``g − 1``."""
    return int((grid_size - 1 + 2 * (2 ** 0.5 * threshold + _GRID_MARGIN)) // grid_size) + 2


def grid_candidates(lines: torch.Tensor, threshold: float, grid_size: int, rows: int,
                    cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells that may hold a point near each scaled line → ``(line, cell)``, two ``C`` longs.

    ``lines B×N×3`` are scaled as by :func:`_scaled_lines` for ``threshold`` (a point is near
    when ``|l·x̃| < 1``); the points are one per ``grid_size`` cell of a ``rows×cols`` grid
    (cells row-major), anywhere inside their cell. ``line`` indexes the flattened ``B·N``
    lines, ``cell`` the cells of that line's image pair. A line closer to horizontal is walked
    column by column: over a column's ``x`` range the band ``|l·x̃| < 1`` spans a bounded ``y``
    interval covering at most ``R`` cell rows; a steeper one is walked row by row. This touches
    ``B·N·max(rows, cols)·R`` cells instead of ``B·N·rows·cols``; the caller tests the
    candidates exactly. Lines that are not finite, of rejected points, or so short that
    ``_scaled_lines`` clamped their norm (points within about ``1e-8 / ‖F‖`` of the epipole,
    whose band would be wider than ``threshold``) give no candidates.
    """
    a, b, c = lines.unbind(-1)  # B×N
    x_major = a.abs() <= b.abs()  # |slope| ≤ 1: walk along x
    along = torch.where(x_major, a, b)[..., None]  # coefficient of the walked coordinate
    across = torch.where(x_major, b, a)[..., None]
    n_steps = torch.where(x_major, cols, rows)[..., None]  # B×N×1
    n_across = torch.where(x_major, rows, cols)[..., None]
    half_width = 1.0 / across.abs()  # ≤ √2·threshold for an unclamped line
    usable = ((half_width <= 2 ** 0.5 * threshold * (1 + 1e-4))
              & torch.isfinite(lines).all(-1, keepdim=True))
    half_width = half_width + _GRID_MARGIN
    reach = _grid_reach(threshold, grid_size)
    n_walk = max(rows, cols)

    step = torch.arange(n_walk, device=lines.device, dtype=lines.dtype)  # D
    start, stop = step * grid_size, step * grid_size + (grid_size - 1)  # walked-coordinate range
    at_start = -(along * start + c[..., None]) / across  # B×N×D: the other coordinate
    at_stop = -(along * stop + c[..., None]) / across
    first = torch.floor((torch.minimum(at_start, at_stop) - half_width) / grid_size)
    last = torch.floor((torch.maximum(at_start, at_stop) + half_width) / grid_size)
    # cell k of a step lies in [first + k, last] ∩ [0, n_across), the step in [0, n_steps)
    first_valid = torch.clamp(first, min=0)
    last_valid = torch.minimum(last, (n_across - 1).to(last.dtype))
    last_valid = torch.where(usable & (step < n_steps), last_valid, first_valid - 1)
    offset = torch.arange(reach, device=lines.device, dtype=lines.dtype)  # R
    valid = (first_valid[..., None] + offset) <= last_valid[..., None]  # B×N×D×R
    flat = torch.nonzero(valid.reshape(-1))[:, 0]  # C, into B·N·D·R
    line = torch.div(flat, n_walk * reach, rounding_mode="floor")
    step_of = torch.div(flat, reach, rounding_mode="floor")  # into B·N·D
    walked = step_of % n_walk
    crossed = first_valid.reshape(-1)[step_of].long() + flat % reach
    cell = torch.where(x_major.reshape(-1)[line], crossed * cols + walked, walked * cols + crossed)
    return line, cell


def good_pairs(keypoints1: torch.Tensor, keypoints2: torch.Tensor, fmat1: torch.Tensor,
               fmat2: torch.Tensor, threshold: float | torch.Tensor,
               accepted1: torch.Tensor | None = None, accepted2: torch.Tensor | None = None,
               grid: tuple[int, int, int] | None = None,
               threshold_in_1: float | torch.Tensor | None = None) -> torch.Tensor:
    """Index list ``G×3`` (``b, i, j``, sorted) of the pairs consistent with the geometry.

    ``(i, j)`` is good when ``x2_j`` is closer than ``threshold`` pixels to the line ``F1·x̃1_i``
    and ``x1_i`` closer than ``threshold_in_1`` (default: ``threshold``) to ``F2·x̃2_j`` (and
    both are accepted, when the ``B×N`` / ``B×M`` masks are given). Thresholds are numbers or
    one per batch element (``B``; then only the dense test runs). Without ``grid`` the first
    test runs densely on
    ``B×N×M``; with ``grid = (grid_size, rows, cols)`` — ``keypoints2`` one per cell of that
    grid, as :func:`sample_keypoints` gives them — only the cells along each line are tested
    (:func:`grid_candidates`). The second test runs on the pairs passing the first. Both ways
    give the same pairs (up to rounding at the threshold) in the same order.
    """
    n_1 = keypoints1.shape[1]
    n_2 = keypoints2.shape[1]
    threshold_in_1 = threshold if threshold_in_1 is None else threshold_in_1
    if torch.is_tensor(threshold) or torch.is_tensor(threshold_in_1):
        grid = None  # the walk's reach is computed for one threshold
    lines_in_2 = _scaled_lines(fmat1, keypoints1, threshold, accepted1)  # B×N×3
    lines_in_1 = _scaled_lines(fmat2, keypoints2, threshold_in_1, accepted2)  # B×M×3
    # flat per-coordinate columns: 1-D gathers are much cheaper than row gathers on a CPU
    a2, b2, c2 = lines_in_2.reshape(-1, 3).T.contiguous()
    a1, b1, c1 = lines_in_1.reshape(-1, 3).T.contiguous()
    x1, y1 = keypoints1.reshape(-1, 2).T.contiguous()
    x2, y2 = keypoints2.reshape(-1, 2).T.contiguous()
    if grid is None:
        near = torch.bmm(lines_in_2, to_homogeneous(keypoints2).transpose(1, 2)).abs_() < 1
        flat = torch.nonzero(near.reshape(-1))[:, 0]  # into B·N·M, sorted
        point1 = torch.div(flat, n_2, rounding_mode="floor")  # into B·N
        point2 = torch.div(point1, n_1, rounding_mode="floor") * n_2 + flat % n_2  # into B·M
    else:
        point1, cell = grid_candidates(lines_in_2, threshold, *grid)
        point2 = torch.div(point1, n_1, rounding_mode="floor") * n_2 + cell
        near = (a2[point1] * x2[point2] + b2[point1] * y2[point2] + c2[point1]).abs() < 1
        point1, point2 = point1[near], point2[near]
    near = (a1[point2] * x1[point1] + b1[point2] * y1[point1] + c1[point2]).abs() < 1
    point1, point2 = point1[near], point2[near]
    pair_b = torch.div(point1, n_1, rounding_mode="floor")
    pairs = torch.stack([pair_b, point1 - pair_b * n_1, point2 - pair_b * n_2], dim=-1)
    if grid is not None:
        # the dense path's (b, i, j) order, so that the F-error draws agree
        pairs = pairs[torch.argsort(point1 * n_2 + pairs[:, 2])]
    return pairs


def good_pair_mask(keypoints1: torch.Tensor, keypoints2: torch.Tensor, fmat1: torch.Tensor,
                   fmat2: torch.Tensor, threshold: float, accepted1: torch.Tensor | None = None,
                   accepted2: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`good_pairs` as a dense ``B×N×M`` bool mask."""
    index = good_pairs(keypoints1, keypoints2, fmat1, fmat2, threshold, accepted1, accepted2)
    mask = torch.zeros(keypoints1.shape[0], keypoints1.shape[1], keypoints2.shape[1],
                       dtype=torch.bool, device=keypoints1.device)
    mask[index.unbind(-1)] = True
    return mask


def draw_index_sets(counts: torch.Tensor, n_trials: int, set_size: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """For each ``counts[b]``, ``n_trials`` uniform random ``set_size``-subsets of
    ``0 .. counts[b]−1`` → ``B×K×set_size`` (long, on the CPU).

    Floyd's algorithm, vectorised over ``B×K`` (a loop over the ``set_size`` positions only):
    the indices within a set are distinct, the sets of different trials independent. (The
    original re-seeds numpy on every call so that all trials use the same 8 points; we
    deliberately draw a different set in each trial.) Rows with ``counts[b] < set_size`` are
    drawn as if ``counts[b] = set_size`` and must be ignored by the caller. The random numbers
    come from ``generator`` (a CPU generator) or the global CPU RNG.
    """
    counts = counts.to("cpu", torch.long).clamp(min=set_size)
    uniform = torch.rand(counts.shape[0], n_trials, set_size, generator=generator,
                         dtype=torch.float64)
    chosen = torch.empty(counts.shape[0], n_trials, set_size, dtype=torch.long)
    for k in range(set_size):
        upper = (counts - set_size + k)[:, None]  # B×1, inclusive bound of this step
        candidate = torch.minimum((uniform[..., k] * (upper + 1)).long(), upper)
        taken = (chosen[..., :k] == candidate[..., None]).any(-1)
        chosen[..., k] = torch.where(taken, upper.expand_as(candidate), candidate)
    return chosen


def fundamental_trial_errors(points1: torch.Tensor, points2: torch.Tensor,
                             fmat2: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 errors ``B×K`` of 8-point estimates from ``B×K×8×2`` sets against ``F2 B×3×3``.

    Each estimate (``x̃1ᵀ·F·x̃2 = 0``, i.e. of ``F2``) is divided by its ``[2, 2]`` entry and
    compared with ``F2`` by ``smooth_l1_loss`` (β = 1, mean over the 9 entries). Solved in
    float64. Trials whose design matrix has rank < 8 (degenerate sets), whose ``[2, 2]`` entry
    vanishes, or whose error is not finite get ``+inf``. (Our 8-point is Hartley-normalised,
    the original's is not: a deliberate difference.)
    """
    x1, x2 = points1.double(), points2.double()
    estimate = eight_point_fundamental(x1, x2)  # B×K×3×3
    # rank of the (normalised) design matrix: a unique null vector needs 8 independent rows
    sing = torch.linalg.svdvals(eight_point_design_matrix(normalize_points_hartley(x1)[0],
                                                          normalize_points_hartley(x2)[0]))
    full_rank = sing[..., -1] > 1e-9 * sing[..., 0]
    corner = estimate[..., 2, 2]
    usable = full_rank & (corner.abs() > 1e-12 * estimate.flatten(-2).norm(dim=-1))
    safe_corner = torch.where(usable, corner, torch.ones_like(corner))
    estimate = estimate / safe_corner[..., None, None]
    target = fmat2.double()[:, None].expand_as(estimate)
    error = F.smooth_l1_loss(estimate, target, reduction="none").flatten(-2).mean(-1)
    usable = usable & torch.isfinite(error)
    return torch.where(usable, error, torch.full_like(error, float("inf")))


def fundamental_error(keypoints1: torch.Tensor, keypoints2: torch.Tensor,
                      good_index: torch.Tensor, fmat2: torch.Tensor, n_trials: int,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-``n_trials`` F-error per image pair from random 8-sets of good pairs.

    keypoints ``B×N×2``, ``B×M×2``; ``good_index G×3`` (``b, i, j``, sorted by ``b`` as
    :func:`good_pairs` / ``torch.nonzero`` give it); ``fmat2 B×3×3``. Returns ``error B``
    (float64, 0 where undefined) and ``has_error B`` (bool): the pair has ≥ 8 good pairs and
    at least one usable trial.
    """
    batch = keypoints1.shape[0]
    counts = torch.bincount(good_index[:, 0], minlength=batch)  # B
    enough = counts >= EIGHT
    zeros = torch.zeros(batch, dtype=torch.float64, device=keypoints1.device)
    if not bool(enough.any()):
        return zeros, torch.zeros_like(enough)
    ranks = draw_index_sets(counts, n_trials, EIGHT, generator).to(good_index.device)  # B×K×8
    offsets = torch.cumsum(counts, 0) - counts
    rows = (offsets[:, None, None] + ranks).clamp(max=good_index.shape[0] - 1)
    pairs = good_index[rows]  # B×K×8×3; rows of pairs without 8 good pairs are ignored below
    batch_index = torch.arange(batch, device=keypoints1.device)[:, None, None]
    errors = fundamental_trial_errors(keypoints1[batch_index, pairs[..., 1]],
                                      keypoints2[batch_index, pairs[..., 2]], fmat2)  # B×K
    best = errors.min(dim=-1).values
    has_error = enough & torch.isfinite(best)
    return torch.where(has_error, best, zeros), has_error
