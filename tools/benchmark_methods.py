"""Extraction time of every method side by side on one image:
``python -m tools.benchmark_methods [--size 480x640] [--repeat 5] [--device cpu|cuda]
[--checkpoint DIR] [--max-keypoints N] [--threads N] [--json FILE]`` (also part of
``python -m tools.benchmark --only methods``).

Each method runs its whole per-image path, ``extract(image)`` of :mod:`evaluation.methods`
(a numpy uint8 RGB photograph in, numpy keypoints, scores and descriptors out): SCFeat
(``detect_and_describe`` of ``--checkpoint``, or of a network with random weights: the time
does not depend on the weights, only on the keypoint count, which the table gives), DISK,
ALIKED (n16), XFeat and OpenCV SIFT, each with its evaluation budget (or ``--max-keypoints``
for all). After one warm-up call each, every round runs every method once in turn, so that a
change of the machine's load hits all of them alike. The table gives the median and minimum
milliseconds per image, images per second, the keypoints found, and each method's median time
over SCFeat's.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from utils.atomic import write_json  # noqa: E402
from utils.cli import network_size, resolve_device, run_cli  # noqa: E402

METHODS = ("scfeat", "disk", "aliked", "xfeat", "sift")
PHOTO = "motorcycle"  # scikit-image's street scene (motorcycle_left.png, 500×741)


def photograph(height: int, width: int) -> np.ndarray:
    """``H×W×3`` uint8: the centre of :data:`PHOTO` cropped to the aspect ratio, resized."""
    from tools.synthetic import load_photo

    photo = load_photo(PHOTO)
    scale = min(photo.shape[0] / height, photo.shape[1] / width)
    crop_h, crop_w = int(round(height * scale)), int(round(width * scale))
    top, left = (photo.shape[0] - crop_h) // 2, (photo.shape[1] - crop_w) // 2
    return cv2.resize(photo[top:top + crop_h, left:left + crop_w], (width, height),
                      interpolation=cv2.INTER_AREA)


def build_network(device: torch.device, model_config: dict | None = None) -> torch.nn.Module:
    """SCFeat (``model_config`` over the defaults) with random weights drawn after seeding the
    global generator with 0, on ``device``: the network the benchmarks time."""
    from registry import build_model
    config = dict(model_config or {})
    config["backbone_config"] = {**config.get("backbone_config", {}), "pretrained": False}
    torch.manual_seed(0)
    return build_model("SCFeatModel", config).to(device)


def random_scfeat(device: torch.device) -> torch.nn.Module:
    """:func:`build_network` with the default model settings, in eval mode; the global
    generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return build_network(device).eval()


def method_extractors(device: torch.device, checkpoint: str | None = None,
                      max_keypoints: int | None = None) -> dict[str, tuple[Callable, int | None]]:
    """``{name: (extract(image) → features, keypoint budget)}`` of :data:`METHODS`, as the
    evaluations build them (:func:`evaluation.methods.make_extractor`)."""
    from evaluation.methods import (CHECKPOINT_MAX_KEYPOINTS, CheckpointExtractor,
                                    make_extractor, parse_method)

    extractors = {}
    for name in METHODS:
        if name == "scfeat" and checkpoint is None:
            extractor = CheckpointExtractor(random_scfeat(device),
                                            max_keypoints or CHECKPOINT_MAX_KEYPOINTS)
        else:
            method = parse_method(checkpoint if name == "scfeat" else name, "--checkpoint")
            extractor = make_extractor(method, max_keypoints, device)
        extractors[name] = (extractor.extract, extractor.conf["max_keypoints"])
    return extractors


def time_methods(extractors: dict[str, tuple[Callable, int | None]], image, repeat: int
                 ) -> dict[str, dict]:
    """One warm-up call of each, then ``repeat`` rounds of every method in turn; per method the
    median and minimum ms, the keypoints and the budget."""
    times: dict[str, list[float]] = {name: [] for name in extractors}
    counts = {name: len(extract(image)["keypoints"]) for name, (extract, _) in extractors.items()}
    for _ in range(repeat):
        for name, (extract, _) in extractors.items():
            start = time.perf_counter()
            extract(image)  # numpy out: a CUDA method has finished when it returns
            times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1000 * statistics.median(values), "min_ms": 1000 * min(values),
                   "keypoints": counts[name], "budget": extractors[name][1]}
            for name, values in times.items()}


def add_ratios(results: dict[str, dict], base: str = "scfeat") -> dict[str, dict]:
    """Each method's median time over ``base``'s (``ratio``), in place."""
    for entry in results.values():
        entry["ratio"] = entry["median_ms"] / results[base]["median_ms"]
    return results


def format_methods(results: dict[str, dict]) -> str:
    """The ratio table (one row per method)."""
    header = f"{'method':<8}{'budget':>8}{'keypoints':>11}{'median ms':>11}{'min ms':>9}" \
             f"{'images/s':>10}{'× SCFeat':>10}"
    lines = [header, "-" * len(header)]
    for name, entry in results.items():
        budget = "all" if entry["budget"] is None else str(entry["budget"])
        lines.append(f"{name:<8}{budget:>8}{entry['keypoints']:>11}{entry['median_ms']:>11.1f}"
                     f"{entry['min_ms']:>9.1f}{1000 / entry['median_ms']:>10.1f}"
                     f"{entry['ratio']:>10.2f}")
    return "\n".join(lines)


def bench_methods(args, device: torch.device) -> dict:
    """Time :data:`METHODS` on :func:`photograph` at ``args.size`` (``args.repeat`` rounds;
    ``args.checkpoint``, ``args.max_keypoints`` when present): ``{size, image, methods:
    {name: {median_ms, min_ms, keypoints, budget, ratio}}}``."""
    height, width = args.size
    extractors = method_extractors(device, getattr(args, "checkpoint", None),
                                   getattr(args, "max_keypoints", None))
    results = add_ratios(time_methods(extractors, photograph(height, width), args.repeat))
    return {"size": [height, width], "image": PHOTO, "methods": results}


def method_note(entry: dict) -> str:
    """A short note on one method's timing (for ``tools.benchmark``'s table)."""
    budget = "all" if entry["budget"] is None else entry["budget"]
    return f"{entry['ratio']:.2f}× SCFeat's time; {entry['keypoints']} keypoints (budget {budget})"


VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}


def cpu_description(cpuinfo: str, logical_cpus: int | None) -> str | None:
    """The first processor of ``/proc/cpuinfo`` text as ``model name (vendor, family F model
    M, N logical CPUs)`` (the vendor from ``vendor_id``: Intel, AMD, else as written), or
    ``None`` without a ``model name`` line."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return None
    details = []
    vendor = fields.get("vendor_id")
    if vendor:
        details.append(VENDORS.get(vendor, vendor))
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    details.append(f"{logical_cpus} logical CPUs")
    return f"{fields['model name']} ({', '.join(details)})"


def cpu_name() -> str:
    """The CPU's model name, vendor, family and model, and logical CPU count
    (:func:`cpu_description` of ``/proc/cpuinfo``), or what :mod:`platform` knows."""
    try:
        described = cpu_description(Path("/proc/cpuinfo").read_text(), os.cpu_count())
    except OSError:
        described = None
    fallback = platform.processor() or platform.machine()
    return described or f"{fallback} ({os.cpu_count()} logical CPUs)"


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's (:func:`cpu_name`)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark_methods",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=network_size, default=(480, 640), metavar="HxW",
                        help="image size (default 480x640)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available")
    parser.add_argument("--checkpoint", default=None,
                        help="SCFeat checkpoint folder (default: random weights)")
    parser.add_argument("--max-keypoints", type=int, default=None,
                        help="budget of every method (default: each method's own)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or (args.max_keypoints is not None and args.max_keypoints < 1):
        parser.error("--repeat and --max-keypoints must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device, "--device")
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        used_threads = torch.get_num_threads()
        report = bench_methods(args, device)
    finally:
        torch.set_num_threads(threads)
    print(f"extraction per image at {args.size[0]}x{args.size[1]} ({PHOTO}): {device} "
          f"({machine(device)}), torch {torch.__version__}, {used_threads} threads, "
          + (f"load average {load:.2f} at start, " if load is not None else "")
          + f"{args.repeat} rounds")
    print(format_methods(report["methods"]))
    if args.json is not None:
        write_json(args.json, {"device": str(device), "machine": machine(device),
                               "torch": torch.__version__, "threads": used_threads,
                               "load_average_start": load, **report}, indent=2)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
