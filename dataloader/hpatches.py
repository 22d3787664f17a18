"""HPatches-sequences images for feature extraction (registry name `HPatch_SIFT`).

Every ``<data_path>/<seq>/<k>.ppm`` is one item (:class:`dataloader.image_folders.ImageFolder`:
cropped at the right and bottom to a multiple of 16, so keypoints found on the crop are already
in original-image pixels), with OpenCV SIFT keypoints on request (``use_sift``).
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import torch

from dataloader.image_folders import ImageFolder, folder_conf
from utils.config import Spec
from utils.image import make_sift


def _natural_key(name: str) -> list:
    """Sort key that orders ``2.ppm`` before ``10.ppm``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def sift_keypoints(image_rgb: np.ndarray, max_pts: int) -> np.ndarray:
    """OpenCV SIFT keypoint locations ``N×2`` (float32 ``x, y``) of an ``H×W×3`` uint8 image."""
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    keypoints = make_sift(max_pts).detect(gray, None)
    return np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2)


class HPatch_SIFT(ImageFolder):
    """HPatches-sequences images; items are dicts (see `__getitem__`), ``None`` if unreadable."""

    default_conf = folder_conf(
        "data/hpatches-sequences-release",
        use_sift=False,
        sift_max_pts=0,  # 0: every SIFT keypoint, as the original's use_sift
        # The original's config keys; nothing reads them here (the original never reads
        # num_pts; use_sift takes every SIFT point).
        prune_kp=Spec(True, inert=True),
        num_pts=Spec(5000, inert=True),
    )
    title = "HPatches"
    layout = "<data_path>/<sequence>/<k>.ppm"

    def list_images(self) -> list[Path]:
        """Every ``<data_path>/<seq>/<k>.ppm``, sorted by sequence then image number."""
        return [path for seq in sorted(p for p in self.root.iterdir() if p.is_dir())
                for path in sorted(seq.glob("*.ppm"), key=lambda p: _natural_key(p.name))]

    def key(self, path: Path) -> str:
        return f"{path.parent.name}/{path.name}"

    def __getitem__(self, index: int) -> dict | None:
        """:meth:`ImageFolder.__getitem__`'s item plus ``seq``, ``name`` (``<k>.ppm``) and,
        with ``use_sift``, ``sift_kpts`` (N×2 float32 x, y on the crop)."""
        item = super().__getitem__(index)
        if item is None:
            return None
        path = self.paths[index]
        item["seq"], item["name"] = path.parent.name, path.name
        if self.conf["use_sift"]:
            item["sift_kpts"] = torch.from_numpy(sift_keypoints(item["image_rgb"].numpy(),
                                                                self.conf["sift_max_pts"]))
        return item
