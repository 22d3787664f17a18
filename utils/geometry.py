"""Pure, batched two-view geometry on tensors.

Conventions used throughout the project:

* pixel coordinates are ``x, y`` (column first), with pixel centres at integers;
* normalised coordinates map ``0 .. size-1`` onto ``-1 .. 1``:
  ``(p - (size-1)/2) / ((size-1)/2)`` (the convention of the original SCFeat code);
* ``F1`` maps an image-1 point to its epipolar line in image 2 (``x2ᵀ·F1·x1 = 0``) and
  ``F2`` the reverse; both are divided by their ``[2, 2]`` entry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_coords(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel ``x, y`` (``...×2``) → normalised ``[-1, 1]`` coordinates."""
    scale = coords.new_tensor([(width - 1) / 2.0, (height - 1) / 2.0])
    return (coords - scale) / scale


def denormalize_coords(coords_n: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised ``[-1, 1]`` coordinates (``...×2``) → pixel ``x, y``."""
    scale = coords_n.new_tensor([(width - 1) / 2.0, (height - 1) / 2.0])
    return coords_n * scale + scale


def to_homogeneous(points: torch.Tensor) -> torch.Tensor:
    """``...×2`` → ``...×3`` by appending ones."""
    return torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)


def epipolar_lines(fmat: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Lines ``F·x̃`` for points ``B×N×2`` and fundamental matrices ``B×3×3`` → ``B×N×3``."""
    return to_homogeneous(points) @ fmat.transpose(-1, -2)


def point_line_distance(lines: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Distance of points ``B×N×2`` to lines ``B×N×3`` (``a, b, c``) → ``B×N``.

    ``|l·x̃| / max(‖l[:2]‖, 1e-8)``: the clamp keeps a degenerate line (a point at the
    epipole gives ``l = 0``) finite.
    """
    num = (lines * to_homogeneous(points)).sum(-1).abs()
    return num / lines[..., :2].norm(dim=-1).clamp(min=1e-8)


def epipolar_distance_matrix(fmat: torch.Tensor, points1: torch.Tensor,
                             points2: torch.Tensor) -> torch.Tensor:
    """Pairwise distances ``B×N×M`` of ``points2[j]`` to the line ``F·points1[i]``."""
    lines = epipolar_lines(fmat, points1)  # B×N×3
    num = (lines @ to_homogeneous(points2).transpose(-1, -2)).abs()  # B×N×M
    return num / lines[..., :2].norm(dim=-1, keepdim=True).clamp(min=1e-8)


def skew(t: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices ``[t]×`` (``B×3×3``) of vectors ``B×3``."""
    zero = torch.zeros_like(t[..., 0])
    tx, ty, tz = t.unbind(-1)
    return torch.stack([
        torch.stack([zero, -tz, ty], -1),
        torch.stack([tz, zero, -tx], -1),
        torch.stack([-ty, tx, zero], -1),
    ], -2)


def relative_pose(pose1: torch.Tensor, pose2: torch.Tensor) -> torch.Tensor:
    """World→camera poses ``B×4×4`` of two cameras → camera-1→camera-2 pose ``E2·E1⁻¹``."""
    return pose2 @ torch.linalg.inv(pose1)


def fundamental_from_pose(K1: torch.Tensor, K2: torch.Tensor, R: torch.Tensor,
                          t: torch.Tensor) -> torch.Tensor:
    """``F = K2⁻ᵀ·[t]×·R·K1⁻¹`` (``B×3×3``) for the pose ``x_c2 = R·x_c1 + t``.

    The result is divided by its ``[2, 2]`` entry, as the original code does, so
    ``x2ᵀ·F·x1 = 0`` for corresponding pixels.
    """
    fmat = torch.linalg.inv(K2).transpose(-1, -2) @ skew(t) @ R @ torch.linalg.inv(K1)
    return fmat / fmat[..., 2:3, 2:3]


def sample_features(feature_map: torch.Tensor, coords_n: torch.Tensor,
                    normalize: bool = True, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear samples of ``B×C×h×w`` maps at normalised ``B×N×2`` points → ``B×N×C``.

    ``grid_sample`` with ``align_corners=False``, as in the original; L2-normalised over
    channels when ``normalize``.
    """
    samples = F.grid_sample(feature_map, coords_n.unsqueeze(1), mode="bilinear",
                            padding_mode=padding_mode, align_corners=False)
    samples = samples.squeeze(2).transpose(1, 2)
    return F.normalize(samples, p=2, dim=-1) if normalize else samples


def normalize_points_hartley(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hartley normalisation of point sets ``...×N×2`` → ``(points_n ...×N×2, T ...×3×3)``.

    ``x̃_n = T·x̃`` moves the centroid to the origin and scales the mean distance to it to
    ``√2``. A set whose points all coincide (mean distance 0) keeps scale 1 instead of
    blowing up; its solve is degenerate anyway and the caller must detect that.
    """
    centroid = points.mean(dim=-2, keepdim=True)  # ...×1×2
    centred = points - centroid
    mean_dist = centred.norm(dim=-1).mean(dim=-1)  # ...
    safe_dist = mean_dist.clamp(min=torch.finfo(points.dtype).tiny)
    scale = torch.where(mean_dist > 0, 2.0 ** 0.5 / safe_dist, torch.ones_like(mean_dist))
    points_n = centred * scale[..., None, None]
    zero, one = torch.zeros_like(scale), torch.ones_like(scale)
    cx, cy = centroid[..., 0, 0], centroid[..., 0, 1]
    transform = torch.stack([
        torch.stack([scale, zero, -scale * cx], -1),
        torch.stack([zero, scale, -scale * cy], -1),
        torch.stack([zero, zero, one], -1),
    ], -2)
    return points_n, transform


def eight_point_design_matrix(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Rows ``x̃1 ⊗ x̃2`` (``...×N×9``) so that ``A·vec(F) = 0`` ⇔ ``x̃1ᵀ·F·x̃2 = 0``.

    ``vec`` is row-major (``F.reshape(..., 9)``).
    """
    h1, h2 = to_homogeneous(x1), to_homogeneous(x2)
    return (h1.unsqueeze(-1) * h2.unsqueeze(-2)).flatten(-2)


def eight_point_fundamental(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Normalised 8-point estimate of ``F`` with ``x̃1ᵀ·F·x̃2 = 0`` from ``...×N×2`` (``N ≥ 8``).

    Batched over any leading dims → ``...×3×3``. Both point sets are Hartley-normalised, ``F``
    is the right singular vector of the smallest singular value of the design matrix, rank 2
    is enforced by zeroing its smallest singular value, and the result is de-normalised
    (``F = T1ᵀ·F_n·T2``). Not divided by ``[2, 2]`` (the caller decides; the entry can be 0).
    The scale is arbitrary (unit Frobenius norm before de-normalisation).
    """
    x1_n, t1 = normalize_points_hartley(x1)
    x2_n, t2 = normalize_points_hartley(x2)
    design = eight_point_design_matrix(x1_n, x2_n)  # ...×N×9
    # full_matrices so that N = 8 (an 8×9 matrix) still yields the 9th, null-space vector.
    _, _, vh = torch.linalg.svd(design, full_matrices=True)
    fmat_n = vh[..., -1, :].reshape(*design.shape[:-2], 3, 3)
    u, sing, vh_f = torch.linalg.svd(fmat_n)
    sing = torch.cat([sing[..., :2], torch.zeros_like(sing[..., 2:])], dim=-1)
    fmat_n = u @ torch.diag_embed(sing) @ vh_f
    return t1.transpose(-1, -2) @ fmat_n @ t2
