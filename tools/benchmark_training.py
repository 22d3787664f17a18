"""The benchmark's training and data-loading sections (``python -m tools.benchmark --only
train,data``): the trainer's own stage-1 and stage-2 steps with their parts timed, and
``MegaDepth_SIFT`` loading with 0, 2 and 4 workers."""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.benchmark_methods import build_network  # noqa: E402
from tools.benchmark_timing import (MIB, PeakMemory, private_bytes, row, Stopwatch, summarize,
                                    synchronize)  # noqa: E402
from utils.errors import SCFeatError  # noqa: E402


DATA_WORKERS = (0, 2, 4)
TRAIN_BATCH = 2  # pairs per step, as the training configs
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
    from schemas import load_train_config
    from utils.checkpoint import CHECKPOINT_PARTS
    from training.loop import build_training_model
    from training.setup import PairModel, build_optimizer, freeze_all_but, set_train_mode
    from training.step import LossComposer, NonFiniteGuard, TrainStep

    conf = load_train_config(config, overrides)
    torch.manual_seed(0)
    model = build_training_model(conf).to(device)
    trainable = conf["optimal_modules"]
    freeze_all_but(model, trainable, CHECKPOINT_PARTS)
    set_train_mode(model, trainable, CHECKPOINT_PARTS)
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
