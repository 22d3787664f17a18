""":class:`FastOps`: which CPU rewrites a network runs, and the entry points the reference
modules call when they hold one (``module.ops``; ``None`` runs the reference composition).

Every entry point returns the rewritten result, or ``None`` where its rewrite does not apply to
the input (another device or dtype, autocast, autograd for the inference-only rewrites, a
switch off): the module then runs its reference composition. Both give the same values up to
floating-point rounding (tests/unit/test_lowres_conv.py, tests/unit/test_winograd.py,
tests/parity/test_model.py run both).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

import model.fast.detnet as detnet
import model.fast.winograd as winograd
from model.fast.encoder import encode_fused
from model.fast.fused import FUSED_AVAILABLE
from model.fast.lowres_conv import upsample_conv3x3

# The switches' values for the original composition of ops.
REFERENCE_SWITCHES = {"fused": False, "lowres_conv": False, "winograd_tile": 0,
                      "channels_last": False}


@dataclasses.dataclass
class FastOps:
    """The rewrites' switches and sizes.

    ``fused``: on the CPU without autograd, BatchNorm folded into the encoder's convolutions
    with ReLU and residual additions as their post-ops, the detector's instance norms and
    PReLUs in place (:mod:`model.fast.fused`, :mod:`model.fast.detnet`); off where this torch
    build lacks oneDNN's fused convolution. ``lowres_conv``: every bilinear upsample → 3×3
    convolution computed at the low resolution, also under autograd
    (:mod:`model.fast.lowres_conv`). ``winograd_tile``: F(m×m, 3×3) for the 3×3 convolutions
    with at least ``winograd_min_channels`` inputs where autograd does not record them
    (:mod:`model.fast.winograd`; 0: direct). ``channels_last``: the encoder's and the
    detector's full-resolution maps channels-last on the fused path. ``lowres_chunk``,
    ``lowres_inference_chunk`` and ``lowres_channels_last_chunk``: the output blocks (rows,
    columns) of the banded interpolation products, channels-first where autograd records the
    layer and where it does not, and channels-last. Small blocks multiply fewer of the banded
    matrices' zeros, large ones make fewer operations (each a meeting point of the threads, and
    under autograd a node and a concatenation): without autograd, 24×32 and 16×64 blocks took
    0.70× and 0.80× of the time of 120×160 and 32×128 for ``upconv2`` and the detector's
    ``conv2`` on ``up(f)`` (docs/performance.md).
    """

    fused: bool = FUSED_AVAILABLE
    lowres_conv: bool = True
    winograd_tile: int = 4
    winograd_min_channels: int = 512
    channels_last: bool = True
    lowres_chunk: tuple[int, int] = (120, 160)
    lowres_inference_chunk: tuple[int, int] = (24, 32)
    lowres_channels_last_chunk: tuple[int, int] = (16, 64)

    def __deepcopy__(self, memo) -> "FastOps":
        return self  # settings shared by every module that holds them, copies included

    def use_reference(self, flag: bool = True) -> None:
        """Every switch to the original composition (``True``) or to its default (``False``)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in REFERENCE_SWITCHES.items():
            setattr(self, name, value if flag else defaults[name])

    @contextmanager
    def reference(self, flag: bool = True) -> Iterator[None]:
        """:meth:`use_reference` for the ``with`` block, the previous settings restored after."""
        saved = dataclasses.asdict(self)
        self.use_reference(flag)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    # ------------------------------------------------------------------ where a rewrite applies
    def lowres_conv_path(self, x: torch.Tensor) -> bool:
        """Whether the low-resolution "upsample → 3×3 convolution" may run on ``x``: a float32
        or float64 CPU tensor, CPU autocast off (bf16 rounding of the interpolation weights
        would differ from the direct ops'), ``lowres_conv`` set. Autograd may be on."""
        return (self.lowres_conv and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu"))

    def winograd_tile_for(self, x: torch.Tensor, conv: nn.Conv2d) -> int:
        """F(m×m, 3×3)'s ``m`` for ``conv`` on ``x``, or 0 for the direct convolution: a
        stride-1, padding-1, ungrouped 3×3 ``conv`` with at least ``winograd_min_channels``
        input channels on a float32 or float64 CPU tensor outside autocast and
        ``torch.compile``, where autograd does not record it."""
        if not (self.winograd_tile and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.in_channels >= self.winograd_min_channels
                and conv.padding_mode == "zeros"):
            return 0
        if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
            return 0
        if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
            return 0
        return self.winograd_tile

    def cpu_inference_path(self, x: torch.Tensor) -> bool:
        """Whether the fused inference ops may run on ``x``: a float32 CPU tensor, autograd and
        CPU autocast off, not traced by ``torch.compile`` (which fuses by itself), oneDNN
        available and ``fused`` set."""
        return (self.fused and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available())

    # ------------------------------------------------------------------ entry points
    def conv_block(self, block: nn.Module, x) -> torch.Tensor | None:
        """:class:`model.blocks.ConvBlock` on ``x`` (a map or maps taken as their
        concatenation over channels, never formed) by Winograd's F(m×m, 3×3)."""
        parts = [x] if isinstance(x, torch.Tensor) else list(x)
        tile = self.winograd_tile_for(parts[0], block.conv)
        if not tile:
            return None
        weight = block.conv.weight  # not recorded by autograd here (winograd_tile_for)
        u = winograd.cached_filter(weight, tile)
        return block.activate(winograd.conv3x3(parts, weight, block.conv.bias, tile, u))

    def upsample_conv_block(self, block: nn.Module, x: torch.Tensor, size: tuple[int, int],
                            align_corners: bool) -> torch.Tensor | None:
        """``block(interpolate(x, size, bilinear))`` with the 3×3 convolution computed at
        ``x``'s resolution (:func:`model.fast.lowres_conv.upsample_conv3x3`)."""
        if not (self.lowres_conv_path(x) and block.conv.kernel_size == (3, 3)):
            return None
        return block.activate(upsample_conv3x3(x, block.conv.weight, block.conv.bias, size,
                                               align_corners, self.lowres_chunk_for(x, block.conv)))

    def lowres_chunk_for(self, x: torch.Tensor, conv: nn.Module) -> tuple[int, int]:
        """The channels-first blocks for ``conv`` on ``x``: ``lowres_inference_chunk`` where
        autograd does not record the layer, else ``lowres_chunk``."""
        recorded = torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in conv.parameters()))
        return self.lowres_chunk if recorded else self.lowres_inference_chunk

    def encode(self, backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """:meth:`model.f2r.ResUNet_F2R.encode` in eval mode with the fused convolutions."""
        if backbone.training or not self.cpu_inference_path(x):
            return None
        return encode_fused(backbone, x, self.channels_last)

    def detnet(self, detector: nn.Module, features: torch.Tensor,
               image: torch.Tensor | None) -> torch.Tensor | None:
        """:meth:`model.detnet.DetNet.forward` with the detector's rewrites
        (:func:`model.fast.detnet.forward`)."""
        return detnet.forward(self, detector, features, image)


def attach(module: nn.Module, ops: FastOps | None) -> nn.Module:
    """Give ``module`` and every submodule that declares an ``ops`` attribute (the reference
    networks' modules) ``ops``; ``None`` selects the reference composition. Returns
    ``module``."""
    for sub in module.modules():
        if hasattr(type(sub), "ops"):
            sub.ops = ops
    return module
