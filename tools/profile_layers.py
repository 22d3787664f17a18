"""Per-layer profile of one extraction forward: time, executed GFLOP and the fraction of the
fp32 GEMM throughput each layer reaches, sorted by time, with totals.

``tools/benchmark.py`` prints it in its extraction section, for this implementation and for the
reference ops (``python -m tools.benchmark --only extraction``).

A layer is a submodule two levels down (``backbone.iconv3``, ``localheader.conv1``) or a
region the code names (:func:`model.fast.profiling.region`: the encoder's stem and layers on the
fused path, the detector's steps). Times are exclusive (a layer's time is the wall time spent
while it is the innermost named layer two levels down), measured in ``repeat`` forwards
without any instrumentation but the hooks and regions (medians per layer); GFLOP are counted
in a separate forward by ``torch.utils.flop_counter``'s formulas (convolutions and matrix
products; a multiply-add counts 2), attributed to the same layers. "At peak" is the time the
layer's GFLOP would take at the measured GEMM throughput: the floor that only fewer FLOPs
lower; what a layer takes beyond it is memory traffic, the non-GEMM operations and the
kernels' efficiency.
"""
from __future__ import annotations

import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from model.fast import profiling  # noqa: E402

DEPTH = 2  # backbone.iconv3, localheader.conv2
OUTSIDE = "(model)"  # work outside every named layer (the model's own forward)


class LayerStack:
    """The names of the layers being run: module hooks (each submodule of ``model`` by its
    attribute name) and :func:`model.fast.profiling.region` (its name); :attr:`row` is the first
    :data:`DEPTH` names joined by dots. ``on_change`` is called before every change."""

    def __init__(self, model: torch.nn.Module, on_change: Callable[[], None] = lambda: None):
        self.labels = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name}
        self.stack: list[str] = []
        self.on_change = on_change

    @property
    def row(self) -> str:
        return ".".join(self.stack[:DEPTH]) or OUTSIDE

    def enter(self, name: str) -> None:
        self.on_change()
        self.stack.append(name)

    def exit(self, name: str) -> None:
        self.on_change()
        self.stack.pop()

    @contextmanager
    def attached(self) -> Iterator[None]:
        def pre(module, args):
            if id(module) in self.labels:
                self.enter(self.labels[id(module)])

        def post(module, args, output):
            if id(module) in self.labels:
                self.exit(self.labels[id(module)])

        with ExitStack() as stack:
            stack.callback(register_module_forward_pre_hook(pre).remove)
            stack.callback(register_module_forward_hook(post, always_call=True).remove)
            stack.enter_context(profiling.listen(self))
            yield


class LayerFlops(TorchDispatchMode):
    """FLOPs of every operator (``torch.utils.flop_counter``'s formulas; operators without one
    are decomposed where PyTorch can, as ``FlopCounterMode`` does) added to ``stack.row``."""

    def __init__(self, stack: LayerStack):
        super().__init__()
        self.stack = stack
        self.flops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in flop_registry:
            count = flop_registry[packet](*args, **kwargs, out_val=out)
            row = self.stack.row
            self.flops[row] = self.flops.get(row, 0) + count
        return out


def profile_layers(forward: Callable[[], object], model: torch.nn.Module, repeat: int = 3,
                   device: torch.device | None = None) -> list[dict]:
    """One row per layer of ``forward()`` (a call of ``model``): ``layer``, ``ms`` (median of
    ``repeat`` timed calls after a warm-up), ``min_ms``, ``gflop``; sorted by time."""
    def synchronize() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    forward()  # warm-up (caches, oneDNN primitives)
    counter_stack = LayerStack(model)
    counter = LayerFlops(counter_stack)
    with counter_stack.attached(), counter:
        forward()
    runs: list[dict[str, float]] = []
    for _ in range(repeat):
        times: dict[str, float] = {}
        clock = [time.perf_counter()]

        def lap() -> None:
            synchronize()
            now = time.perf_counter()
            times[stack.row] = times.get(stack.row, 0.0) + now - clock[0]
            clock[0] = now

        stack = LayerStack(model, lap)
        with stack.attached():
            synchronize()
            clock[0] = time.perf_counter()
            forward()
            lap()
        runs.append(times)
    layers = sorted({k for run in runs for k in run} | set(counter.flops))
    rows = [{"layer": layer, "ms": 1000 * statistics.median(run.get(layer, 0.0) for run in runs),
             "min_ms": 1000 * min(run.get(layer, 0.0) for run in runs),
             "gflop": counter.flops.get(layer, 0) / 1e9} for layer in layers]
    return sorted(rows, key=lambda r: r["ms"], reverse=True)


def format_layer_profile(rows: list[dict], gemm_gflops: float) -> str:
    """Rows of :func:`profile_layers` → a table with each layer's GFLOP/s, fraction of the
    GEMM throughput ``gemm_gflops``, its time at that throughput and the totals."""
    header = (f"{'layer':<30} {'ms':>8} {'min ms':>8} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8} "
              f"{'of GEMM':>8} {'at peak ms':>10} {'beyond ms':>9}")
    total_ms = sum(r["ms"] for r in rows)
    lines = [header, "-" * len(header)]

    def line(name: str, ms: float, min_ms: float, gflop: float) -> str:
        rate = gflop / (ms / 1000) if ms > 0 else 0.0
        floor = 1000 * gflop / gemm_gflops
        fraction = f"{100 * rate / gemm_gflops:7.0f}%" if gflop else f"{'':>8}"
        return (f"{name[:30]:<30} {ms:>8.1f} {min_ms:>8.1f} {100 * ms / total_ms:>5.1f}% "
                f"{gflop:>7.2f} {rate:>8.1f} {fraction} {floor:>10.1f} {ms - floor:>9.1f}")

    lines += [line(r["layer"], r["ms"], r["min_ms"], r["gflop"]) for r in rows]
    lines.append("-" * len(header))
    lines.append(line("total", total_ms, sum(r["min_ms"] for r in rows),
                      sum(r["gflop"] for r in rows)))
    return "\n".join(lines)
