"""Every CUDA path of the project in a few minutes: ``python -m tools.gpu_check``.

Run it whenever a GPU is at hand (after installing, after a driver or PyTorch upgrade, before a
long training run). On synthetic data written to ``--out`` (a temporary folder by default):

1. **stage 1** for ``--steps`` steps on CUDA in float32, with ``--amp`` (bf16 autocast) and with
   ``--compile`` (``torch.compile``): every logged loss finite, the weights finite and changed;
2. **stage 2** for ``--steps`` steps on CUDA with ``--amp`` and ``--compile``, from the float32
   stage-1 run's weights;
3. **extraction** of one 480×640 photograph with the stage-1 weights: CUDA float32 against CPU
   float32 (TF32 off, then PyTorch's default TF32 setting), CUDA ``amp`` and ``compile`` against
   CUDA float32 (:data:`utils.acceleration.TOLERANCE`): the score map's largest difference
   relative to its largest value, and the largest difference of a unit descriptor's component
   at the CPU run's keypoints;
4. **torchrun with NCCL**: ``min(2, GPUs)`` processes train ``--steps`` steps.

It prints one line per check as it goes and a table at the end, and exits with 1 when a check
fails. Without CUDA it says so and exits 0. ``--device cpu`` runs the same checks on the CPU
(gloo instead of NCCL) to check the script itself; ``--skip compile,ddp`` leaves checks out.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
DESC_CONFIG = REPO / "config" / "demo" / "train_desc.yaml"
DET_CONFIG = REPO / "config" / "demo" / "train_det.yaml"
CHECKS = ("stage1", "amp", "compile", "stage2", "extraction", "ddp")
CROSS_DEVICE_TOLERANCE = 1e-3   # CUDA float32 (TF32 off) vs CPU float32: summation order only
TF32_TOLERANCE = 5e-2           # PyTorch's default lets cuDNN convolve in TF32 (10-bit mantissa)
EXTRACTION_SIZE = (480, 640)


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    seconds: float


def cuda_summary() -> str:
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} GPU(s): "
            f"{', '.join(names)}; bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}; "
            f"NCCL {'yes' if torch.distributed.is_nccl_available() else 'no'}")


def run_check(name: str, fn: Callable[[], str], results: list[CheckResult]) -> None:
    """Run one check; an exception or an ``AssertionError`` is a failure with its message."""
    print(f"--- {name} ...", flush=True)
    start = time.perf_counter()
    try:
        detail, passed = fn(), True
    except Exception as exc:  # a check's failure is a result, not a crash of the script
        detail, passed = f"{exc.__class__.__name__}: {exc}", False
    result = CheckResult(name, passed, detail, time.perf_counter() - start)
    results.append(result)
    print(f"    {'ok' if passed else 'FAILED'} ({result.seconds:.1f} s): {detail}", flush=True)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

class LossRecorder(logging.Handler):
    """Collects the loss of every step the trainer logs (``epoch E step S loss L ...``)."""

    def __init__(self):
        super().__init__()
        self.losses: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("epoch %d step %d loss"):
            self.losses.append(float(record.args[2]))


def train_overrides(data: Path, out: Path, name: str, steps: int, device: str,
                    size: tuple[int, int]) -> list[str]:
    return [f"data_config_train.data_path={data}", f"data_config_train.resize=[{size[0]}, {size[1]}]",
            "data_config_train.workers=0", f"output_root={out}", f"checkpoint_name={name}",
            "epoch=1", f"epoch_step={steps}", "log_freq=1", f"save_freq={steps}",
            f"device={device}"]


def train_run(config: Path, overrides: list[str]) -> tuple[Path, list[float]]:
    """Train with the project's own loader and trainer; returns the run folder and the logged
    losses."""
    from schemas import load_train_config
    from training.loop import run_training

    conf = load_train_config(str(config), overrides)
    recorder = LossRecorder()
    logger = logging.getLogger("scfeat")
    logger.addHandler(recorder)
    try:
        run_training(conf, str(config))
    finally:
        logger.removeHandler(recorder)
    return Path(conf["output_root"]) / conf["checkpoint_name"], recorder.losses


def check_weights(run_dir: Path, part: str) -> str:
    """The trained part's weights in ``001`` are finite and differ from the starting ``000``."""
    from utils.checkpoint import load_state_dict_file

    before = load_state_dict_file(run_dir / "000" / f"{part}.pth")
    after = load_state_dict_file(run_dir / "001" / f"{part}.pth")
    changed = 0
    for key, value in after.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{part}.{key} is not finite after training"
            changed += int(not torch.equal(value, before[key]))
    assert changed, f"no {part} weight changed"
    return f"{changed} {part} tensors changed"


def training_check(config: Path, overrides: list[str], steps: int, part: str) -> str:
    run_dir, losses = train_run(config, overrides)
    assert len(losses) == steps, f"{len(losses)} of {steps} steps logged a loss"
    assert all(map(torch.isfinite, torch.tensor(losses))), f"non-finite loss: {losses}"
    return f"{steps} steps, losses {losses[0]:.4f} … {losses[-1]:.4f}; {check_weights(run_dir, part)}"


def ddp_check(data: Path, out: Path, steps: int, device: str, size: tuple[int, int]) -> str:
    processes = max(1, min(2, torch.cuda.device_count())) if device == "cuda" else 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), str(REPO / "train.py"), "--config", str(DESC_CONFIG),
               *train_overrides(data, out, "ddp", steps, device, size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"torchrun exited {result.returncode}: {result.stderr[-1500:]}"
    state = torch.load(out / "ddp" / "training_state.pth", map_location="cpu", weights_only=False)
    assert state["global_step"] == steps, f"{state['global_step']} of {steps} steps"
    backend = "NCCL" if device == "cuda" else "gloo"
    return f"{processes} processes ({backend}), {steps} steps; {check_weights(out / 'ddp', 'backbone')}"


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------

def photograph() -> torch.Tensor:
    """One 480×640 photograph (scikit-image's astronaut, resized), ``1×3×H×W`` normalised."""
    import cv2

    from tools.synthetic import load_photo
    from utils.image import to_tensor_normalized

    height, width = EXTRACTION_SIZE
    image = cv2.resize(load_photo("astronaut"), (width, height), interpolation=cv2.INTER_AREA)
    return to_tensor_normalized(image)[None]


def extract(model: torch.nn.Module, image: torch.Tensor, amp: bool = False,
            compile: bool = False) -> dict[str, torch.Tensor]:
    from utils.acceleration import accelerated

    device = next(model.parameters()).device
    run = accelerated(model.extract, device, amp=amp, compile=compile)
    with torch.inference_mode():
        outputs = run(image.to(device))
    return {key: value.float().cpu() for key, value in outputs.items()}


def difference(reference: dict, outputs: dict, keypoints: torch.Tensor) -> tuple[float, float]:
    """Score map: largest difference relative to its largest value; descriptors: largest
    difference of a unit descriptor's component at ``keypoints``."""
    from model.keypoints import sample_descriptors

    score_ref, score = reference["local_point"], outputs["local_point"]
    relative = float((score - score_ref).abs().max() / score_ref.abs().max().clamp_min(1e-12))
    desc_ref = sample_descriptors(reference["desc_map"], keypoints, EXTRACTION_SIZE)
    desc = sample_descriptors(outputs["desc_map"], keypoints, EXTRACTION_SIZE)
    return relative, float((desc - desc_ref).abs().max())


def extraction_check(checkpoint: Path, device: str, skip: set[str]) -> str:
    from model.features import select_features
    from model.keypoints import make_detector
    from model.scfeat import SCFeatModel

    image = photograph()
    cpu = extract(SCFeatModel.from_checkpoint(checkpoint, "cpu"), image)
    features = select_features(cpu, EXTRACTION_SIZE, make_detector("generate_kpts_single", {}),
                               "desc_map")
    keypoints = features["keypoints"]
    model = SCFeatModel.from_checkpoint(checkpoint, device)
    lines, failures = [], []

    def compare(label: str, reference: dict, outputs: dict, tolerance: float) -> None:
        score, desc = difference(reference, outputs, keypoints)
        ok = score <= tolerance and desc <= tolerance
        lines.append(f"{label}: score {score:.1e}, descriptors {desc:.1e} (≤ {tolerance:g})")
        if not ok:
            failures.append(lines[-1])

    from utils.acceleration import TOLERANCE

    # TF32 off for the float32 comparisons: each variant's own deviation, not TF32's (PyTorch's
    # default lets cuDNN convolve in TF32; that setting is compared with the CPU on its own).
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        exact = extract(model, image)
        compare(f"{device} vs cpu", cpu, exact, CROSS_DEVICE_TOLERANCE)
        compare("amp vs float32", exact, extract(model, image, amp=True), TOLERANCE["amp"])
        if "compile" not in skip:
            compare("compile vs float32", exact, extract(model, image, compile=True),
                    TOLERANCE["compile"])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    if device == "cuda":
        compare("cuda (default TF32) vs cpu", cpu, extract(model, image), TF32_TOLERANCE)
    assert not failures, "; ".join(failures)
    return f"{len(keypoints)} keypoints; " + "; ".join(lines)


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.cli import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="\n".join(__doc__.split("\n")[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default); cpu runs the same checks on the CPU, with gloo")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (default 6)")
    parser.add_argument("--size", type=parse_size, default=(128, 160), metavar="HxW",
                        help="training image size (default 128x160)")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to leave out: {', '.join(CHECKS)}")
    parser.add_argument("--out", help="working folder (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    args.skip = {name for name in args.skip.split(",") if name}
    unknown = args.skip - set(CHECKS)
    if unknown:
        parser.error(f"--skip: unknown check(s) {sorted(unknown)}; expected some of {list(CHECKS)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def run_checks(args: argparse.Namespace, out: Path) -> list[CheckResult]:
    from tools.synthetic import make_megadepth

    data = out / "data"
    make_megadepth(data, scenes=2, pairs=12, images=6, size=args.size, seed=0)
    runs, results, steps, device = out / "runs", [], args.steps, args.device

    def stage1(name: str, *flags: str) -> Callable[[], str]:
        overrides = train_overrides(data, runs, name, steps, device, args.size) + list(flags)
        return lambda: training_check(DESC_CONFIG, overrides, steps, "backbone")

    stage1_run = runs / "stage1"
    if "stage1" not in args.skip or {"stage2", "extraction"} - args.skip:
        run_check("stage 1, float32", stage1("stage1"), results)
    if "amp" not in args.skip:
        run_check("stage 1, --amp", stage1("stage1-amp", "amp=true"), results)
    if "compile" not in args.skip:
        run_check("stage 1, --compile", stage1("stage1-compile", "compile=true"), results)
    if "stage2" not in args.skip:
        flags = [f"load_path={stage1_run / '001'}", "amp=true"]
        flags += [] if "compile" in args.skip else ["compile=true"]
        overrides = train_overrides(data, runs, "stage2", steps, device, args.size) + flags
        label = "stage 2, --amp" + ("" if "compile" in args.skip else " --compile")
        run_check(label, lambda: training_check(DET_CONFIG, overrides, steps, "localheader"), results)
    if "extraction" not in args.skip:
        run_check(f"extraction {EXTRACTION_SIZE[0]}×{EXTRACTION_SIZE[1]}",
                  lambda: extraction_check(stage1_run / "001", device, args.skip), results)
    if "ddp" not in args.skip:
        run_check("torchrun " + ("NCCL" if device == "cuda" else "gloo"),
                  lambda: ddp_check(data, runs, steps, device, args.size), results)
    return results


def format_results(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  result  seconds  detail"]
    lines += [f"{r.name:<{width}}  {'ok' if r.passed else 'FAILED':<6}  {r.seconds:7.1f}  {r.detail}"
              for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from utils.cli import setup_logging

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, so there is nothing to check (the CUDA paths need "
              "a GPU; `--device cpu` runs the same checks on the CPU).")
        return 0
    setup_logging()
    print(cuda_summary() if args.device == "cuda" else f"torch {torch.__version__}, CPU")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scfeat_gpu_check_") as tmp:
        results = run_checks(args, Path(args.out) if args.out else Path(tmp))
    print(f"\n{format_results(results)}\n\n{sum(r.passed for r in results)} of {len(results)} "
          f"checks passed in {time.perf_counter() - start:.0f} s")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
