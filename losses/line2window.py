"""Stage-1 loss of SCFeat: global soft correspondence, epipolar line search and window.

For every query in image 1 the descriptor ``d1`` is matched against image 2 three ways:

* globally, against the descriptors of image 2's own queries (soft-argmax over them);
* along the epipolar line ``F1·x̃1`` (no gradient), whose best sample is the window centre;
* inside a small window around that centre (soft-argmax over a regular grid of samples).

The loss is the pixel distance of the soft correspondences to the epipolar line, weighted by
the inverse spread of the soft-argmax and masked to plausible matches. The direction 2→1 is
the mirror image (``F2``, queries of image 2).

Coordinates follow ``utils/geometry.py``: ``x, y`` pixels, normalised as
``(p - (size-1)/2) / ((size-1)/2)``. ``B`` batch, ``N`` queries of image 1, ``M`` queries of
image 2, ``C`` channels, ``h×w`` feature map, ``L`` samples per line, ``K`` window samples.

Speed: the line and window samples are never materialised as ``…×C`` tensors. Maps are laid
out as a zero-bordered channels-last table (``padded_table``); each query's descriptor is
dotted only with the table rows its bilinear taps touch (a sparse sampled product,
``sampled_correlation``), and the samples interpolate those scalars.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import SCFeatError
from utils.geometry import (denormalize_coords, epipolar_lines, normalize_coords,
                            point_line_distance, sample_features)

# Zero border of the padded table: one cell before, two after (see ``bilinear_cells``).
PAD_BEFORE, PAD_AFTER = 1, 2


# --------------------------------------------------------------------------- queries, global

def temperature_at(epoch: int, base: float, maximum: float) -> float:
    """Softmax temperature ``min(base + epoch, maximum)``."""
    return float(min(base + epoch, maximum))


def draw_queries(batch_size: int, height: int, width: int, grid_size: int,
                 device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniformly drawn point per ``grid_size``×``grid_size`` cell → pixels ``B×N×2``.

    ``N = (height // grid_size)·(width // grid_size)``, cells in row-major order; the point of
    the cell with corner ``(x0, y0)`` lies in ``[x0, x0 + grid_size)×[y0, y0 + grid_size)``.
    """
    rows, cols = height // grid_size, width // grid_size
    if rows == 0 or cols == 0:
        raise SCFeatError(f"grid_size: expected at most the image size {height}x{width}, "
                          f"got {grid_size}")
    ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device),
                            indexing="ij")
    corners = torch.stack([xs, ys], -1).reshape(1, -1, 2).float() * grid_size  # 1×N×2
    jitter = torch.rand(batch_size, rows * cols, 2, device=device, generator=generator)
    return corners + jitter * grid_size


def soft_correspondence(logits: torch.Tensor, coords2_n: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax over candidate points.

    logits ``B×N×M`` (``T·d1·d2ᵀ``), coords2_n ``B×M×2`` (normalised) → expected location
    ``B×N×2`` (normalised) and its spread ``B×N`` (no gradient: it only weights the loss),
    ``Σ_xy sqrt(clamp(E[c²] − E[c]², 1e-6))``.
    """
    prob = torch.softmax(logits, dim=-1)
    mean = prob @ coords2_n
    with torch.no_grad():
        mean_sq = prob @ coords2_n.square()
        std = (mean_sq - mean.square()).clamp(min=1e-6).sqrt().sum(-1)
    return mean, std


# --------------------------------------------------------------------------- epipolar line

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


# --------------------------------------------------------------------------- sparse sampling

def padded_table(feature_map: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``B×C×h×w`` → channels-last table ``(B·(h+3)·(w+3))×C`` of ``T·normalise(map)``.

    Each cell's vector is L2-normalised over channels and scaled by the temperature; a zero
    border (``PAD_BEFORE`` cell before, ``PAD_AFTER`` after, on both axes) makes every tap of
    a clamped sample a real row, so taps need no masks or index clamps.
    """
    channels = feature_map.shape[1]
    table = F.pad(feature_map.permute(0, 2, 3, 1),
                  (0, 0, PAD_BEFORE, PAD_AFTER, PAD_BEFORE, PAD_AFTER)).reshape(-1, channels)
    norm = table.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # F.normalize's eps
    return table * (temperature / norm)


def bilinear_cells(coords_n: torch.Tensor, height: int, width: int, padding_mode: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-left tap and fractions of bilinear samples on an ``h×w`` map.

    coords_n ``…×2`` (normalised) → ``x0, y0`` (int64, in the padded table's grid, i.e. plus
    ``PAD_BEFORE``) and ``fx, fy`` (``…``). As ``grid_sample(align_corners=False)``:
    ``ix = ((x + 1)·w − 1) / 2``. ``"border"`` clamps ``ix`` into ``[0, w−1]`` (border
    values); ``"zeros"`` clamps it into ``[−1, w]``, which keeps every tap that lies outside
    the map on the zero border while leaving the value unchanged (0 outside).
    """
    if padding_mode not in ("zeros", "border"):
        raise ValueError(f"padding_mode must be 'zeros' or 'border', got {padding_mode!r}")
    low = 0.0 if padding_mode == "border" else -1.0
    ix = (((coords_n[..., 0] + 1) * width - 1) / 2).clamp(low, width - 1 - low)
    iy = (((coords_n[..., 1] + 1) * height - 1) / 2).clamp(low, height - 1 - low)
    x0, y0 = ix.floor(), iy.floor()
    return x0.long() + PAD_BEFORE, y0.long() + PAD_BEFORE, ix - x0, iy - y0


def bilinear_weights(fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """Weights ``…×4`` of the taps ``(x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1)``."""
    wx = torch.stack([1 - fx, fx], -1)
    wy = torch.stack([1 - fy, fy], -1)
    return (wy.unsqueeze(-1) * wx.unsqueeze(-2)).flatten(-2)


def tap_offsets(row_length: int, device: torch.device) -> torch.Tensor:
    """Flat offsets ``4`` of the four taps from the top-left one, in rows of ``row_length``."""
    return torch.tensor([0, 1, row_length, row_length + 1], device=device)


def bilinear_taps(coords_n: torch.Tensor, height: int, width: int, padding_mode: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``padded_table`` and weights of bilinear samples.

    coords_n ``B×…×2`` (normalised) on ``h×w`` maps → rows ``B×…×4`` (int64, with the
    batch offset) and weights ``B×…×4``; ``Σ weight·table[row]`` equals
    ``grid_sample(map, coords, align_corners=False, padding_mode=padding_mode)``.
    """
    x0, y0, fx, fy = bilinear_cells(coords_n, height, width, padding_mode)
    row_length = width + PAD_BEFORE + PAD_AFTER
    batch_rows = (height + PAD_BEFORE + PAD_AFTER) * row_length
    batch = torch.arange(coords_n.shape[0], device=coords_n.device) * batch_rows
    corner = y0 * row_length + x0 + batch.view(-1, *([1] * (x0.dim() - 1)))
    return corner.unsqueeze(-1) + tap_offsets(row_length, coords_n.device), \
        bilinear_weights(fx, fy)


def _row_sparse(cols: torch.Tensor, values: torch.Tensor, num_cols: int) -> torch.Tensor:
    """CSR matrix ``R×num_cols`` with ``J`` entries per row at ``cols`` (``R×J``)."""
    num_rows, per_row = cols.shape
    crow = torch.arange(num_rows + 1, device=cols.device) * per_row
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), values, (num_rows, num_cols),
                                       check_invariants=False)


class _SampledCorrelation(torch.autograd.Function):
    """``out[r, j] = desc[r] · table[cols[r, j]]`` (see ``sampled_correlation``)."""

    @staticmethod
    def forward(ctx, desc: torch.Tensor, table: torch.Tensor, cols: torch.Tensor
                ) -> torch.Tensor:
        pattern = _row_sparse(cols, desc.new_ones(cols.numel()), table.shape[0])
        out = torch.sparse.sampled_addmm(pattern, desc, table.t(), beta=0.0)
        ctx.save_for_backward(desc, table, cols)
        return out.values().view(cols.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        desc, table, cols = ctx.saved_tensors
        grad = _row_sparse(cols, grad_out.reshape(-1).contiguous(), table.shape[0])  # R×M
        grad_desc = torch.sparse.mm(grad, table) if ctx.needs_input_grad[0] else None
        grad_table = torch.sparse.mm(grad.t(), desc) if ctx.needs_input_grad[1] else None
        return grad_desc, grad_table, None


def sampled_correlation(desc: torch.Tensor, table: torch.Tensor, cols: torch.Tensor
                        ) -> torch.Tensor:
    """Dot products of each descriptor with a few table rows: ``R×J``.

    desc ``R×C``, table ``M×C``, cols ``R×J`` (int64, ``< M``; repeats allowed) →
    ``desc[r] · table[cols[r, j]]``, differentiable in ``desc`` and ``table``. A sparse
    sampled matrix product: neither the ``R×J×C`` gathered rows nor the dense ``R×M``
    correlation is formed. Tables with fewer rows than ``J`` (tiny maps; the sparse kernel
    rejects rows with more entries than columns) take the dense product instead.
    """
    if cols.shape[1] > table.shape[0]:
        return torch.gather(desc @ table.t(), 1, cols)
    return _SampledCorrelation.apply(desc.contiguous(), table.contiguous(), cols.contiguous())


def line_search_centres(desc1: torch.Tensor, table2: torch.Tensor, map_hw: tuple[int, int],
                        line_points_n: torch.Tensor, use_nn: bool) -> torch.Tensor:
    """Best match of each query along its epipolar line (call without gradient).

    desc1 ``B×N×C``, table2 ``padded_table(map2, temperature)`` of a ``map_hw`` map,
    line_points_n ``B×N×L×2`` (normalised) → centres ``B×N×2`` (normalised): the most likely
    sample (``use_nn``) or the softmax expectation. Samples take border padding.
    """
    batch, num, steps = line_points_n.shape[:3]
    rows, weights = bilinear_taps(line_points_n, *map_hw, "border")
    tap_corr = sampled_correlation(desc1.reshape(batch * num, -1), table2,
                                   rows.reshape(batch * num, steps * 4))
    logits = (tap_corr.view(weights.shape) * weights).sum(-1)  # B×N×L
    if use_nn:  # the softmax keeps the order: no need to compute it
        best = logits.argmax(-1)  # B×N
        return torch.gather(line_points_n, 2, best[..., None, None].expand(batch, num, 1, 2)
                            ).squeeze(2)
    prob = torch.softmax(logits, dim=-1)
    return (prob.unsqueeze(-1) * line_points_n).sum(2)


# --------------------------------------------------------------------------- window

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
    location ``B×N×2`` (normalised) and spread ``B×N``:
    ``Σ_xy sqrt(clamp(E[c²] − E[c]², 1e-10))`` (no gradient: it only weights the loss).
    Samples beyond the border are zero. Each descriptor is dotted once with the small patch
    of cells under its window; the samples interpolate those scalars.
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
    with torch.no_grad():
        mean_sq = (prob.unsqueeze(-1) * coords_n.square()).sum(2)
        std = (mean_sq - location.square()).clamp(min=1e-10).sqrt().sum(-1)
    return location, std


# --------------------------------------------------------------------------- loss weights

def inverse_std_weights(std: torch.Tensor, mask: torch.Tensor, use_std: bool) -> torch.Tensor:
    """Detached per-query weights ``B×N``.

    ``(1/clamp(std, 1e-10)) / its mean`` (or ones without ``use_std``), times the mask, divided
    by ``(its mean + 1e-8)``; every mean is over all ``B×N`` entries.
    """
    std = std.detach()
    if use_std:
        weight = 1.0 / std.clamp(min=1e-10)
        weight = weight / weight.mean()
    else:
        weight = torch.ones_like(std)
    weight = weight * mask.to(weight.dtype)
    return weight / (weight.mean() + 1e-8)


# --------------------------------------------------------------------------- config classes

class Preprocess_Line2Window:  # noqa: N801  (config name)
    """Queries, global soft correspondences, epipolar line search and window correspondences.

    ``__call__(batch, outputs1, outputs2, epoch, queries=None)`` → dict (``B`` pairs, ``N``
    queries per image): ``coord1, coord2`` (queries, pixels ``B×N×2``); ``feat1g_corloc``
    (global correspondence in image 2 of image 1's queries), ``feat2g_corloc``,
    ``feat1w_corloc``, ``feat2w_corloc`` (window correspondences; pixels ``B×N×2``);
    ``feat1g_std, feat2g_std, feat1w_std, feat2w_std`` (``B×N``, normalised units);
    ``valid_epi1, valid_epi2`` (``B×N`` bool); ``epi_line1, epi_line2`` (``B×N×3``, the lines
    ``F1·x̃1`` in image 2 and ``F2·x̃2`` in image 1); ``image_hw`` (``(H, W)``) and
    ``temperature``. ``queries=(query1_n, query2_n)`` (``B×N×2``, normalised) replaces the
    random draw.
    """

    default_conf = {
        "grid_size": 16,
        "window_size": 0.1,
        "line_step": 100,
        "use_nn": True,
        "loc_rand": True,
        "temperature_base": 60,
        "temperature_max": 60,
    }

    def __init__(self, conf: dict):
        self.conf = {**self.default_conf, **conf}
        if int(self.conf["grid_size"]) < 1:
            raise SCFeatError(f"grid_size: expected a positive integer (pixels per query "
                              f"cell), got {self.conf['grid_size']!r}")
        if int(self.conf["line_step"]) < 2:
            raise SCFeatError(f"line_step: expected an integer of at least 2 (samples per "
                              f"epipolar line), got {self.conf['line_step']!r}")
        if not 0 < float(self.conf["window_size"]) <= 1:
            raise SCFeatError(f"window_size: expected a value in (0, 1] (normalised half-width "
                              f"of the window), got {self.conf['window_size']!r}")

    def temperature(self, epoch: int) -> float:
        """``min(temperature_base + epoch, temperature_max)``."""
        return temperature_at(epoch, self.conf["temperature_base"], self.conf["temperature_max"])

    def _direction(self, desc1: torch.Tensor, coords1: torch.Tensor, global_logits: torch.Tensor,
                   coords2_n: torch.Tensor, map2: torch.Tensor, fmat: torch.Tensor,
                   image_hw: tuple[int, int], temperature: float) -> dict:
        """Matches of image 1's queries in image 2 (``map2``: ``B×C×h×w`` local map)."""
        height, width = image_hw
        global_n, global_std = soft_correspondence(global_logits, coords2_n)
        map_hw = tuple(map2.shape[-2:])
        table2 = padded_table(map2, temperature)  # rows of T·normalise(map2)
        lines = epipolar_lines(fmat, coords1)  # B×N×3, in image 2
        with torch.no_grad():
            ends, valid = line_border_intersections(lines, height, width)
            line_points_n = normalize_coords(sample_along_lines(ends, self.conf["line_step"]),
                                             height, width)
            centres_n = line_search_centres(desc1.detach(), table2.detach(), map_hw,
                                            line_points_n, self.conf["use_nn"])
            if self.conf["loc_rand"]:
                jitter = torch.rand_like(centres_n) * 2 - 1
                centres_n = centres_n + jitter * 0.707 * self.conf["window_size"]
            valid = valid & (centres_n.abs() <= 1).all(-1)
        offsets = window_offsets(self.conf["window_size"], *map_hw,
                                 device=map2.device).to(map2.dtype)
        window_n, window_std = window_correspondence(desc1, table2, map_hw, centres_n, offsets,
                                                     self.conf["window_size"])
        return {"g_corloc": denormalize_coords(global_n, height, width), "g_std": global_std,
                "w_corloc": denormalize_coords(window_n, height, width), "w_std": window_std,
                "valid_epi": valid, "epi_line": lines}

    def __call__(self, batch: dict, outputs1: dict, outputs2: dict, epoch: int,
                 queries: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        map1, map2 = outputs1["local_map"], outputs2["local_map"]
        height, width = (int(size) for size in batch["im1"].shape[-2:])
        if queries is None:
            queries = tuple(normalize_coords(
                draw_queries(map1.shape[0], height, width, self.conf["grid_size"],
                             device=map1.device), height, width) for _ in range(2))
        query1_n, query2_n = (query.to(map1.dtype) for query in queries)
        coords1 = denormalize_coords(query1_n, height, width)
        coords2 = denormalize_coords(query2_n, height, width)
        desc1 = sample_features(map1, query1_n)  # B×N×C, L2-normalised
        desc2 = sample_features(map2, query2_n)
        temperature = self.temperature(epoch)
        logits = temperature * (desc1 @ desc2.transpose(1, 2))  # B×N×M, both directions
        one = self._direction(desc1, coords1, logits, query2_n, map2, batch["F1"],
                              (height, width), temperature)
        two = self._direction(desc2, coords2, logits.transpose(1, 2), query1_n, map1,
                              batch["F2"], (height, width), temperature)
        processed = {"coord1": coords1, "coord2": coords2, "image_hw": (height, width),
                     "temperature": temperature}
        for index, result in (("1", one), ("2", two)):
            for key, value in result.items():
                name = f"{key}{index}" if key in ("valid_epi", "epi_line") else f"feat{index}{key}"
                processed[name] = value
        return processed


class EpipolarLoss_Line2Window(nn.Module):  # noqa: N801  (config name)
    """Weighted epipolar distance of the global and window correspondences (both directions).

    ``forward(batch, outputs1, outputs2, processed, epoch)`` → ``(loss, components)``,
    components ``loss_g1, loss_w1, loss_g2, loss_w2, percent_g, percent_w`` (scalars;
    ``percent_*`` the fraction of kept queries over both directions).
    """

    needs_detector = False
    default_conf = {
        "grid_cost_thr": 0.5,
        "win_cost_thr": 0.1,
        "use_std_as_weight": True,
        "weight_grid": 0.0,
        "weight_window": 1.0,
    }

    def __init__(self, conf: dict):
        super().__init__()
        self.conf = {**self.default_conf, **conf}
        for key in ("grid_cost_thr", "win_cost_thr"):
            if not float(self.conf[key]) > 0:
                raise SCFeatError(f"{key}: expected a positive fraction of the shorter image "
                                  f"side, got {self.conf[key]!r}")

    def _term(self, cost: torch.Tensor, std: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight = inverse_std_weights(std, mask, self.conf["use_std_as_weight"])
        return (weight * cost).mean()

    def forward(self, batch: dict, outputs1: dict, outputs2: dict, processed: dict,
                epoch: int) -> tuple[torch.Tensor, dict]:
        shorter = min(processed["image_hw"])
        components, masks_g, masks_w = {}, [], []
        for index in ("1", "2"):
            lines, valid = processed[f"epi_line{index}"], processed[f"valid_epi{index}"]
            corloc_g = processed[f"feat{index}g_corloc"]
            corloc_w = processed[f"feat{index}w_corloc"]
            # A term weighted 0 is only logged: skip its backward.
            if self.conf["weight_grid"] == 0:
                corloc_g = corloc_g.detach()
            if self.conf["weight_window"] == 0:
                corloc_w = corloc_w.detach()
            cost_g = point_line_distance(lines, corloc_g)  # B×N, pixels
            cost_w = point_line_distance(lines, corloc_w)
            mask_g = (cost_g.detach() < self.conf["grid_cost_thr"] * shorter) & valid
            mask_w = (cost_w.detach() < self.conf["win_cost_thr"] * shorter) & valid
            components[f"loss_g{index}"] = self._term(cost_g, processed[f"feat{index}g_std"],
                                                      mask_g)
            components[f"loss_w{index}"] = self._term(cost_w, processed[f"feat{index}w_std"],
                                                      mask_w)
            masks_g.append(mask_g)
            masks_w.append(mask_w)
        components["percent_g"] = torch.stack(masks_g).float().mean()
        components["percent_w"] = torch.stack(masks_w).float().mean()
        loss = (self.conf["weight_grid"] * (components["loss_g1"] + components["loss_g2"])
                + self.conf["weight_window"] * (components["loss_w1"] + components["loss_w2"]))
        return loss, components
