"""Image reading, the images the per-image APIs accept, and the normalisation shared by every
loader.

Every image the project reads (training, extraction, evaluation, tools) goes through
:func:`decode_image`: pixels as stored in the file, an EXIF orientation tag ignored (COLMAP's
models, and so MegaDepth's intrinsics, describe the stored pixels; OpenCV would otherwise rotate
a tagged JPEG, and the original's reader rotates it: docs/differences.md). Images are ``H×W×3`` uint8 RGB arrays (``H×W`` when grey) and reach the networks as
``3×H×W`` float tensors normalised with the ImageNet mean and standard deviation.

:func:`image_tensor` turns any accepted form of one image (numpy uint8 RGB or grey, or a float
tensor in [0, 1] as LightGlue's ``load_image`` gives) into one ``1×C×H×W`` float tensor.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from utils.errors import SCFeatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NETWORK_STRIDE = 16  # the F2R encoder's total stride: network inputs are multiples of it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")  # the image files a folder lists


def make_sift(max_keypoints: int | None = None) -> "cv2.SIFT":
    """OpenCV's SIFT with its default parameters, keeping at most ``max_keypoints`` per image
    (``None`` or 0: all)."""
    return cv2.SIFT_create(nfeatures=max_keypoints or 0)


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


IMAGE_FORMS = ("a numpy uint8 array H×W×3 (RGB), H×W or H×W×1 (grey), or a torch float tensor "
               "3×H×W or 1×H×W in [0, 1] (optionally 1×C×H×W)")


def image_tensor(image: object, where: str, min_size: int = 1) -> torch.Tensor:
    """One image of any accepted form → ``1×C×H×W`` float32 in ``[0, 1]``, ``C`` 3 (RGB) or 1
    (grey), on the image's own device (the CPU for numpy).

    Accepted: a numpy uint8 array ``H×W×3`` (RGB), ``H×W`` or ``H×W×1`` (grey); a torch float
    tensor ``3×H×W`` or ``1×H×W`` with values in ``[0, 1]`` (LightGlue's ``load_image``
    convention), optionally with a batch dimension of 1, on any device. Anything else (another
    dtype, values outside ``[0, 1]``, other shapes, a side below ``min_size``) raises an
    :class:`SCFeatError` that starts with ``where`` and says what was expected. A uint8 array
    ``a`` and the tensor ``torch.from_numpy(a).permute(2, 0, 1).float() / 255`` give the same
    tensor. A contiguous float32 tensor is returned as a view of the input (not copied): do
    not modify it in place.
    """
    if isinstance(image, np.ndarray):
        tensor = _numpy_image(image, where)
    elif isinstance(image, torch.Tensor):
        tensor = _torch_image(image, where)
    else:
        raise SCFeatError(f"{where} must be {IMAGE_FORMS}; got {type(image).__name__}")
    height, width = tensor.shape[-2:]
    if min(height, width) < min_size:
        raise SCFeatError(f"{where} is {height}×{width}; at least {min_size}×{min_size} pixels "
                          f"are needed")
    return tensor


def _numpy_image(image: np.ndarray, where: str) -> torch.Tensor:
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        hint = (" (channels first: image.transpose(1, 2, 0))"
                if image.ndim == 3 and image.shape[0] in (1, 3) else
                " (RGBA: image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else "")
        raise SCFeatError(f"{where} must have shape H×W×3 (RGB), H×W or H×W×1 (grey), got "
                          f"{image.shape}{hint}")
    if image.dtype != np.uint8:
        hint = (" (a float image in [0, 1]: (image * 255).round().astype(np.uint8), or pass it "
                "as a tensor: torch.from_numpy(image).permute(2, 0, 1))"
                if np.issubdtype(image.dtype, np.floating) else "")
        raise SCFeatError(f"{where}: a numpy image must be uint8 (0..255), got {image.dtype}{hint}")
    return to_float_tensor(image)[None]


def _torch_image(image: torch.Tensor, where: str) -> torch.Tensor:
    shape = tuple(image.shape)
    if image.dtype == torch.uint8:
        raise SCFeatError(f"{where}: a tensor image must be float in [0, 1], got uint8 "
                          f"(use image.float() / 255)")
    if not image.is_floating_point():
        raise SCFeatError(f"{where}: a tensor image must be float in [0, 1], got {image.dtype}")
    if image.ndim == 4:
        if shape[0] != 1:
            raise SCFeatError(f"{where}: one image at a time, got a batch of {shape[0]} "
                              f"(shape {shape})")
        image = image[0]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        hint = (" (channels last: image.permute(2, 0, 1))"
                if image.ndim == 3 and image.shape[-1] in (1, 3) else
                " (grey: image[None])" if image.ndim == 2 else "")
        raise SCFeatError(f"{where}: a tensor image must have shape 3×H×W (RGB) or 1×H×W (grey), "
                          f"optionally with a batch dimension of 1, got {shape}{hint}")
    low, high = (float(v) for v in torch.aminmax(image.detach()))
    if not (0.0 <= low and high <= 1.0):  # also false for NaN
        hint = " (a 0..255 image? divide it by 255)" if high > 1.0 and high <= 255.0 else ""
        raise SCFeatError(f"{where}: a tensor image must hold values in [0, 1], got "
                          f"[{low:g}, {high:g}]{hint}")
    return image.detach().float()[None].contiguous()
