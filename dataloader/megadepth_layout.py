"""The MegaDepth layout on disk (CAPS): the records of ``img_cam.txt`` and ``pairs.txt``, the
aligned folders, and the names of the causes for which a pair is dropped or skipped.

See :mod:`dataloader.megadepth` for the layout and what happens to faulty data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from utils.atomic import atomic_open
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.data")

IMG_CAM_FORMAT = "name w h fx fy cx cy r11 r12 r13 r21 r22 r23 r31 r32 r33 t1 t2 t3"
ROTATION_TOLERANCE = 1e-2  # max |RᵀR - I| and |det R - 1| for a rotation matrix
EXAMPLES_PER_CAUSE = 3  # places named in each index-time log line

# Index-time causes (keys of ``dropped_at_index``). Filters asked for by the config are logged
# at INFO, data faults at WARNING.
INVALID_SIZE = "invalid image size in img_cam.txt"
NONFINITE_INTRINSICS = "non-finite intrinsics"
SINGULAR_INTRINSICS = "singular intrinsics (fx or fy <= 0)"
NOT_ROTATION = "not a rotation matrix (RtR != I or det != 1)"
NONFINITE_TRANSLATION = "non-finite translation"
LISTED_TWICE = "image listed twice in img_cam.txt"
SELF_PAIR = "self pair"
DUPLICATE_PAIR = "duplicate pair (repeated or reversed)"
DEGENERATE_F = "degenerate fundamental matrix (F[2,2] ~ 0 or no baseline)"
EPIPOLAR_MISS = "epipolar lines miss the other image"

# Load-time causes (the prefix of the strings in ``item['skipped']``).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
TRUNCATED_IMAGE = "truncated image"
UNDECODABLE_IMAGE = "undecodable image"


@dataclass(frozen=True, slots=True)
class CameraRecord:
    """One line of ``img_cam.txt``: image size, intrinsics ``K`` (3×3) and world→camera ``pose``
    (4×4), both float64; ``source`` is ``file:line``."""
    width: int
    height: int
    K: np.ndarray
    pose: np.ndarray
    source: str = ""


@dataclass(frozen=True, slots=True)
class PairRecord:
    """One usable pair: its ``aligned`` folder (absolute and relative to ``data_path``) and cameras."""
    folder: Path
    rel_folder: str
    name1: str
    name2: str
    camera1: CameraRecord
    camera2: CameraRecord


class PairLine(NamedTuple):
    """One line of ``pairs.txt``."""
    line: int
    name1: str
    name2: str


def text_lines(path: Path) -> list[str]:
    """The lines of the UTF-8 text file ``path``, split at ``\\n`` only (so line numbers match
    an editor's); an error naming the file (and the line of a byte that is not UTF-8)."""
    try:
        return path.read_bytes().decode("utf-8").split("\n")
    except OSError as error:
        raise SCFeatError(f"{path}: cannot read the file ({error})") from None
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1
        raise SCFeatError(f"{path}:{line}: not UTF-8 text (byte {error.object[error.start]:#04x}); "
                          f"expected a text file") from None


def _data_lines(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, tokens)`` of the non-blank lines of ``path`` not starting with ``#``."""
    lines = []
    for number, line in enumerate(text_lines(path), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append((number, stripped.split()))
    return lines


def _camera_fault(values: np.ndarray) -> str | None:
    """The index-time cause that makes a parsed ``img_cam.txt`` line unusable, or ``None``."""
    width, height = values[0], values[1]
    if not (np.isfinite(width) and np.isfinite(height) and width == int(width)
            and height == int(height) and width >= 1 and height >= 1):
        return INVALID_SIZE
    fx, fy, cx, cy = values[2:6]
    if not np.isfinite(values[2:6]).all():
        return NONFINITE_INTRINSICS
    if fx <= 0 or fy <= 0:
        return SINGULAR_INTRINSICS
    rotation = values[6:15].reshape(3, 3)
    if not np.isfinite(rotation).all():
        return NOT_ROTATION
    with np.errstate(all="ignore"):
        orthogonal = np.abs(rotation @ rotation.T - np.eye(3)).max() <= ROTATION_TOLERANCE
        if not (orthogonal and abs(np.linalg.det(rotation) - 1) <= ROTATION_TOLERANCE):
            return NOT_ROTATION
    if not np.isfinite(values[15:18]).all():
        return NONFINITE_TRANSLATION
    return None


def read_img_cam(path: Path) -> tuple[dict[str, CameraRecord], dict[str, tuple[str, str]]]:
    """Parse ``img_cam.txt`` → ``(cameras, rejected)``: ``{name: CameraRecord}`` for the usable
    lines and ``{name: (cause, 'file:line')}`` for the parseable but unusable ones (see the
    module docstring). ``SCFeatError`` naming ``file:line`` on a wrong token count or a
    non-number; a missing or non-UTF-8 file is an ``SCFeatError`` too."""
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"{path}: img_cam.txt not found (expected one line per image: "
                          f"{IMG_CAM_FORMAT})")
    cameras: dict[str, CameraRecord] = {}
    rejected: dict[str, tuple[str, str]] = {}
    for number, tokens in _data_lines(path):
        where = f"{path}:{number}"
        if len(tokens) != 19:
            raise SCFeatError(f"{where}: expected 19 values ({IMG_CAM_FORMAT}), got {len(tokens)}")
        values = parse_numbers(tokens[1:], where, IMG_CAM_FORMAT)
        name = tokens[0]
        if name in cameras or name in rejected:
            first = cameras.pop(name).source if name in cameras else rejected[name][1]
            rejected[name] = (LISTED_TWICE, f"{first} and line {number}")
            continue
        fault = _camera_fault(values)
        if fault is not None:
            rejected[name] = (fault, where)
            continue
        fx, fy, cx, cy = values[2:6]
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = values[6:15].reshape(3, 3), values[15:18]
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        cameras[name] = CameraRecord(int(values[0]), int(values[1]), K, pose, where)
    return cameras, rejected


def parse_numbers(tokens: list[str], where: str, expected: str) -> np.ndarray:
    """The tokens of a text line as float64, or an error naming ``where`` (``file:line``), the
    first token that is not a number and the ``expected`` layout."""
    values = []
    for token in tokens:
        try:
            values.append(float(token))
        except ValueError:
            raise SCFeatError(f"{where}: {token!r} is not a number (expected {expected})") from None
    return np.array(values, dtype=np.float64)


def read_pairs(path: Path) -> list[PairLine]:
    """Parse ``pairs.txt`` → ``[PairLine(line, name1, name2)]`` in file order;
    ``SCFeatError`` naming ``file:line`` when a line does not hold exactly two names. Which
    pairs are usable is decided by the dataset."""
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"{path}: pairs.txt not found (expected one 'name1 name2' per line)")
    pairs = []
    for number, tokens in _data_lines(path):
        if len(tokens) != 2:
            raise SCFeatError(f"{path}:{number}: expected two image names 'name1 name2', "
                              f"got {len(tokens)} values")
        pairs.append(PairLine(number, tokens[0], tokens[1]))
    return pairs


def find_aligned_folders(data_path: Path) -> list[Path]:
    """``<data_path>/<scene>/<*dense*>/aligned`` folders, sorted. A scene folder without a dense
    folder, or a dense folder without ``aligned``, is skipped with a warning; none at all is an
    error."""
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
                log.warning("%s: folder not found; %s skipped", aligned, folder)
                continue
            folders.append(aligned)
    if not folders:
        raise SCFeatError(f"{data_path}: no <scene>/<dense*>/aligned folders (expected the CAPS "
                          f"MegaDepth layout <scene>/<dense>/aligned/{{images/, img_cam.txt, "
                          f"pairs.txt}})")
    return folders


def missing_part(folder: Path) -> str | None:
    """Why an aligned folder cannot be used (a message naming the missing part), or ``None``."""
    if not (folder / "img_cam.txt").is_file():
        return (f"{folder / 'img_cam.txt'}: img_cam.txt not found (expected one line per image: "
                f"{IMG_CAM_FORMAT})")
    if not (folder / "pairs.txt").is_file():
        return f"{folder / 'pairs.txt'}: pairs.txt not found (expected one 'name1 name2' per line)"
    if not (folder / "images").is_dir():
        return f"{folder / 'images'}: images folder not found"
    return None


def img_cam_line(name: str, camera: CameraRecord) -> str:
    """The ``img_cam.txt`` line of one image (``IMG_CAM_FORMAT``; values as ``repr``, exact)."""
    K, pose = camera.K, camera.pose
    values = [K[0, 0], K[1, 1], K[0, 2], K[1, 2], *pose[:3, :3].ravel(), *pose[:3, 3]]
    return f"{name} {camera.width} {camera.height} " + " ".join(repr(float(v)) for v in values)


def write_img_cam(path: Path, names: list[str], cameras: list[CameraRecord],
                  comments: tuple[str, ...] = ()) -> None:
    """``img_cam.txt`` of ``names`` and their ``cameras``, atomically, after ``# comments``."""
    lines = [f"# {IMG_CAM_FORMAT}", *(f"# {c}" for c in comments)]
    lines += [img_cam_line(name, camera) for name, camera in zip(names, cameras)]
    with atomic_open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    """``pairs.txt`` (``name1 name2`` per line), atomically."""
    with atomic_open(path, "w") as handle:
        handle.write("".join(f"{a} {b}\n" for a, b in pairs))
