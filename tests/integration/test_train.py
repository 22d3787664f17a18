"""The trainer: outputs, resume after SIGKILL, refusal to overwrite, non-finite steps, frozen
modules, config errors and 2-process DDP (gloo). Tiny images and a handful of steps."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import save_random_checkpoint, with_exif_orientation
from utils.checkpoint import load_state_dict_file

REPO = Path(__file__).resolve().parents[2]
DESC_CONFIG = str(REPO / "config" / "demo" / "train_desc.yaml")


def stage1_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", DESC_CONFIG, f"data_config_train.data_path={data}", f"output_root={out}",
            "data_config_train.batch_size=1", "epoch=1", "epoch_step=3", "log_freq=1", *extra]


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Global step → loss from train.log (written at every log_freq step)."""
    losses = {}
    for match in re.finditer(r"epoch (\d+) step (\d+) loss ([-\d.e+naif]+)", (run_dir / "train.log").read_text()):
        losses[int(match.group(2))] = float(match.group(3))
    return losses


@pytest.mark.slow
def test_stage1_writes_checkpoints_and_freezes_the_detector(megadepth, tmp_path):
    val = (f"val_config={{data_config_val: {{data_path: {megadepth}, batch_size: 1, workers: 0}}, "
           f"max_pairs: 2, vis_topk: 50}}")
    assert train.main(stage1_args(megadepth, tmp_path, val)) == 0
    run_dir = tmp_path / "demo-descriptor"
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "tb").iterdir())
    log = (run_dir / "train.log").read_text()
    # val_config.max_pairs caps the validation set (6 pairs) at a seeded subset of 2.
    assert f"validation pairs: 2 of the 6 of {megadepth} (val_config.max_pairs: 2)" in log
    assert re.search(r"validation after epoch 1 \(2 pairs, 2 batches\): loss=[\d.]+", log)
    state = torch.load(run_dir / "training_state.pth", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 3
    backbone = load_state_dict_file(run_dir / "001" / "backbone.pth")
    header = load_state_dict_file(run_dir / "001" / "localheader.pth")
    # The detector is frozen in stage 1 (and never run): its weights equal the initial ones,
    # which the seed makes reproducible; the backbone moved.
    torch.manual_seed(0)
    from registry import build_model
    fresh = build_model("SCFeatModel", {"backbone_config": {"pretrained": False}})
    for key, value in fresh.localheader.state_dict().items():
        assert torch.equal(value, header[key]), key
    assert not torch.equal(fresh.backbone.state_dict()["side1.conv.weight"], backbone["side1.conv.weight"])
    # 000 holds the starting weights, written before the first step (as the original).
    start = load_state_dict_file(run_dir / "000" / "backbone.pth")
    for key, value in fresh.backbone.state_dict().items():
        assert torch.equal(value, start[key]), key
    assert sorted(logged_losses(run_dir)) == [1, 2, 3]


@pytest.mark.slow
def test_losses_see_the_one_based_epoch_and_weights_refresh_every_save_freq(megadepth, tmp_path,
                                                                             monkeypatch):
    """The original passes its 1-based epoch to the losses (temperature schedules), refreshes
    the current epoch's folder every save_freq steps and clips each optimised module. An epoch
    is exactly epoch_step steps (the original's loop takes epoch_step + 1)."""
    from losses.line2window import EpipolarLoss_Line2Window

    epochs, clipped = [], []
    original = EpipolarLoss_Line2Window.forward

    def spy(self, batch, outputs1, outputs2, processed, epoch):
        epochs.append(epoch)
        return original(self, batch, outputs1, outputs2, processed, epoch)

    def clip_spy(parameters, max_norm, *args, **kwargs):
        clipped.append((len(list(parameters)), max_norm))

    monkeypatch.setattr(EpipolarLoss_Line2Window, "forward", spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    assert train.main(stage1_args(megadepth, tmp_path, "epoch=2", "epoch_step=2", "save_freq=3",
                                  "max_steps_this_run=3", "grad_clip=true")) == 0
    assert epochs == [1, 1, 2]  # epoch_step=2: the third step is the first of epoch 2
    backbone_params = len(list(__import__("registry").build_model(
        "SCFeatModel", {"backbone_config": {"pretrained": False}}).backbone.parameters()))
    assert clipped == [(backbone_params, 10.0)] * 3  # the backbone alone, clip_norm 10
    run_dir = tmp_path / "demo-descriptor"
    # step 3 (save_freq) is in epoch 2: its folder exists before the epoch ends
    assert (run_dir / "002" / "backbone.pth").is_file()
    first, second = (load_state_dict_file(run_dir / f"00{e}" / "backbone.pth") for e in (1, 2))
    assert not torch.equal(first["side1.conv.weight"], second["side1.conv.weight"])


@pytest.mark.slow
def test_exif_tagged_jpegs_train_with_no_pair_skipped(megadepth, tmp_path):
    """A scene whose 64×96 JPEGs carry EXIF orientation 6 trains on every pair: the pixels are
    read as stored, so the images keep img_cam.txt's size."""
    data = Path(shutil.copytree(megadepth, tmp_path / "data"))
    for path in data.rglob("*.jpg"):
        path.write_bytes(with_exif_orientation(path.read_bytes()))
    assert train.main(stage1_args(data, tmp_path / "out", "data_config_train.batch_size=2")) == 0
    run_dir = tmp_path / "out" / "demo-descriptor"
    state = torch.load(run_dir / "training_state.pth", weights_only=False)
    assert state["global_step"] == 3  # 3 steps × 2 pairs: the 6 pairs, none skipped
    log = (run_dir / "train.log").read_text()
    assert "skipped" not in log and "unusable" not in log and "differ" not in log


def test_existing_run_is_refused_without_resume(megadepth, tmp_path, capsys):
    (tmp_path / "demo-descriptor").mkdir()
    (tmp_path / "demo-descriptor" / "config.yaml").write_text("x: 1\n")
    assert train.main(stage1_args(megadepth, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err and "checkpoint_name=" in err


def test_resume_of_a_missing_run_is_refused(megadepth, tmp_path, capsys):
    assert train.main(stage1_args(megadepth, tmp_path) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "there is no run folder" in err and "checkpoint_name" in err


@pytest.mark.parametrize("override, message", [
    ("epcoh=2", "did you mean 'epoch'"),
    ("epoch=two", "key 'epoch' must be an integer"),
    ("model_config.backbone_config.encoder=resnet18", "too few channels"),
    ("losses=[NoSuchLoss]", "unknown name 'NoSuchLoss'"),
    ("losses_weight=[1, 2]", "losses_weight"),
    ("optimal_modules=[head]", "optimal_modules"),
    ("load_path=/nonexistent/010", "load_path"),
    ("data_config_train.data_path=/nonexistent", "/nonexistent"),
    ("preprocess_train_config.kps_generator_config.grid_sise=8", "did you mean 'grid_size'"),
])
def test_config_errors_stop_before_work(megadepth, tmp_path, capsys, override, message):
    assert train.main(stage1_args(megadepth, tmp_path, override)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_nonfinite_loss_skips_step_and_stops_after_limit(megadepth, tmp_path, monkeypatch, capsys):
    from losses.line2window import EpipolarLoss_Line2Window

    original = EpipolarLoss_Line2Window.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        loss, parts = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 2 else loss), parts

    monkeypatch.setattr(EpipolarLoss_Line2Window, "forward", sometimes_nan)
    code = train.main(stage1_args(megadepth, tmp_path, "epoch_step=6", "max_nonfinite_steps=2"))
    run_dir = tmp_path / "demo-descriptor"
    assert code == 2
    assert "consecutive steps had a non-finite loss" in capsys.readouterr().err
    assert (run_dir / "nonfinite_batch.pth").is_file()
    assert "im1" in torch.load(run_dir / "nonfinite_batch.pth", weights_only=False)
    # The good first step was saved; the non-finite ones changed no weight.
    state = torch.load(run_dir / "training_state.pth", weights_only=False)
    assert state["global_step"] >= 1


def _run_in_background(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_resume_after_sigkill_finishes_the_same_steps(megadepth, tmp_path):
    args = stage1_args(megadepth, tmp_path, "epoch_step=5")
    run_dir = tmp_path / "demo-descriptor"
    state_path = run_dir / "training_state.pth"
    process = _run_in_background(args, tmp_path / "first.log")
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if state_path.is_file():
            try:
                if torch.load(state_path, weights_only=False)["global_step"] >= 2:
                    break
            except Exception:
                pass  # being replaced right now: atomic rename, try again
        time.sleep(0.2)
    assert process.poll() is None, (tmp_path / "first.log").read_text()
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(state_path, weights_only=False)["global_step"]
    assert 2 <= killed_at < 5

    assert train.main(args + ["--resume"]) == 0
    state = torch.load(state_path, weights_only=False)
    assert state["global_step"] == 5 and state["epoch"] == 1
    steps = logged_losses(run_dir)
    assert sorted(steps) == [1, 2, 3, 4, 5]  # the curve continues where it stopped
    assert (run_dir / "001" / "backbone.pth").is_file()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(megadepth, tmp_path):
    """Same seed and data order: 2 steps + resume for 2 more == 4 steps straight."""
    straight = tmp_path / "straight"
    assert train.main(stage1_args(megadepth, straight, "epoch_step=4", "deterministic=true")) == 0
    split = tmp_path / "split"
    assert train.main(stage1_args(megadepth, split, "epoch_step=4", "deterministic=true",
                                  "epoch=1", "log_freq=2", "max_steps_this_run=2")) == 0
    assert train.main(stage1_args(megadepth, split, "epoch_step=4", "deterministic=true",
                                  "log_freq=2") + ["--resume"]) == 0
    a = load_state_dict_file(straight / "demo-descriptor" / "001" / "backbone.pth")
    b = load_state_dict_file(split / "demo-descriptor" / "001" / "backbone.pth")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo test uses torchrun on Linux")
def test_two_process_ddp_with_gloo(megadepth, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), *stage1_args(megadepth, tmp_path, "epoch_step=2", "log_freq=2")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "demo-descriptor"
    state = torch.load(run_dir / "training_state.pth", weights_only=False)
    assert state["global_step"] == 2
    assert len(list((run_dir / "tb").iterdir())) == 1  # only rank 0 writes logs
    assert (run_dir / "001" / "backbone.pth").is_file()


@pytest.mark.slow
def test_stage2_trains_only_the_detector(megadepth, tmp_path):
    stage1 = tmp_path / "stage1" / "001"
    save_random_checkpoint(stage1)
    args = ["--config", str(REPO / "config" / "train_det.yaml"), f"load_path={stage1}",
            f"output_root={tmp_path}", f"data_config_train.data_path={megadepth}",
            "data_config_train.resize=null", "data_config_train.workers=0",
            "data_config_train.batch_size=1", "epoch_step=2", "log_freq=1",
            f"val_config.data_config_val.data_path={megadepth}", "val_config.data_config_val.resize=null",
            "val_config.data_config_val.workers=0", "val_config.max_pairs=0"]
    assert train.main(args) == 0
    run_dir = tmp_path / "keypoint-1k"
    assert "validation" not in (run_dir / "train.log").read_text()  # max_pairs 0: none
    before = load_state_dict_file(stage1 / "backbone.pth")
    after = load_state_dict_file(run_dir / "001" / "backbone.pth")
    assert before.keys() == after.keys()
    for key in before:  # byte-identical, BatchNorm statistics included
        assert torch.equal(before[key], after[key]), key
    header_before = load_state_dict_file(stage1 / "localheader.pth")
    header_after = load_state_dict_file(run_dir / "001" / "localheader.pth")
    assert any(not torch.equal(header_before[k], header_after[k]) for k in header_before)
    from utils.config import read_yaml
    # model_config is None in train_det.yaml: the stage-2 run records the loaded run's settings
    # (extraction reads them).
    recorded = read_yaml(run_dir / "config.yaml")["model_config"]
    assert recorded["backbone_config"] == {"encoder": "resnet50", "pretrained": False, "fusion_out_ch": 128}
    assert recorded["backbone"] == "ResUNet_F2R" and recorded["localheader_config"] == {"in_channels": 192}
    log = (run_dir / "train.log").read_text()
    assert "reinforce=" in log and "kp_penalty=" in log and "n_good=" in log
