"""Interrupted training runs: SIGKILL at random points and in the middle of a checkpoint write,
SIGINT (Ctrl-C to the whole process group, DataLoader workers included), and a run killed before
its first save. Every interrupted run is resumed to the end; with a fixed seed and data order
(deterministic mode, CPU) its final weights equal an uninterrupted run's."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from training.run_state import STATE_FILE
from utils.checkpoint import load_state_dict_file

REPO = Path(__file__).resolve().parents[2]
DESC_CONFIG = str(REPO / "config" / "demo" / "train_desc.yaml")
STEPS = 4
RUN = "demo-descriptor"

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"), pytest.mark.slow]


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Deterministic stage 1, STEPS steps, a training state saved after every step."""
    return ["--config", DESC_CONFIG, f"data_config_train.data_path={data}", f"output_root={out}",
            "data_config_train.batch_size=1", "epoch=1", f"epoch_step={STEPS}", "log_freq=1",
            "deterministic=true", *extra]


@pytest.fixture(scope="module")
def uninterrupted(megadepth, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight")
    log = out / "straight.log"
    assert start(run_args(megadepth, out), log).wait(timeout=300) == 0, log.read_text()[-3000:]
    return load_state_dict_file(out / RUN / "001" / "backbone.pth")


def assert_same_weights(run_dir: Path, reference: dict) -> None:
    weights = load_state_dict_file(run_dir / "001" / "backbone.pth")
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=1e-6, msg=key)


def saved_step(run_dir: Path) -> int | None:
    """The global step of the training state on disk, None when there is none."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def start(args: list[str], log: Path, wrapper: str | None = None) -> subprocess.Popen:
    """train.py in its own process group (as a terminal runs it), output to ``log``."""
    command = [sys.executable, "-c", wrapper, *args] if wrapper else \
        [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.Popen(command, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until(condition, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"train.py ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(megadepth, tmp_path,
                                                                       uninterrupted):
    """Three kills at random moments once training is under way (in a step, in a save, or
    between), each followed by --resume; the last attempt runs to the end."""
    rng = random.Random(1234)
    args = run_args(megadepth, tmp_path)
    run_dir = tmp_path / RUN
    kills = 0
    for attempt in range(6):
        log = tmp_path / f"attempt{attempt}.log"
        process = start(args + (["--resume"] if attempt else []), log)
        if kills < 3:
            # Training is under way once the progress bar is shown; a resumed run with few
            # steps left may also finish before the wait sees it (then it is not killed).
            wait_until(lambda: "epoch 1/1" in log.read_text() or process.poll() == 0, process, log)
            time.sleep(rng.uniform(0.0, 4.0))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                kills += 1
        code = process.wait(timeout=300)
        if code == 0:
            break
        assert code == -signal.SIGKILL, log.read_text()[-3000:]
        step = saved_step(run_dir)  # never a corrupt file: torch.load would raise here
        assert step is None or 1 <= step <= STEPS
    else:
        pytest.fail("the run did not finish after 6 attempts")
    assert kills >= 1, "no kill landed: the run finished before the first one"
    assert saved_step(run_dir) == STEPS
    assert not list(run_dir.rglob(".*.tmp")), "an interrupted write's temporary file was left"
    assert_same_weights(run_dir, uninterrupted)


# Runs train.main with torch.save replaced: the third write of the training state (the weights
# of 000/ are written before it) writes half of its bytes (flushed to disk) and then kills the
# process, as a power loss in the middle of a checkpoint write would.
KILL_IN_THIRD_SAVE = """
import io, os, signal, sys
import torch
sys.path.insert(0, os.getcwd())
real_save, calls = torch.save, [0]
def dying_save(obj, f, *args, **kwargs):
    calls[0] += "training_state" in str(getattr(f, "name", ""))
    if calls[0] == 3:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_state(megadepth, tmp_path,
                                                                   uninterrupted):
    args = run_args(megadepth, tmp_path)
    run_dir = tmp_path / RUN
    log = tmp_path / "killed.log"
    process = start(args, log, wrapper=KILL_IN_THIRD_SAVE)
    assert process.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-3000:]
    # The state of step 2 is intact; the half-written state of step 3 is only a temporary file.
    assert saved_step(run_dir) == 2
    partial = list(run_dir.glob(f".{STATE_FILE}.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0

    assert train.main(args + ["--resume"]) == 0
    assert saved_step(run_dir) == STEPS
    assert not partial[0].exists()
    assert "left by a write that was interrupted" in (run_dir / "train.log").read_text()
    assert_same_weights(run_dir, uninterrupted)


def test_ctrl_c_saves_the_state_and_exits_cleanly(megadepth, tmp_path):
    """SIGINT to the process group (a terminal's Ctrl-C) with a DataLoader worker: the step in
    progress finishes, the state is saved, exit code 0; --resume then completes the run."""
    args = run_args(megadepth, tmp_path, "data_config_train.workers=1")
    run_dir = tmp_path / RUN
    log = tmp_path / "interrupted.log"
    process = start(args, log)
    wait_until(lambda: (saved_step(run_dir) or 0) >= 1, process, log)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "interrupt received" in output and "continue with --resume" in output
    assert "Traceback" not in output
    stopped_at = saved_step(run_dir)
    assert 1 <= stopped_at < STEPS, output[-3000:]
    assert not (run_dir / "001").exists()

    assert train.main(args + ["--resume"]) == 0
    assert saved_step(run_dir) == STEPS
    assert (run_dir / "001" / "backbone.pth").is_file()


def test_resume_of_a_run_killed_before_its_first_save_starts_over(megadepth, tmp_path,
                                                                  uninterrupted, capsys):
    args = run_args(megadepth, tmp_path)
    run_dir = tmp_path / RUN
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("checkpoint_name: demo-descriptor\n")
    assert train.main(args + ["--resume"]) == 0
    assert "has no training state yet" in capsys.readouterr().err
    assert saved_step(run_dir) == STEPS
    assert_same_weights(run_dir, uninterrupted)
