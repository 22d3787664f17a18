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
from typing import Iterator

from utils.atomic import write_json
from utils.checkpoint import checkpoint_files, is_checkpoint
from utils.cli import setup_logging
from utils.files import files_signature

REPO = Path(__file__).resolve().parents[1]
DESC_CONFIG = REPO / "config" / "demo" / "train_desc.yaml"
DET_CONFIG = REPO / "config" / "demo" / "train_det.yaml"
EXTRACT_CONFIG = REPO / "config" / "demo" / "extract.yaml"
EVAL_CONFIG = REPO / "config" / "demo" / "eval.yaml"
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

def make_data(out: Path, size: tuple[int, int], hpatches_size: tuple[int, int], sequences: int,
              result: DemoResult) -> tuple[Path, Path]:
    """Synthetic MegaDepth and HPatches under ``<out>/data`` (each written atomically, so an
    existing folder is complete)."""
    from tools.synthetic import make_hpatches, make_megadepth

    start = time.perf_counter()
    megadepth, hpatches = out / "data" / "megadepth", out / "data" / "hpatches"
    made = []
    if non_empty_dir(megadepth):
        print(f"reusing {megadepth}")
    else:
        counts = make_megadepth(megadepth, size=size, seed=DATA_SEED)
        made.append(f"{counts['pairs']} training pairs")
        print(f"wrote {megadepth}: {counts['scenes']} scenes, {counts['images']} images, "
              f"{counts['pairs']} pairs at {size[0]}×{size[1]}")
    if non_empty_dir(hpatches):
        print(f"reusing {hpatches}")
    else:
        counts = make_hpatches(hpatches, sequences=sequences, size=hpatches_size, seed=DATA_SEED)
        made.append(f"{counts['sequences']} HPatches sequences")
        print(f"wrote {hpatches}: {counts['sequences']} sequences, {counts['images']} images at "
              f"{hpatches_size[0]}×{hpatches_size[1]}")
    result.stages.append(StageRecord("synthetic data", time.perf_counter() - start, not made,
                                     ", ".join(made) if made else str(out / "data")))
    result.paths["data"] = out / "data"
    return megadepth, hpatches


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
    update_bn(training_images(desc_conf, BATCHNORM_BATCHES), model.backbone)
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


def extract(name: str, checkpoint: Path, output_root: str, out: Path, hpatches: Path,
            device: str, result: DemoResult) -> Path:
    """Features of every synthetic HPatches image with ``checkpoint`` (reused when the
    checkpoint and the images are unchanged); returns the ``desc`` folder."""
    from extraction import feature_file, output_dir, run_extraction
    from schemas import load_extract_config

    # Absolute: extraction writes a relative output_root under ./ckpts.
    overrides = [f"output_root={yaml_str((out / 'ckpts' / output_root).resolve())}",
                 f"load_path={yaml_str(checkpoint)}",
                 f"data_config_extract.data_path={yaml_str(hpatches)}", f"device={device}"]
    conf = load_extract_config(EXTRACT_CONFIG, overrides)
    out_dir = output_dir(conf)
    desc = out_dir / "desc"
    images = sorted(hpatches.glob("*/*.ppm"))
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


def evaluate(out: Path, hpatches: Path, untrained: Path, trained: Path,
             result: DemoResult) -> dict:
    """SIFT, the untrained and the trained network on the synthetic HPatches."""
    from evaluation.hpatches import run_evaluation
    from schemas import load_eval_hpatches_config

    conf = load_eval_hpatches_config(EVAL_CONFIG)
    postfix = "scfeat"
    conf.update(
        data_path=str(hpatches),
        methods=["sift",
                 {"name": "untrained", "features": str(untrained), "postfix": postfix},
                 {"name": "trained", "features": str(trained), "postfix": postfix}],
        compare_caches=[], cache_dir=str(out / "eval" / "cache"),
        output_plot=str(out / "mma.png"))
    start = time.perf_counter()
    results = run_evaluation(conf)
    result.stages.append(StageRecord("evaluation", time.perf_counter() - start, False,
                                     f"{len(results)} methods, {conf['output_plot']}"))
    result.paths["caches"] = Path(conf["cache_dir"])
    result.paths["plot"] = Path(conf["output_plot"])
    return results
