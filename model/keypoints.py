"""Keypoint selection from a detector score map, and descriptor sampling at keypoints.

:func:`select_keypoints` is the original's selection (checked against
``tests/fixtures/keypoint_selection_reference.npz`` and the ``kp_*`` keys of
``f2r_detnet_reference.npz``), batched over ``B×1×H×W`` score maps:

1. only the interior (the map without its one-pixel outer ring) is eligible;
2. candidates: hard NMS of radius ``r`` (``use_nms: true``) keeps a pixel iff it is the first
   position, in raster order, holding the maximum of its ``(2r+1)²`` window on the
   mirror-padded interior (a plateau keeps only its raster-first pixel; mirrored copies count,
   so a plateau straddling the first two interior rows or columns keeps nothing); no NMS
   (``false``) keeps every pixel; soft NMS (``'softnms'``) weights every pixel by
   ``softplus(score − mean of its window)`` and needs a threshold;
3. threshold, only when ``thr`` is truthy (``False``, ``0``, ``None``: none): score >
   ``thr`` × (1, the interior's max or its mean for ``thr_mod`` ``abs`` / ``max`` / ``mean``);
4. ``N = min(num_pts, count)`` (``count``: candidates of the poorest batch element; ``num_pts``
   falsy: ``count``), raised to at least ``MIN_KEYPOINTS`` = 128: when fewer candidates
   survive, the tail is filled with suppressed pixels (ranking value 0), as in the original;
   ``n_valid`` counts the real ones;
5. ranking by the pixel's own masked value (score × candidate mask, × the soft-NMS weight);
6. keypoint = the score-weighted mean of the 3×3 full-map neighbourhood (the outer ring
   contributes), score = the maximum of that neighbourhood (so returned scores are not
   necessarily sorted);
7. ``stable: false``: each of the ``N`` keypoints is a Gumbel-softmax draw over the interior
   (temperature ``temperature``) of the centroids of step 6, its score the same weighted mean
   of the pixels' own scores.

Differences (docs/differences.md), for maps so small that the original fails: an interior smaller
than ``N`` pixels caps ``N`` at the interior's size, and an NMS radius not smaller than the
interior's side is reduced to fit the mirror padding. The Gumbel draws run in blocks of draws
(the same values, bounded memory).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from utils.config import Spec, lookup, validate
from utils.errors import SCFeatError
from utils.geometry import normalize_coords, sample_features

MIN_KEYPOINTS = 128
THRESHOLD_MODES = ("abs", "max", "mean")
NMS_MODES = (True, False, "softnms")
_GUMBEL_BLOCK = 1 << 22  # draw × interior-pixel entries per block of Gumbel draws

# The options of generate_kpts_single as a config section (registry name `generate_kpts_single`),
# with the original function's defaults for a key a config leaves out: every candidate
# (num_pts falsy), no threshold, thr_mod mean, Gumbel temperature 1. The original reads a falsy
# num_pts (false, 0, null) as "every candidate" and a falsy thr as "no threshold".
default_conf = {
    "num_pts": Spec(None, types=(int, bool, type(None))),
    "stable": True,
    "use_nms": Spec(True, types=(bool, str), choices=NMS_MODES),
    "nms_radius": 1,
    "thr": Spec(None, types=(float, bool, type(None))),
    "thr_mod": Spec("mean", choices=THRESHOLD_MODES),
    # the original's parameter; only 1 runs there (a config may give it, as 1)
    "stride": Spec(1, choices=(1,), doc="the original's parameter; only stride 1 runs there"),
    "temperature": 1.0,
}


def _check_options(num_pts, stable, use_nms, nms_radius, thr, thr_mod, stride,
                   temperature) -> None:
    where = "generate_kpts_single"
    if thr_mod not in THRESHOLD_MODES:
        raise SCFeatError(f"{where}: thr_mod must be one of {THRESHOLD_MODES}, got {thr_mod!r} "
                          f"(the original cannot run another value either)")
    if not (use_nms is True or use_nms is False or use_nms == "softnms"):
        raise SCFeatError(f"{where}: use_nms must be one of {list(NMS_MODES)}, got {use_nms!r}")
    if use_nms == "softnms" and not thr:
        raise SCFeatError(f"{where}: use_nms 'softnms' needs a threshold (thr), got "
                          f"thr={thr!r}; the original cannot run soft NMS without one either")
    if isinstance(stride, bool) or stride != 1:
        raise SCFeatError(f"{where}: stride must be 1, got {stride!r} (the original cannot run "
                          f"another stride either)")
    if isinstance(nms_radius, bool) or not isinstance(nms_radius, int) or nms_radius < 0:
        raise SCFeatError(f"{where}: nms_radius must be an integer ≥ 0, got {nms_radius!r}")
    if num_pts and (isinstance(num_pts, bool) or not isinstance(num_pts, int) or num_pts < 0):
        raise SCFeatError(f"{where}: num_pts must be a positive integer or null (all), got "
                          f"{num_pts!r}")
    if thr and (isinstance(thr, bool) or not isinstance(thr, (int, float))):
        raise SCFeatError(f"{where}: thr must be a number, or false / 0 / null for no "
                          f"threshold, got {thr!r}")
    if not stable and not float(temperature) > 0:
        raise SCFeatError(f"{where}: temperature must be positive, got {temperature!r}")


def hard_nms_mask(interior: torch.Tensor, radius: int) -> torch.Tensor:
    """``B×h×w`` bool: the pixel is the raster-first position of its window's maximum.

    The window is ``(2r+1)²`` on the interior mirror-padded by ``r`` (the edge pixel is not
    repeated). A pixel survives iff it is ≥ every later position and > every earlier one.
    """
    height, width = interior.shape[-2:]
    padded = F.pad(interior[:, None], (radius,) * 4, mode="reflect")[:, 0]
    keep = torch.ones_like(interior, dtype=torch.bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx == 0:
                continue
            other = padded[:, radius + dy:radius + dy + height, radius + dx:radius + dx + width]
            earlier = dy < 0 or (dy == 0 and dx < 0)
            keep &= (interior > other) if earlier else (interior >= other)
    return keep


def soft_nms_weight(interior: torch.Tensor, radius: int) -> torch.Tensor:
    """``B×h×w`` weights ``softplus(score − mean of its (2r+1)² window)``, mirror padding."""
    padded = F.pad(interior[:, None], (radius,) * 4, mode="reflect")
    window_mean = F.avg_pool2d(padded, 2 * radius + 1, stride=1)[:, 0]
    return F.softplus(interior - window_mean)


def neighbourhood_centroids(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every interior pixel of ``B×H×W`` maps: the score-weighted mean of its 3×3
    full-map neighbourhood (pixel ``x, y``, ``B×h×w×2``) and the neighbourhood's maximum
    (``B×h×w``). An all-zero neighbourhood gives the pixel itself."""
    height, width = full.shape[-2:]
    h, w = height - 2, width - 2
    total = torch.zeros_like(full[:, 1:-1, 1:-1])
    shift_x, shift_y = torch.zeros_like(total), torch.zeros_like(total)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            values = full[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            total = total + values
            shift_x = shift_x + dx * values
            shift_y = shift_y + dy * values
    safe = torch.where(total != 0, total, torch.ones_like(total))
    ys, xs = torch.meshgrid(torch.arange(1, height - 1, device=full.device, dtype=full.dtype),
                            torch.arange(1, width - 1, device=full.device, dtype=full.dtype),
                            indexing="ij")
    centroid = torch.stack([xs + shift_x / safe, ys + shift_y / safe], dim=-1)
    maximum = F.max_pool2d(full[:, None], 3, stride=1)[:, 0]
    return centroid, maximum


def _gumbel_draws(masked: torch.Tensor, values: torch.Tensor, n_draws: int, temperature: float,
                  uniform_noise: torch.Tensor | None, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """Weighted means ``B×N×D`` of ``values`` (``B×P×D``) under ``N`` Gumbel-softmax draws of
    the ranking values ``masked`` (``B×P``): ``softmax((masked + g) / T)``, with
    ``g = −log(−log(U + 1e-20) + 1e-20)``; ``U`` (``B×N×P``) is given or drawn uniformly."""
    batch, pixels = masked.shape
    block = max(1, _GUMBEL_BLOCK // max(pixels, 1))
    out = []
    for start in range(0, n_draws, block):
        count = min(block, n_draws - start)
        if uniform_noise is not None:
            uniform = uniform_noise[:, start:start + count].to(masked)
        else:
            uniform = torch.rand(batch, count, pixels, generator=generator,
                                 device=masked.device, dtype=masked.dtype)
        gumbel = -torch.log(-torch.log(uniform + 1e-20) + 1e-20)
        weights = torch.softmax((masked[:, None, :] + gumbel) / temperature, dim=-1)
        out.append(weights @ values)
    return torch.cat(out, dim=1)


def select_keypoints(score_maps: torch.Tensor, num_pts: int | None = None, stable: bool = True,
                     use_nms: bool | str = True, nms_radius: int = 1,
                     thr: float | None = None, thr_mod: str = "mean", stride: int = 1,
                     temperature: float = 1.0, uniform_noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The original's keypoint selection on ``B×1×H×W`` score maps (see the module doc).

    Returns ``keypoints_px`` (``B×N×2`` pixel ``x, y``), ``keypoints`` (the same normalised,
    ``(p − (size−1)/2) / ((size−1)/2)``), ``scores`` (``B×N``), ``masked`` (``B×h×w``, the
    ranking value of each interior pixel), ``n_valid`` (``B``: the first ``n_valid`` entries
    are real candidates, the rest fill the 128 minimum). Entries are in descending ranking
    value; ties keep raster order. ``uniform_noise`` (``B×N×h·w``) / ``generator``: the
    uniforms of the Gumbel draws (``stable: false``).
    """
    _check_options(num_pts, stable, use_nms, nms_radius, thr, thr_mod, stride, temperature)
    if score_maps.dim() != 4 or score_maps.shape[1] != 1:
        raise SCFeatError(f"select_keypoints: expected B×1×H×W score maps, got shape "
                          f"{tuple(score_maps.shape)}")
    full = score_maps[:, 0].detach().float()
    batch, height, width = full.shape
    if height < 3 or width < 3:
        raise SCFeatError(f"generate_kpts_single: score map {height}×{width} is smaller "
                          f"than 3×3")
    interior = full[:, 1:-1, 1:-1]
    # mirror padding needs radius < interior size; the original fails on such tiny maps
    nms_radius = min(nms_radius, min(interior.shape[-2:]) - 1)

    candidates = torch.ones_like(interior, dtype=torch.bool)
    if thr:
        reference = {"abs": torch.ones(batch, device=full.device),
                     "max": interior.flatten(1).max(1).values,
                     "mean": interior.flatten(1).mean(1)}[thr_mod]
        candidates &= interior > thr * reference[:, None, None]
    masked = interior
    if use_nms == "softnms":
        masked = soft_nms_weight(interior, nms_radius) * interior
    elif use_nms:
        candidates &= hard_nms_mask(interior, nms_radius)
    masked = masked * candidates

    count = int(candidates.flatten(1).sum(1).min())
    n_points = min(num_pts, count) if num_pts else count
    n_points = min(max(n_points, MIN_KEYPOINTS), interior[0].numel())  # cap: ours, see doc
    centroid, neighbourhood_max = neighbourhood_centroids(full)
    flat_masked = masked.flatten(1)  # B×P
    if stable:
        order = torch.sort(flat_masked, dim=1, descending=True, stable=True).indices[:, :n_points]
        keypoints_px = centroid.flatten(1, 2).gather(1, order[..., None].expand(-1, -1, 2))
        scores = neighbourhood_max.flatten(1).gather(1, order)
        n_valid = (flat_masked.gather(1, order) > 0).sum(1)
    else:
        values = torch.cat([normalize_coords(centroid.flatten(1, 2), height, width),
                            interior.flatten(1)[..., None]], dim=-1)  # B×P×3
        drawn = _gumbel_draws(flat_masked, values, n_points, float(temperature),
                              uniform_noise, generator)
        keypoints_n, scores = drawn[..., :2], drawn[..., 2]
        scale = keypoints_n.new_tensor([(width - 1) / 2.0, (height - 1) / 2.0])
        keypoints_px = keypoints_n * scale + scale
        n_valid = candidates.flatten(1).sum(1).clamp(max=n_points)
    keypoints = (normalize_coords(keypoints_px, height, width) if stable else keypoints_n)
    return {"keypoints_px": keypoints_px, "keypoints": keypoints, "scores": scores,
            "masked": masked, "n_valid": n_valid}


def _as_batch(score_map: torch.Tensor) -> torch.Tensor:
    """``1×1×H×W`` or ``H×W`` → ``1×1×H×W``."""
    if score_map.dim() == 4 and score_map.shape[:2] == (1, 1):
        return score_map
    if score_map.dim() == 2:
        return score_map[None, None]
    raise SCFeatError(f"generate_kpts_single: expected a 1×1×H×W or H×W score map, "
                      f"got shape {tuple(score_map.shape)}")


def generate_kpts_single(score_map: torch.Tensor, num_pts: int | None = None,
                         stable: bool = True, use_nms: bool | str = True, nms_radius: int = 1,
                         thr: float | None = None, thr_mod: str = "mean", stride: int = 1,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Select keypoints from one score map (``1×1×H×W`` or ``H×W``, H, W ≥ 3).

    Returns ``keypoints`` (``N×2`` float32 pixel ``x, y``) and ``scores`` (``N``) on the
    input's device, in descending ranking value (:func:`select_keypoints`), all ``N`` of
    them as the original returns them: when fewer than 128 candidates survive, the last
    ``N − n_valid`` are suppressed pixels filling the 128 minimum.
    """
    result = select_keypoints(_as_batch(score_map), num_pts=num_pts, stable=stable,
                              use_nms=use_nms, nms_radius=nms_radius, thr=thr, thr_mod=thr_mod,
                              stride=stride, temperature=temperature)
    return result["keypoints_px"][0], result["scores"][0]


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


# ----------------------------------------------------------------------------- as a config section

DETECTORS = {"generate_kpts_single": generate_kpts_single}  # config name → keypoint selection
Detector = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

def detector_schema(name: str) -> dict:
    """Schema of the options of the detector ``name`` (its ``default_conf``)."""
    return lookup(DETECTORS, name, "detector").default_conf


def make_detector(name: str, options: dict, origin: str = "detector_config") -> Detector:
    """The detector ``name`` with ``options`` (validated; defaults filled in) bound: a function
    ``score_map 1×1×H×W → (keypoints N×2, scores N)``."""
    options = validate(options, detector_schema(name), origin)
    detector = functools.partial(DETECTORS[name], **options)
    try:
        detector(torch.zeros(3, 3))  # the detector's own value checks, before any work
    except SCFeatError as error:
        raise SCFeatError(f"{origin}: {error}") from None
    return detector
