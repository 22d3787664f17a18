"""COLMAP models (text or binary): their posed images as :class:`CameraRecord` in the project's
conventions, and the image pairs that training and the relative-pose evaluation use.

A model folder holds ``cameras``, ``images`` and ``points3D`` as ``.bin`` or ``.txt`` (binary
first when both are there, as COLMAP reads them). Conventions:

* COLMAP's poses are world→camera, ``x_cam = R(q)·x_world + t`` with ``q = (qw, qx, qy, qz)``,
  as ``img_cam.txt``'s ``[R|t]``.
* COLMAP puts the top-left image corner at ``(0, 0)``, so pixel centres at ``+0.5``; the project
  puts pixel centres at integers (:mod:`utils.geometry`). The records here hold
  ``cx - 0.5, cy - 0.5``: a 3-D point projected by ``K`` of a record lands at the project's
  pixel coordinates of the spot where COLMAP's camera projects it, minus 0.5.
* Only pinhole cameras are used: ``SIMPLE_PINHOLE`` and ``PINHOLE``, and the radial / OpenCV
  models when all their distortion parameters are 0. Other cameras are refused with a message
  that says how to undistort them.

Pairs (:func:`select_pairs`), by one of two stated rules:

* ``points`` (the model has 3-D points; the MegaDepth rule of D2-Net's preprocessing, which CAPS's
  pairs come from): the overlap ratio of images ``i, j`` is the number of 3-D points both observe
  over ``min(points of i, points of j)``; a pair is kept when the ratio lies in
  ``[min_overlap, max_overlap]`` (defaults 0.1 and 0.7: the range of LoFTR's MegaDepth training
  indices, ``scene_info_0.1_0.7``; near-duplicate views above 0.7 teach little).
* ``cameras`` (no 3-D points, e.g. ground-truth cameras only): a pair is kept when the angle
  between the two viewing directions is at most ``max_angle`` degrees (60) and the view overlap
  lies in ``[min_view_overlap, 1]`` (0.3). The view overlap is the smaller of the two
  directions' fractions: a ``grid``×``grid`` (10×10) grid of cell centres of image 1,
  back-projected to the depth ``D`` (``z`` in camera 1), that project in front of camera 2 and
  inside image 2; and the same from image 2 to image 1. ``D`` is the scene's: the median, over
  the pairs whose optical axes meet at an angle between ``MIN_AXIS_ANGLE`` (5) and
  ``MAX_AXIS_ANGLE`` (90) degrees with their point of closest approach in front of both cameras,
  of that point's distance along each axis (``depth`` overrides it). Pairs whose camera centres coincide
  (baseline below ``1e-6·D``) are dropped: their epipolar geometry is undefined.

``auto`` takes ``points`` when the model's images observe any 3-D point, else ``cameras``.
Everything is vectorised over the pairs (a 1000-image model is paired in about a second).
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataloader.megadepth_layout import CameraRecord, text_lines
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.data")

COLMAP_PIXEL_OFFSET = 0.5  # COLMAP's pixel centres are at x + 0.5
RULES = ("auto", "points", "cameras")
MIN_AXIS_ANGLE = 5.0  # degrees: optical axes closer to parallel than this give no scene depth
MAX_AXIS_ANGLE = 90.0  # degrees: nor do axes further apart (cameras looking away from each other)
DEFAULT_PAIRS = {"rule": "auto", "min_overlap": 0.1, "max_overlap": 0.7, "max_angle": 60.0,
                 "min_view_overlap": 0.3, "grid": 10, "depth": None}
PAIR_CHUNK = 20000  # pairs per vectorised block of the camera rule

# model id → (name, number of parameters), COLMAP's camera models.
CAMERA_MODELS = {0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4),
                 3: ("RADIAL", 5), 4: ("OPENCV", 8), 5: ("OPENCV_FISHEYE", 8),
                 6: ("FULL_OPENCV", 12), 7: ("FOV", 5), 8: ("SIMPLE_RADIAL_FISHEYE", 4),
                 9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12),
                 11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16)}
MODEL_IDS = {name: model_id for model_id, (name, _) in CAMERA_MODELS.items()}
# Models that are a pinhole when their distortion parameters (after these many) are all 0.
PINHOLE_WHEN_ZERO = {"SIMPLE_RADIAL": 3, "RADIAL": 3, "OPENCV": 4, "FULL_OPENCV": 4}
UNDISTORT_HINT = ("undistort the model first: python -m tools.colmap_to_megadepth --model DIR "
                  "--images DIR --out DIR --undistort (pycolmap.undistort_images), or COLMAP's "
                  "image_undistorter, and use the undistorted model and images")


@dataclass(frozen=True)
class ColmapModel:
    """A model's posed images in file order: ``names``, ``cameras`` (``CameraRecord``s with
    the project's pixel convention; ``source`` is ``file:line`` or ``file: image <id>``), and
    per image the ids of the 3-D points it observes (``point_ids``, unique, sorted)."""
    folder: Path
    format: str  # "text" | "binary"
    names: list[str]
    cameras: list[CameraRecord]
    point_ids: list[np.ndarray] = field(repr=False)
    files: list[Path] = field(default_factory=list)

    @property
    def has_points(self) -> bool:
        return any(len(ids) for ids in self.point_ids)

    def records(self) -> dict[str, CameraRecord]:
        return dict(zip(self.names, self.cameras))


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """``(qw, qx, qy, qz)`` ``...×4`` → rotation matrices ``...×3×3`` (normalised first)."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def model_files(folder: str | Path) -> tuple[str, list[Path]]:
    """``("binary" | "text", [cameras, images, points3D])`` of a model folder (binary first);
    an error naming the folder when neither set is complete. ``points3D`` may be absent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SCFeatError(f"{folder}: COLMAP model folder not found (expected cameras, images "
                          f"and points3D as .bin or .txt)")
    for kind, suffix in (("binary", ".bin"), ("text", ".txt")):
        files = [folder / f"{part}{suffix}" for part in ("cameras", "images", "points3D")]
        if files[0].is_file() and files[1].is_file():
            return kind, files
    present = sorted(p.name for p in folder.iterdir())
    raise SCFeatError(f"{folder}: not a COLMAP model (expected cameras.bin + images.bin or "
                      f"cameras.txt + images.txt; found {', '.join(present[:8]) or 'nothing'})")


def _numbers(tokens: list[str], where: str, expected: str) -> list[float]:
    try:
        return [float(token) for token in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise SCFeatError(f"{where}: {bad!r} is not a number (expected {expected})") from None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


CAMERA_LINE = "CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]"
IMAGE_LINE = "IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, then a line of X Y POINT3D_ID triples"


def _read_cameras_text(path: Path) -> dict[int, tuple[str, int, int, np.ndarray, str]]:
    cameras = {}
    for number, line in enumerate(text_lines(path), start=1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(tokens) < 4 or tokens[1] not in MODEL_IDS:
            raise SCFeatError(f"{where}: expected {CAMERA_LINE} with MODEL one of "
                              f"{', '.join(MODEL_IDS)}")
        expected = CAMERA_MODELS[MODEL_IDS[tokens[1]]][1]
        if len(tokens) != 4 + expected:
            raise SCFeatError(f"{where}: a {tokens[1]} camera has {expected} parameters, got "
                              f"{len(tokens) - 4}")
        values = _numbers(tokens[2:], where, CAMERA_LINE)
        cameras[int(_numbers(tokens[:1], where, CAMERA_LINE)[0])] = (
            tokens[1], values[0], values[1], np.array(values[2:]), where)
    return cameras


def _read_images_text(path: Path) -> list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray, str]]:
    lines = text_lines(path)
    images, index = [], 0
    while index < len(lines):
        line, number = lines[index].strip(), index + 1
        index += 1
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        tokens = line.split()
        if len(tokens) != 10:
            raise SCFeatError(f"{where}: expected {IMAGE_LINE} (10 values; an image name may "
                              f"not contain spaces), got {len(tokens)} values")
        values = _numbers(tokens[1:9], where, IMAGE_LINE)
        points = lines[index].split() if index < len(lines) else []
        index += 1
        if len(points) % 3:
            raise SCFeatError(f"{path}:{number + 1}: expected X Y POINT3D_ID triples (the "
                              f"second line of image {tokens[0]}), got {len(points)} values")
        try:
            ids = np.array(points[2::3], dtype=np.float64).astype(np.int64)
        except ValueError:
            raise SCFeatError(f"{path}:{number + 1}: a POINT3D_ID is not a number") from None
        images.append((tokens[9], int(values[7]), np.array(values[:4]), np.array(values[4:7]),
                       ids, where))
    return images


class _Reader:
    """Sequential reads from a binary model file, with an error naming it at its end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data = path.read_bytes()
        except OSError as error:
            raise SCFeatError(f"{path}: cannot read the file ({error})") from None
        self.offset = 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise SCFeatError(f"{self.path}: ends at byte {len(self.data)} in the middle of a "
                              f"record (a truncated or non-COLMAP binary file)")
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return values

    def name(self) -> str:
        end = self.data.find(b"\x00", self.offset)
        if end < 0:
            raise SCFeatError(f"{self.path}: an image name runs to the end of the file "
                              f"(a truncated or non-COLMAP binary file)")
        raw, self.offset = self.data[self.offset:end], end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SCFeatError(f"{self.path}: image name {raw!r} is not UTF-8") from None


def _read_cameras_binary(path: Path) -> dict[int, tuple[str, int, int, np.ndarray, str]]:
    reader, cameras = _Reader(path), {}
    (count,) = reader.take("<Q")
    for _ in range(count):
        camera_id, model_id, width, height = reader.take("<iiQQ")
        if model_id not in CAMERA_MODELS:
            raise SCFeatError(f"{path}: camera {camera_id} has model id {model_id}, not a "
                              f"COLMAP camera model (0-{max(CAMERA_MODELS)})")
        name, params = CAMERA_MODELS[model_id]
        cameras[camera_id] = (name, width, height, np.array(reader.take(f"<{params}d")),
                              f"{path}: camera {camera_id}")
    return cameras


def _read_images_binary(path: Path) -> list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray, str]]:
    reader, images = _Reader(path), []
    (count,) = reader.take("<Q")
    record = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
    for _ in range(count):
        values = reader.take("<i7di")
        name = reader.name()
        (num_points,) = reader.take("<Q")
        size = num_points * record.itemsize
        if reader.offset + size > len(reader.data):
            raise SCFeatError(f"{path}: image {values[0]} ({name}) lists {num_points} points "
                              f"beyond the end of the file (truncated?)")
        points = np.frombuffer(reader.data, record, num_points, reader.offset)
        reader.offset += size
        images.append((name, values[8], np.array(values[1:5]), np.array(values[5:8]),
                       points["id"].copy(), f"{path}: image {values[0]}"))
    return images


def pinhole_intrinsics(model: str, params: np.ndarray, where: str) -> tuple[float, float, float, float]:
    """``fx, fy, cx, cy`` (COLMAP's convention) of a pinhole camera; an error saying how to
    undistort any other."""
    if model == "SIMPLE_PINHOLE":
        return params[0], params[0], params[1], params[2]
    if model == "PINHOLE":
        return tuple(params[:4])
    if model in PINHOLE_WHEN_ZERO and not np.any(params[PINHOLE_WHEN_ZERO[model]:]):
        if PINHOLE_WHEN_ZERO[model] == 3:
            return params[0], params[0], params[1], params[2]
        return tuple(params[:4])
    raise SCFeatError(f"{where}: a {model} camera with distortion "
                      f"{list(np.round(params, 6))}; only pinhole cameras are used: "
                      f"{UNDISTORT_HINT}")


def read_model(folder: str | Path) -> ColmapModel:
    """The posed images of a COLMAP model folder (text or binary), in file order.

    Errors name the file (and line) for: no model, a malformed line or record, an image whose
    camera is not in ``cameras``, a distorted camera, a non-finite pose or intrinsics, an image
    name listed twice or containing whitespace, and a model without images."""
    folder = Path(folder)
    kind, files = model_files(folder)
    if kind == "binary":
        cameras, images = _read_cameras_binary(files[0]), _read_images_binary(files[1])
    else:
        cameras, images = _read_cameras_text(files[0]), _read_images_text(files[1])
    if not images:
        raise SCFeatError(f"{files[1]}: the model has no images (expected one entry per posed "
                          f"image: {IMAGE_LINE})")
    names, records, point_ids, seen = [], [], [], {}
    for name, camera_id, qvec, tvec, ids, where in images:
        if camera_id not in cameras:
            raise SCFeatError(f"{where}: camera {camera_id} of {name} is not in {files[0]}")
        if name in seen:
            raise SCFeatError(f"{where}: image {name!r} is listed twice (first at {seen[name]})")
        if not name or any(c.isspace() for c in name):
            raise SCFeatError(f"{where}: image name {name!r} is empty or contains whitespace "
                              f"(img_cam.txt and pairs.txt separate names by spaces)")
        seen[name] = where
        model, width, height, params, camera_where = cameras[camera_id]
        fx, fy, cx, cy = pinhole_intrinsics(model, params, camera_where)
        if not (np.isfinite([fx, fy, cx, cy]).all() and fx > 0 and fy > 0
                and width >= 1 and height >= 1 and width == int(width) and height == int(height)):
            raise SCFeatError(f"{camera_where}: expected a positive integer size and finite "
                              f"fx, fy > 0, got {width}x{height}, fx={fx}, fy={fy}, cx={cx}, cy={cy}")
        if not (np.isfinite(qvec).all() and np.isfinite(tvec).all()
                and np.linalg.norm(qvec) > 1e-12):
            raise SCFeatError(f"{where}: the pose of {name} is not finite or its quaternion is 0")
        K = np.array([[fx, 0.0, cx - COLMAP_PIXEL_OFFSET], [0.0, fy, cy - COLMAP_PIXEL_OFFSET],
                      [0.0, 0.0, 1.0]])
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = quaternion_to_rotation(qvec), tvec
        names.append(name)
        records.append(CameraRecord(int(width), int(height), K, pose, where))
        point_ids.append(np.unique(ids[ids >= 0]))
    return ColmapModel(folder, kind, names, records, point_ids,
                       [f for f in files if f.is_file()])


# ---------------------------------------------------------------------------------------------
# images on disk
# ---------------------------------------------------------------------------------------------

def check_images(model: ColmapModel, images_dir: str | Path) -> list[Path]:
    """The image files of the model's images under ``images_dir``; one error naming the images
    the folder lacks, or an image whose size is not its camera's (read from the file header)."""
    from PIL import Image

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise SCFeatError(f"{images_dir}: images folder not found (the model {model.folder} "
                          f"names {len(model.names)} images)")
    paths = [images_dir / name for name in model.names]
    missing = [name for name, path in zip(model.names, paths) if not path.is_file()]
    if missing:
        raise SCFeatError(f"{images_dir}: lacks {len(missing)} of the {len(paths)} images that "
                          f"{model.files[1]} names: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}")
    for path, camera in zip(paths, model.cameras):
        try:
            with Image.open(path) as image:
                size = image.size
        except Exception as error:  # noqa: BLE001 - PIL raises many types on bad data
            raise SCFeatError(f"{path}: cannot read the image ({error})") from None
        if size != (camera.width, camera.height):
            raise SCFeatError(f"{path}: the image is {size[0]}x{size[1]} (w x h), its camera "
                              f"({camera.source}) says {camera.width}x{camera.height}: the images "
                              f"are not the ones the model was made from (resized or "
                              f"undistorted copies need their own model)")
    return paths


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------

def pair_options(options: dict | None = None) -> dict:
    """``DEFAULT_PAIRS`` updated by ``options``, checked: an error naming the bad option."""
    options = {**DEFAULT_PAIRS, **(options or {})}
    unknown = sorted(set(options) - set(DEFAULT_PAIRS))
    if unknown:
        raise SCFeatError(f"unknown pair option(s) {unknown} (expected {sorted(DEFAULT_PAIRS)})")
    if options["rule"] not in RULES:
        raise SCFeatError(f"pair rule {options['rule']!r}: expected one of {', '.join(RULES)}")
    if not 0 <= options["min_overlap"] <= options["max_overlap"] <= 1:
        raise SCFeatError(f"pair overlap range [{options['min_overlap']}, "
                          f"{options['max_overlap']}]: expected 0 <= min <= max <= 1")
    if not 0 <= options["min_view_overlap"] <= 1:
        raise SCFeatError(f"min_view_overlap {options['min_view_overlap']}: expected 0..1")
    if not 0 < options["max_angle"] <= 180:
        raise SCFeatError(f"max_angle {options['max_angle']}: expected degrees in (0, 180]")
    if int(options["grid"]) != options["grid"] or options["grid"] < 2:
        raise SCFeatError(f"grid {options['grid']}: expected an integer >= 2")
    if options["depth"] is not None and not options["depth"] > 0:
        raise SCFeatError(f"depth {options['depth']}: expected a positive depth (model units)")
    return options


def point_overlaps(point_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                          np.ndarray]:
    """``(i, j, shared, ratio)`` of every image pair ``i < j`` sharing a 3-D point: the count of
    shared points and ``shared / min(points of i, points of j)``."""
    from scipy import sparse

    counts = np.array([len(ids) for ids in point_ids])
    if not counts.sum():
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0)
    columns = np.concatenate(point_ids)
    _, columns = np.unique(columns, return_inverse=True)
    rows = np.repeat(np.arange(len(point_ids)), counts)
    incidence = sparse.csr_matrix((np.ones(len(rows), np.int32), (rows, columns)),
                                  shape=(len(point_ids), columns.max() + 1))
    shared = sparse.triu(incidence @ incidence.T, k=1).tocoo()
    i, j, count = shared.row.astype(np.int64), shared.col.astype(np.int64), shared.data
    order = np.lexsort((j, i))
    i, j, count = i[order], j[order], count[order].astype(np.int64)
    return i, j, count, count / np.minimum(counts[i], counts[j])


def _centres_axes(cameras: list[CameraRecord]) -> tuple[np.ndarray, np.ndarray]:
    rotations = np.stack([c.pose[:3, :3] for c in cameras])
    translations = np.stack([c.pose[:3, 3] for c in cameras])
    centres = -np.einsum("nji,nj->ni", rotations, translations)
    return centres, rotations[:, 2, :]  # the optical axis is the third row of R


def _upper_pairs(count: int):
    """Blocks ``(i, j)`` of all pairs ``i < j`` of ``count`` images, about ``PAIR_CHUNK`` each."""
    start = 0
    while start < count - 1:
        rows, size = [], 0
        stop = start
        while stop < count - 1 and (size == 0 or size + count - stop - 1 <= PAIR_CHUNK):
            size += count - stop - 1
            stop += 1
        i = np.concatenate([np.full(count - r - 1, r) for r in range(start, stop)])
        j = np.concatenate([np.arange(r + 1, count) for r in range(start, stop)])
        yield i, j
        start = stop


def _axis_angles(axes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    cos = np.einsum("nk,nk->n", axes[i], axes[j])
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def scene_depth(cameras: list[CameraRecord]) -> float | None:
    """The scene depth of the ``cameras`` rule (see the module docstring), or ``None`` when no
    pair's optical axes cross in front of both cameras."""
    centres, axes = _centres_axes(cameras)
    depths = []
    for i, j in _upper_pairs(len(cameras)):
        angle = _axis_angles(axes, i, j)
        keep = (angle >= MIN_AXIS_ANGLE) & (angle <= MAX_AXIS_ANGLE)
        i, j = i[keep], j[keep]
        # Closest points C_i + s·a_i and C_j + u·a_j of the two axes (unit directions).
        a, b, w = axes[i], axes[j], centres[i] - centres[j]
        ab = np.einsum("nk,nk->n", a, b)
        aw, bw = np.einsum("nk,nk->n", a, w), np.einsum("nk,nk->n", b, w)
        denominator = 1.0 - ab ** 2
        s = (ab * bw - aw) / denominator
        u = (bw - ab * aw) / denominator
        front = (s > 0) & (u > 0)
        depths.extend([s[front], u[front]])
    depths = np.concatenate(depths) if depths else np.zeros(0)
    return float(np.median(depths)) if len(depths) else None


def _grid_rays(camera: CameraRecord, grid: int) -> np.ndarray:
    """Rays ``K⁻¹·x̃`` (``G×3``, ``z = 1``) of a ``grid``×``grid`` grid of cell centres."""
    xs = (np.arange(grid) + 0.5) / grid * camera.width - 0.5
    ys = (np.arange(grid) + 0.5) / grid * camera.height - 0.5
    x, y = np.meshgrid(xs, ys)
    pixels = np.stack([x.ravel(), y.ravel(), np.ones(x.size)], -1)
    return pixels @ np.linalg.inv(camera.K).T


def _fraction_inside(rays: np.ndarray, depth: float, rotation: np.ndarray, translation: np.ndarray,
                     K: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per pair, the fraction of ``rays`` (``P×G×3`` in camera 1) at ``depth`` that project in
    front of camera 2 (relative pose ``rotation`` ``P×3×3``, ``translation`` ``P×3``) and inside
    its image (``K`` ``P×3×3``, ``sizes`` ``P×2``)."""
    points = depth * rays @ rotation.transpose(0, 2, 1) + translation[:, None]
    z = points[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = K[:, None, 0, 0] * points[..., 0] / z + K[:, None, 0, 2]
        y = K[:, None, 1, 1] * points[..., 1] / z + K[:, None, 1, 2]
    inside = ((z > 0) & (x >= -0.5) & (x <= sizes[:, None, 0] - 0.5)
              & (y >= -0.5) & (y <= sizes[:, None, 1] - 0.5))
    return inside.mean(-1)


def view_overlaps(cameras: list[CameraRecord], max_angle: float, grid: int, depth: float,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, angle, overlap)`` of the pairs ``i < j`` within ``max_angle`` with a baseline of at
    least ``1e-6·depth``: the viewing-direction angle (degrees) and the view overlap (the smaller
    of the two directions' fractions at ``depth``; see the module docstring)."""
    centres, axes = _centres_axes(cameras)
    rays = np.stack([_grid_rays(c, grid) for c in cameras])  # same G for every image
    poses = np.stack([c.pose for c in cameras])
    Ks = np.stack([c.K for c in cameras])
    sizes = np.array([[c.width, c.height] for c in cameras], np.float64)
    out = [[], [], [], []]
    for i, j in _upper_pairs(len(cameras)):
        angle = _axis_angles(axes, i, j)
        keep = (angle <= max_angle) & (np.linalg.norm(centres[i] - centres[j], axis=1)
                                      >= 1e-6 * depth)
        i, j, angle = i[keep], j[keep], angle[keep]
        if not len(i):
            continue
        relative = poses[j] @ np.linalg.inv(poses[i])  # camera i → camera j
        inverse = np.linalg.inv(relative)
        forward = _fraction_inside(rays[i], depth, relative[:, :3, :3], relative[:, :3, 3],
                                   Ks[j], sizes[j])
        backward = _fraction_inside(rays[j], depth, inverse[:, :3, :3], inverse[:, :3, 3],
                                    Ks[i], sizes[i])
        for store, values in zip(out, (i, j, angle, np.minimum(forward, backward))):
            store.append(values)
    if not out[0]:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return tuple(np.concatenate(values) for values in out)


@dataclass(frozen=True)
class PairSelection:
    """The pairs of a model: image indices ``i < j`` (arrays), the rule used, its measure per
    pair (``overlap``: the point overlap ratio or the view overlap) and a one-line description."""
    i: np.ndarray
    j: np.ndarray
    overlap: np.ndarray
    rule: str
    description: str

    def __len__(self) -> int:
        return len(self.i)


def select_pairs(model: ColmapModel, options: dict | None = None) -> PairSelection:
    """The image pairs of ``model`` by the configured rule (see the module docstring); an error
    naming the model when the rule leaves no pair."""
    options = pair_options(options)
    rule = options["rule"]
    if rule == "auto":
        rule = "points" if model.has_points else "cameras"
    if len(model.names) < 2:
        raise SCFeatError(f"{model.files[1]}: the model has {len(model.names)} image; pairs need "
                          f"at least 2")
    if rule == "points":
        if not model.has_points:
            raise SCFeatError(f"{model.folder}: no image observes a 3-D point, so the 'points' "
                              f"pair rule has nothing to count (use the 'cameras' rule)")
        i, j, _, ratio = point_overlaps(model.point_ids)
        keep = (ratio >= options["min_overlap"]) & (ratio <= options["max_overlap"])
        selection = PairSelection(i[keep], j[keep], ratio[keep], rule,
                                  f"shared 3-D points / min(points of either image) in "
                                  f"[{options['min_overlap']}, {options['max_overlap']}]")
        hint = "widen min_overlap/max_overlap (--min-overlap, --max-overlap)"
        best = f"the largest overlap ratio is {ratio.max():.3f}" if len(ratio) else \
            "no two images share a 3-D point"
    else:
        depth = options["depth"]
        if depth is None:
            depth = scene_depth(model.cameras)
            if depth is None:
                raise SCFeatError(f"{model.folder}: no two cameras' optical axes meet in front "
                                  f"of both at {MIN_AXIS_ANGLE:g}-{MAX_AXIS_ANGLE:g} deg, so the "
                                  f"scene depth is unknown: give it (depth, --depth, in model "
                                  f"units)")
        i, j, angle, overlap = view_overlaps(model.cameras, options["max_angle"],
                                             int(options["grid"]), depth)
        keep = overlap >= options["min_view_overlap"]
        selection = PairSelection(i[keep], j[keep], overlap[keep], rule,
                                  f"viewing directions within {options['max_angle']} deg and "
                                  f"view overlap >= {options['min_view_overlap']} at depth "
                                  f"{depth:.4g} ({int(options['grid'])}x{int(options['grid'])} "
                                  f"grid)")
        hint = "lower min_view_overlap or raise max_angle (--min-view-overlap, --max-angle)"
        best = f"the largest view overlap is {overlap.max():.3f}" if len(overlap) else \
            f"no two cameras look within {options['max_angle']} deg of each other"
    if not len(selection):
        raise SCFeatError(f"{model.folder}: the pair rule ({selection.description}) leaves no "
                          f"pair of its {len(model.names)} images ({best}); {hint}")
    return selection


# ---------------------------------------------------------------------------------------------
# writing (tests and the benchmark write small models with these)
# ---------------------------------------------------------------------------------------------

def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """A rotation matrix ``3×3`` → ``(qw, qx, qy, qz)`` with ``qw >= 0`` (Shepperd's method:
    from the largest of the four squared components, accurate for every angle)."""
    trace = np.trace(R)
    squares = [1 + trace, 1 + 2 * R[0, 0] - trace, 1 + 2 * R[1, 1] - trace, 1 + 2 * R[2, 2] - trace]
    k = int(np.argmax(squares))
    root = np.sqrt(squares[k])
    if k == 0:
        q = [root, (R[2, 1] - R[1, 2]) / root, (R[0, 2] - R[2, 0]) / root, (R[1, 0] - R[0, 1]) / root]
    elif k == 1:
        q = [(R[2, 1] - R[1, 2]) / root, root, (R[0, 1] + R[1, 0]) / root, (R[0, 2] + R[2, 0]) / root]
    elif k == 2:
        q = [(R[0, 2] - R[2, 0]) / root, (R[0, 1] + R[1, 0]) / root, root, (R[1, 2] + R[2, 1]) / root]
    else:
        q = [(R[1, 0] - R[0, 1]) / root, (R[0, 2] + R[2, 0]) / root, (R[1, 2] + R[2, 1]) / root, root]
    q = np.array(q) / 2
    q = q / np.linalg.norm(q)
    return -q if q[0] < 0 else q


def write_model(folder: str | Path, cameras: list[tuple[str, int, int, list[float]]],
                images: list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]],
                binary: bool = False) -> Path:
    """A COLMAP model: ``cameras`` ``[(MODEL, width, height, params)]`` (ids 1..), ``images``
    ``[(name, camera index 0.., R 3×3, t 3, points2D N×3 (x, y, point3D id; -1: none))]``
    (ids 1..) and an empty ``points3D``. Parameters in COLMAP's convention."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if binary:
        with open(folder / "cameras.bin", "wb") as f:
            f.write(struct.pack("<Q", len(cameras)))
            for index, (model, width, height, params) in enumerate(cameras, start=1):
                f.write(struct.pack("<iiQQ", index, MODEL_IDS[model], width, height))
                f.write(struct.pack(f"<{len(params)}d", *params))
        with open(folder / "images.bin", "wb") as f:
            f.write(struct.pack("<Q", len(images)))
            for index, (name, camera, R, t, points) in enumerate(images, start=1):
                f.write(struct.pack("<i7di", index, *rotation_to_quaternion(R), *t, camera + 1))
                f.write(name.encode() + b"\x00")
                points = np.asarray(points, np.float64).reshape(-1, 3)
                f.write(struct.pack("<Q", len(points)))
                record = np.zeros(len(points), [("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
                record["x"], record["y"], record["id"] = points[:, 0], points[:, 1], points[:, 2]
                f.write(record.tobytes())
        (folder / "points3D.bin").write_bytes(struct.pack("<Q", 0))
        return folder
    lines = ["# Camera list with one line of data per camera:", f"#   {CAMERA_LINE}"]
    lines += [f"{index} {model} {width} {height} " + " ".join(repr(float(p)) for p in params)
              for index, (model, width, height, params) in enumerate(cameras, start=1)]
    (folder / "cameras.txt").write_text("\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:", f"#   {IMAGE_LINE}"]
    for index, (name, camera, R, t, points) in enumerate(images, start=1):
        values = " ".join(repr(float(v)) for v in (*rotation_to_quaternion(R), *t))
        lines.append(f"{index} {values} {camera + 1} {name}")
        points = np.asarray(points, np.float64).reshape(-1, 3)
        lines.append(" ".join(f"{x!r} {y!r} {int(p)}" for x, y, p in points.tolist()))
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    (folder / "points3D.txt").write_text("# 3D point list\n")
    return folder
