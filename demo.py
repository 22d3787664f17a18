"""The whole SCFeat pipeline on synthetic data, in minutes on a CPU:
``python demo.py [--steps N] [--out DIR] [--device auto|cpu|cuda]``.

1. synthetic MegaDepth-style training pairs and HPatches-style sequences under ``<out>/data/``
   (``tools.synthetic``);
2. stage 1 (``config/demo/train_desc.yaml``: the backbone learns descriptors from camera poses),
   then stage 2 (``config/demo/train_det.yaml``: the detector, frozen backbone), checkpoints
   under ``<out>/ckpts/``;
3. features on the synthetic HPatches (``config/demo/extract.yaml``) for the untrained network
   (the random initialisation stage 1 starts from, with BatchNorm statistics estimated on the
   training data, saved as ``<out>/ckpts/demo-untrained/000``) and for the trained one (the
   last stage-2 epoch);
4. the HPatches evaluation (``config/demo/eval.yaml``: mean matching accuracy of SIFT, the
   untrained and the trained network), printed as a table and plotted to ``<out>/mma.png``.

``--steps N`` (default 80) sets the training length: stage 1 runs N optimiser steps (split over
the config's epochs, rounded up to a multiple of them), stage 2 runs N // 2 (at least 1). The
defaults take about 3 minutes on 2 idle CPU cores (most of it stage 1, about 1.4 s a step) and
write about 0.9 GB, mostly the training states. Stage 1 keeps improving up to about 200 steps
and then flattens (measured on held-out data over a long run: docs/training.md, "Stage 1 over
a long CPU run"), so ``--steps 200`` gives the better descriptors in about twice the default's time.

Re-running the same command continues: finished stages are reused (data, checkpoints, features
and evaluation caches), an interrupted training run resumes from its last saved state. Ctrl-C
is safe at any time. The options that shape the results (``--steps``, ``--size``,
``--hpatches-size``, ``--sequences``) are recorded in ``<out>/demo.json``; re-running with
other values asks for another ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tools.demo_stages import (DESC_CONFIG, DET_CONFIG, REPO, DemoResult, banner, evaluate, extract,
                               format_seconds, make_data, make_untrained,
                               train_stage, yaml_str)
from utils.atomic import write_json
from utils.cli import resolve_device, run_cli, setup_logging

DEFAULT_STEPS = 80
DEFAULT_SIZE = "128x160"           # synthetic MegaDepth images (the stage-1/2 input size)
DEFAULT_HPATCHES_SIZE = "160x224"  # synthetic HPatches images
DEFAULT_SEQUENCES = 6              # half illumination, half viewpoint
SETTINGS_FILE = "demo.json"
TRAINED_FEATURES = "demo-hpatches"  # config/demo/extract.yaml's output_root
UNTRAINED_FEATURES = "demo-hpatches-untrained"


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The whole SCFeat pipeline on synthetic data, in minutes on a CPU.",
        epilog="\n".join(__doc__.split("\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"stage-1 training steps; stage 2 runs steps // 2 (default "
                             f"{DEFAULT_STEPS})")
    parser.add_argument("--out", default="demo_output",
                        help="output folder: data/, ckpts/, eval/, mma.png, demo.json "
                             "(default demo_output)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available (default auto)")
    parser.add_argument("--size", default=DEFAULT_SIZE, metavar="HxW",
                        help=f"synthetic training image size, multiples of 16 (default "
                             f"{DEFAULT_SIZE})")
    parser.add_argument("--hpatches-size", default=DEFAULT_HPATCHES_SIZE, metavar="HxW",
                        help=f"synthetic HPatches image size (default {DEFAULT_HPATCHES_SIZE})")
    parser.add_argument("--sequences", type=positive_int, default=DEFAULT_SEQUENCES,
                        help=f"synthetic HPatches sequences, half illumination and half "
                             f"viewpoint (default {DEFAULT_SEQUENCES})")
    return parser.parse_args(argv)


def parse_sizes(args: argparse.Namespace) -> tuple[tuple[int, int], tuple[int, int]]:
    from utils.cli import parse_size
    from utils.errors import SCFeatError

    sizes = []
    for option, text, example in (("--size", args.size, DEFAULT_SIZE),
                                  ("--hpatches-size", args.hpatches_size, DEFAULT_HPATCHES_SIZE)):
        try:
            sizes.append(parse_size(text))
        except SCFeatError:
            raise SCFeatError(f"{option} {text!r}: expected HEIGHTxWIDTH with both between 32 "
                              f"and 4096, e.g. {example}") from None
    if sizes[0][0] % 16 or sizes[0][1] % 16:
        raise SCFeatError(f"--size {args.size!r}: the training images go through the network "
                          f"uncropped, so height and width must be multiples of 16 "
                          f"(e.g. {DEFAULT_SIZE})")
    return sizes[0], sizes[1]


def settings_of(args: argparse.Namespace, size: tuple[int, int],
                hpatches_size: tuple[int, int]) -> dict:
    """The options that shape the outputs (recorded in ``<out>/demo.json``)."""
    return {"steps": args.steps, "size": "x".join(map(str, size)),
            "hpatches_size": "x".join(map(str, hpatches_size)), "sequences": args.sequences}


def check_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in ``<out>/demo.json``, or refuse when an earlier run used others."""
    from utils.errors import SCFeatError

    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SCFeatError(f"{path}: cannot read the settings of the earlier demo run ({exc}); "
                              f"delete {out} or use another --out") from None
        changed = [f"--{key.replace('_', '-')} {previous.get(key)} (now {value})"
                   for key, value in settings.items() if previous.get(key) != value]
        if changed:
            raise SCFeatError(
                f"{out} holds a demo run made with {', '.join(changed)}; re-running continues "
                f"it only with the same options. Use --out <new folder> for a new demo, or "
                f"delete {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


# ---------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------

def run_demo(args: argparse.Namespace) -> DemoResult:
    """All stages; raises ``SCFeatError`` or ``KeyboardInterrupt``."""
    from schemas import load_train_config  # late: --help and option errors stay fast
    from utils.errors import SCFeatError

    size, hpatches_size = parse_sizes(args)
    device = str(resolve_device(args.device, "--device"))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SCFeatError(f"--out {out}: exists and is not a folder")
    check_settings(out, settings_of(args, size, hpatches_size))
    result = DemoResult()
    total = 6
    ckpts = out / "ckpts"

    banner(1, total, "synthetic data")
    megadepth, hpatches = make_data(out, size, hpatches_size, args.sequences, result)

    banner(2, total, f"stage 1: descriptors ({DESC_CONFIG.relative_to(REPO)}) on {device}")
    common = [f"output_root={yaml_str(ckpts)}",
              f"data_config_train.data_path={yaml_str(megadepth)}", f"device={device}"]
    epochs = load_train_config(DESC_CONFIG, common)["epoch"]
    desc_overrides = common + [f"epoch_step={math.ceil(args.steps / epochs)}"]
    desc_conf = load_train_config(DESC_CONFIG, desc_overrides)
    stage1 = train_stage("stage 1: descriptors", DESC_CONFIG, desc_conf, None, result)

    banner(3, total, f"stage 2: detector ({DET_CONFIG.relative_to(REPO)}) on {device}")
    det_epochs = load_train_config(DET_CONFIG, common + [f"load_path={yaml_str(stage1)}"])["epoch"]
    det_overrides = common + [f"load_path={yaml_str(stage1)}",
                              f"epoch_step={math.ceil(max(1, args.steps // 2) / det_epochs)}"]
    det_conf = load_train_config(DET_CONFIG, det_overrides)
    stage2 = train_stage("stage 2: detector", DET_CONFIG, det_conf, stage1, result)

    banner(4, total, "features of the untrained network")
    untrained_ckpt = make_untrained(out, desc_conf, result)
    untrained = extract("extraction, untrained", untrained_ckpt, UNTRAINED_FEATURES, out,
                        hpatches, device, result)

    banner(5, total, "features of the trained network")
    trained = extract("extraction, trained", stage2, TRAINED_FEATURES, out, hpatches, device,
                      result)
    result.paths["features"] = [untrained, trained]

    banner(6, total, "HPatches evaluation (synthetic sequences)")
    result.results = evaluate(out, hpatches, untrained, trained, result)
    result.paths["checkpoint_folders"] = [untrained_ckpt, stage1, stage2]
    return result


def print_summary(result: DemoResult, total_seconds: float) -> None:
    print(f"\n=== summary: {format_seconds(total_seconds)} in all ===")
    width = max(len(stage.name) for stage in result.stages)
    for stage in result.stages:
        when = "reused" if stage.reused else format_seconds(stage.seconds)
        print(f"  {stage.name:<{width}}  {when:>14}  {stage.detail}")
    mma3 = ", ".join(f"{name} {summary['mma'][2]:.3f}" for name, summary in result.results.items()
                     if len(summary["mma"]) >= 3)
    if mma3:
        print(f"MMA@3px, all pairs: {mma3}")
    untrained, stage1, stage2 = result.paths["checkpoint_folders"]
    print(f"data:        {result.paths['data']}")
    print(f"checkpoints: {stage1} (stage 1), {stage2} (stage 2), {untrained} (untrained)")
    print(f"features:    {result.paths['features'][1]} (trained), "
          f"{result.paths['features'][0]} (untrained)")
    print(f"caches:      {result.paths['caches']}")
    print(f"plot:        {result.paths['plot']}")
    print("(a few dozen steps from random weights on synthetic data: this checks that the whole "
          "pipeline runs; it is not a benchmark)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    start = time.perf_counter()

    def work() -> int:
        print_summary(run_demo(args), time.perf_counter() - start)
        return 0
    return run_cli(work, interrupted="finished stages and the training state are kept; run the "
                                     "same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
