"""HPatches-sequences images for feature extraction (registry name `HPatch_SIFT`).

Every ``<data_path>/<seq>/<k>.ppm`` is one item. Images are cropped at the right and bottom
to a multiple of 16 (the network's stride), so keypoints found on the crop are already in
original-image pixels.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dataloader.collate import collate_skip_none
from utils.image import load_image, to_tensor_normalized
from utils.config import Spec, section_config
from utils.errors import SCFeatError

logger = logging.getLogger(__name__)

CROP_MULTIPLE = 16


def _natural_key(name: str) -> list:
    """Sort key that orders ``2.ppm`` before ``10.ppm``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_hpatches_images(data_path: str | Path) -> list[Path]:
    """All ``<data_path>/<seq>/<k>.ppm``, sorted by sequence then image number."""
    root = Path(data_path)
    if not root.is_dir():
        raise SCFeatError(f"HPatches data_path {root} is not a folder "
                          f"(expected <data_path>/<sequence>/<k>.ppm)")
    images = [path for seq in sorted(p for p in root.iterdir() if p.is_dir())
              for path in sorted(seq.glob("*.ppm"), key=lambda p: _natural_key(p.name))]
    if not images:
        raise SCFeatError(f"no HPatches images under {root}: expected "
                          f"<data_path>/<sequence>/<k>.ppm files")
    return images


def sift_keypoints(image_rgb: np.ndarray, max_pts: int) -> np.ndarray:
    """OpenCV SIFT keypoint locations ``N×2`` (float32 ``x, y``) of an ``H×W×3`` uint8 image."""
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    keypoints = cv2.SIFT_create(nfeatures=max_pts).detect(gray, None)
    return np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2)


class HPatch_SIFT(Dataset):
    """HPatches-sequences images; items are dicts (see `__getitem__`), ``None`` if unreadable."""

    collate_fn = staticmethod(collate_skip_none)  # drops unusable items (None), lists them
    default_conf = {
        "data_path": "data/hpatches-sequences-release",
        "batch_size": Spec(1, minimum=1),
        "workers": Spec(4, minimum=0),
        "use_sift": False,
        "sift_max_pts": 0,  # 0: every SIFT keypoint, as the original's use_sift
        # The original's keys; its extraction ignores them (use_sift takes every SIFT point).
        "prune_kp": Spec(True, inert=True),
        "num_pts": Spec(5000, inert=True),
    }

    def __init__(self, conf: dict):
        self.conf = section_config(self.default_conf, conf, "data_config_extract")
        self.root = Path(self.conf["data_path"])
        self.paths = list_hpatches_images(self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict | None:
        """One image: ``image`` (3×H'×W' normalised), ``image_rgb`` (H'×W'×3 uint8),
        ``orig_size`` (long tensor ``[H, W]`` before the crop), ``seq``, ``name``
        (``<k>.ppm``), ``path`` and, with ``use_sift``, ``sift_kpts`` (N×2 float32 x, y on the
        crop). H', W' are H, W rounded down to a multiple of 16."""
        path = self.paths[index]
        try:
            rgb = load_image(path)
        except SCFeatError as error:  # one bad file must not stop a whole extraction
            logger.warning("HPatches: skipping %s (%s)", path, error)
            return None
        height, width = rgb.shape[:2]
        crop_h = height // CROP_MULTIPLE * CROP_MULTIPLE
        crop_w = width // CROP_MULTIPLE * CROP_MULTIPLE
        if crop_h == 0 or crop_w == 0:
            logger.warning("HPatches: image %s (%d×%d) is smaller than %d px; skipping it",
                           path, height, width, CROP_MULTIPLE)
            return None
        image_rgb = np.ascontiguousarray(rgb[:crop_h, :crop_w])
        item = {
            "image": to_tensor_normalized(image_rgb),
            "image_rgb": torch.from_numpy(image_rgb),
            "orig_size": torch.tensor([height, width]),
            "seq": path.parent.name,
            "name": path.name,
            "path": str(path),
        }
        if self.conf["use_sift"]:
            item["sift_kpts"] = torch.from_numpy(sift_keypoints(image_rgb,
                                                                self.conf["sift_max_pts"]))
        return item
