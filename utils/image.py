"""Image reading and the normalisation shared by every loader.

Every image the project reads (training, extraction, evaluation, tools) goes through
:func:`decode_image`: pixels as stored in the file, an EXIF orientation tag ignored (as the
original's reader and the cameras' intrinsics assume; OpenCV would otherwise rotate a tagged
JPEG). Images are ``H×W×3`` uint8 RGB arrays (``H×W`` when grey) and reach the networks as
``3×H×W`` float tensors normalised with the ImageNet mean and standard deviation.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from utils.errors import SCFeatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes | np.ndarray, grey: bool = False) -> np.ndarray | None:
    """The bytes of an image file → ``H×W×3`` uint8 RGB (grey files expanded to three
    channels) or, with ``grey``, ``H×W`` uint8 (OpenCV's own grey decoding); ``None`` when
    OpenCV cannot decode them. Pixels as stored: an EXIF orientation tag is ignored."""
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    if not buffer.size:
        return None
    mode = cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR
    image = cv2.imdecode(buffer, mode | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None or grey:
        return image
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_image(path: str | Path, grey: bool = False) -> np.ndarray:
    """Read an image file → :func:`decode_image` (``H×W×3`` RGB, or ``H×W`` with ``grey``).

    Raises ``SCFeatError`` naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"{path}: image file not found")
    # imdecode on the bytes, rather than imread, so that non-ASCII paths work too.
    image = decode_image(np.fromfile(str(path), dtype=np.uint8), grey)
    if image is None:
        raise SCFeatError(f"{path}: cannot decode the image (expected a JPEG, PNG, PPM or another "
                          f"format OpenCV reads)")
    return image


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
