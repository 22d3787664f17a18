"""Relative pose on MegaDepth-1500-style test pairs (the LoFTR and glue-factory protocols).

Per pair: features of both images (resized so the longer side is ``resize``, intrinsics scaled
alike), the method's matches (:mod:`evaluation.methods`: mutual nearest neighbours, optionally
with a ratio test, or LightGlue), an essential matrix by

* ``opencv`` — the LoFTR protocol: ``cv2.findEssentialMat`` on points normalised by ``K``,
  RANSAC threshold in pixels divided by the mean focal length, confidence 0.99999, the
  decomposition with the most cheirality inliers (``cv2.recoverPose``); or
* ``poselib`` — the glue-factory protocol: PoseLib's LO-RANSAC with ``max_epipolar_error`` in
  pixels and its non-linear refinement,

and the pose error ``max(angle of R_est⁻¹·R_gt, angle between t_est and t_gt)`` in degrees
(the translation angle taken modulo the sign ambiguity of E, as both protocols); a failed
estimate counts as an infinite error. AUC@5/10/20° integrates the recall-over-error curve up
to the threshold (:func:`pose_auc`, SuperGlue's ``pose_auc``). The matches' epipolar precision
is the fraction with a squared symmetric epipolar distance (normalised coordinates, ground
truth E) below ``epipolar_threshold`` (5e-4, LoFTR's).

Pairs are read from glue-factory's ``pairs_calibrated.txt`` (per line ``name0 name1 K0(9)
K1(9) R(9) t(3)``, row-major, relative pose 0→1: ``x1 = R·x0 + t``; images under
``<data_path>/<images_dir>``) or LoFTR's ``megadepth_test_1500_scene_info/*.npz``
(``image_paths`` relative to ``data_path``, ``intrinsics`` N×3×3, world→camera ``poses`` N×4×4,
``pair_infos`` of ``((i, j), overlap, central_matches)``) or a COLMAP model
(``layout: colmap``: ``<data_path>/<model_dir>`` in text or binary, images under
``<data_path>/<images_dir>``, pairs by :func:`dataloader.colmap_model.select_pairs` with the
``colmap_pairs`` options; intrinsics with pixel centres at integers, COLMAP's ``cx, cy`` minus
0.5, unlike the two MegaDepth-1500 layouts, whose intrinsics are used as given).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from dataloader.colmap_model import DEFAULT_PAIRS, check_images, read_model, select_pairs
from dataloader.megadepth_layout import parse_numbers
from evaluation.matching import read_features, require_files
from evaluation.methods import Matcher, Method, make_matcher, method_features, parse_methods
from utils.cli import progress, resolve_device
from utils.atomic import atomic_target, write_json
from utils.errors import SCFeatError
from utils.files import files_signature
from utils.image import load_image

logger = logging.getLogger(__name__)

# Bump when the protocol or the cache content changes, so older caches are never reused.
PROTOCOL_VERSION = "megadepth1500-relative-pose-v1"
AUC_THRESHOLDS = (5, 10, 20)
LAYOUTS = ("gluefactory", "loftr", "colmap")
ESTIMATORS = ("opencv", "poselib")
# Pixels: LoFTR's OpenCV threshold, glue-factory's PoseLib threshold.
DEFAULT_RANSAC_THRESHOLD = {"opencv": 0.5, "poselib": 1.0}
PAIRS_FORMAT = "name0 name1 K0(9) K1(9) R(9) t(3)"
SCENE_INFO_KEYS = ("image_paths", "intrinsics", "poses", "pair_infos")

default_conf = {
    "data_path": "data/megadepth1500-synthetic",
    "layout": "gluefactory",  # gluefactory: pairs_file + images_dir; loftr: scene_info_dir;
    # colmap: model_dir + images_dir, pairs by colmap_pairs (dataloader.colmap_model)
    "pairs_file": "pairs_calibrated.txt",  # relative to data_path (or absolute)
    "images_dir": "images",  # glue-factory's image root, relative to data_path
    "scene_info_dir": "megadepth_test_1500_scene_info",  # LoFTR's, relative to data_path
    "model_dir": "sparse",  # layout colmap: the COLMAP model, relative to data_path
    "colmap_pairs": dict(DEFAULT_PAIRS),  # layout colmap: the pair rule and its thresholds
    "methods": ["sift"],  # evaluation.methods names: sift, disk, aliked+lightglue, checkpoints...
    "resize": 1600,  # longer image side in pixels; None keeps the images' size
    "max_keypoints": 2048,  # every method's budget; None: each method's own default
    "ratio": None,  # Lowe's ratio on top of the mutual check (not for LightGlue); None: none
    "estimator": "opencv",
    "ransac_threshold": None,  # pixels; None: DEFAULT_RANSAC_THRESHOLD of the estimator
    "confidence": 0.99999,
    "epipolar_threshold": 5e-4,
    "cache_dir": "ckpts/pose-eval/cache",
    "output_json": "ckpts/pose-eval/pose.json",
    "output_plot": "ckpts/pose-eval/pose.png",
    "device": "auto",
    "seed": 0,
}


@dataclass(frozen=True)
class PosePair:
    """One test pair: image keys and files, intrinsics ``3×3`` (original pixels), the relative
    pose ``R`` ``3×3``, ``t`` ``3`` (``x1 = R·x0 + t``) and where it was read (``source``)."""
    key0: str
    key1: str
    path0: Path
    path1: Path
    K0: np.ndarray
    K1: np.ndarray
    R: np.ndarray
    t: np.ndarray
    source: str


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------

def _check_pose_values(K0: np.ndarray, K1: np.ndarray, R: np.ndarray, t: np.ndarray,
                       where: str) -> None:
    """Finite values, positive focal lengths and a rotation ``R``; else an error at ``where``."""
    if not all(np.isfinite(a).all() for a in (K0, K1, R, t)):
        raise SCFeatError(f"{where}: intrinsics and pose must be finite numbers")
    for name, K in (("K0", K0), ("K1", K1)):
        if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]):
            raise SCFeatError(f"{where}: {name} is not an intrinsics matrix (expected "
                              f"[[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0)")
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or abs(np.linalg.det(R) - 1) > 1e-3:
        raise SCFeatError(f"{where}: R is not a rotation matrix (R·Rᵀ must be I, det R = 1)")


def read_pairs_calibrated(path: str | Path, image_root: str | Path) -> list[PosePair]:
    """glue-factory's ``pairs_calibrated.txt`` (``PAIRS_FORMAT`` per line; blank lines and
    lines starting with ``#`` skipped); images are ``<image_root>/<name>``."""
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise SCFeatError(f"pairs file {path} not found (expected one line per pair: "
                          f"{PAIRS_FORMAT})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SCFeatError(f"{path}: cannot read it as UTF-8 text ({error})") from None
    pairs = []
    for number, line in enumerate(text.split("\n"), start=1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(tokens) != 32:
            raise SCFeatError(f"{where}: expected 32 values ({PAIRS_FORMAT}), got {len(tokens)}")
        values = parse_numbers(tokens[2:], where, PAIRS_FORMAT)
        K0, K1, R = values[:9].reshape(3, 3), values[9:18].reshape(3, 3), values[18:27].reshape(3, 3)
        t = values[27:30]
        _check_pose_values(K0, K1, R, t, where)
        pairs.append(PosePair(tokens[0], tokens[1], image_root / tokens[0], image_root / tokens[1],
                              K0, K1, R, t, where))
    if not pairs:
        raise SCFeatError(f"{path}: no pairs (expected one line per pair: {PAIRS_FORMAT})")
    return pairs


def read_scene_info(path: str | Path, data_root: str | Path) -> list[PosePair]:
    """The pairs of one LoFTR scene-info file; images are ``<data_root>/<image_paths[i]>``.

    These files hold pickled objects (``pair_infos``), so they are loaded with
    ``allow_pickle``: read only files you trust.
    """
    path, data_root = Path(path), Path(data_root)
    try:
        with np.load(path, allow_pickle=True) as data:
            missing = [key for key in SCENE_INFO_KEYS if key not in data.files]
            if missing:
                raise SCFeatError(f"{path}: lacks {missing} (expected LoFTR's scene info with "
                                  f"{', '.join(SCENE_INFO_KEYS)})")
            image_paths, intrinsics = data["image_paths"], data["intrinsics"]
            poses, pair_infos = data["poses"], data["pair_infos"]
    except SCFeatError:
        raise
    except Exception as error:  # np.load raises several types for a corrupt file
        raise SCFeatError(f"{path}: cannot read it as an npz file ({error})") from error
    count = len(image_paths)
    if np.shape(intrinsics)[1:] != (3, 3) or np.shape(poses)[1:] != (4, 4) \
            or len(intrinsics) != count or len(poses) != count:
        raise SCFeatError(f"{path}: expected intrinsics N×3×3 and poses N×4×4 for the "
                          f"{count} image_paths, got {np.shape(intrinsics)} and {np.shape(poses)}")
    pairs = []
    for index, info in enumerate(pair_infos):
        where = f"{path}: pair_infos[{index}]"
        try:
            (i, j), _overlap, _central = info
            i, j = int(i), int(j)
        except (TypeError, ValueError):
            raise SCFeatError(f"{where}: expected ((i, j), overlap, central_matches), got "
                              f"{info!r}") from None
        for k in (i, j):
            if not 0 <= k < count or not isinstance(image_paths[k], str) or not image_paths[k]:
                raise SCFeatError(f"{where}: image {k} has no entry in image_paths "
                                  f"({count} entries)")
        relative = np.asarray(poses[j], np.float64) @ np.linalg.inv(np.asarray(poses[i], np.float64))
        K0, K1 = np.asarray(intrinsics[i], np.float64), np.asarray(intrinsics[j], np.float64)
        _check_pose_values(K0, K1, relative[:3, :3], relative[:3, 3], where)
        pairs.append(PosePair(image_paths[i], image_paths[j], data_root / image_paths[i],
                              data_root / image_paths[j], K0, K1, relative[:3, :3],
                              relative[:3, 3], where))
    return pairs


def read_colmap_pairs(model_dir: Path, images_dir: Path, options: dict | None = None,
                      ) -> tuple[list[PosePair], list[Path]]:
    """The pairs of a COLMAP model (:func:`dataloader.colmap_model.select_pairs` with
    ``options``) and the model's files; every image must be in ``images_dir`` at its camera's
    size."""
    model = read_model(model_dir)
    paths = check_images(model, images_dir)
    selection = select_pairs(model, options)
    logger.info("%s: %d pairs of %d images (%s rule: %s)", model_dir, len(selection),
                len(model.names), selection.rule, selection.description)
    pairs = []
    for i, j in zip(selection.i, selection.j):
        a, b = model.cameras[i], model.cameras[j]
        relative = b.pose @ np.linalg.inv(a.pose)
        pairs.append(PosePair(model.names[i], model.names[j], paths[i], paths[j], a.K, b.K,
                              relative[:3, :3], relative[:3, 3],
                              f"{model.files[1]}: {model.names[i]} {model.names[j]}"))
    return pairs, model.files


def resolve(data_path: Path, name: str) -> Path:
    """``name`` relative to ``data_path`` unless absolute."""
    return Path(name) if Path(name).is_absolute() else data_path / name


def load_pairs(conf: dict) -> tuple[list[PosePair], list[Path]]:
    """The test pairs of the configured layout and the index files they came from."""
    data_path = Path(conf["data_path"])
    if not data_path.is_dir():
        raise SCFeatError(f"config key 'data_path': {data_path} is not a folder (write the "
                          f"synthetic set with: python -m tools.synthetic megadepth1500 --out "
                          f"{data_path})")
    if conf["layout"] == "gluefactory":
        pairs_file = resolve(data_path, conf["pairs_file"])
        return read_pairs_calibrated(pairs_file, resolve(data_path, conf["images_dir"])), [pairs_file]
    if conf["layout"] == "colmap":
        return read_colmap_pairs(resolve(data_path, conf["model_dir"]),
                                 resolve(data_path, conf["images_dir"]), conf["colmap_pairs"])
    folder = resolve(data_path, conf["scene_info_dir"])
    files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    if not files:
        raise SCFeatError(f"config key 'scene_info_dir': no LoFTR scene-info files (*.npz) in "
                          f"{folder}")
    pairs = [pair for path in files for pair in read_scene_info(path, data_path)]
    if not pairs:
        raise SCFeatError(f"{folder}: the scene-info files list no pairs")
    return pairs, files


# ---------------------------------------------------------------------------------------------
# images and intrinsics
# ---------------------------------------------------------------------------------------------

def resize_long_side(image: np.ndarray, resize: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``image`` resized so its longer side is ``resize`` (``None``: unchanged) and the scales
    ``[sx, sy]`` (new size over old size, per axis after rounding)."""
    height, width = image.shape[:2]
    if resize is None or max(height, width) == resize:
        return image, np.ones(2)
    scale = resize / max(height, width)
    new_w, new_h = max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return resized, np.array([new_w / width, new_h / height])


def scale_intrinsics(K: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``K`` ``3×3`` of the image resized by ``scales`` ``[sx, sy]``, pixel centres at integers
    (``x' = (x + 0.5)·s − 0.5``)."""
    sx, sy = scales
    scaling = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return scaling @ K


# ---------------------------------------------------------------------------------------------
# estimation and errors
# ---------------------------------------------------------------------------------------------

def normalize_points(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels ``N×2`` → normalised image coordinates ``N×2`` (``K⁻¹·x``, no skew)."""
    return (points - K[[0, 1], [2, 2]][None]) / K[[0, 1], [0, 1]][None]


def estimate_pose_opencv(points0: np.ndarray, points1: np.ndarray, K0: np.ndarray,
                         K1: np.ndarray, threshold: float, confidence: float = 0.99999,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """LoFTR's ``estimate_pose``: ``(R 3×3, t 3 (unit), inlier mask N)`` or ``None``."""
    if len(points0) < 5:
        return None
    mean_focal = np.mean([K0[0, 0], K1[1, 1], K0[0, 0], K1[1, 1]])  # LoFTR's (sic) mean focal
    norm0, norm1 = normalize_points(points0, K0), normalize_points(points1, K1)
    E, mask = cv2.findEssentialMat(norm0, norm1, np.eye(3), threshold=threshold / mean_focal,
                                   prob=confidence, method=cv2.RANSAC)
    if E is None:
        return None
    best, result = 0, None
    for candidate in np.split(E, len(E) // 3):  # several solutions may be stacked
        inliers, R, t, _ = cv2.recoverPose(candidate, norm0, norm1, np.eye(3), 1e9,
                                           mask=mask.copy())
        if inliers > best:
            best, result = inliers, (R, t[:, 0], mask.ravel() > 0)
    return result


def estimate_pose_poselib(points0: np.ndarray, points1: np.ndarray, K0: np.ndarray,
                          K1: np.ndarray, threshold: float, size0: tuple[int, int],
                          size1: tuple[int, int], seed: int = 0,
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """glue-factory's PoseLib estimator: ``(R, t (unit), inlier mask N)`` or ``None``.
    ``size0``/``size1``: image ``(width, height)``."""
    import poselib

    if len(points0) < 5:
        return None

    def camera(K: np.ndarray, size: tuple[int, int]) -> dict:
        return {"model": "PINHOLE", "width": int(size[0]), "height": int(size[1]),
                "params": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]}

    pose, info = poselib.estimate_relative_pose(
        np.ascontiguousarray(points0, np.float64), np.ascontiguousarray(points1, np.float64),
        camera(K0, size0), camera(K1, size1), {"max_epipolar_error": threshold, "seed": seed}, {})
    if pose is None or not info.get("inliers") or not any(info["inliers"]):
        return None
    t = np.asarray(pose.t, np.float64)
    return np.asarray(pose.R, np.float64), t / max(np.linalg.norm(t), 1e-12), \
        np.asarray(info["inliers"], bool)


def angle_between(v0: np.ndarray, v1: np.ndarray) -> float:
    """Angle in degrees between two 3-vectors."""
    cos = np.dot(v0, v1) / max(np.linalg.norm(v0) * np.linalg.norm(v1), 1e-30)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def rotation_error(R: np.ndarray, R_gt: np.ndarray) -> float:
    """Angle in degrees of ``Rᵀ·R_gt``."""
    cos = (np.trace(R.T @ R_gt) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def relative_pose_error(R_gt: np.ndarray, t_gt: np.ndarray, R: np.ndarray,
                        t: np.ndarray) -> tuple[float, float]:
    """``(t error, R error)`` in degrees; the t error ignores t's sign (E's ambiguity)."""
    t_error = angle_between(t, t_gt)
    return min(t_error, 180.0 - t_error), rotation_error(R, R_gt)


def pose_auc(errors: np.ndarray | list, thresholds=AUC_THRESHOLDS) -> list[float]:
    """Area under the recall-over-error curve up to each threshold, over the threshold.

    The curve steps through ``(0, 0)`` and ``(e_k, k/N)`` for the sorted errors ``e_k``
    (linear between them, flat after the last error below the threshold); ``inf`` errors
    (failures) only lower the recall. Equals SuperGlue's / LoFTR's ``pose_auc``.
    """
    errors = np.sort(np.asarray(errors, np.float64))
    if len(errors) == 0:
        return [0.0 for _ in thresholds]
    recall = np.arange(len(errors) + 1) / len(errors)
    errors = np.concatenate([[0.0], errors])
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has trapz only
    aucs = []
    for threshold in thresholds:
        last = int(np.searchsorted(errors, threshold))
        x = np.concatenate([errors[:last], [threshold]])
        y = np.concatenate([recall[:last], [recall[last - 1]]])
        aucs.append(float(trapezoid(y, x) / threshold))
    return aucs


def skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def symmetric_epipolar_distances(points0: np.ndarray, points1: np.ndarray, K0: np.ndarray,
                                 K1: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """LoFTR's squared symmetric epipolar distances ``N`` in normalised coordinates for
    ``E = [t]ₓ·R``."""
    E = skew(t) @ R
    x0 = np.concatenate([normalize_points(points0, K0), np.ones((len(points0), 1))], axis=1)
    x1 = np.concatenate([normalize_points(points1, K1), np.ones((len(points1), 1))], axis=1)
    Ex0, Etx1 = x0 @ E.T, x1 @ E
    residual = np.sum(x1 * Ex0, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return residual ** 2 * (1.0 / (Ex0[:, 0] ** 2 + Ex0[:, 1] ** 2)
                                + 1.0 / (Etx1[:, 0] ** 2 + Etx1[:, 1] ** 2))


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def ransac_threshold(conf: dict) -> float:
    value = conf["ransac_threshold"]
    return DEFAULT_RANSAC_THRESHOLD[conf["estimator"]] if value is None else float(value)


def evaluate_pair(pair: PosePair, points0: np.ndarray, points1: np.ndarray, K0: np.ndarray,
                  K1: np.ndarray, sizes: tuple, conf: dict) -> dict:
    """Pose error and match statistics of one pair from its matched points ``K×2`` (pixels of
    the resized images, whose intrinsics are ``K0``, ``K1`` and sizes ``(w, h)`` ``sizes``)."""
    threshold = ransac_threshold(conf)
    if conf["estimator"] == "opencv":
        estimate = estimate_pose_opencv(points0, points1, K0, K1, threshold, conf["confidence"])
    else:
        estimate = estimate_pose_poselib(points0, points1, K0, K1, threshold, sizes[0], sizes[1],
                                         conf["seed"])
    distances = symmetric_epipolar_distances(points0, points1, K0, K1, pair.R, pair.t)
    record = {"name0": pair.key0, "name1": pair.key1, "matches": int(len(points0)),
              "precision": float(np.mean(distances < conf["epipolar_threshold"]))
              if len(distances) else 0.0,
              "error_t": float("inf"), "error_R": float("inf"), "inliers": 0}
    if estimate is not None:
        R, t, inliers = estimate
        record["error_t"], record["error_R"] = relative_pose_error(pair.R, pair.t, R, t)
        record["inliers"] = int(np.sum(inliers))
    record["error"] = max(record["error_t"], record["error_R"])
    return record


def evaluate_matches(pairs: list[PosePair], feature_files: dict[str, Path], conf: dict,
                     match: Matcher) -> list[dict]:
    """Match (``match``, see :func:`evaluation.methods.make_matcher`) and estimate every pair;
    one record per pair (see :func:`evaluate_pair`)."""
    records = []
    for pair in progress(pairs, "pairs"):
        features = [read_features(feature_files[key]) for key in (pair.key0, pair.key1)]
        extras = [_read_extras(feature_files[key]) for key in (pair.key0, pair.key1)]
        matches = match(features[0], features[1])
        points0 = features[0].keypoints[matches[:, 0]]
        points1 = features[1].keypoints[matches[:, 1]]
        K0 = scale_intrinsics(pair.K0, extras[0]["scale"])
        K1 = scale_intrinsics(pair.K1, extras[1]["scale"])
        sizes = (features[0].image_size, features[1].image_size)
        records.append(evaluate_pair(pair, points0, points1, K0, K1, sizes, conf))
    return records


def _read_extras(path: Path) -> dict[str, np.ndarray]:
    """The ``scale`` ``[sx, sy]`` stored with the features."""
    with np.load(path, allow_pickle=False) as data:
        if "scale" not in data.files or "image_size" not in data.files:
            raise SCFeatError(f"feature file {path} lacks 'scale'/'image_size' (written by an "
                              f"older version? delete the cache folder {path.parent})")
        return {"scale": data["scale"].astype(np.float64)}


def summarize(records: list[dict]) -> dict:
    """AUC@5/10/20 (fractions), mean epipolar precision, matches and inliers, failures."""
    errors = [r["error"] for r in records]
    aucs = pose_auc(errors)
    return {"auc": dict(zip((str(t) for t in AUC_THRESHOLDS), aucs)),
            "epipolar_precision": float(np.mean([r["precision"] for r in records])),
            "mean_matches": float(np.mean([r["matches"] for r in records])),
            "mean_inliers": float(np.mean([r["inliers"] for r in records])),
            "failed": int(sum(not np.isfinite(e) for e in errors)), "pairs": len(records)}


def image_loaders(pairs: list[PosePair], resize: int | None) -> dict[str, Callable]:
    """``{image key: function → (resized RGB image, {scale})}`` of all pairs."""
    paths = {}
    for pair in pairs:
        paths[pair.key0], paths[pair.key1] = pair.path0, pair.path1

    def loader(path: Path) -> Callable:
        def load() -> tuple[np.ndarray, dict]:
            image, scales = resize_long_side(load_image(path), resize)
            return image, {"scale": scales}
        return load
    return {key: loader(path) for key, path in paths.items()}


def evaluate_method(method: Method, pairs: list[PosePair], index_files: list[Path], conf: dict,
                    device: torch.device | str = "cpu") -> tuple[list[dict], Path]:
    """Per-pair records of one method, from the cache when its inputs are unchanged.

    Features go to ``<cache_dir>/features/<features label>-<hash>/`` (keyed by what makes the
    features, the image files, ``resize`` and the keypoint budget, so methods that differ only
    in their matcher share them); the records to ``<cache_dir>/<label>-<hash>.json`` (keyed by
    the feature files, the index files, the matcher and the protocol settings).
    """
    label = method.label
    cache_dir = Path(conf["cache_dir"])
    images = sorted({path for pair in pairs for path in (pair.path0, pair.path1)})
    feature_files = method_features(method, image_loaders(pairs, conf["resize"]), images,
                                    cache_dir / "features", f"resize={conf['resize']}",
                                    conf["max_keypoints"], device)
    settings = {key: conf[key] for key in ("estimator", "confidence", "ratio",
                                           "epipolar_threshold", "seed")}
    settings["ransac_threshold"] = ransac_threshold(conf)
    settings["matcher"] = method.matcher
    if conf["layout"] == "colmap":  # the pairs depend on the rule, not only on the model files
        settings["colmap_pairs"] = conf["colmap_pairs"]
    signature = files_signature(list(feature_files.values()) + index_files,
                                f"{PROTOCOL_VERSION}\n{json.dumps(settings, sort_keys=True)}")
    cache_path = cache_dir / f"{label}-{signature[:16]}.json"
    if cache_path.is_file():
        logger.info("%s: reusing %s", label, cache_path)
        try:
            return json.loads(cache_path.read_text())["records"], cache_path
        except (ValueError, KeyError) as error:
            logger.warning("%s: unreadable cache %s (%s), evaluating again", label, cache_path,
                           error)
    logger.info("%s: evaluating %d pairs", label, len(pairs))
    cv2.setRNGSeed(conf["seed"])  # OpenCV's RANSAC draws from the global generator
    records = evaluate_matches(pairs, feature_files, conf,
                               make_matcher(method, device, conf["ratio"]))
    write_json(cache_path, {"protocol": PROTOCOL_VERSION, "method": method.name,
                            "settings": settings, "records": records}, indent=None)
    return records, cache_path


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def format_table(results: dict[str, dict]) -> str:
    """Text table: AUC@5/10/20 (%), epipolar precision (%), matches, inliers, failures."""
    width = max([len("method")] + [len(name) for name in results])
    header = (f"{'method':<{width}}" + "".join(f"{'AUC@' + str(t):>9}" for t in AUC_THRESHOLDS)
              + f"{'P(epi)':>9}{'matches':>9}{'inliers':>9}{'failed':>8}")
    lines = [header, "-" * len(header)]
    for name, summary in results.items():
        lines.append(f"{name:<{width}}"
                     + "".join(f"{100 * summary['auc'][str(t)]:>9.1f}" for t in AUC_THRESHOLDS)
                     + f"{100 * summary['epipolar_precision']:>9.1f}"
                     + f"{summary['mean_matches']:>9.0f}{summary['mean_inliers']:>9.0f}"
                     + f"{summary['failed']:>5}/{summary['pairs']}")
    return "\n".join(lines)


def auc_line(name: str, summary: dict) -> str:
    """``AUC@5/10/20 <name>: a / b / c`` (percent)."""
    values = " / ".join(f"{100 * summary['auc'][str(t)]:.1f}" for t in AUC_THRESHOLDS)
    return f"AUC@5/10/20 {name}: {values}"


def plot_cumulative_errors(results: dict[str, list[dict]], path: str | Path,
                           max_error: float = AUC_THRESHOLDS[-1]) -> None:
    """The fraction of pairs with pose error below x, for x in 0..max_error degrees."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    grid = np.linspace(0.0, max_error, 401)
    for name, records in results.items():
        errors = np.array([r["error"] for r in records])
        axis.plot(grid, [(errors <= x).mean() for x in grid], linewidth=2, label=name)
    axis.set_xlim(0, max_error)
    axis.set_ylim(0, 1)
    axis.set_xlabel("pose error max(ΔR, Δt) [°]")
    axis.set_ylabel("fraction of pairs")
    axis.grid()
    axis.legend()
    figure.tight_layout()
    try:
        with atomic_target(Path(path)) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(figure)


def run_pose_evaluation(conf: dict, print_fn: Callable[[str], None] = print) -> dict[str, dict]:
    """Evaluate the configured methods; print a table and one ``AUC@5/10/20`` line per method
    (the last method's last), write the JSON and the plot. Returns ``{label: summary}``."""
    conf = {**default_conf, **conf}
    methods = parse_methods(conf["methods"])
    labels = [method.label for method in methods]
    if conf["max_keypoints"] is not None and conf["max_keypoints"] < 1:
        raise SCFeatError(f"config key 'max_keypoints': expected a positive number or null, got "
                          f"{conf['max_keypoints']}")
    if conf["resize"] is not None and conf["resize"] < 16:
        raise SCFeatError(f"config key 'resize': expected at least 16 pixels or null, got "
                          f"{conf['resize']}")
    device = resolve_device(conf["device"])
    pairs, index_files = load_pairs(conf)
    require_files(sorted({p for pair in pairs for p in (pair.path0, pair.path1)}), "image")
    title = "COLMAP model" if conf["layout"] == "colmap" else "MegaDepth-1500"
    print_fn(f"{title} relative pose: {len(pairs)} pairs ({conf['layout']} layout) in "
             f"{conf['data_path']}; estimator {conf['estimator']}, RANSAC threshold "
             f"{ransac_threshold(conf)} px, resize {conf['resize']}")
    all_records, summaries = {}, {}
    for method, label in zip(methods, labels):
        records, cache_path = evaluate_method(method, pairs, index_files, conf, device)
        print_fn(f"{label}: cache {cache_path}")
        all_records[label], summaries[label] = records, summarize(records)
    print_fn(format_table(summaries))
    if conf["output_json"]:
        write_json(conf["output_json"], {"protocol": PROTOCOL_VERSION, "config": conf,
                                         "summaries": summaries, "records": all_records},
                   default=str)
        print_fn(f"results: {conf['output_json']}")
    if conf["output_plot"]:
        plot_cumulative_errors(all_records, conf["output_plot"])
        print_fn(f"plot: {conf['output_plot']}")
    for label in labels:
        print_fn(auc_line(label, summaries[label]))
    return summaries
