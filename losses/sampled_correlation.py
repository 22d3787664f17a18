"""Bilinear samples of a feature map as sparse dot products (the stage-1 loss's speed design).

Maps are laid out as a zero-bordered channels-last table (``padded_table``); a descriptor is
dotted only with the table rows that the bilinear taps of its samples touch
(``sampled_correlation``, a sparse sampled matrix product with an exact backward), and the
samples interpolate those scalars. Neither the ``…×C`` samples nor a dense correlation is
formed. Coordinates are normalised as in ``utils/geometry.py``; ``grid_sample`` conventions
with ``align_corners=False``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# Zero border of the padded table: one cell before, two after (see ``bilinear_cells``).
PAD_BEFORE, PAD_AFTER = 1, 2


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
