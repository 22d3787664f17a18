"""The F2R backbone: ResNet encoder up to layer3, U-Net decoder, feature fusion and the shared
coupling-bridge normalisation (config name ``ResUNet_F2R``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from model.blocks import ConvBlock, PositionwiseNorm, ResizeBlock, UpBlock, channelwise_norm, join_skip
from utils.errors import SCFeatError
from utils.image import NETWORK_STRIDE

# Bottleneck ResNets only: the decoder expects 256/512/1024 channels from layer1/2/3.
ENCODERS = {
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
    "resnet152": (torchvision.models.resnet152, torchvision.models.ResNet152_Weights.IMAGENET1K_V1),
}


def build_encoder(encoder: str, pretrained: bool | str) -> torchvision.models.ResNet:
    """A torchvision ResNet with random, ImageNet (``True``) or local-file (path) weights."""
    if encoder not in ENCODERS:
        hint = (" (resnet18/34 have too few channels for the F2R fusion block)"
                if encoder in ("resnet18", "resnet34") else "")
        raise SCFeatError(f"model_config.backbone_config.encoder: '{encoder}' is not supported{hint}; "
                          f"expected one of {sorted(ENCODERS)}")
    constructor, weights = ENCODERS[encoder]
    resnet = constructor(weights=None)
    if pretrained is True:
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # no internet, proxy, ...
            raise SCFeatError(
                f"model_config.backbone_config.pretrained: true downloads torchvision's ImageNet "
                f"weights for {encoder}, which failed ({exc.__class__.__name__}: {exc}). Without "
                f"internet, download them elsewhere and set pretrained to the file's path, or set "
                f"pretrained: false") from None
        resnet.load_state_dict(state)
    elif isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():
            raise SCFeatError(f"model_config.backbone_config.pretrained: weight file '{path}' does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SCFeatError(f"{path}: cannot read encoder weights ({exc})") from None
        missing, unexpected = resnet.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("layer4")]
        if missing:
            raise SCFeatError(f"{path}: not a torchvision {encoder} state_dict; missing keys "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return resnet


class ResUNet_F2R(nn.Module):
    """F2R backbone.

    Input ``B×3×H×W`` (H, W multiples of 16, ImageNet-normalised). Output dict:
    ``global_map`` (layer3, ``B×1024×H/16×W/16``), ``desc_map`` (fused map before
    normalisation, ``B×C×H/4×W/4``), ``local_map`` (after the coupling bridge, same shape) and
    ``local_map_first`` (stem after max-pool, ``B×64×H/4×W/4``).
    """

    default_conf = {"encoder": "resnet50", "pretrained": True, "fusion_out_ch": 128}
    ops = None  # a model.fast.FastOps (its rewrites first), or None: the composition below

    def __init__(self, conf: dict | None = None):
        super().__init__()
        conf = {**self.default_conf, **(conf or {})}
        self.conf = conf
        out_ch = conf["fusion_out_ch"]
        if out_ch % 32:
            raise SCFeatError(f"model_config.backbone_config.fusion_out_ch: {out_ch} must be a "
                              f"multiple of 32 (GroupNorm with 32 groups)")
        resnet = build_encoder(conf["encoder"], conf["pretrained"])
        self.firstconv = resnet.conv1
        self.firstbn = resnet.bn1
        self.firstrelu = resnet.relu
        self.firstmaxpool = resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

        self.upconv3 = UpBlock(1024, 512)
        self.iconv3 = ConvBlock(1024, 512, 3)
        self.upconv2 = UpBlock(512, 256)
        self.iconv2 = ConvBlock(512, 256, 3)

        self.side1 = ConvBlock(256, out_ch, 1)
        self.side2 = ResizeBlock(512, out_ch)
        self.side3 = ResizeBlock(1024, out_ch)
        self.fusion_conv = nn.Conv2d(3 * out_ch, out_ch, 1)
        self.fusion_pn = PositionwiseNorm()
        # Learned mix of PN and CN, initialised 0.7 / 0.3 as in the paper.
        self.fuse_weight_fusion_1 = nn.Parameter(torch.tensor([0.7]))
        self.fuse_weight_fusion_2 = nn.Parameter(torch.tensor([0.3]))

    def coupling_bridge(self, desc_map: torch.Tensor) -> torch.Tensor:
        """``PN(d)·w1/(w1+w2) + CN(d)·w2/(w1+w2)`` on ``B×C×h×w``."""
        w1, w2 = self.fuse_weight_fusion_1, self.fuse_weight_fusion_2
        total = w1 + w2
        return self.fusion_pn(desc_map) * (w1 / total) + channelwise_norm(desc_map) * (w2 / total)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encoder maps: stem after max-pool, layer1, layer2, layer3."""
        if self.ops is not None and (maps := self.ops.encode(self, x)) is not None:
            return maps
        x_first = self.firstmaxpool(self.firstrelu(self.firstbn(self.firstconv(x))))
        x1 = self.layer1(x_first)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        return x_first, x1, x2, x3

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-2] % NETWORK_STRIDE or x.shape[-1] % NETWORK_STRIDE:
            raise SCFeatError(f"image size {tuple(x.shape[-2:])} must be a multiple of "
                              f"{NETWORK_STRIDE} in H and W")
        x_first, x1, x2, x3 = self.encode(x)

        x2d = self.iconv3(join_skip(self.upconv3(x3), x2))
        x1d = self.iconv2(join_skip(self.upconv2(x2d), x1))

        side1 = self.side1(x1d)
        size = side1.shape[-2:]
        side2 = self.side2(x2d, size)
        side3 = self.side3(x3, size)
        desc_map = self.fusion_conv(torch.cat([side1, side2, side3], dim=1))
        local_map = self.coupling_bridge(desc_map)
        return {
            "global_map": x3.contiguous(),
            "desc_map": desc_map,
            "local_map": local_map,
            "local_map_first": x_first.contiguous(),
        }
