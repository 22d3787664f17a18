"""SCFeat: the F2R backbone and the detection network in one module (config name
``SCFeatModel``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from model.detnet import DetNet
from model.extractor import detect_and_describe
from model.f2r import ResUNet_F2R
from utils.checkpoint import CHECKPOINT_PARTS, checkpoint_files, load_state_dict_file, load_strict
from utils.cli import resolve_device
from utils.config import lookup, read_yaml
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
        ``descriptors`` ``N×D`` (unit norm). See :func:`model.extractor.detect_and_describe`."""
        return detect_and_describe(self, image, detector, descriptor_map, **detector_config)

    @classmethod
    def from_config(cls, model_config: dict) -> "SCFeatModel":
        """The model of a (validated) ``model_config``: backbone and detection network named
        there, the detector's ``in_channels`` checked against ``local_input_elements``."""
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
        return cls(backbone, header, conf)

    @classmethod
    def from_checkpoint(cls, folder: str | Path, device: str | torch.device | None = None,
                        model_config: dict | None = None) -> "SCFeatModel":
        """Load ``backbone.pth`` and ``localheader.pth`` from ``folder`` (strictly).

        Model settings come from ``model_config``, else from ``config.yaml`` in the folder's
        parent (written by ``train.py``), else the defaults. The encoder is never downloaded:
        the checkpoint supplies all weights. Returns the model in eval mode on ``device``
        (default: CUDA when available).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise SCFeatError(f"checkpoint folder '{folder}' does not exist")
        if model_config is None:
            config_file = folder.parent / "config.yaml"
            if config_file.is_file():
                run_config = read_yaml(config_file)
                lookup(MODELS, run_config.get("model", "SCFeatModel"), f"{config_file}: model")
                model_config = run_config.get("model_config", {})
        model_config = dict(model_config or {})
        model_config["backbone_config"] = {**model_config.get("backbone_config", {}), "pretrained": False}
        model = cls.from_config(model_config)
        for part, path in zip(CHECKPOINT_PARTS, checkpoint_files(folder)):
            load_strict(getattr(model, part), load_state_dict_file(path), path)
        return model.to(resolve_device(device)).eval()


# Config names of the networks (the registry aggregates them for the config layer).
BACKBONES = {"ResUNet_F2R": ResUNet_F2R}
LOCALHEADERS = {"DetNet": DetNet}
MODELS = {"SCFeatModel": SCFeatModel}
