"""SCFeat trained on a real scene, against the same training on synthetic pairs.

``python -m tools.real_scene train --data DIR --run NAME --out DIR [--seed S] [--desc-steps N]
[--det-steps M]`` trains stage 1 (``config/strecha/train_desc.yaml``) and then stage 2
(``config/strecha/train_det.yaml``, from stage 1's last epoch) on the CAPS-layout folder
``--data`` (a COLMAP model converted by ``tools.colmap_to_megadepth``, or synthetic pairs of
``tools.synthetic megadepth``), into ``<out>/<NAME>-desc`` and ``<out>/<NAME>-det``; a finished
stage is reused, an unfinished one continues (``tools.demo_stages.train_stage``).
``--untrained`` also writes the random initialisation of stage 1 with BatchNorm statistics of
``--data`` (``tools.demo_stages.make_untrained``) to ``<out>/<NAME>-untrained``.

``python -m tools.real_scene measure --pairs DIR --checkpoints DIR [DIR ...] --out DIR
[--max-pairs N] [--plot PNG]`` measures stage 1's own quantities on the pairs of a CAPS-layout
folder that training never used, at the training size (``data_config_train.resize`` of
``config/strecha/train_desc.yaml``):

* ``loss`` — the stage-1 loss (``EpipolarLoss_Line2Window`` with the config's settings) in
  eval mode with fixed query points (``training.loop.validation_means``, the trainer's own
  validation), and its window terms ``loss_w1``/``loss_w2``;
* ``epi@2`` — the share of dense mutual nearest-neighbour matches of ``desc_map`` within 2 px
  of the ground-truth epipolar lines (``tools.learning_stage1.dense_epipolar_precision``).

A loss that falls on held-out pairs as training goes on says the signal is learnt and
transfers; one that falls only on the training scene says the data, not the signal, is what
limits. Rows are cached per checkpoint under ``--out``; ``--plot`` draws both measures and the
runs' training losses (their ``train.log``) against steps.

The pose evaluation on the held-out scene is ``evaluate_pose.py`` with
``config/strecha/eval_pose.yaml`` (docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.errors import SCFeatError

REPO = Path(__file__).resolve().parents[1]
DESC_CONFIG = REPO / "config" / "strecha" / "train_desc.yaml"
DET_CONFIG = REPO / "config" / "strecha" / "train_det.yaml"
EPI_THRESHOLD = 2.0          # px, as tools.learning_stage1 (the stage-2 reward_thr)
MEASURE_SEED = 0             # the held-out subset and the query points
MEASURE_VERSION = "real-scene-v1"
LOG_LINE = re.compile(r"epoch (\d+) step (\d+) loss ([-+0-9.eE]+|nan|inf)")


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def size_overrides(size: str | None, keys: Sequence[str]) -> list[str]:
    """``<key>=[H,W]`` for each of ``keys`` from ``HxW`` (nothing for ``None``)."""
    if size is None:
        return []
    from utils.cli import parse_size

    height, width = parse_size(size)
    return [f"{key}=[{height},{width}]" for key in keys]


def stage_overrides(data: Path, out: Path, name: str, seed: int, steps: int, epochs: int,
                    device: str) -> list[str]:
    """``KEY=VALUE`` overrides of a config for one run: its data, folder, seed and ``steps``
    split over ``epochs`` epochs (rounded up)."""
    from tools.demo_stages import yaml_str

    return [f"data_config_train.data_path={yaml_str(data)}", f"output_root={yaml_str(out)}",
            f"checkpoint_name={yaml_str(name)}", f"seed={seed}", f"device={device}",
            f"epoch={epochs}", f"epoch_step={math.ceil(steps / epochs)}"]


def train(args: argparse.Namespace) -> dict[str, Path]:
    """Stage 1, stage 2 (and the untrained network) of one run; returns their folders."""
    from schemas import load_train_config
    from tools.demo_stages import DemoResult, make_untrained, train_stage, yaml_str

    result = DemoResult()
    data, out = args.data.resolve(), args.out.resolve()
    val = (["val_config.max_pairs=0"] if args.val is None else
           [f"val_config.data_config_val.data_path={yaml_str(args.val.resolve())}"])
    val += size_overrides(args.size, ("data_config_train.resize",
                                      "val_config.data_config_val.resize"))
    desc_conf = load_train_config(DESC_CONFIG, stage_overrides(
        data, out, f"{args.run}-desc", args.seed, args.desc_steps, args.desc_epochs,
        args.device) + val)
    folders = {"stage 1": train_stage("stage 1", DESC_CONFIG, desc_conf, None, result)}
    if args.det_steps:
        det_conf = load_train_config(DET_CONFIG, stage_overrides(
            data, out, f"{args.run}-det", args.seed, args.det_steps, args.det_epochs,
            args.device) + val + [f"load_path={yaml_str(folders['stage 1'])}"])
        folders["stage 2"] = train_stage("stage 2", DET_CONFIG, det_conf, folders["stage 1"],
                                         result)
    if args.untrained:
        folders["untrained"] = make_untrained(out / f"{args.run}-untrained", desc_conf, result)
    for label, folder in folders.items():
        print(f"{label}: {folder}")
    return folders


# ---------------------------------------------------------------------------------------------
# measures on held-out pairs
# ---------------------------------------------------------------------------------------------

def held_out_loader(pairs: Path, conf: dict, max_pairs: int | None):
    """The pairs of the CAPS-layout folder ``pairs`` in eval mode at ``conf``'s training size,
    a seeded subset of ``max_pairs`` (``training.data.validation_subset``), one pair a batch."""
    import torch

    from registry import DATASETS
    from training.data import validation_subset

    data = {**conf["data_config_train"], "data_path": str(pairs), "mode": "val",
            "random_percent": 0, "batch_size": 1, "workers": 0}
    dataset = DATASETS[conf["data"]](data)
    subset = validation_subset(dataset, max_pairs, MEASURE_SEED)
    return torch.utils.data.DataLoader(subset, batch_size=1, shuffle=False,
                                       collate_fn=dataset.collate_fn)


def measure_network(folder: Path, loader, conf: dict) -> dict:
    """The held-out stage-1 loss (and its components) and epi@2 of the checkpoint ``folder``."""
    import torch

    from model.scfeat import SCFeatModel
    from tools.learning_stage1 import dense_epipolar_precision
    from training.loop import validation_means
    from training.step import LossComposer

    model = SCFeatModel.from_checkpoint(folder, device="cpu")
    means, pairs, _ = validation_means(model, LossComposer(conf), loader, MEASURE_SEED, 1,
                                       torch.device("cpu"))
    if not pairs:
        raise SCFeatError(f"{folder}: no usable held-out pair")
    precisions = []
    with torch.inference_mode():
        for batch in loader:
            if "im1" not in batch:
                continue
            maps1 = model(batch["im1"], with_detector=False)["desc_map"][0]
            maps2 = model(batch["im2"], with_detector=False)["desc_map"][0]
            precision, _ = dense_epipolar_precision(maps1, maps2, tuple(batch["im1"].shape[-2:]),
                                                    batch["F1"][0], batch["F2"][0], EPI_THRESHOLD)
            precisions.append(precision)
    return {"loss": means["loss"], "loss_w1": means.get("loss_w1"),
            "loss_w2": means.get("loss_w2"), "epi": float(np.mean(precisions)), "pairs": pairs}


def training_losses(run: Path) -> tuple[list[int], list[float]]:
    """``(global steps, losses)`` logged in ``<run>/train.log`` (every ``log_freq`` steps; the
    log numbers steps within their epoch of ``epoch_step``, from ``<run>/config.yaml``), a step
    logged twice (a resumed run) once."""
    from utils.config import read_yaml

    path = run / "train.log"
    if not path.is_file() or not (run / "config.yaml").is_file():
        return [], []
    epoch_step = read_yaml(run / "config.yaml")["epoch_step"]
    logged = {}
    for match in LOG_LINE.finditer(path.read_text(errors="replace")):
        step = (int(match.group(1)) - 1) * epoch_step + int(match.group(2))
        logged[step] = float(match.group(3))
    steps = sorted(logged)
    return steps, [logged[step] for step in steps]


def measure(args: argparse.Namespace) -> list[dict]:
    from schemas import load_train_config
    from tools.learning_stage1 import cached, describe_checkpoint, files_key

    conf = load_train_config(DESC_CONFIG, size_overrides(args.size, ("data_config_train.resize",)))
    loader = held_out_loader(args.pairs, conf, args.max_pairs)
    settings = {"version": MEASURE_VERSION, "pairs": str(args.pairs.resolve()),
                "max_pairs": args.max_pairs, "resize": conf["data_config_train"]["resize"]}
    rows = []
    for folder in args.checkpoints:
        network = describe_checkpoint(folder)
        row = cached(args.out, "measure", files_key(folder, settings),
                     lambda: measure_network(folder, loader, conf))
        steps = 0 if folder.name == "000" else network.steps
        rows.append({"label": network.label, "run": folder.parent.name, "steps": steps, **row})
        print(f"{network.label:<32}{steps if steps is not None else '':>6}  "
              f"loss {row['loss']:.3f}  loss_w1 {row['loss_w1']:.3f}  loss_w2 "
              f"{row['loss_w2']:.3f}  epi@2 {row['epi']:.3f}", flush=True)
    if args.plot is not None:
        plot(rows, args.checkpoints, args.plot, args.title)
    return rows


def plot(rows: list[dict], folders: Sequence[Path], path: Path, title: str) -> None:
    """Training loss (each run's ``train.log``), held-out loss and held-out epi@2 against
    steps, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.atomic import atomic_target

    untrained = [row for row in rows if row["run"].endswith("untrained")]
    runs = sorted({row["run"] for row in rows} - {row["run"] for row in untrained})
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for row in untrained:  # the random initialisation: step 0 of every run
        for axis, key in ((axes[1], "loss"), (axes[2], "epi")):
            axis.plot([0], [row[key]], "k*", markersize=10, label="untrained")
    for index, run in enumerate(runs):
        colour = f"C{index}"
        run_dir = next(Path(f).parent for f in folders if Path(f).parent.name == run)
        steps, losses = training_losses(run_dir)
        if steps:
            window = min(5, len(losses))
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            axes[0].plot(steps[window - 1:], smooth, color=colour, label=run)
        points = sorted((r for r in rows if r["run"] == run and r["steps"] is not None),
                        key=lambda r: r["steps"])
        for axis, key in ((axes[1], "loss"), (axes[2], "epi")):
            axis.plot([r["steps"] for r in points], [r[key] for r in points], "o-",
                      color=colour, label=run)
    axes[0].set_title("training loss (mean of 5 logged steps)", fontsize=10)
    axes[1].set_title("stage-1 loss on held-out pairs", fontsize=10)
    axes[2].set_title(f"epi@{EPI_THRESHOLD:g} on held-out pairs (dense mutual matches)",
                      fontsize=10)
    for axis in axes:
        axis.set_xlabel("steps")
        axis.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    try:
        with atomic_target(Path(path)) as tmp:
            figure.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.real_scene",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="stage 1 then stage 2 on one CAPS-layout folder")
    run.add_argument("--data", type=Path, required=True, help="CAPS-layout training folder")
    run.add_argument("--run", required=True, help="run name: <out>/<run>-desc, <run>-det")
    run.add_argument("--out", type=Path, required=True, help="folder of the runs")
    run.add_argument("--val", type=Path, default=None,
                     help="CAPS-layout folder for the trainer's validation after each epoch "
                          "(default: none)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--desc-steps", type=int, default=300, help="stage-1 steps (default 300)")
    run.add_argument("--desc-epochs", type=int, default=6,
                     help="stage-1 epochs, one checkpoint each (default 6)")
    run.add_argument("--det-steps", type=int, default=100,
                     help="stage-2 steps, 0: none (default 100)")
    run.add_argument("--det-epochs", type=int, default=2, help="stage-2 epochs (default 2)")
    run.add_argument("--untrained", action="store_true",
                     help="also write the calibrated untrained network")
    run.add_argument("--size", default=None, metavar="HxW",
                     help="training size, multiples of 16 (default: the configs' 256x384)")
    run.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    check = commands.add_parser("measure", help="stage-1 loss and epi@2 on held-out pairs")
    check.add_argument("--pairs", type=Path, required=True, help="CAPS-layout held-out folder")
    check.add_argument("--checkpoints", type=Path, nargs="+", required=True, metavar="DIR")
    check.add_argument("--out", type=Path, required=True, help="cache folder of the rows")
    check.add_argument("--max-pairs", type=int, default=40,
                       help="held-out pairs, a seeded subset (default 40)")
    check.add_argument("--size", default=None, metavar="HxW",
                       help="image size of the pairs (default: the stage-1 config's resize)")
    check.add_argument("--plot", type=Path, default=None, help="PNG of the curves")
    check.add_argument("--title", default="", help="the figure's title")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from utils.cli import run_cli, setup_logging

    args = parse_args(argv)
    setup_logging()

    def work() -> None:
        (train if args.command == "train" else measure)(args)
    return run_cli(work, interrupted="finished stages are kept; the same command continues")


if __name__ == "__main__":
    sys.exit(main())
