"""MegaDepth image pairs in the CAPS layout, with fundamental matrices from camera poses.

On disk::

    <data_path>/<scene>/<folder whose name contains "dense">/aligned/
        images/<name>
        img_cam.txt   # name w h fx fy cx cy r11..r33 t1 t2 t3   ([R|t] world→camera; '#' comments)
        pairs.txt     # name1 name2

Everything that can be checked from the text files (syntax, names, rotation threshold,
degenerate geometry, the per-folder cap) is checked once, when the index is built; a pair whose
image is missing or unreadable at load time makes ``__getitem__`` return ``None``, which
``collate_skip_none`` drops.
"""
from __future__ import annotations

import collections
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate
from torchvision.transforms import ColorJitter

from dataloader.transforms import load_image_rgb, normalize_imagenet, to_float_tensor
from utils.errors import SCFeatError
from utils.geometry import fundamental_from_pose, relative_pose

log = logging.getLogger("scfeat.data")

MODES = ("train", "val", "test")
QUERY_POINT_MODES = (None, "random", "sift", "mixed")
IMG_CAM_FORMAT = "name w h fx fy cx cy r11 r12 r13 r21 r22 r23 r31 r32 r33 t1 t2 t3"
MAX_FUNDAMENTAL_ENTRY = 1e12  # |F/F[2,2]| beyond this means F[2,2] ≈ 0: unusable normalisation


@dataclass(frozen=True, slots=True)
class CameraRecord:
    """One line of ``img_cam.txt``: image size, intrinsics ``K`` (3×3) and world→camera ``pose``
    (4×4), both float64."""
    width: int
    height: int
    K: np.ndarray
    pose: np.ndarray


@dataclass(frozen=True, slots=True)
class PairRecord:
    """One usable pair: its ``aligned`` folder (absolute and relative to ``data_path``) and cameras."""
    folder: Path
    rel_folder: str
    name1: str
    name2: str
    camera1: CameraRecord
    camera2: CameraRecord


# ----------------------------------------------------------------------------- index files

def _data_lines(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, tokens)`` of the non-blank lines of ``path`` not starting with ``#``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise SCFeatError(f"{path}: cannot read the file ({error})") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append((number, stripped.split()))
    return lines


def read_img_cam(path: Path) -> dict[str, CameraRecord]:
    """Parse ``img_cam.txt`` → ``{image name: CameraRecord}``; ``SCFeatError`` naming the line on
    a wrong token count, a non-number, a non-positive size, a non-rotation or a repeated name."""
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"{path}: img_cam.txt not found (expected one line per image: "
                          f"{IMG_CAM_FORMAT})")
    cameras: dict[str, CameraRecord] = {}
    for number, tokens in _data_lines(path):
        where = f"{path}:{number}"
        if len(tokens) != 19:
            raise SCFeatError(f"{where}: expected 19 values ({IMG_CAM_FORMAT}), got {len(tokens)}")
        try:
            values = np.array([float(token) for token in tokens[1:]], dtype=np.float64)
        except ValueError:
            bad = next(t for t in tokens[1:] if not _is_float(t))
            raise SCFeatError(f"{where}: {bad!r} is not a number (expected {IMG_CAM_FORMAT})") from None
        if not np.isfinite(values).all():
            raise SCFeatError(f"{where}: values must be finite numbers")
        width, height = values[0], values[1]
        if width != int(width) or height != int(height) or width < 1 or height < 1:
            raise SCFeatError(f"{where}: width and height must be positive integers, "
                              f"got {tokens[1]} {tokens[2]}")
        fx, fy, cx, cy = values[2:6]
        if fx <= 0 or fy <= 0:
            raise SCFeatError(f"{where}: focal lengths fx, fy must be positive, got {fx:g} {fy:g}")
        rotation = values[6:15].reshape(3, 3)
        if (np.abs(rotation @ rotation.T - np.eye(3)).max() > 1e-2
                or abs(np.linalg.det(rotation) - 1) > 1e-2):
            raise SCFeatError(f"{where}: r11..r33 is not a rotation matrix (row-major, det 1)")
        if tokens[0] in cameras:
            raise SCFeatError(f"{where}: image {tokens[0]!r} is listed twice")
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = rotation, values[15:18]
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        cameras[tokens[0]] = CameraRecord(int(width), int(height), K, pose)
    return cameras


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_pairs(path: Path, cameras: dict[str, CameraRecord]) -> list[tuple[str, str]]:
    """Parse ``pairs.txt`` → ``[(name1, name2)]``; ``SCFeatError`` naming the line when it does
    not hold two names or names an image absent from ``img_cam.txt``."""
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"{path}: pairs.txt not found (expected one 'name1 name2' per line)")
    pairs = []
    for number, tokens in _data_lines(path):
        if len(tokens) != 2:
            raise SCFeatError(f"{path}:{number}: expected two image names 'name1 name2', "
                              f"got {len(tokens)} values")
        for name in tokens:
            if name not in cameras:
                raise SCFeatError(f"{path}:{number}: image {name!r} is not listed in "
                                  f"{path.parent / 'img_cam.txt'}")
        pairs.append((tokens[0], tokens[1]))
    return pairs


def find_aligned_folders(data_path: Path) -> list[Path]:
    """``<data_path>/<scene>/<*dense*>/aligned`` folders, sorted. A scene folder without a dense
    folder is skipped with a warning; a dense folder without ``aligned`` is an error."""
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise SCFeatError(f"{data_path}: MegaDepth data folder not found (data.data_path)")
    folders = []
    for scene in sorted(p for p in data_path.iterdir() if p.is_dir()):
        dense = sorted(p for p in scene.iterdir() if p.is_dir() and "dense" in p.name)
        if not dense:
            log.warning("%s: no folder whose name contains 'dense'; scene skipped", scene)
        for folder in dense:
            aligned = folder / "aligned"
            if not aligned.is_dir():
                raise SCFeatError(f"{aligned}: folder not found (expected the CAPS layout "
                                  f"<scene>/<dense>/aligned/{{images/, img_cam.txt, pairs.txt}})")
            folders.append(aligned)
    if not folders:
        raise SCFeatError(f"{data_path}: no <scene>/<dense*>/aligned folders (expected the CAPS "
                          f"MegaDepth layout <scene>/<dense>/aligned/{{images/, img_cam.txt, "
                          f"pairs.txt}})")
    return folders


# ----------------------------------------------------------------------------- geometry

def rotation_angles_deg(rotations: np.ndarray) -> np.ndarray:
    """Rotation angles (degrees) of ``...×3×3`` rotation matrices → ``...``."""
    cos = (np.trace(rotations, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def scale_intrinsics(K: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Intrinsics of an image resized by ``scale_x, scale_y`` (pixel centres at integers, as
    cv2.resize: ``x' = (x + 0.5)·s - 0.5``) → 3×3."""
    scaling = np.array([[scale_x, 0.0, (scale_x - 1) / 2],
                        [0.0, scale_y, (scale_y - 1) / 2],
                        [0.0, 0.0, 1.0]])
    return scaling @ K


def pair_fundamentals(K1: np.ndarray, K2: np.ndarray, pose1: np.ndarray,
                      pose2: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``F1`` (image 1 → lines in image 2) and ``F2`` (the reverse) for ``N×3×3`` intrinsics and
    ``N×4×4`` world→camera poses (float64) → two ``N×3×3`` float64 tensors, each ÷ its [2, 2]."""
    K1, K2 = torch.from_numpy(K1), torch.from_numpy(K2)
    rel12 = relative_pose(torch.from_numpy(pose1), torch.from_numpy(pose2))
    rel21 = torch.linalg.inv(rel12)
    fmat1 = fundamental_from_pose(K1, K2, rel12[:, :3, :3], rel12[:, :3, 3])
    fmat2 = fundamental_from_pose(K2, K1, rel21[:, :3, :3], rel21[:, :3, 3])
    return fmat1, fmat2


# ----------------------------------------------------------------------------- query points

def random_points(count: int, height: int, width: int) -> torch.Tensor:
    """``count×2`` pixel ``x, y`` uniform over the image (torch's RNG, so worker seeding applies)."""
    return torch.rand(count, 2) * torch.tensor([width - 1.0, height - 1.0])


def sift_points(image_rgb: np.ndarray, count: int) -> torch.Tensor:
    """Up to ``count`` SIFT keypoint locations ``≤count×2`` (pixel ``x, y``), strongest first."""
    if count <= 0:
        return torch.zeros(0, 2)
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    keypoints = cv2.SIFT_create(nfeatures=count).detect(gray, None)
    keypoints = sorted(keypoints, key=lambda kp: -kp.response)[:count]
    if not keypoints:
        return torch.zeros(0, 2)
    height, width = gray.shape
    coords = torch.tensor([kp.pt for kp in keypoints], dtype=torch.float32)
    return torch.minimum(coords.clamp(min=0), torch.tensor([width - 1.0, height - 1.0]))


def query_points(image_rgb: np.ndarray, mode: str, count: int, random_percent: float) -> torch.Tensor:
    """Exactly ``count×2`` query points (float32 pixel ``x, y``) by ``mode`` ('random', 'sift' or
    'mixed': ``round(random_percent·count)`` random, the rest SIFT). A SIFT shortfall (flat or
    tiny images) is filled with random points so batches always stack."""
    height, width = image_rgb.shape[:2]
    num_random = {"random": count, "sift": 0}.get(mode, int(round(random_percent * count)))
    sift = sift_points(image_rgb, count - num_random)
    coords = torch.cat([sift, random_points(count - len(sift), height, width)])
    return coords.float()


# ----------------------------------------------------------------------------- batching

def collate_skip_none(batch: list[dict | None]) -> dict | None:
    """Collate the items that are not ``None`` → batch dict, or ``None`` if none is left.

    ``batch['skipped']`` (int) counts the dropped items; the reasons are counted in the
    dataset's ``skipped`` and logged (once per reason) where they happen.
    """
    kept = [item for item in batch if item is not None]
    dropped = len(batch) - len(kept)
    if dropped:
        log.debug("dropped %d of %d pairs from a batch", dropped, len(batch))
    if not kept:
        return None
    for key in ("im1", "im2", "coord1", "coord2"):
        shapes = {tuple(item[key].shape) for item in kept if key in item}
        if len(shapes) > 1:
            raise SCFeatError(f"data: the images of one batch differ in size ({key}: "
                              f"{sorted(shapes)}); set data.resize: [H, W] or data.batch_size: 1")
    collated = default_collate(kept)
    collated["skipped"] = dropped
    return collated


# ----------------------------------------------------------------------------- dataset

class MegaDepth_SIFT(Dataset):
    """Image pairs of MegaDepth (CAPS layout) with ground-truth epipolar geometry.

    Item (a dict, or ``None`` when the pair cannot be loaded): ``im1, im2`` (3×H×W float32,
    ImageNet-normalised; colour-jittered in train mode), ``F1, F2`` (3×3 float32),
    ``intrinsic1/2`` (3×3 float32), ``pose1/2`` (4×4 float32, world→camera), ``name1/2``
    (str, path relative to ``data_path``) and, when ``query_points`` is set, ``coord1/2``
    (num_pts×2 float32 pixel ``x, y``).
    """

    collate_fn = staticmethod(collate_skip_none)  # drops unusable items (None)
    default_conf = {
        "data_path": "data/megadepth/train",
        "mode": "train",
        "num_pts": 2000,
        "query_points": None,  # None | 'random' | 'sift' | 'mixed'
        "random_percent": 0.5,
        "rot_thr": 80,  # degrees; train mode only
        "max_pairs_per_scene": 5000,  # per dense folder, seeded subsample
        "resize": None,  # None (size on disk) or [H, W], multiples of 16
        "seed": 0,
        "batch_size": 2,
        "workers": 4,
        "shuffle": True,
    }

    def __init__(self, conf: dict) -> None:
        unknown = sorted(set(conf) - set(self.default_conf))
        if unknown:
            raise SCFeatError(f"data: unknown key(s) {unknown} for MegaDepth_SIFT "
                              f"(expected some of {sorted(self.default_conf)})")
        self.conf = {**self.default_conf, **conf}
        self._check_conf()
        self.data_path = Path(self.conf["data_path"])
        self.train = self.conf["mode"] == "train"
        self.resize = tuple(self.conf["resize"]) if self.conf["resize"] is not None else None
        self.jitter = ColorJitter(brightness=1, contrast=1, saturation=1, hue=0.4)
        self.skipped: collections.Counter = collections.Counter()  # per process (worker copy)
        self.dropped_at_index: collections.Counter = collections.Counter()
        self._logged_reasons: set[str] = set()
        self.pairs = self._build_index()

    def _check_conf(self) -> None:
        conf = self.conf
        if conf["mode"] not in MODES:
            raise SCFeatError(f"data.mode: expected one of {list(MODES)}, got {conf['mode']!r}")
        if conf["query_points"] not in QUERY_POINT_MODES:
            raise SCFeatError(f"data.query_points: expected one of {list(QUERY_POINT_MODES)}, "
                              f"got {conf['query_points']!r}")
        if not (isinstance(conf["num_pts"], int) and conf["num_pts"] >= 1):
            raise SCFeatError(f"data.num_pts: expected a positive integer, got {conf['num_pts']!r}")
        if not 0.0 <= conf["random_percent"] <= 1.0:
            raise SCFeatError(f"data.random_percent: expected a value in [0, 1], "
                              f"got {conf['random_percent']!r}")
        if not (isinstance(conf["max_pairs_per_scene"], int) and conf["max_pairs_per_scene"] >= 1):
            raise SCFeatError(f"data.max_pairs_per_scene: expected a positive integer, "
                              f"got {conf['max_pairs_per_scene']!r}")
        resize = conf["resize"]
        if resize is not None and not (
                isinstance(resize, (list, tuple)) and len(resize) == 2
                and all(isinstance(v, int) and v > 0 and v % 16 == 0 for v in resize)):
            raise SCFeatError(f"data.resize: expected null or [H, W] with positive multiples of "
                              f"16, got {resize!r}")

    # ------------------------------------------------------------------ index

    def _build_index(self) -> list[PairRecord]:
        records: list[PairRecord] = []
        listed = 0
        for folder in find_aligned_folders(self.data_path):
            if not (folder / "images").is_dir():
                raise SCFeatError(f"{folder / 'images'}: images folder not found")
            cameras = read_img_cam(folder / "img_cam.txt")
            pairs = read_pairs(folder / "pairs.txt", cameras)
            listed += len(pairs)
            records.extend(self._usable_pairs(folder, cameras, pairs))
        if self.dropped_at_index:
            log.info("%s: %d of %d listed pairs dropped while indexing: %s", self.data_path,
                     listed - len(records), listed, dict(self.dropped_at_index))
        if not records:
            raise SCFeatError(f"{self.data_path}: no usable pairs ({listed} listed; dropped: "
                              f"{dict(self.dropped_at_index) or 'none'})")
        return records

    def _final_camera(self, camera: CameraRecord) -> CameraRecord:
        """The camera of the image as it will be returned (intrinsics scaled when resizing)."""
        if self.resize is None:
            return camera
        height, width = self.resize
        K = scale_intrinsics(camera.K, width / camera.width, height / camera.height)
        return CameraRecord(width, height, K, camera.pose)

    def _usable_pairs(self, folder: Path, cameras: dict[str, CameraRecord],
                      pairs: list[tuple[str, str]]) -> list[PairRecord]:
        """Filter one folder's pairs (rotation in train mode, degenerate F) and cap their number."""
        if not pairs:
            return []
        final = {name: self._final_camera(cam) for name, cam in cameras.items()}
        cams1 = [final[a] for a, _ in pairs]
        cams2 = [final[b] for _, b in pairs]
        poses1 = np.stack([c.pose for c in cams1])
        poses2 = np.stack([c.pose for c in cams2])
        keep = np.ones(len(pairs), dtype=bool)
        if self.train:
            angles = rotation_angles_deg(poses2[:, :3, :3] @ poses1[:, :3, :3].transpose(0, 2, 1))
            too_far = angles > self.conf["rot_thr"]
            self.dropped_at_index[f"rotation > {self.conf['rot_thr']} deg"] += int(too_far.sum())
            keep &= ~too_far
        fmat1, fmat2 = pair_fundamentals(np.stack([c.K for c in cams1]), np.stack([c.K for c in cams2]),
                                         poses1, poses2)
        degenerate = ~(torch.isfinite(fmat1).all((1, 2)) & torch.isfinite(fmat2).all((1, 2))
                       & (fmat1.abs().amax((1, 2)) < MAX_FUNDAMENTAL_ENTRY)
                       & (fmat2.abs().amax((1, 2)) < MAX_FUNDAMENTAL_ENTRY)).numpy()
        self.dropped_at_index["degenerate fundamental matrix (F[2,2] ~ 0 or no baseline)"] += \
            int((degenerate & keep).sum())
        keep &= ~degenerate
        indices = np.flatnonzero(keep)
        rel_folder = folder.relative_to(self.data_path).as_posix()
        cap = self.conf["max_pairs_per_scene"]
        if len(indices) > cap:
            # Seeded by the folder's name, so a folder's subsample does not depend on the others.
            rng = np.random.default_rng([self.conf["seed"], zlib.crc32(rel_folder.encode())])
            self.dropped_at_index[f"over max_pairs_per_scene={cap}"] += len(indices) - cap
            indices = np.sort(rng.choice(indices, size=cap, replace=False))
        for key in [k for k, v in self.dropped_at_index.items() if v == 0]:
            del self.dropped_at_index[key]
        return [PairRecord(folder, rel_folder, pairs[i][0], pairs[i][1],
                           cameras[pairs[i][0]], cameras[pairs[i][1]]) for i in indices]

    # ------------------------------------------------------------------ items

    def __len__(self) -> int:
        return len(self.pairs)

    def _skip(self, reason: str, detail: str) -> None:
        """Count a pair that cannot be used, log the first occurrence of each reason → ``None``."""
        self.skipped[reason] += 1
        if reason not in self._logged_reasons:
            self._logged_reasons.add(reason)
            log.warning("pair skipped (%s): %s; further pairs skipped for this reason are only "
                        "counted", reason, detail)
        return None

    def _load(self, record: PairRecord, name: str, camera: CameraRecord) -> np.ndarray | str:
        """The image (resized when asked) → ``H×W×3`` uint8, or a skip reason."""
        path = record.folder / "images" / name
        if not path.is_file():
            return "missing image"
        try:
            image = load_image_rgb(path)
        except SCFeatError:
            return "undecodable image"
        if image.shape[:2] != (camera.height, camera.width):
            return "image size differs from img_cam.txt"
        if self.resize is not None and image.shape[:2] != self.resize:
            height, width = self.resize
            shrink = height < image.shape[0] and width < image.shape[1]
            image = cv2.resize(image, (width, height),
                               interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return image

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        if self.train:
            # On a PIL image, as the original: three times faster than on a tensor.
            image = np.array(self.jitter(Image.fromarray(image)))
        return normalize_imagenet(to_float_tensor(image))

    def __getitem__(self, index: int) -> dict | None:
        record = self.pairs[index]
        images = []
        for name, camera in ((record.name1, record.camera1), (record.name2, record.camera2)):
            image = self._load(record, name, camera)
            if isinstance(image, str):
                path = record.folder / "images" / name
                return self._skip(image, f"{path} (listed in {record.folder / 'pairs.txt'})")
            images.append(image)
        cam1, cam2 = self._final_camera(record.camera1), self._final_camera(record.camera2)
        fmat1, fmat2 = pair_fundamentals(cam1.K[None], cam2.K[None], cam1.pose[None], cam2.pose[None])
        item = {
            "im1": self._image_tensor(images[0]),
            "im2": self._image_tensor(images[1]),
            "F1": fmat1[0].float(),
            "F2": fmat2[0].float(),
            "intrinsic1": torch.from_numpy(cam1.K).float(),
            "intrinsic2": torch.from_numpy(cam2.K).float(),
            "pose1": torch.from_numpy(cam1.pose).float(),
            "pose2": torch.from_numpy(cam2.pose).float(),
            "name1": f"{record.rel_folder}/images/{record.name1}",
            "name2": f"{record.rel_folder}/images/{record.name2}",
        }
        mode = self.conf["query_points"]
        if mode is not None:
            count, percent = self.conf["num_pts"], self.conf["random_percent"]
            item["coord1"] = query_points(images[0], mode, count, percent)
            item["coord2"] = query_points(images[1], mode, count, percent)
        return item
