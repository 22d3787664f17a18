"""Features of any image from a model: the per-image API behind
``SCFeatModel.detect_and_describe`` and the selection step every extraction shares.

:func:`select_features`: keypoints from the detector score map (``local_point``) or given
(SIFT), descriptors bilinearly sampled from ``desc_map`` (the fused map before normalisation,
as the original) or ``local_map`` and L2-normalised, scores from the map.

Coordinates are pixels ``x, y`` of the image as given (pixel centres at integers).
:func:`detect_and_describe` takes numpy or tensor images, RGB or grey (:func:`network_input`),
pads at the right and bottom (every pixel is kept) and crops the score map back to the input
size before selection, so no keypoint comes from the padding.
"""
from __future__ import annotations

import numpy as np
import torch

from utils.errors import SCFeatError
from utils.image import NETWORK_STRIDE, image_tensor, normalize_imagenet
from model.keypoints import Detector, make_detector, sample_descriptors

MIN_IMAGE_SIZE = 16  # smaller images would be mostly padding
DESCRIPTOR_MAPS = ("desc_map", "local_map")

Features = dict[str, torch.Tensor]

def is_textureless(image: torch.Tensor) -> bool:
    """True when every channel of a ``C×H×W`` (or ``1×C×H×W``) image is constant.

    Such an image has nothing to detect: the score map's only structure comes from the
    convolutions' zero padding at the image border, and keypoints there would be noise.
    """
    flat = image.reshape(image.shape[-3], -1)
    return bool((flat.amax(1) == flat.amin(1)).all())


def select_features(outputs: dict[str, torch.Tensor], valid_hw: tuple[int, int], detector: Detector,
                    descriptor_map: str = "desc_map", keypoints: torch.Tensor | None = None,
                    textureless: bool = False) -> Features:
    """Keypoints, scores and descriptors of one image from the network ``outputs`` (batch 1).

    ``valid_hw``: the image's size inside the (possibly padded) network input; the score map is
    cropped to it first, so the padding yields no keypoint. ``keypoints`` (``N×2`` pixels) replace
    the detector's, each with score 1 (the original's ``use_sift``). ``textureless`` (see
    :func:`is_textureless`): no keypoints at all. Returns ``keypoints`` ``N×2``, ``scores``
    ``N``, ``descriptors`` ``N×D`` (unit norm), float32 on the outputs' device.
    """
    height, width = valid_hw
    score_map = outputs["local_point"][:, :, :height, :width]
    if textureless:
        keypoints = score_map.new_zeros(0, 2)
    if keypoints is None:
        keypoints, scores = detector(score_map)
    else:
        keypoints = keypoints.to(score_map.device, torch.float32).reshape(-1, 2)
        scores = keypoints.new_ones(len(keypoints))
    input_hw = tuple(outputs["local_point"].shape[-2:])
    descriptors = sample_descriptors(outputs[descriptor_map], keypoints, input_hw)
    return {"keypoints": keypoints.float(), "scores": scores.float(),
            "descriptors": descriptors.float()}


def to_numpy(features: Features) -> dict[str, np.ndarray]:
    """Tensors → contiguous float32 numpy arrays on the CPU."""
    return {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32)
            for k, v in features.items()}


def network_input(image: object, device: torch.device | str | None = None,
                  where: str = "detect_and_describe: image") -> tuple[torch.Tensor, tuple[int, int]]:
    """The network's input for one image of any form that :func:`utils.image.image_tensor`
    accepts (numpy uint8 RGB or grey, float tensor in [0, 1]; at least ``MIN_IMAGE_SIZE``
    pixels a side): ``1×3×H'×W'`` ImageNet-normalised on ``device`` (default: the image's),
    grey repeated to three channels, padded at the right and bottom to multiples of
    ``utils.image.NETWORK_STRIDE`` by replicating the last row and column; and the image's ``(H, W)``.

    Replicate rather than zero: black padding would put a strong artificial edge along the
    image border, and since the detector normalises its maps over the whole image (peakiness,
    instance norm), that edge would change the scores inside the image too.
    """
    tensor = image_tensor(image, where, MIN_IMAGE_SIZE)
    if device is not None:
        tensor = tensor.to(device)
    height, width = tensor.shape[-2:]
    tensor = tensor.expand(-1, 3, -1, -1)  # grey → RGB, as image files are read
    pad_h, pad_w = -height % NETWORK_STRIDE, -width % NETWORK_STRIDE
    if pad_h or pad_w:
        tensor = torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h), mode="replicate")
    return normalize_imagenet(tensor), (height, width)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def detect_and_describe(model: torch.nn.Module, image: object,
                        detector: str = "generate_kpts_single", descriptor_map: str = "desc_map",
                        **detector_config) -> dict[str, np.ndarray]:
    """Features of one image of any size (at least 16×16): a numpy uint8 ``H×W×3`` RGB, ``H×W``
    or ``H×W×1`` grey array, or a float tensor ``3×H×W`` or ``1×H×W`` in ``[0, 1]``
    (optionally ``1×C×H×W``) on any device (see :func:`utils.image.image_tensor`).

    The image is padded at the right/bottom to a multiple of 16 and ImageNet-normalised
    (:func:`network_input`) and run through ``model`` (in eval mode, on its device); keypoints
    are selected by ``detector`` with ``detector_config`` on the score map cropped to the image
    (an option left out takes the detector's ``default_conf``, for ``generate_kpts_single``
    the original's: every NMS candidate, no threshold; the original's HPatches extraction
    passes ``num_pts=8192, thr=1.0, thr_mod="abs"``). Returns numpy float32 ``keypoints``
    ``N×2`` (``x, y`` in the input's pixels),
    ``scores`` ``N`` and ``descriptors`` ``N×D`` (unit norm), best score first; ``N = 0`` for
    an image without texture (:func:`is_textureless`).
    """
    if descriptor_map not in DESCRIPTOR_MAPS:
        raise SCFeatError(f"detect_and_describe: descriptor_map must be one of "
                          f"{list(DESCRIPTOR_MAPS)}, got {descriptor_map!r}")
    select = make_detector(detector, detector_config, origin="detect_and_describe")
    tensor, image_hw = network_input(image, model_device(model))
    was_training = model.training
    model.eval()  # BatchNorm must use its running statistics
    try:
        with torch.inference_mode():
            outputs = model.extract(tensor)
            features = select_features(outputs, image_hw, select, descriptor_map,
                                       textureless=is_textureless(tensor))
            return to_numpy(features)
    finally:
        model.train(was_training)
