"""The stages of ``demo.py``, each reused when its inputs are unchanged (a stamp file records
what an output was made from): synthetic data, a training stage (``training.loop.run_training``
over a ``schemas.load_train_config`` config), the untrained checkpoint, an extraction
(``extraction.run_extraction``) and the HPatches evaluation (``evaluation.hpatches``).

The demo, ``tools.real_photos`` and ``tools.learning_stage1`` call these functions; they are
the scripts' own library calls with the demo's configs (``config/demo/``).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from utils.atomic import write_json
from utils.checkpoint import checkpoint_files, is_checkpoint
from utils.cli import setup_logging
from utils.files import files_signature

REPO = Path(__file__).resolve().parents[1]
DESC_CONFIG = REPO / "config" / "demo" / "train_desc.yaml"
DET_CONFIG = REPO / "config" / "demo" / "train_det.yaml"
EXTRACT_CONFIG = REPO / "config" / "demo" / "extract.yaml"
EVAL_CONFIG = REPO / "config" / "demo" / "eval.yaml"
POSE_CONFIG = REPO / "config" / "strecha" / "eval_pose.yaml"   # the real-scene pose protocol
# The Strecha benchmark's Herz-Jesus-P25 where this checkout sits beside a shared/ data folder
STRECHA_SCENE = REPO.parent / "shared" / "data" / "strecha" / "Herz-Jesus-P25"
DATA_SEED = 0
STAMP_FILE = "demo_stamp.json"     # what a reused output was made from
BATCHNORM_BATCHES = 20              # pair batches that estimate the untrained network's statistics
UNTRAINED_RUN = "demo-untrained"


@dataclass
class StageRecord:
    name: str
    seconds: float
    reused: bool
    detail: str = ""


@dataclass
class DemoResult:
    stages: list[StageRecord] = field(default_factory=list)
    results: dict = field(default_factory=dict)   # method → evaluation summary
    paths: dict = field(default_factory=dict)     # what → path, for the final summary
    rows: list = field(default_factory=list)      # the table: (label, method, at SIFT's keypoints)
    pose: dict = field(default_factory=dict)      # label → relative pose summary (--pose-scene)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def stamp_matches(folder: Path, signature: str) -> bool:
    path = folder / STAMP_FILE
    try:
        return json.loads(path.read_text()).get("signature") == signature
    except (OSError, ValueError, AttributeError):
        return False


def write_stamp(folder: Path, signature: str, sources: list[Path]) -> None:
    write_json(folder / STAMP_FILE, {"signature": signature,
                                     "sources": sorted(str(p) for p in sources)})


def non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def yaml_str(value: object) -> str:
    """A value for a ``KEY=VALUE`` override that YAML reads back as this exact string."""
    return json.dumps(str(value))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def banner(index: int, total: int, title: str) -> None:
    print(f"\n=== [{index}/{total}] {title} ===", flush=True)


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------

def make_data(out: Path, size: tuple[int, int], result: DemoResult) -> Path:
    """Synthetic MegaDepth-style training pairs under ``<out>/data/megadepth`` (written
    atomically, so an existing folder is complete)."""
    from tools.synthetic import make_megadepth

    start = time.perf_counter()
    megadepth = out / "data" / "megadepth"
    if non_empty_dir(megadepth):
        print(f"reusing {megadepth}")
        result.stages.append(StageRecord("training data", 0.0, True, str(megadepth)))
        return megadepth
    counts = make_megadepth(megadepth, size=size, seed=DATA_SEED)
    print(f"wrote {megadepth}: {counts['scenes']} scenes, {counts['images']} images, "
          f"{counts['pairs']} pairs at {size[0]}×{size[1]}")
    result.stages.append(StageRecord("training data", time.perf_counter() - start, False,
                                     f"{counts['pairs']} synthetic pairs"))
    return megadepth


def train_stage(name: str, config: Path, conf: dict, source: Path | None,
                result: DemoResult) -> Path:
    """Run (or continue, or reuse) one training stage of ``conf`` (loaded from ``config`` by
    ``schemas.load_train_config``); returns its last epoch folder.

    ``source``: the checkpoint the stage starts from (stage 2); a finished run that the demo
    made from other weights (its ``demo_stamp.json`` says so) is trained again.
    """
    from training.loop import run_training
    from training.run_state import STATE_FILE

    run_dir = Path(conf["output_root"]) / conf["checkpoint_name"]
    final = run_dir / f"{conf['epoch']:03d}"
    steps = conf["epoch"] * conf["epoch_step"]
    signature = files_signature(checkpoint_files(source)) if source is not None else ""
    start = time.perf_counter()
    stale = source is not None and (run_dir / STAMP_FILE).is_file() \
        and not stamp_matches(run_dir, signature)
    if is_checkpoint(final) and not stale:
        print(f"reusing {final} (finished earlier)")
        result.stages.append(StageRecord(name, time.perf_counter() - start, True,
                                         f"{plural(steps, 'step')}, {final}"))
        return final
    state = run_dir / STATE_FILE
    resume = False
    if is_checkpoint(final):
        print(f"{run_dir} was trained from other weights than {source}: training it again")
        shutil.rmtree(run_dir)
    elif state.is_file():
        print(f"continuing the unfinished run in {run_dir}")
        resume = True
    elif run_dir.exists():
        # Stopped before its first saved state: nothing in it is worth keeping.
        print(f"removing {run_dir}: an earlier run stopped before saving a training state")
        shutil.rmtree(run_dir)
    print(f"training {plural(steps, 'step')} ({plural(conf['epoch'], 'epoch')} of "
          f"{conf['epoch_step']}) on "
          f"{conf['data_config_train']['data_path']} → {run_dir}", flush=True)
    try:
        run_training(conf, str(config), resume)
    finally:
        setup_logging()  # the trainer logged to its run folder's train.log too
    if not is_checkpoint(final):  # Ctrl-C: the trainer saved its state and returned
        raise KeyboardInterrupt
    if source is not None:
        write_stamp(run_dir, signature, checkpoint_files(source))
    result.stages.append(StageRecord(name, time.perf_counter() - start, False,
                                     f"{plural(steps, 'step')}, {final}"))
    return final


def training_images(desc_conf: dict, batches: int) -> Iterator:
    """Image batches ``B×3×H×W`` of stage 1's training data, image 1 and image 2 of each pair
    batch separately (as the trainer runs them), ``batches`` pair batches in a seeded order."""
    import torch

    from registry import DATASETS
    from utils.errors import SCFeatError

    data = desc_conf["data_config_train"]
    dataset = DATASETS[desc_conf["data"]](data)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=data["batch_size"], shuffle=True, collate_fn=dataset.collate_fn,
        generator=torch.Generator().manual_seed(desc_conf["seed"]))
    drawn = 0
    while drawn < batches:
        drawn_before = drawn
        for batch in loader:
            if "im1" not in batch:
                continue
            yield batch["im1"]
            yield batch["im2"]
            drawn += 1
            if drawn == batches:
                return
        if drawn == drawn_before:
            raise SCFeatError(f"{data['data_path']}: no usable training pair to estimate the "
                              f"untrained network's BatchNorm statistics")


def make_untrained(out: Path, desc_conf: dict, result: DemoResult) -> Path:
    """The random initialisation of stage 1 (same model settings and seed) as a checkpoint
    folder ``<out>/ckpts/demo-untrained/000`` with ``config.yaml`` beside it.

    Its BatchNorm statistics are estimated on the training data (``BATCHNORM_BATCHES`` pair
    batches, weights unchanged): a fresh network holds mean 0 and variance 1 there, so in eval
    mode its BatchNorm layers would not normalise at all, and the comparison with the trained
    network would mostly measure that, not what training learnt.
    """
    import torch
    from torch.optim.swa_utils import update_bn
    from tqdm import tqdm

    from registry import build_model
    from utils.checkpoint import save_checkpoint
    from utils.config import read_yaml, save_config

    run_dir = out / "ckpts" / UNTRAINED_RUN
    folder = run_dir / "000"
    statistics = f"{BATCHNORM_BATCHES} batches of {desc_conf['data_config_train']['data_path']}"
    if is_checkpoint(folder) and (run_dir / "config.yaml").is_file() \
            and read_yaml(run_dir / "config.yaml").get("batchnorm_statistics") == statistics:
        print(f"reusing {folder}")
        result.stages.append(StageRecord("untrained checkpoint", 0.0, True, str(folder)))
        return folder
    start = time.perf_counter()
    model_config = {**desc_conf["model_config"], "backbone_config": {
        **desc_conf["model_config"].get("backbone_config", {}), "pretrained": False}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(desc_conf["seed"])  # as the trainer does before building the model
        model = build_model(desc_conf["model"], model_config)
        # Cumulative averages over the batches, then eval mode; no gradient, no weight change.
        # Inside the seeded block: the training data's colour jitter draws from the global
        # generator, so the statistics depend on the seed alone, not on what ran before.
        batches = tqdm(training_images(desc_conf, BATCHNORM_BATCHES),
                       total=2 * BATCHNORM_BATCHES, desc="BatchNorm statistics", disable=None,
                       leave=False, dynamic_ncols=True)
        update_bn(batches, model.backbone)
    save_checkpoint(model, folder)
    # config.yaml last: with it, the folder is complete (every file is written atomically).
    save_config({"model": desc_conf["model"], "model_config": model_config,
                 "seed": desc_conf["seed"], "batchnorm_statistics": statistics},
                run_dir / "config.yaml")
    print(f"wrote the untrained network (seed {desc_conf['seed']}: stage 1's starting point, "
          f"BatchNorm statistics of {statistics}) to {folder}")
    result.stages.append(StageRecord("untrained checkpoint", time.perf_counter() - start, False,
                                     str(folder)))
    return folder


def extract(name: str, checkpoint: Path, output_root: str, out: Path, sequences: Path,
            device: str, result: DemoResult, overrides: Sequence[str] = ()) -> Path:
    """Features of every image of ``sequences`` (HPatches layout) with ``checkpoint`` and
    ``config/demo/extract.yaml`` (plus ``overrides``, ``KEY=VALUE``), written under the absolute
    ``<out>/ckpts/<output_root>`` and reused when the checkpoint, the images and the settings
    are unchanged; returns the ``desc`` folder."""
    from extraction import feature_file, output_dir, run_extraction
    from schemas import load_extract_config

    # Absolute: extraction writes a relative output_root under ./ckpts.
    overrides = [f"output_root={yaml_str((out / 'ckpts' / output_root).resolve())}",
                 f"load_path={yaml_str(checkpoint)}",
                 f"data_config_extract.data_path={yaml_str(sequences)}", f"device={device}",
                 *overrides]
    conf = load_extract_config(EXTRACT_CONFIG, overrides)
    out_dir = output_dir(conf)
    desc = out_dir / "desc"
    images = sorted(sequences.glob("*/*.ppm"))
    sources = checkpoint_files(checkpoint) + images
    signature = files_signature(sources, json.dumps(conf, sort_keys=True, default=str))
    expected = [feature_file(out_dir, f"{p.parent.name}/{p.name}", conf["postfix"]) for p in images]
    start = time.perf_counter()
    if stamp_matches(out_dir, signature) and all(p.is_file() for p in expected):
        print(f"reusing {desc}")
        result.stages.append(StageRecord(name, time.perf_counter() - start, True, str(desc)))
        return desc
    (out_dir / STAMP_FILE).unlink(missing_ok=True)
    print(f"extracting {len(images)} images with {checkpoint} → {desc}", flush=True)
    # One line per image is too much here; the demo prints a summary per extraction.
    extract_log = logging.getLogger("scfeat.extract")
    level = extract_log.level
    extract_log.setLevel(logging.WARNING)
    try:
        summary = run_extraction(conf)
    finally:
        extract_log.setLevel(level)
    if summary["skipped"]:
        print(f"warning: {len(summary['skipped'])} image(s) could not be read", file=sys.stderr)
    write_stamp(out_dir, signature, sources)
    result.stages.append(StageRecord(
        name, time.perf_counter() - start, False,
        f"{summary['images']} images, {summary['mean_ms']:.0f} ms/image, {desc}"))
    return desc


def budget_overrides(keypoints: int, sift_keypoints: bool) -> list[str]:
    """``config/demo/extract.yaml`` overrides for a keypoint budget: the detector keeps its
    ``keypoints`` strongest local maxima (no score threshold); with ``sift_keypoints`` the
    network describes OpenCV SIFT's ``keypoints`` strongest keypoints instead."""
    overrides = [f"detector_config.num_pts={keypoints}", "detector_config.thr=null"]
    if sift_keypoints:
        overrides += ["use_sift=true", f"data_config_extract.sift_max_pts={keypoints}"]
    return overrides


def same_backbone(first: Path, second: Path) -> bool:
    """Whether two checkpoint folders hold the same backbone weights and statistics (stage 2
    trains the detector alone, so its descriptors are stage 1's)."""
    import torch

    from utils.checkpoint import load_state_dict_file

    a = load_state_dict_file(Path(first) / "backbone.pth")
    b = load_state_dict_file(Path(second) / "backbone.pth")
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def baseline_features(method: str, sequences: Path, out: Path, keypoints: int, device: str,
                    result: DemoResult) -> bool:
    """Features of a method extracted by name (``evaluation/methods.py``: ``sift``, ``disk``,
    ...), at most ``keypoints`` per image, for every image of ``sequences``, extracted as the
    evaluation extracts them (``evaluation.hpatches.method_feature_files``) into its cache under
    ``<out>/eval/cache`` and reused from there. Returns ``False``, after one line saying why,
    when the method cannot run here (its wheels are not installed)."""
    from evaluation.hpatches import list_sequences, method_feature_files
    from evaluation.methods import missing_requirement, parse_method

    parsed = parse_method(method, "demo.BASELINES")
    missing = missing_requirement(parsed)
    if missing is not None:
        print(f"{method}: skipped, {missing}")
        result.stages.append(StageRecord(f"features, {method}", 0.0, False, "not installed"))
        return False
    cache_dir = eval_cache(out)
    before = set((cache_dir / "features").rglob("*.npz"))
    start = time.perf_counter()
    files = method_feature_files(parsed, sequences, list_sequences(sequences), cache_dir,
                                 keypoints, device)
    folder = next(iter(files.values())).parents[1]
    reused = set(files.values()) <= before
    print(f"{'reusing' if reused else 'extracted'} {folder}")
    result.stages.append(StageRecord(f"features, {method}", time.perf_counter() - start, reused,
                                     str(folder)))
    return True


def eval_cache(out: Path) -> Path:
    """The evaluation's cache folder (absolute): its matches and the named methods' features."""
    return Path(out).resolve() / "eval" / "cache"


def evaluate(out: Path, sequences: Path, methods: dict[str, tuple[Path, str] | None],
             keypoints: int, result: DemoResult) -> dict:
    """``evaluation.hpatches`` (``config/demo/eval.yaml``) on ``sequences`` for ``methods``
    (name → (features folder, postfix), or ``None`` for a method extracted by name with
    ``keypoints`` as its budget); returns ``{name: summary}``. Its full table (MMA@1..10,
    illumination and viewpoint apart) goes to ``<out>/eval/mma.txt``, the curves to
    ``<out>/mma.png``."""
    from evaluation.hpatches import run_evaluation
    from schemas import load_eval_hpatches_config
    from utils.atomic import atomic_open

    conf = load_eval_hpatches_config(EVAL_CONFIG)
    conf.update(
        data_path=str(sequences), max_keypoints=keypoints,
        methods=[name if where is None else
                 {"name": name, "features": str(where[0]), "postfix": where[1]}
                 for name, where in methods.items()],
        compare_caches=[], cache_dir=str(eval_cache(out)), output_plot=str(out / "mma.png"))
    start = time.perf_counter()
    lines: list[str] = []
    results = run_evaluation(conf, print_fn=lines.append)
    table = out / "eval" / "mma.txt"
    with atomic_open(table, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    result.stages.append(StageRecord("evaluation", time.perf_counter() - start, False,
                                     f"{len(results)} methods, {table}"))
    result.paths["caches"] = Path(conf["cache_dir"])
    result.paths["table"] = table
    result.paths["plot"] = Path(conf["output_plot"])
    return results


def pose_scene_problem(scene: Path) -> str | None:
    """What keeps ``scene`` from being a COLMAP scene for :func:`evaluate_pose_scene`, or
    ``None``."""
    missing = [part for part in ("sparse", "images") if not (Path(scene) / part).is_dir()]
    if missing:
        lacks = " and ".join(f"{part}/" for part in missing)
        return (f"{scene}: not a COLMAP scene folder (it lacks {lacks}; "
                f"expected {scene}/sparse with cameras, images and points3D as .txt or .bin, "
                f"and the photographs in {scene}/images)")
    return None


def evaluate_pose_scene(out: Path, scene: Path, methods: dict[str, str], keypoints: int,
                        device: str, result: DemoResult) -> dict[str, dict]:
    """Relative pose on the COLMAP scene ``scene`` (``sparse/``, ``images/``) by
    ``evaluation.pose`` with ``config/strecha/eval_pose.yaml`` (its pair rule and protocol, the
    images at their own size) for ``methods`` (table label → a method of
    ``evaluation/methods.py`` or a checkpoint folder), at most ``keypoints`` per image. Features
    and records are cached under ``<out>/eval/pose-cache``; the table goes to
    ``<out>/eval/pose.txt``, the cumulative error curves to ``<out>/pose.png``. Returns
    ``{label: summary}``."""
    from evaluation.methods import parse_method
    from evaluation.pose import run_pose_evaluation
    from schemas import load_eval_pose_config
    from utils.atomic import atomic_open

    cache = eval_cache(out).parent / "pose-cache"
    conf = load_eval_pose_config(POSE_CONFIG, [
        f"data_path={yaml_str(Path(scene).resolve())}", f"max_keypoints={keypoints}",
        f"device={device}", f"cache_dir={yaml_str(cache)}",
        f"output_json={yaml_str(cache.parent / 'pose.json')}",
        f"output_plot={yaml_str(Path(out).resolve() / 'pose.png')}"])
    conf["methods"] = list(methods.values())
    start = time.perf_counter()
    lines: list[str] = []
    summaries = run_pose_evaluation(conf, print_fn=lines.append)
    table = Path(out) / "eval" / "pose.txt"
    with atomic_open(table, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    results = {label: summaries[parse_method(entry, "methods").label]
               for label, entry in methods.items()}
    pairs = next(iter(results.values()))["pairs"]
    result.stages.append(StageRecord("relative pose", time.perf_counter() - start, False,
                                     f"{len(results)} methods, {pairs} pairs of {scene}, {table}"))
    result.paths["pose_table"] = table
    result.paths["pose_plot"] = Path(conf["output_plot"])
    return results


def results_table(results: dict[str, dict], rows: list[tuple[str, str, str | None]],
                  threshold: int = 3) -> str:
    """The demo's table: one line per ``(label, method, method with SIFT's keypoints or
    None)``; MMA at ``threshold`` px over all pairs, the illumination and the viewpoint pairs,
    and keypoints per image, with the method's own keypoints, then the same MMA with SIFT's
    keypoints (``-`` where the method cannot describe given keypoints)."""
    width = max(len("method"), *(len(label) for label, _, _ in rows))
    splits = ("mma", "mma_i", "mma_v")
    columns = "".join(f"{name:>7}" for name in ("all", "illum", "view"))
    own_title, fixed_title = f"own keypoints: MMA@{threshold}", f"SIFT's keypoints: MMA@{threshold}"
    lines = [f"{'':<{width}}  {own_title:^{len(columns) + 12}}   {fixed_title:^{len(columns)}}"
             .rstrip(), f"{'method':<{width}}  {columns}{'kpts/image':>12}   {columns}"]
    for label, own, fixed in rows:
        summary = results[own]
        line = (f"{label:<{width}}  "
                + "".join(f"{summary[key][threshold - 1]:>7.3f}" for key in splits)
                + f"{summary['mean_features']:>12.0f}   ")
        if fixed is None:
            line += "".join(f"{'-':>7}" for _ in splits)
        else:
            line += "".join(f"{results[fixed][key][threshold - 1]:>7.3f}" for key in splits)
        lines.append(line.rstrip())
    return "\n".join(lines)
