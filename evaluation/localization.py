"""Visual localisation with pycolmap and the Aachen Day-Night protocol's measures.

Per scene: the reference images, whose poses are known, are matched exhaustively (the
method's matcher, :mod:`evaluation.methods`; COLMAP's geometric verification) and triangulated
with their known
cameras (``pycolmap.triangulate_points``); each query image is matched to every reference
image, its keypoints matched to a reference keypoint with a 3-D point give 2D–3D
correspondences, and ``pycolmap.estimate_and_refine_absolute_pose`` (LO-RANSAC, 12 px, then
refinement; hloc's settings) gives its pose. Reported: the fraction of queries whose pose is
within (0.25 m, 2°), (0.5 m, 5°) and (5 m, 10°) of the ground truth (camera centre distance
and rotation angle; on synthetic scenes one scene unit counts as one metre).

Known cameras come from an ``img_cam.txt``-layout file (e.g. ``tools.synthetic
megadepth1500``'s ``poses/<scene>.txt``); queries are every ``query_every``-th image unless
named.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dataloader.megadepth_layout import CameraRecord
from evaluation.matching import Features
from evaluation.methods import Matcher, Method, make_matcher
from evaluation.reconstruction import (COLMAP_PIXEL_OFFSET, _pycolmap, build_database,
                                       camera_centre, colmap_camera, exhaustive_matches,
                                       extract_features, list_images, read_ground_truth,
                                       FEATURE_CONF, rotation_angle)
from utils.config import Spec
from utils.errors import SCFeatError

logger = logging.getLogger(__name__)

AACHEN_THRESHOLDS = ((0.25, 2.0), (0.5, 5.0), (5.0, 10.0))  # (metres, degrees)

# localize.py's config (config/localize.yaml).
default_conf = {
    "images": Spec(types=(list,), doc="the image folder of each scene"),
    "poses": Spec(types=(list,), doc="the known cameras of each scene (img_cam.txt layout), "
                                     "in the order of images"),
    "queries": Spec(None, types=(list, type(None)),
                    doc="query image names; null: every query_every-th image"),
    "query_every": 4,
    **FEATURE_CONF,
}


def split_queries(names: list[str], queries: list[str] | None, query_every: int,
                  ) -> tuple[list[str], list[str]]:
    """``(references, queries)``: the named queries, else every ``query_every``-th image."""
    if queries:
        unknown = [q for q in queries if q not in names]
        if unknown:
            raise SCFeatError(f"--queries: {', '.join(unknown)} not among the images")
        chosen = [n for n in names if n in set(queries)]
    else:
        if query_every < 2:
            raise SCFeatError(f"--query-every must be at least 2, got {query_every}")
        chosen = names[::query_every]
    references = [n for n in names if n not in set(chosen)]
    if len(references) < 2:
        raise SCFeatError(f"need at least 2 reference images, got {len(references)} of "
                          f"{len(names)} (fewer queries)")
    return references, chosen


def reference_model(database: Path, cameras: dict[str, CameraRecord]):
    """A pycolmap reconstruction holding the reference cameras and their known poses (no
    points yet), with the database's camera and image ids."""
    pycolmap = _pycolmap()
    model = pycolmap.Reconstruction()
    with pycolmap.Database.open(database) as db:
        images = sorted(db.read_all_images(), key=lambda image: image.image_id)
    for stored in images:
        camera = colmap_camera(cameras[stored.name])
        camera.camera_id = stored.camera_id
        model.add_camera_with_trivial_rig(camera)
        image = pycolmap.Image(name=stored.name, camera_id=stored.camera_id,
                               image_id=stored.image_id)
        pose = cameras[stored.name].pose
        model.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pose[:3, :4]))
    return model


def triangulate_references(images_dir: Path, references: list[str],
                           features: dict[str, Features], cameras: dict[str, CameraRecord],
                           out_dir: Path, match: Matcher):
    """The 3-D points of the reference images, matched by ``match`` and triangulated from
    their known poses."""
    pycolmap = _pycolmap()
    matches = exhaustive_matches(features, references, match)
    database = out_dir / "references.db"
    build_database(database, images_dir, references, features, matches, cameras)
    model = reference_model(database, cameras)
    options = pycolmap.IncrementalPipelineOptions()
    options.num_threads = min(torch.get_num_threads(), 4)
    (out_dir / "triangulated").mkdir(parents=True, exist_ok=True)
    return pycolmap.triangulate_points(model, database, images_dir, out_dir / "triangulated",
                                       options=options)


def correspondences_2d3d(query: Features, model, features: dict[str, Features], match: Matcher,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Query pixels ``K×2`` and world points ``K×3`` from ``match`` es to every reference image
    (one entry per distinct (query keypoint, 3-D point))."""
    pairs = set()
    for image in model.images.values():
        point_ids = np.array([p.point3D_id if p.has_point3D() else -1 for p in image.points2D])
        matches = match(query, features[image.name])
        for query_index, reference_index in matches:
            if point_ids[reference_index] >= 0:
                pairs.add((int(query_index), int(point_ids[reference_index])))
    if not pairs:
        return np.zeros((0, 2)), np.zeros((0, 3))
    pairs = sorted(pairs)
    points2d = query.keypoints[[q for q, _ in pairs]]
    points3d = np.array([model.points3D[p].xyz for _, p in pairs])
    return points2d, points3d


def localize_query(points2d: np.ndarray, points3d: np.ndarray, camera: CameraRecord,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, int] | None:
    """World→camera ``(R, t)`` and the inlier count from 2D–3D matches, or ``None``."""
    pycolmap = _pycolmap()
    if len(points2d) < 4:
        return None
    options = pycolmap.AbsolutePoseEstimationOptions()
    options.ransac.max_error = 12.0  # hloc's localisation threshold (pixels)
    options.ransac.random_seed = seed
    result = pycolmap.estimate_and_refine_absolute_pose(
        points2d + COLMAP_PIXEL_OFFSET, points3d, colmap_camera(camera), options)
    if result is None:
        return None
    pose = result["cam_from_world"]
    return pose.rotation.matrix(), np.asarray(pose.translation), int(result["num_inliers"])


def query_errors(estimate: tuple | None, camera: CameraRecord) -> tuple[float, float]:
    """``(centre error, rotation error in degrees)``; ``inf`` for a failed query."""
    if estimate is None:
        return float("inf"), float("inf")
    R, t, _ = estimate
    R_gt, t_gt = camera.pose[:3, :3], camera.pose[:3, 3]
    centre_error = float(np.linalg.norm(camera_centre(R, t) - camera_centre(R_gt, t_gt)))
    return centre_error, rotation_angle(R.T @ R_gt)


def recall_at(errors: list[tuple[float, float]], thresholds=AACHEN_THRESHOLDS) -> list[float]:
    """Fraction of queries within each ``(metres, degrees)`` threshold."""
    if not errors:
        return [0.0 for _ in thresholds]
    return [float(np.mean([c <= metres and r <= degrees for c, r in errors]))
            for metres, degrees in thresholds]


def localize_scene(images_dir: str | Path, poses: str | Path, method: Method,
                   out_dir: str | Path, queries: list[str] | None = None, query_every: int = 4,
                   max_keypoints: int | None = 2048, ratio: float | None = None,
                   device: torch.device | str = "cpu", seed: int = 0) -> list[dict]:
    """Localise the queries of one scene with ``method`` (features and matcher); one record per
    query (name, errors, inliers). ``max_keypoints`` ``None``: the method's own budget."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    names = list_images(images_dir)
    cameras = read_ground_truth(poses, names)
    references, chosen = split_queries(names, queries, query_every)
    features = extract_features(method, images_dir, names, out_dir / "features", max_keypoints,
                                device)
    scene_dir = out_dir / f"{method.label}-{images_dir.name}"
    match = make_matcher(method, device, ratio)
    model = triangulate_references(images_dir, references, features, cameras, scene_dir, match)
    logger.info("%s: %d reference images, %d 3-D points", images_dir, len(references),
                model.num_points3D())
    records = []
    for name in chosen:
        points2d, points3d = correspondences_2d3d(features[name], model, features, match)
        estimate = localize_query(points2d, points3d, cameras[name], seed)
        centre_error, rotation_error = query_errors(estimate, cameras[name])
        records.append({"scene": images_dir.name, "query": name, "matches_2d3d": len(points2d),
                        "inliers": estimate[2] if estimate else 0,
                        "centre_error": centre_error, "rotation_error": rotation_error})
    return records


def summarize(records: list[dict]) -> dict:
    """Recall at the Aachen thresholds, median errors, mean 2D–3D matches."""
    errors = [(r["centre_error"], r["rotation_error"]) for r in records]
    return {"queries": len(records),
            "recall": dict(zip([f"{m}m,{d}deg" for m, d in AACHEN_THRESHOLDS],
                               recall_at(errors))),
            "centre_error_median": float(np.median([c for c, _ in errors])) if errors else None,
            "rotation_error_median": float(np.median([r for _, r in errors])) if errors else None,
            "mean_matches_2d3d": float(np.mean([r["matches_2d3d"] for r in records]))
            if records else 0.0}
