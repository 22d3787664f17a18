"""SCFeat: the F2R backbone and the detection network in one module (config name
``SCFeatModel``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from model.fast import DEFAULT as DEFAULT_OPS, FastOps, attach
from model.detnet import DetNet
from model.checkpoint_config import checkpoint_settings
from model.features import detect_and_describe
from model.f2r import ResUNet_F2R
from utils.checkpoint import CHECKPOINT_PARTS, checkpoint_files, load_state_dict_file, load_strict
from utils.cli import resolve_device
from utils.config import Spec, lookup
from utils.errors import SCFeatError

DETECTOR_INPUTS = ("local_map", "local_map_first", "desc_map")


class SCFeatModel(nn.Module):
    """Holds ``backbone`` and ``localheader``; built by :meth:`from_config` (a config) or
    :meth:`from_checkpoint` (a trained folder).

    ``model_config`` keys (those of the original code): ``backbone``, ``backbone_config``,
    ``localheader``, ``localheader_config``, ``align_local_grad`` (let the detector's gradient
    reach the backbone), ``local_input_elements`` (backbone maps concatenated as detector input),
    ``local_with_img`` (the detector also sees the image).
    """

    default_conf = {
        "backbone": "ResUNet_F2R",
        "backbone_config": {},
        "localheader": "DetNet",
        "localheader_config": {},
        "align_local_grad": False,
        "local_input_elements": ["local_map", "local_map_first"],
        "local_with_img": True,
    }

    ops = None  # the model.fast.FastOps its networks hold (use_fast), or None

    def __init__(self, backbone: nn.Module, localheader: nn.Module, conf: dict | None = None):
        super().__init__()
        self.conf = {**self.default_conf, **(conf or {})}
        bad = [e for e in self.conf["local_input_elements"] if e not in DETECTOR_INPUTS]
        if bad or not self.conf["local_input_elements"]:
            raise SCFeatError(f"model_config.local_input_elements: {self.conf['local_input_elements']} "
                              f"must be a non-empty list drawn from {list(DETECTOR_INPUTS)}")
        self.backbone = backbone
        self.localheader = localheader

    def backbone_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())

    def detector_input(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """``cat(local_input_elements)``, detached unless ``align_local_grad``."""
        features = torch.cat([maps[name] for name in self.conf["local_input_elements"]], dim=1)
        return features if self.conf["align_local_grad"] else features.detach()

    def forward(self, images: torch.Tensor, with_detector: bool = True) -> dict[str, torch.Tensor]:
        """Images ``B×3×H×W`` → backbone maps and, with ``with_detector``, ``local_point``
        (score map ``B×1×H×W``).

        A frozen backbone (stage 2) runs without autograd.
        """
        with torch.set_grad_enabled(self.backbone_needs_grad()):
            outputs = dict(self.backbone(images))
        if with_detector:
            image = images if self.conf["local_with_img"] else None
            outputs["local_point"] = self.localheader(self.detector_input(outputs), image)
        return outputs

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{global_map, desc_map, local_map, local_point}`` for ``B×3×H×W`` images."""
        outputs = self.forward(images, with_detector=True)
        return {k: outputs[k] for k in ("global_map", "desc_map", "local_map", "local_point")}

    def detect_and_describe(self, image, detector: str = "generate_kpts_single",
                            descriptor_map: str = "desc_map", **detector_config) -> dict:
        """Features of one ``H×W×3`` uint8 RGB numpy image of any size (≥ 16×16): numpy
        float32 ``keypoints`` ``N×2`` (``x, y`` in the image's pixels), ``scores`` ``N``,
        ``descriptors`` ``N×D`` (unit norm). See :func:`model.features.detect_and_describe`."""
        return detect_and_describe(self, image, detector, descriptor_map, **detector_config)

    def use_fast(self, ops: FastOps | bool | None = True) -> "SCFeatModel":
        """Run the CPU rewrites of :mod:`model.fast` with the settings ``ops`` (``True``:
        :data:`model.fast.DEFAULT`, which ``--reference-ops`` switches) or the reference
        composition (``False`` / ``None``). Returns the model."""
        attach(self, DEFAULT_OPS if ops is True else (ops or None))
        return self

    @classmethod
    def from_config(cls, model_config: dict, fast: FastOps | bool | None = True
                    ) -> "SCFeatModel":
        """The model of a (validated) ``model_config``: backbone and detection network named
        there, the detector's ``in_channels`` checked against ``local_input_elements``;
        ``fast`` as in :meth:`use_fast`."""
        conf = {**cls.default_conf, **model_config}
        backbone = lookup(BACKBONES, conf["backbone"], "model_config.backbone")(conf["backbone_config"])
        header_cls = lookup(LOCALHEADERS, conf["localheader"], "model_config.localheader")
        channels = {"local_map": backbone.conf["fusion_out_ch"],
                    "desc_map": backbone.conf["fusion_out_ch"], "local_map_first": 64}
        expected = sum(channels.get(e, 0) for e in conf["local_input_elements"])
        in_channels = {**header_cls.default_conf, **conf["localheader_config"]}["in_channels"]
        if expected != in_channels:
            raise SCFeatError(f"model_config.localheader_config.in_channels: {in_channels} does "
                              f"not match local_input_elements {conf['local_input_elements']} "
                              f"({expected} channels)")
        header = header_cls(conf["localheader_config"], with_image=conf["local_with_img"])
        return cls(backbone, header, conf).use_fast(fast)

    @classmethod
    def from_checkpoint(cls, folder: str | Path, device: str | torch.device | None = None,
                        model_config: dict | None = None,
                        fast: FastOps | bool | None = True) -> "SCFeatModel":
        """Load ``backbone.pth`` and ``localheader.pth`` from ``folder`` (strictly).

        Model settings: those of ``config.yaml`` in the folder's parent (written by
        ``train.py``), which win over ``model_config`` (as in the original; each differing
        entry is logged: :func:`model.checkpoint_config.checkpoint_model_config`); ``model_config`` alone without that
        file; else the defaults. The encoder is never downloaded: the checkpoint supplies all
        weights. Returns the model in eval mode on ``device`` (default: CUDA when available);
        ``fast`` as in :meth:`use_fast`.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise SCFeatError(f"checkpoint folder '{folder}' does not exist")
        model_config, run_model, config_file = checkpoint_settings(folder, model_config or {})
        if run_model is not None:
            lookup(MODELS, run_model, f"{config_file}: model")
        model_config["backbone_config"] = {**model_config.get("backbone_config", {}), "pretrained": False}
        model = cls.from_config(model_config, fast=fast)
        for part, path in zip(CHECKPOINT_PARTS, checkpoint_files(folder)):
            load_strict(getattr(model, part), load_state_dict_file(path), path)
        return model.to(resolve_device(device)).eval()


# Config names of the networks (the registry aggregates them for the config layer).
BACKBONES = {"ResUNet_F2R": ResUNet_F2R}
LOCALHEADERS = {"DetNet": DetNet}
MODELS = {"SCFeatModel": SCFeatModel}


def model_schema(model_config: dict) -> dict:
    """Schema of ``model_config``: SCFeatModel's keys, with ``backbone_config`` and
    ``localheader_config`` taken from the classes the config names."""
    defaults = SCFeatModel.default_conf
    backbone = model_config.get("backbone", defaults["backbone"])
    header = model_config.get("localheader", defaults["localheader"])
    return {
        "backbone": Spec(defaults["backbone"], choices=tuple(BACKBONES)),
        "backbone_config": {**lookup(BACKBONES, backbone, "model_config.backbone").default_conf,
                            "pretrained": Spec(True, types=(bool, str))},
        "localheader": Spec(defaults["localheader"], choices=tuple(LOCALHEADERS)),
        "localheader_config": lookup(LOCALHEADERS, header, "model_config.localheader").default_conf,
        "align_local_grad": defaults["align_local_grad"],
        "local_input_elements": defaults["local_input_elements"],
        "local_with_img": defaults["local_with_img"],
    }
