"""Image reading and the normalisation shared by every loader.

Images are read as ``H×W×3`` uint8 RGB arrays and handed to the networks as ``3×H×W`` float
tensors normalised with the ImageNet mean and standard deviation.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from utils.errors import SCFeatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file → ``H×W×3`` uint8 RGB (grey images are expanded to three channels).

    Raises ``SCFeatError`` naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"{path}: image file not found")
    # imdecode on the bytes, rather than imread, so that non-ASCII paths work too.
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise SCFeatError(f"{path}: cannot decode the image (expected a JPEG, PNG, PPM or another "
                          f"format OpenCV reads)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_float_tensor(image: np.ndarray) -> torch.Tensor:
    """``H×W×3`` uint8 RGB → ``3×H×W`` float32 in ``[0, 1]``, contiguous.

    Contiguous rather than the permuted view's channels-last strides: convolutions keep their
    input's memory format, so a channels-last image would make every layer of the network
    convert layouts back and forth (about 3% of an extraction on the CPU).
    """
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().float().div_(255.0)


def normalize_imagenet(image: torch.Tensor) -> torch.Tensor:
    """``3×H×W`` (or ``B×3×H×W``) float in ``[0, 1]`` → ImageNet-normalised, same shape."""
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def to_tensor_normalized(image: np.ndarray) -> torch.Tensor:
    """``H×W×3`` uint8 RGB → ``3×H×W`` float32, ImageNet-normalised (the evaluation transform)."""
    return normalize_imagenet(to_float_tensor(image))
