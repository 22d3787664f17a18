"""The two speed options of extraction and training: bf16 autocast (``amp``) and
``torch.compile`` (``compile``). Both are meant for CUDA; on the CPU they run (for checking),
but slowly: most CPUs have no bf16 arithmetic, and compiling the network takes minutes.

Stated tolerances against float32 eager (checked by the tests for ``amp`` and by
``python -m tools.benchmark --amp --compile``): the largest difference of the score map relative
to its largest value, and the largest difference of a unit descriptor's component.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

import torch

log = logging.getLogger("scfeat")

TOLERANCE = {"amp": 5e-2, "compile": 1e-3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--amp`` and ``--compile``: shorthands for the config keys ``amp=true`` and
    ``compile=true`` of ``train.py`` and ``extract_features.py``; ``--reference-ops``: the
    original composition of operators (``model.fast.use_reference_ops``, applied by the
    script)."""
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast for the network, for CUDA (the same as amp=true)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network, for CUDA (the same as compile=true)")
    parser.add_argument("--reference-ops", action="store_true",
                        help="run the original composition of operators (no fused CPU inference, "
                             "upsampled maps convolved at full resolution): same numbers up to "
                             "float32 rounding, slower; for comparisons")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides that ``--amp`` / ``--compile`` stand for."""
    return [f"{key}=true" for key in ("amp", "compile") if getattr(args, key)]


def to_float32(outputs: Any) -> Any:
    """Floating tensors in (nested) dicts, lists and tuples → float32; anything else as is."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(value) for value in outputs)
    return outputs


def accelerated(fn: Callable, device: torch.device, amp: bool = False,
                compile: bool = False) -> Callable:
    """``fn`` (a module or a bound method such as ``model.extract``), compiled with
    ``torch.compile`` when ``compile``, run under bf16 autocast on ``device`` when ``amp``.

    With ``amp`` the outputs come back in float32, so what follows (keypoint selection, losses)
    runs as in float32 eager.
    """
    if (amp or compile) and device.type == "cpu":
        log.warning("%s on the CPU: for checking only, slower than float32 eager",
                    " and ".join(name for name, on in (("amp", amp), ("compile", compile)) if on))
    runner = torch.compile(fn) if compile else fn
    if not amp:
        return runner

    def run(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = runner(*args, **kwargs)
        return to_float32(outputs)

    return run
