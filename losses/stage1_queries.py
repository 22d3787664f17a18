"""Stage-1 query points: the original's ``generate_kpts_regular_grid_random``.

The image (not the feature map) is cut into ``g×g`` cells; cells beyond the last full one on
either axis are never used. ``rows = H // g``, ``cols = W // g``, ``N = rows·cols`` queries per
image in row-major cell order, returned normalised as ``(p − (size−1)/2) / ((size−1)/2)``
(``x`` first), ``B×N×2``.
"""
from __future__ import annotations

import torch

from utils.errors import SCFeatError
from utils.geometry import normalize_coords

RANDOM_SELECTS = ("random", "regular_random")


def query_grid_shape(height: int, width: int, grid_size: int) -> tuple[int, int]:
    """``(H // g, W // g)``, the whole cells of the image; an error if there is none."""
    rows, cols = height // grid_size, width // grid_size
    if rows == 0 or cols == 0:
        raise SCFeatError(f"preprocess_train_config.kps_generator_config.grid_size: expected at "
                          f"most the image size {height}x{width}, got {grid_size}")
    return rows, cols


def random_pixel_queries(proposals: torch.Tensor, height: int, width: int, grid_size: int
                         ) -> torch.Tensor:
    """``random_select: random``: one integer pixel per cell.

    proposals ``B×rows×cols`` (int, ``k`` in ``0 .. g²−1``, row-major inside the cell: the pixel
    is ``(g·c + k mod g, g·r + k div g)``) → normalised ``B×N×2`` (float32).
    """
    batch, rows, cols = proposals.shape
    device = proposals.device
    cell_y, cell_x = torch.meshgrid(torch.arange(rows, device=device),
                                    torch.arange(cols, device=device), indexing="ij")
    pixel_x = grid_size * cell_x + proposals % grid_size
    pixel_y = grid_size * cell_y + torch.div(proposals, grid_size, rounding_mode="floor")
    pixels = torch.stack([pixel_x, pixel_y], -1).reshape(batch, rows * cols, 2)
    return normalize_coords(pixels.float(), height, width)


def regular_random_queries(uniform: torch.Tensor, height: int, width: int, grid_size: int
                           ) -> torch.Tensor:
    """``random_select: regular_random``: a regular grid shifted by one random offset.

    uniform ``B×2`` (``U_x, U_y`` in ``[0, 1)``, one pair per batch element) → normalised
    ``B×N×2`` (float32, continuous positions). As in the original, ``s = 0.5·g / H`` for both
    axes (the image height, also for ``x``); the nominal positions are
    ``linspace(−1+s, 1−s, cols)`` × ``linspace(−1+s, 1−s, rows)`` and every one is shifted by
    ``s·(2U − 1)``. With ``W ≠ H`` the ``x`` positions are therefore not cell centres.
    """
    rows, cols = query_grid_shape(height, width, grid_size)
    step = 0.5 * grid_size / height
    xs = torch.linspace(-1 + step, 1 - step, cols, device=uniform.device)
    ys = torch.linspace(-1 + step, 1 - step, rows, device=uniform.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x, grid_y], -1).reshape(1, rows * cols, 2)
    return grid + (step * (2 * uniform.float() - 1)).unsqueeze(1)


def draw_queries(batch_size: int, height: int, width: int, grid_size: int, random_select: str,
                 device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one image's queries → normalised ``B×N×2`` (float32).

    ``random``: the cell index ``k`` uniform in ``0 .. g²−1`` (the original's categorical over
    equal logits); ``regular_random``: ``U`` uniform in ``[0, 1)``. Draws come from
    ``generator`` (on its own device) when given, else from torch's global generator.
    """
    rows, cols = query_grid_shape(height, width, grid_size)
    draw_device = generator.device if generator is not None else device
    if random_select == "random":
        proposals = torch.randint(0, grid_size * grid_size, (batch_size, rows, cols),
                                  device=draw_device, generator=generator)
        return random_pixel_queries(proposals.to(device), height, width, grid_size)
    if random_select == "regular_random":
        uniform = torch.rand(batch_size, 2, device=draw_device, generator=generator)
        return regular_random_queries(uniform.to(device), height, width, grid_size)
    raise SCFeatError(f"preprocess_train_config.kps_generator_config.random_select: expected one "
                      f"of {', '.join(RANDOM_SELECTS)}, got {random_select!r}")
