"""The benchmark's measuring helpers (``python -m tools.benchmark``): summaries of timings,
FLOP counts, the fp32 GEMM throughput, a stopwatch, peak memory, test inputs and the table
every section prints its rows into."""
from __future__ import annotations

import functools
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from utils.errors import SCFeatError  # noqa: E402


MIB = 1024 * 1024
# ----------------------------------------------------------------------------- pure helpers

def summarize(seconds: Sequence[float]) -> dict:
    """Timings in seconds → ``{median_ms, min_ms, max_ms, n}``."""
    if not seconds:
        raise ValueError("summarize: no timings")
    ms = [1000.0 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def count_flops(fn: Callable, *args, **kwargs) -> tuple[int, object]:
    """FLOPs of ``fn(*args, **kwargs)`` as counted by ``torch.utils.flop_counter`` (a
    multiply-add counts 2; convolutions and matrix products only) and the call's result."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result


def gemm_flops(n: int) -> int:
    """FLOPs of an ``n×n`` by ``n×n`` matrix product."""
    return 2 * n ** 3


def efficiency(gflop: float, seconds: float, gemm_gflops: float) -> float:
    """Fraction of the GEMM throughput reached: ``gflop / seconds / gemm_gflops``."""
    return gflop / seconds / gemm_gflops


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------------- timing, memory

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Per-label lists of elapsed seconds; ``lap(label)`` synchronises the device first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, list[float]] = {}
        self._last = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._last = time.perf_counter()

    def lap(self, label: str) -> float:
        synchronize(self.device)
        now = time.perf_counter()
        elapsed = now - self._last
        self.times.setdefault(label, []).append(elapsed)
        self._last = now
        return elapsed

    def add(self, label: str, seconds: float) -> None:
        self.times.setdefault(label, []).append(seconds)


def _proc_status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``) in bytes, or ``None``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def private_bytes(pid: int) -> int | None:
    """Memory private to process ``pid`` (``Private_Clean + Private_Dirty`` of
    ``/proc/<pid>/smaps_rollup``): what a forked worker adds, its shared pages left out."""
    try:
        total = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
        return total
    except (OSError, ValueError):
        return None


def _ru_maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(who).ru_maxrss * scale


class PeakMemory:
    """Peak memory of the block and the level it started from (``start_bytes``).

    CUDA: ``max_memory_allocated`` (reset on entry) and ``memory_allocated`` at entry. CPU: the
    process's resident-set high-water mark ``VmHWM``, reset on entry through
    ``/proc/self/clear_refs`` where the kernel allows it, and ``VmRSS`` at entry; elsewhere the
    process-lifetime ``ru_maxrss`` (``kind`` says which).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self.start_bytes: int | None = None
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda max_memory_allocated"
            return self
        self.kind = "peak RSS (ru_maxrss, process lifetime)"
        if _proc_status_bytes("VmHWM") is not None:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "peak RSS"
            except OSError:
                pass
        self.start_bytes = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "peak RSS":
            self.bytes = _proc_status_bytes("VmHWM")
        else:
            self.bytes = _ru_maxrss_bytes()

    @property
    def mib(self) -> float | None:
        return None if self.bytes is None else self.bytes / MIB

    @property
    def increase_mib(self) -> float | None:
        """Peak minus the level at entry."""
        if self.bytes is None or self.start_bytes is None:
            return None
        return (self.bytes - self.start_bytes) / MIB

    def as_dict(self) -> dict:
        return {"peak_mib": self.mib, "increase_mib": self.increase_mib, "kind": self.kind}


def measure_gemm(device: torch.device, n: int) -> float:
    """Seconds of one fp32 ``n×n`` matrix product (operands cached per size)."""
    a, b = _gemm_operands(device, n)
    synchronize(device)
    start = time.perf_counter()
    torch.matmul(a, b)
    synchronize(device)
    return time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def _gemm_operands(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=generator).to(device)
    b = torch.randn(n, n, generator=generator).to(device)
    return a, b


def gemm_sizes(device: torch.device) -> tuple[int, ...]:
    return (2048, 4096, 8192) if device.type == "cuda" else (1024, 2048)


def gemm_summary(times: dict[int, list[float]]) -> dict:
    """Per-size GFLOP/s (median and best) and the reference: the best size's median."""
    per_size = {}
    for n, seconds in times.items():
        rates = [gemm_flops(n) / s / 1e9 for s in seconds]
        per_size[str(n)] = {"median_gflops": statistics.median(rates), "best_gflops": max(rates),
                            "n": len(rates)}
    best = max(per_size, key=lambda k: per_size[k]["median_gflops"])
    return {"sizes": per_size, "reference_size": int(best),
            "median_gflops": per_size[best]["median_gflops"],
            "best_gflops": max(v["best_gflops"] for v in per_size.values())}


# ----------------------------------------------------------------------------- inputs

def test_image(height: int, width: int) -> np.ndarray:
    """An ``H×W×3`` uint8 photograph (scikit-image's astronaut, resized), or seeded noise when
    scikit-image is absent."""
    import cv2
    try:
        from tools.synthetic import load_photo
        photo = load_photo("astronaut")
        return cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
    except SCFeatError:
        return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def load_config_file(name: str) -> dict:
    from utils.config import read_yaml
    return read_yaml(REPO_ROOT / "config" / name)


# ----------------------------------------------------------------------------- table

def row(section: str, name: str, timing: dict | None, rate: str = "", share: float | None = None,
        memory: dict | None = None, note: str = "") -> dict:
    """One table row; ``memory`` is a :meth:`PeakMemory.as_dict`."""
    memory = memory or {}
    return {"section": section, "name": name,
            "median_ms": None if timing is None else timing["median_ms"],
            "min_ms": None if timing is None else timing["min_ms"],
            "rate": rate, "share": share, "peak_mib": memory.get("peak_mib"),
            "increase_mib": memory.get("increase_mib"), "note": note}


def format_table(rows: list[dict]) -> str:
    """Rows → an aligned text table."""
    header = ["section", "measurement", "median ms", "min ms", "rate", "share", "peak MiB",
              "+MiB", "notes"]
    cells = [[r["section"], r["name"],
              "" if r["median_ms"] is None else f"{r['median_ms']:.1f}",
              "" if r["min_ms"] is None else f"{r['min_ms']:.1f}",
              r["rate"], "" if r["share"] is None else f"{100 * r['share']:.0f}%",
              "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
              "" if r.get("increase_mib") is None else f"{r['increase_mib']:+.0f}", r["note"]]
             for r in rows]
    widths = [max(len(str(c[i])) for c in cells + [header]) for i in range(len(header) - 1)]
    right = {2, 3, 5, 6, 7}
    lines = []
    for line in [header] + cells:
        parts = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts + [line[-1]]).rstrip())
    lines.insert(1, "-" * max(len(x) for x in lines))
    return "\n".join(lines)
