"""3-D reconstruction with pycolmap and the measures of the ETH local-feature benchmark.

Steps: features of every image (any method of :mod:`evaluation.methods`, cached), exhaustive
matching with the method's matcher (mutual nearest neighbours or LightGlue), import into a
COLMAP database, COLMAP's geometric verification, incremental mapping. Reported (:func:`reconstruction_statistics`): registered images, 3-D
points, observations, mean track length, mean reprojection error (pixels) — the ETH table —
and, with ground-truth cameras (``img_cam.txt`` layout, e.g. ``tools.synthetic
megadepth1500``'s ``poses/<scene>.txt``, or a COLMAP model folder), the rotation and
camera-centre errors of the registered images after a similarity alignment of the camera
centres (:func:`pose_errors`) and their mAA (:func:`mean_average_accuracy`).

COLMAP puts pixel centres at ``x + 0.5`` (the top-left corner is 0); our keypoints and
intrinsics put them at integers, so both are shifted by 0.5 on the way in (as hloc does).
Ground-truth intrinsics, when given, are used as fixed ``PINHOLE`` cameras; without them
every image gets a ``SIMPLE_RADIAL`` camera from COLMAP's focal prior, refined by the mapper.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dataloader.colmap_model import check_images, read_model
from dataloader.megadepth_layout import CameraRecord, read_img_cam
from evaluation.matching import Features, read_features
from evaluation.methods import SYNTAX, Matcher, Method, make_matcher, method_features
from utils.cli import run_cli, setup_logging
from utils.errors import SCFeatError
from utils.image import load_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")
COLMAP_PIXEL_OFFSET = 0.5  # COLMAP's pixel centres are at x + 0.5
# mAA thresholds, paired: IMC 2022's 10 (rotation in degrees, translation in metres; here the
# camera centre error after the alignment, in ground-truth units).
MAA_ROTATION_DEG = tuple(float(v) for v in np.linspace(1, 10, 10))
MAA_CENTRE = tuple(float(v) for v in np.geomspace(0.2, 5, 10))


def _pycolmap():
    try:
        import pycolmap
    except ImportError as error:
        raise SCFeatError("reconstruction and localisation need pycolmap "
                          "(pip install pycolmap)") from error
    return pycolmap


def quiet_colmap() -> None:
    """COLMAP logs only warnings and errors (its INFO lines run to hundreds per scene)."""
    pycolmap = _pycolmap()
    pycolmap.logging.minloglevel = int(pycolmap.logging.WARNING)


def colmap_cli(work) -> int:
    """What ``reconstruct.py`` and ``localize.py`` share around their work: logging, COLMAP's
    log level and the exit codes of :func:`utils.cli.run_cli`."""
    setup_logging()
    quiet_colmap()
    return run_cli(work)


def add_feature_arguments(parser) -> None:
    """The options ``reconstruct.py`` and ``localize.py`` share (an ``argparse`` parser)."""
    parser.add_argument("--features", required=True, metavar="METHOD",
                        help=f"the method: {SYNTAX} (evaluation/methods.py)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-keypoints", type=int, default=2048,
                        help="keypoint budget of the method (default 2048)")
    parser.add_argument("--ratio", type=float, default=None,
                        help="Lowe's ratio test on top of mutual nearest neighbours (none)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)


def list_images(folder: str | Path) -> list[str]:
    """Sorted image file names of ``folder`` (suffixes ``IMAGE_SUFFIXES``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SCFeatError(f"--images {folder}: not a folder of images")
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(names) < 2:
        raise SCFeatError(f"--images {folder}: expected at least 2 images "
                          f"({', '.join(IMAGE_SUFFIXES)}), found {len(names)}")
    return names


def read_ground_truth(path: str | Path, names: list[str],
                      images_dir: str | Path | None = None) -> dict[str, CameraRecord]:
    """Ground-truth cameras of ``names`` from an ``img_cam.txt`` file or a COLMAP model folder
    (:func:`dataloader.colmap_model.read_model`: pixel centres moved to integers); every name
    must be there. With ``images_dir``, a model's cameras must have the images' sizes."""
    path = Path(path)
    if path.is_dir():
        model = read_model(path)
        cameras, expected = model.records(), f"an image entry in {model.files[1]}"
        if images_dir is not None:
            keep = [k for k, name in enumerate(model.names) if name in names]
            check_images(replace(model, names=[model.names[k] for k in keep],
                                 cameras=[model.cameras[k] for k in keep],
                                 point_ids=[model.point_ids[k] for k in keep]), images_dir)
    else:
        cameras, rejected = read_img_cam(path)
        for name, (cause, where) in rejected.items():
            if name in names:
                raise SCFeatError(f"{where}: {cause} (camera of {name})")
        expected = "one line per image: name w h fx fy cx cy R(9) t(3)"
    missing = [name for name in names if name not in cameras]
    if missing:
        raise SCFeatError(f"{path}: no camera for {', '.join(missing[:5])}"
                          f"{' and more' if len(missing) > 5 else ''} (expected {expected})")
    return {name: cameras[name] for name in names}


def extract_features(method: Method, images_dir: Path, names: list[str], cache_dir: Path,
                     max_keypoints: int | None, device: torch.device | str | None = None,
                     ) -> dict[str, Features]:
    """``{name: Features}`` of every image, cached under ``<cache_dir>/<features label>-<hash>/``
    (keyed by what makes the features, the image files and the keypoint budget)."""
    loaders = {name: (lambda path=Path(images_dir) / name: (load_image(path), {}))
               for name in names}
    files = method_features(method, loaders, [Path(images_dir) / name for name in names],
                            cache_dir, "full-size", max_keypoints, device)
    return {name: read_features(files[name]) for name in names}


def exhaustive_matches(features: dict[str, Features], names: list[str], match: Matcher,
                       ) -> dict[tuple[str, str], np.ndarray]:
    """Matches ``K×2`` (``match``, see :func:`evaluation.methods.make_matcher`) of every pair
    ``(names[i], names[j])``, i < j."""
    return {(a, b): match(features[a], features[b])
            for i, a in enumerate(names) for b in names[i + 1:]}


def colmap_camera(record: CameraRecord):
    """A fixed ``PINHOLE`` pycolmap camera from ground truth (principal point in COLMAP's
    convention)."""
    pycolmap = _pycolmap()
    K = record.K
    return pycolmap.Camera(model="PINHOLE", width=record.width, height=record.height,
                           params=[K[0, 0], K[1, 1], K[0, 2] + COLMAP_PIXEL_OFFSET,
                                   K[1, 2] + COLMAP_PIXEL_OFFSET])


def build_database(database: Path, images_dir: Path, names: list[str],
                   features: dict[str, Features],
                   matches: dict[tuple[str, str], np.ndarray],
                   cameras: dict[str, CameraRecord] | None = None) -> dict[str, int]:
    """A new COLMAP database with one camera per image, the keypoints and the raw matches, then
    COLMAP's geometric verification of every matched pair. Returns ``{name: image_id}``."""
    pycolmap = _pycolmap()
    database = Path(database)
    database.parent.mkdir(parents=True, exist_ok=True)
    database.unlink(missing_ok=True)
    pycolmap.Database.open(database).close()  # import_images wants an existing file
    options = pycolmap.ImageReaderOptions()
    options.camera_model = "PINHOLE" if cameras else "SIMPLE_RADIAL"
    pycolmap.import_images(database, images_dir, pycolmap.CameraMode.PER_IMAGE, names, options)
    with pycolmap.Database.open(database) as db:
        ids = {image.name: image.image_id for image in db.read_all_images()}
        for image in db.read_all_images():
            if cameras:
                camera = colmap_camera(cameras[image.name])
                camera.camera_id = image.camera_id
                camera.has_prior_focal_length = True
                db.update_camera(camera)
            keypoints = features[image.name].keypoints + COLMAP_PIXEL_OFFSET
            db.write_keypoints(image.image_id, keypoints.astype(np.float32))
        for (a, b), pair_matches in matches.items():
            db.write_matches(ids[a], ids[b], pair_matches.astype(np.uint32))
    pairs_file = database.with_suffix(".pairs.txt")
    pairs_file.write_text("".join(f"{a} {b}\n" for a, b in matches))
    pycolmap.verify_matches(database, pairs_file, pycolmap.TwoViewGeometryOptions())
    return ids


def run_mapper(database: Path, images_dir: Path, out_dir: Path, fixed_intrinsics: bool,
               seed: int = 0):
    """Incremental mapping → the reconstruction with the most registered images (or None)."""
    pycolmap = _pycolmap()
    options = pycolmap.IncrementalPipelineOptions()
    options.num_threads = min(torch.get_num_threads(), 4)
    options.random_seed = seed
    if fixed_intrinsics:
        options.ba_refine_focal_length = False
        options.ba_refine_principal_point = False
        options.ba_refine_extra_params = False
    out_dir.mkdir(parents=True, exist_ok=True)
    reconstructions = pycolmap.incremental_mapping(database, images_dir, out_dir, options)
    if not reconstructions:
        return None
    return max(reconstructions.values(), key=lambda r: r.num_reg_images())


def reconstruction_statistics(reconstruction, num_images: int) -> dict:
    """The ETH benchmark's measures of a pycolmap reconstruction (None: nothing registered)."""
    if reconstruction is None:
        return {"images": num_images, "registered": 0, "points3D": 0, "observations": 0,
                "mean_track_length": 0.0, "mean_reprojection_error": float("nan")}
    return {"images": num_images, "registered": int(reconstruction.num_reg_images()),
            "points3D": int(reconstruction.num_points3D()),
            "observations": int(reconstruction.compute_num_observations()),
            "mean_track_length": float(reconstruction.compute_mean_track_length()),
            "mean_reprojection_error": float(reconstruction.compute_mean_reprojection_error())}


def rotation_angle(R: np.ndarray) -> float:
    """Angle in degrees of a rotation matrix."""
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def camera_centre(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Centre ``3`` of the world→camera pose ``x_c = R·x_w + t``."""
    return -R.T @ t


def _mean_rotation(rotations: np.ndarray) -> np.ndarray:
    """The rotation closest (Frobenius) to the mean of ``N×3×3`` rotations."""
    u, _, vt = np.linalg.svd(rotations.sum(axis=0))
    return u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt


def align_to_ground_truth(rotations: np.ndarray, centres: np.ndarray, gt_rotations: np.ndarray,
                          gt_centres: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity ``x_gt = s·Rs·x + ts`` from a reconstruction's frame to the ground truth's.

    ``rotations``/``gt_rotations`` ``N×3×3`` world→camera, ``centres``/``gt_centres`` ``N×3``.
    Each camera proposes ``Rs = R_gtᵢᵀ·Rᵢ``; the proposal with the smallest median rotation
    error wins and is refined as the mean over the cameras it fits (error ≤ max(2·median,
    0.1°)), so one wrong camera does not tilt the others. Orientations fix ``Rs`` even when
    the centres are nearly collinear (aligning centres alone leaves a free turn about their
    line). Then ``s`` and ``ts`` by least squares on the centres. Returns ``(s, Rs, ts)``.
    """
    proposals = np.einsum("nji,njk->nik", gt_rotations, rotations)

    def errors(candidate: np.ndarray) -> np.ndarray:
        return np.array([rotation_angle(candidate @ p.T) for p in proposals])

    best = min(proposals, key=lambda candidate: np.median(errors(candidate)))
    best_errors = errors(best)
    fits = best_errors <= max(2 * np.median(best_errors), 0.1)
    rotation = _mean_rotation(proposals[fits])
    mean, gt_mean = centres.mean(axis=0), gt_centres.mean(axis=0)
    turned = (centres - mean) @ rotation.T
    spread = float(np.sum(turned ** 2))
    scale = float(np.sum(turned * (gt_centres - gt_mean)) / spread) if spread > 0 else 1.0
    return scale, rotation, gt_mean - scale * rotation @ mean


def mean_average_accuracy(rotation_errors: np.ndarray, centre_errors: np.ndarray,
                          num_images: int) -> float:
    """mAA: the mean over the threshold pairs ``(MAA_ROTATION_DEG[k], MAA_CENTRE[k])`` of the
    fraction of the ``num_images`` images whose rotation and centre errors are both below them
    (images without errors, the unregistered, count as inaccurate)."""
    if num_images == 0:
        return 0.0
    rotation_errors, centre_errors = np.asarray(rotation_errors), np.asarray(centre_errors)
    accurate = [(np.sum((rotation_errors < r) & (centre_errors < c))) / num_images
                for r, c in zip(MAA_ROTATION_DEG, MAA_CENTRE)]
    return float(np.mean(accurate))


def pose_errors(reconstruction, cameras: dict[str, CameraRecord],
                num_images: int | None = None) -> dict:
    """Rotation (degrees) and centre (ground-truth units) errors of the registered images after
    the similarity alignment :func:`align_to_ground_truth` (needs ≥ 2 registered images), and
    their mAA over ``num_images`` (default: the ground truth's images;
    :func:`mean_average_accuracy`)."""
    num_images = len(cameras) if num_images is None else num_images
    images = [image for image in reconstruction.images.values() if image.has_pose]
    if len(images) < 2:
        return {"aligned": 0, "maa": 0.0}
    rotations = np.array([image.cam_from_world().rotation.matrix() for image in images])
    centres = np.array([image.projection_center() for image in images])
    gt_poses = [cameras[image.name].pose for image in images]
    gt_rotations = np.array([pose[:3, :3] for pose in gt_poses])
    gt_centres = np.array([camera_centre(pose[:3, :3], pose[:3, 3]) for pose in gt_poses])
    scale, rotation, translation = align_to_ground_truth(rotations, centres, gt_rotations,
                                                         gt_centres)
    # Camera from ground-truth world: R·Rsᵀ.
    rotation_errors = [rotation_angle((R @ rotation.T).T @ R_gt)
                       for R, R_gt in zip(rotations, gt_rotations)]
    aligned = scale * centres @ rotation.T + translation
    centre_errors = np.linalg.norm(aligned - gt_centres, axis=1)
    return {"aligned": len(images),
            "rotation_error_median": float(np.median(rotation_errors)),
            "rotation_error_max": float(np.max(rotation_errors)),
            "centre_error_median": float(np.median(centre_errors)),
            "centre_error_max": float(np.max(centre_errors)),
            "maa": mean_average_accuracy(np.array(rotation_errors), centre_errors, num_images)}


def run_reconstruction(images_dir: str | Path, method: Method, out_dir: str | Path,
                       ground_truth: str | Path | None = None, max_keypoints: int | None = 2048,
                       ratio: float | None = None, device: torch.device | str = "cpu",
                       seed: int = 0) -> dict:
    """Reconstruct ``images_dir`` with ``method`` (features and matcher) into ``out_dir``
    (``features/``, ``<label>.db``, ``sparse-<label>/``); returns the statistics (and pose
    errors with ``ground_truth``). ``max_keypoints`` ``None``: the method's own budget."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    names = list_images(images_dir)
    cameras = read_ground_truth(ground_truth, names, images_dir) if ground_truth else None
    features = extract_features(method, images_dir, names, out_dir / "features", max_keypoints,
                                device)
    matches = exhaustive_matches(features, names, make_matcher(method, device, ratio))
    label = method.label
    database = out_dir / f"{label}.db"
    build_database(database, images_dir, names, features, matches, cameras)
    reconstruction = run_mapper(database, images_dir, out_dir / f"sparse-{label}",
                                fixed_intrinsics=cameras is not None, seed=seed)
    statistics = {"method": label, **reconstruction_statistics(reconstruction, len(names)),
                  "mean_matches": float(np.mean([len(m) for m in matches.values()]))}
    if cameras is not None and reconstruction is not None:
        statistics.update(pose_errors(reconstruction, cameras, len(names)))
    elif cameras is not None:
        statistics.update({"aligned": 0, "maa": 0.0})
    return statistics
