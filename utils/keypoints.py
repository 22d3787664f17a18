"""Keypoint selection from a detector score map, and descriptor sampling at keypoints.

`generate_kpts_single` reproduces the original selection (checked against
``kp_thr_abs/`` and ``kp_top200/`` of the reference file):

* candidates are the pixels of the score map's interior (the one-pixel border is dropped);
* NMS: a candidate survives when it equals the maximum of its ``(2r+1)²`` window over the
  interior, reflect-padded;
* an optional threshold keeps candidates with a score strictly above ``thr`` × (1, the
  interior's max or its mean for ``thr_mod`` ``abs`` / ``max`` / ``mean``);
* the location is the score-weighted mean of the 3×3 neighbourhood in the full map (so the
  dropped border still contributes), the score the 3×3 maximum; coordinates are full-image
  pixels ``x, y``;
* the best ``min(num_pts, survivors)`` are kept; when the threshold leaves fewer than
  ``MIN_KEYPOINTS`` survivors it is ignored, so the best NMS survivors (up to ``num_pts``) are
  kept instead (``num_pts`` stays a hard cap).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.errors import SCFeatError
from utils.geometry import normalize_coords, sample_features

MIN_KEYPOINTS = 128
THRESHOLD_MODES = ("abs", "max", "mean")

# The options of generate_kpts_single as a config section (registry name `generate_kpts_single`).
default_conf = {"num_pts": 8192, "stable": True, "use_nms": True, "nms_radius": 1,
                "thr": None, "thr_mod": "abs"}


def _as_2d(score_map: torch.Tensor) -> torch.Tensor:
    """``1×1×H×W`` or ``H×W`` → ``H×W``."""
    if score_map.dim() == 4 and score_map.shape[:2] == (1, 1):
        return score_map[0, 0]
    if score_map.dim() == 2:
        return score_map
    raise SCFeatError(f"generate_kpts_single: expected a 1×1×H×W or H×W score map, "
                      f"got shape {tuple(score_map.shape)}")


def nms_mask(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """``H×W`` bool: pixels equal to the max of their ``(2r+1)²`` window (reflect padding)."""
    if radius <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    padded = F.pad(scores[None, None], (radius,) * 4, mode="reflect")
    window_max = F.max_pool2d(padded, 2 * radius + 1, stride=1)[0, 0]
    return scores == window_max


def generate_kpts_single(score_map: torch.Tensor, num_pts: int = 8192, stable: bool = True,
                         use_nms: bool = True, nms_radius: int = 1, thr: float | None = None,
                         thr_mod: str = "abs") -> tuple[torch.Tensor, torch.Tensor]:
    """Select keypoints from one score map (``1×1×H×W`` or ``H×W``, H, W ≥ 3).

    Returns ``keypoints`` (``N×2`` float32 pixel ``x, y``) and ``scores`` (``N``), best
    score first, on the input's device. ``stable`` sorts stably, so equal scores keep
    raster order (y, then x) and the output is deterministic.
    """
    if thr_mod not in THRESHOLD_MODES:
        raise SCFeatError(f"generate_kpts_single: thr_mod must be one of {THRESHOLD_MODES}, "
                          f"got {thr_mod!r}")
    if nms_radius < 0 or num_pts < 1:
        raise SCFeatError(f"generate_kpts_single: expected nms_radius >= 0 and num_pts >= 1, "
                          f"got nms_radius={nms_radius}, num_pts={num_pts}")
    full = _as_2d(score_map).detach().float()
    height, width = full.shape
    if height < 3 or width < 3:
        raise SCFeatError(f"generate_kpts_single: score map {height}×{width} is smaller "
                          f"than 3×3")
    interior = full[1:-1, 1:-1]
    radius = min(nms_radius, min(interior.shape) - 1)  # reflect padding needs radius < size
    candidates = (nms_mask(interior, radius) if use_nms
                  else torch.ones_like(interior, dtype=torch.bool))

    passing = candidates
    if thr is not None:
        reference = {"abs": 1.0, "max": interior.max(), "mean": interior.mean()}[thr_mod]
        passing = candidates & (interior > thr * reference)
        if int(passing.sum()) < MIN_KEYPOINTS:
            passing = candidates  # too few above threshold: fall back to the best NMS survivors

    ys, xs = torch.nonzero(passing, as_tuple=True)  # interior indices, raster order
    ys, xs = ys + 1, xs + 1  # full-map pixel of each candidate
    offsets = torch.arange(-1, 2, device=full.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")  # the 3×3 cells, raster order
    neighbours = (ys * width + xs)[:, None] + (dy * width + dx).flatten()[None, :]  # N×9
    weights = full.flatten()[neighbours]  # 3×3 neighbourhoods in the full map
    total = weights.sum(1).clamp(min=1e-12)
    shifts = torch.stack([dx.flatten(), dy.flatten()], dim=1).float()  # 9×2 (x, y)
    keypoints = torch.stack([xs, ys], dim=1).float() + (weights @ shifts) / total[:, None]
    scores = weights.max(1).values

    keep = min(num_pts, scores.numel())
    order = torch.sort(scores, descending=True, stable=stable).indices[:keep]
    return keypoints[order], scores[order]


generate_kpts_single.default_conf = default_conf  # the registry reads `default_conf` of a name


def sample_descriptors(desc_map: torch.Tensor, keypoints_px: torch.Tensor,
                       image_hw: tuple[int, int]) -> torch.Tensor:
    """L2-normalised descriptors ``N×C`` at pixel keypoints ``N×2`` of an image ``H×W``.

    ``desc_map`` is ``1×C×h×w`` (typically ``h = H/4``); points are normalised with the
    IMAGE size, then bilinearly sampled (``align_corners=False``), as the original does.
    """
    if desc_map.dim() != 4 or desc_map.shape[0] != 1:
        raise SCFeatError(f"sample_descriptors: expected a 1×C×h×w descriptor map, "
                          f"got shape {tuple(desc_map.shape)}")
    height, width = image_hw
    # Sample in float32: a bf16 map (autocast) must not round pixel coordinates to bf16.
    coords_n = normalize_coords(keypoints_px.float(), height, width)
    return sample_features(desc_map.float(), coords_n[None], normalize=True)[0]
