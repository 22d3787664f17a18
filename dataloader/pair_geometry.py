"""Pair geometry for the MegaDepth loader: relative rotations, intrinsics of resized images,
the pair's fundamental matrices and whether its epipolar lines reach the other image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dataloader.megadepth_layout import CameraRecord
from utils.geometry import fundamental_from_pose, relative_pose

MAX_FUNDAMENTAL_ENTRY = 1e12  # |F/F[2,2]| beyond this means F[2,2] ≈ 0: unusable normalisation
ASPECT_TOLERANCE = 0.01  # relative difference of the x and y size ratios that a resize explains


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


def camera_at_size(camera: CameraRecord, width: int, height: int) -> CameraRecord:
    """The camera of the image at ``width×height``: the intrinsics scaled by the size ratio
    (:func:`scale_intrinsics`: the image's extent ``[-0.5, W - 0.5]`` maps onto the new one, as
    a resize does); the same record when the size is unchanged."""
    if (width, height) == (camera.width, camera.height):
        return camera
    K = scale_intrinsics(camera.K, width / camera.width, height / camera.height)
    return CameraRecord(width, height, K, camera.pose, camera.source)


def size_note(images: Path, name: str, camera: CameraRecord, width: int, height: int) -> str:
    """The warning for an image of ``images`` whose size on disk (``width×height``) is not the
    one its ``img_cam.txt`` line gives (``camera``)."""
    scale_x, scale_y = width / camera.width, height / camera.height
    note = (f"{images}: image sizes differ from img_cam.txt (e.g. {name} is {width}x{height} "
            f"(w x h) on disk, {camera.source} says {camera.width}x{camera.height}); the "
            f"intrinsics of such images are scaled by the size ratio (x {scale_x:.4g}, "
            f"y {scale_y:.4g})")
    if abs(scale_x / scale_y - 1) > ASPECT_TOLERANCE:
        note += ("; the aspect ratio differs too: were the images cropped or rotated rather "
                 "than resized? Then their geometry is wrong")
    return note


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


def _rectangle(sizes: np.ndarray) -> np.ndarray:
    """Homogeneous corners ``N×4×3`` of the pixel extents ``[-0.5, w-0.5]×[-0.5, h-0.5]`` of
    images of ``sizes`` ``N×2`` (``w, h``)."""
    w, h = sizes[:, 0] - 0.5, sizes[:, 1] - 0.5
    lo, one = np.full_like(w, -0.5), np.ones_like(w)
    return np.stack([np.stack([lo, lo, one], -1), np.stack([w, lo, one], -1),
                     np.stack([lo, h, one], -1), np.stack([w, h, one], -1)], 1)


def _lines_reach(fmat: np.ndarray, sizes_from: np.ndarray, sizes_to: np.ndarray) -> np.ndarray:
    """Whether at least one of the epipolar lines ``F·x`` of the 4 corners and the centre of
    the source images crosses the target image's rectangle → ``N`` bool."""
    corners = _rectangle(sizes_from)
    centre = np.concatenate([(sizes_from - 1) / 2, np.ones((len(sizes_from), 1))], 1)[:, None]
    lines = np.concatenate([corners, centre], 1) @ fmat.transpose(0, 2, 1)  # N×5×3
    values = lines @ _rectangle(sizes_to).transpose(0, 2, 1)  # N×5×4: line at each corner
    # A line crosses the rectangle iff its sign is not the same strict sign at all 4 corners.
    return ((values.min(-1) <= 0) & (values.max(-1) >= 0)).any(-1)


def epipolar_lines_miss(fmat1: np.ndarray, fmat2: np.ndarray, sizes1: np.ndarray,
                        sizes2: np.ndarray) -> np.ndarray:
    """Pairs (``N×3×3`` F1, F2; ``N×2`` image sizes ``w, h``) where no epipolar line of image
    1's corners and centre crosses image 2 (by ``F1``), or none of image 2's crosses image 1
    (by ``F2``) → ``N`` bool. Cheap index-time check for a pose that is far off."""
    return ~(_lines_reach(fmat1, sizes1, sizes2) & _lines_reach(fmat2, sizes2, sizes1))
