"""Features and matching shared by every evaluation (HPatches, relative pose, reconstruction,
localisation): feature files, SIFT of an image file, mutual nearest-neighbour matching. The
methods themselves (extractors, matchers, feature caches) are defined in
:mod:`evaluation.methods`.

Keypoints are pixels ``x, y`` with pixel centres at integers (the extraction's convention).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from evaluation.peers import SiftExtractor
from utils.atomic import atomic_open
from utils.errors import SCFeatError
from utils.image import load_image

logger = logging.getLogger(__name__)


class Features(NamedTuple):
    """One image's features for matching: ``keypoints`` ``N×2`` float64, ``descriptors``
    ``N×D`` float32 and ``image_size`` ``(width, height)`` (``None`` when the file lacks it)."""
    keypoints: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int] | None = None


def require_files(paths: list[Path], what: str) -> None:
    """Raise naming the missing files (all checked before any work is done)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SCFeatError(f"missing {what} file{'s' if len(missing) > 1 else ''}: {shown}{more}")


# ---------------------------------------------------------------------------------------------
# feature files
# ---------------------------------------------------------------------------------------------

def read_feature_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``keypoints`` (``N×2`` x, y; extra columns ignored) and ``descriptors`` (``N×D``)."""
    features = read_features(path)
    return features.keypoints, features.descriptors


def read_features(path: Path) -> Features:
    """A feature file's :class:`Features`; ``image_size`` when the file holds one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"keypoints", "descriptors"} - set(data.files)
            if missing:
                raise SCFeatError(f"feature file {path} lacks {sorted(missing)} (expected an npz "
                                  f"with keypoints N×2, scores N, descriptors N×D)")
            keypoints, descriptors = data["keypoints"], data["descriptors"]
            size = data["image_size"] if "image_size" in data.files else None
    except SCFeatError:
        raise
    except Exception as error:  # np.load raises several types for a corrupt file
        raise SCFeatError(f"cannot read feature file {path} as npz: {error}") from error
    size = None if size is None else (int(size[0]), int(size[1]))
    if keypoints.size == 0:  # no features: valid, the pairs of this image score 0
        width = descriptors.shape[-1] if descriptors.ndim == 2 else 0
        return Features(np.zeros((0, 2)), np.zeros((0, width), np.float32), size)
    if keypoints.ndim != 2 or keypoints.shape[1] < 2 or descriptors.ndim != 2 \
            or len(keypoints) != len(descriptors):
        raise SCFeatError(f"feature file {path}: expected keypoints N×2 and descriptors N×D with "
                          f"the same N, got {keypoints.shape} and {descriptors.shape}")
    return Features(keypoints[:, :2].astype(np.float64), descriptors.astype(np.float32), size)


def write_feature_file(path: Path, keypoints: np.ndarray, descriptors: np.ndarray,
                       **extra: np.ndarray) -> None:
    """``keypoints`` ``N×2`` and ``descriptors`` ``N×D`` (and any ``extra`` arrays) to ``path``
    (npz, atomically, no ``.npz`` appended), readable by :func:`read_feature_file`."""
    with atomic_open(path) as handle:
        np.savez(handle, keypoints=np.asarray(keypoints, np.float32),
                 descriptors=np.asarray(descriptors, np.float32), **extra)


def sift_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV SIFT (all keypoints) of the image file ``path`` read as grey:
    ``(keypoints N×2, descriptors N×128)``."""
    found = SiftExtractor().extract(load_image(path, grey=True))
    return found["keypoints"].astype(np.float64), found["descriptors"]


# ---------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------

def mnn_matches(desc1: torch.Tensor, desc2: torch.Tensor, chunk: int = 4096,
                ratio: float | None = None) -> torch.Tensor:
    """Mutual nearest neighbours (max dot product) of ``N×D`` and ``M×D`` → ``K×2`` indices.

    The similarity matrix is built ``chunk`` rows at a time so 20k×20k features fit in memory.
    ``ratio``: also Lowe's ratio test on the Euclidean distances of unit descriptors (best over
    second best of each ``desc1`` row below ``ratio``; a row without a second candidate passes).
    """
    if len(desc1) == 0 or len(desc2) == 0:
        return torch.zeros(0, 2, dtype=torch.long, device=desc1.device)
    nn12 = torch.empty(len(desc1), dtype=torch.long, device=desc1.device)
    passes = torch.ones(len(desc1), dtype=torch.bool, device=desc1.device)
    best21 = torch.full((len(desc2),), -torch.inf, device=desc1.device)
    nn21 = torch.zeros(len(desc2), dtype=torch.long, device=desc1.device)
    for start in range(0, len(desc1), chunk):
        sim = desc1[start:start + chunk] @ desc2.T
        nn12[start:start + chunk] = sim.argmax(dim=1)
        if ratio is not None and sim.shape[1] > 1:
            top2 = sim.topk(2, dim=1).values
            distances = (2.0 - 2.0 * top2).clamp(min=0.0).sqrt()  # unit vectors
            passes[start:start + chunk] = distances[:, 0] < ratio * distances[:, 1]
        col_best, col_arg = sim.max(dim=0)
        better = col_best > best21  # strict: ties keep the earliest row, as one big max would
        best21 = torch.where(better, col_best, best21)
        nn21 = torch.where(better, col_arg + start, nn21)
    ids1 = torch.arange(len(desc1), device=desc1.device)
    keep = (nn21[nn12] == ids1) & passes
    return torch.stack([ids1[keep], nn12[keep]], dim=1)


def mnn_matcher(device: torch.device | str = "cpu", ratio: float | None = None):
    """``match(features0, features1) → K×2``: :func:`match_numpy` of the two :class:`Features`'
    descriptors (with Lowe's ``ratio`` when given) on ``device``."""
    return lambda first, second: match_numpy(first.descriptors, second.descriptors, ratio, device)


def match_numpy(desc1: np.ndarray, desc2: np.ndarray, ratio: float | None = None,
                device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`mnn_matches` of numpy descriptors → ``K×2`` int64 indices."""
    if len(desc1) and len(desc2) and desc1.shape[1] != desc2.shape[1]:
        raise SCFeatError(f"descriptors differ in size ({desc1.shape[1]} vs {desc2.shape[1]})")
    return mnn_matches(torch.from_numpy(np.ascontiguousarray(desc1)).to(device),
                       torch.from_numpy(np.ascontiguousarray(desc2)).to(device),
                       ratio=ratio).cpu().numpy()
