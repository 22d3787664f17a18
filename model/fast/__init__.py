"""The CPU inference rewrites of the networks, apart from their reference definitions.

A reference module (:mod:`model.blocks`, :mod:`model.f2r`, :mod:`model.detnet`) runs the
original composition of ops unless it holds a :class:`FastOps` in its ``ops`` attribute
(:func:`attach`; ``SCFeatModel.from_config(..., fast=...)`` and ``SCFeatModel.use_fast``
set it for a whole model); then it first offers its input to the matching entry point of that
object, which returns the rewritten result or ``None`` where the rewrite does not apply. The
reference modules never import this package.

- ``ops.py``: :class:`FastOps` (the switches, where each rewrite applies, the entry points),
  :func:`attach`
- ``fused.py``: oneDNN's conv+BN(+ReLU)(+add) and in-place convolution, in-place instance norm,
  their FLOP formulas
- ``encoder.py``: the encoder with the fused convolutions
- ``detnet.py``: the detector's rewrites
- ``lowres_conv.py``: bilinear upsample → 3×3 convolution at the low resolution
- ``winograd.py``: Winograd's F(m×m, 3×3)
- ``instance_norm.py``: channels-last instance norms fused with what follows
- ``derived.py``: tensors derived from parameters, cached; ``workspace.py``: reused memory
- ``profiling.py``: named regions of the rewritten forwards (``tools/profile_layers.py``)

:data:`DEFAULT` is the settings object every model built by ``SCFeatModel.from_config`` holds
unless given another; :func:`use_reference_ops` (``--reference-ops`` of the scripts) and
:func:`reference_ops` switch it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from model.fast.ops import REFERENCE_SWITCHES, FastOps, attach

DEFAULT = FastOps()


def use_reference_ops(flag: bool = True) -> None:
    """Select the original composition of ops (``True``: no fused CPU inference path, every
    upsampled map convolved at full resolution, direct convolutions, channels-first maps) or
    the rewrites (``False``, the default) in :data:`DEFAULT`, hence in every model that holds
    it. Both give the same outputs up to float32 rounding."""
    DEFAULT.use_reference(flag)


@contextmanager
def reference_ops(flag: bool = True) -> Iterator[None]:
    """:func:`use_reference_ops` for the ``with`` block, the previous settings restored after."""
    with DEFAULT.reference(flag):
        yield


__all__ = ["DEFAULT", "FastOps", "REFERENCE_SWITCHES", "attach", "reference_ops",
           "use_reference_ops"]
