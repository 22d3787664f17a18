"""Features and matching shared by every evaluation (HPatches, relative pose, reconstruction,
localisation): feature files, the OpenCV SIFT baseline, features from a checkpoint, mutual
nearest-neighbour matching, and per-image feature caches keyed by their inputs.

Keypoints are pixels ``x, y`` with pixel centres at integers (the extraction's convention).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from utils.atomic import atomic_open
from utils.checkpoint import checkpoint_files
from utils.files import files_signature
from utils.errors import SCFeatError
from utils.image import load_image

logger = logging.getLogger(__name__)

SIFT = "sift"

# image (H×W×3 uint8 RGB) → (keypoints N×2 float64, descriptors N×D float32, unit norm)
Extractor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


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
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"keypoints", "descriptors"} - set(data.files)
            if missing:
                raise SCFeatError(f"feature file {path} lacks {sorted(missing)} (expected an npz "
                                  f"with keypoints N×2, scores N, descriptors N×D)")
            keypoints, descriptors = data["keypoints"], data["descriptors"]
    except SCFeatError:
        raise
    except Exception as error:  # np.load raises several types for a corrupt file
        raise SCFeatError(f"cannot read feature file {path} as npz: {error}") from error
    if keypoints.size == 0:  # no features: valid, the pairs of this image score 0
        width = descriptors.shape[-1] if descriptors.ndim == 2 else 0
        return np.zeros((0, 2)), np.zeros((0, width), np.float32)
    if keypoints.ndim != 2 or keypoints.shape[1] < 2 or descriptors.ndim != 2 \
            or len(keypoints) != len(descriptors):
        raise SCFeatError(f"feature file {path}: expected keypoints N×2 and descriptors N×D with "
                          f"the same N, got {keypoints.shape} and {descriptors.shape}")
    return keypoints[:, :2].astype(np.float64), descriptors.astype(np.float32)


def write_feature_file(path: Path, keypoints: np.ndarray, descriptors: np.ndarray,
                       **extra: np.ndarray) -> None:
    """``keypoints`` ``N×2`` and ``descriptors`` ``N×D`` (and any ``extra`` arrays) to ``path``
    (npz, atomically, no ``.npz`` appended), readable by :func:`read_feature_file`."""
    with atomic_open(path) as handle:
        np.savez(handle, keypoints=np.asarray(keypoints, np.float32),
                 descriptors=np.asarray(descriptors, np.float32), **extra)


# ---------------------------------------------------------------------------------------------
# extractors
# ---------------------------------------------------------------------------------------------

def sift_from_gray(gray: np.ndarray, max_keypoints: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV SIFT on an ``H×W`` uint8 image: keypoints ``N×2`` and L2-normalised descriptors
    ``N×128``; ``max_keypoints`` 0 keeps all (else OpenCV keeps the strongest)."""
    keypoints, descriptors = cv2.SIFT_create(nfeatures=max_keypoints).detectAndCompute(gray, None)
    if descriptors is None:
        return np.zeros((0, 2)), np.zeros((0, 128), np.float32)
    descriptors = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True).clip(1e-12)
    return np.array([kp.pt for kp in keypoints], np.float64), descriptors.astype(np.float32)


def sift_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sift_from_gray` of the image file ``path`` (all keypoints)."""
    return sift_from_gray(load_image(path, grey=True))


def check_method(entry: object, origin: str) -> str:
    """A method entry: ``'sift'`` or an existing checkpoint folder (returned as given)."""
    if entry == SIFT:
        return SIFT
    if not isinstance(entry, str) or not entry:
        raise SCFeatError(f"{origin}: expected 'sift' or a checkpoint folder, got {entry!r}")
    files = checkpoint_files(entry)
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise SCFeatError(f"{origin}: '{Path(entry)}' is not a checkpoint folder (expected 'sift' "
                          f"or a folder with {' and '.join(p.name for p in files)}; missing "
                          f"{', '.join(missing)})")
    return entry


def method_label(method: str) -> str:
    """A short file-safe name: ``sift``, or ``<run>-<checkpoint>`` for ``.../<run>/<ckpt>``."""
    if method == SIFT:
        return SIFT
    folder = Path(method).resolve()
    label = f"{folder.parent.name}-{folder.name}" if folder.parent.name else folder.name
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def method_signature(method: str, extra: str = "") -> str:
    """:func:`files_signature` of what makes a method's features: the checkpoint files (and the
    run's ``config.yaml``), or OpenCV's version for SIFT; plus ``extra``."""
    if method == SIFT:
        return files_signature([], f"{extra}\nsift opencv-{cv2.__version__}")
    sources = checkpoint_files(method) + [Path(method).parent / "config.yaml"]
    return files_signature([p for p in sources if p.is_file()], f"{extra}\ncheckpoint")


def make_extractor(method: str, max_keypoints: int,
                   device: torch.device | str | None = None) -> Extractor:
    """The features of ``method`` (``'sift'`` or a checkpoint folder) for an RGB image, at
    most ``max_keypoints`` (the network's detector keeps at least 128)."""
    if method == SIFT:
        return lambda image: sift_from_gray(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY),
                                            max_keypoints)
    from model.scfeat import SCFeatModel  # late: SIFT-only runs need no network

    model = SCFeatModel.from_checkpoint(method, device)

    def extract(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = model.detect_and_describe(image, num_pts=max(max_keypoints, 128))
        return features["keypoints"].astype(np.float64), features["descriptors"]
    return extract


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


def match_numpy(desc1: np.ndarray, desc2: np.ndarray, ratio: float | None = None,
                device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`mnn_matches` of numpy descriptors → ``K×2`` int64 indices."""
    if len(desc1) and len(desc2) and desc1.shape[1] != desc2.shape[1]:
        raise SCFeatError(f"descriptors differ in size ({desc1.shape[1]} vs {desc2.shape[1]})")
    return mnn_matches(torch.from_numpy(np.ascontiguousarray(desc1)).to(device),
                       torch.from_numpy(np.ascontiguousarray(desc2)).to(device),
                       ratio=ratio).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# per-image feature caches
# ---------------------------------------------------------------------------------------------

def cached_features(method: str, images: dict[str, Callable[[], tuple[np.ndarray, dict]]],
                    folder: Path, max_keypoints: int, device: torch.device | str | None = None,
                    ) -> dict[str, Path]:
    """Features of every image, written once to ``<folder>/<key>.npz`` and reused afterwards.

    ``images``: ``{key: function returning (the H×W×3 uint8 RGB image, extra arrays to store
    beside the features)}`` (keys may contain ``/``). ``folder`` must be specific to the method and everything that changes its
    features (see :func:`method_signature`). The network is loaded only when a file is
    missing. Returns ``{key: feature file}``.
    """
    paths = {key: folder / f"{key}.npz" for key in images}
    todo = [key for key, path in paths.items() if not path.is_file()]
    if todo:
        logger.info("%s: extracting %d images into %s", method_label(method), len(todo), folder)
        extract = make_extractor(method, max_keypoints, device)
        for key in _progress(todo, method_label(method)):
            image, extra = images[key]()
            keypoints, descriptors = extract(image)
            write_feature_file(paths[key], keypoints, descriptors, **extra)
    return paths


def _progress(items: list, label: str):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=f"features {label}", leave=False, disable=None)
    except ImportError:  # tqdm is optional here
        return items
