"""Query points of a training image (the loader's ``query_points`` option): random, SIFT or
mixed, always exactly ``num_pts`` so that batches stack."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from utils.image import make_sift

QUERY_POINT_MODES = (None, "random", "sift", "mixed")

def random_points(count: int, height: int, width: int) -> torch.Tensor:
    """``count×2`` pixel ``x, y`` uniform over the image (torch's RNG, so worker seeding applies)."""
    return torch.rand(count, 2) * torch.tensor([width - 1.0, height - 1.0])


def sift_points(image_rgb: np.ndarray, count: int) -> torch.Tensor:
    """Up to ``count`` SIFT keypoint locations ``≤count×2`` (pixel ``x, y``), strongest first."""
    if count <= 0:
        return torch.zeros(0, 2)
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    keypoints = make_sift(count).detect(gray, None)
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
