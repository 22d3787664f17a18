"""tools/learning_stage1.py: the dense epipolar precision, checkpoint discovery, the whole
command on a tiny run (calibrated untrained row, cache reuse)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import save_random_checkpoint
from tools import learning_stage1
from utils.errors import SCFeatError

# Rectified geometry: image 2 is image 1 shifted along x, so the epipolar line of (x, y) is the
# row y in the other image (x2ᵀ·F·x1 = y1 − y2).
RECTIFIED_F = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def test_cell_centres_follow_align_corners_false():
    centres = learning_stage1.cell_centres(8, 16, (2, 4))  # 4-pixel cells
    assert centres.shape == (8, 2)
    assert centres[0].tolist() == [1.5, 1.5]
    assert centres[-1].tolist() == [13.5, 5.5]
    assert centres[:4, 1].tolist() == [1.5] * 4  # raster order: first row first


def test_dense_precision_counts_matches_on_the_epipolar_line():
    torch.manual_seed(0)
    desc1 = torch.randn(16, 6, 10)
    along_line = torch.roll(desc1, shifts=2, dims=2)  # same rows, 8 px disparity
    precision, matches = learning_stage1.dense_epipolar_precision(
        desc1, along_line, (24, 40), RECTIFIED_F, RECTIFIED_F.T, threshold=2.0)
    assert precision == 1.0 and matches == 60
    off_line = torch.roll(desc1, shifts=3, dims=1)  # rows move by 12 px: every match is wrong
    precision, matches = learning_stage1.dense_epipolar_precision(
        desc1, off_line, (24, 40), RECTIFIED_F, RECTIFIED_F.T, threshold=2.0)
    assert precision == 0.0 and matches == 60
    # Both directions count: one point on the line is not enough.
    good = learning_stage1.epipolar_good(torch.tensor([[3.0, 5.0]]), torch.tensor([[9.0, 6.5]]),
                                         RECTIFIED_F, RECTIFIED_F.T, threshold=2.0)
    assert good.tolist() == [True]
    good = learning_stage1.epipolar_good(torch.tensor([[3.0, 5.0]]), torch.tensor([[9.0, 7.5]]),
                                         RECTIFIED_F, RECTIFIED_F.T, threshold=2.0)
    assert good.tolist() == [False]


def test_checkpoint_steps_come_from_the_run_config(tmp_path):
    folder = tmp_path / "run" / "003"
    folder.mkdir(parents=True)
    save_random_checkpoint(folder)
    (folder.parent / "config.yaml").write_text("model: SCFeatModel\nepoch_step: 25\n")
    network = learning_stage1.describe_checkpoint(folder)
    assert (network.label, network.steps) == ("run/003", 75)
    with pytest.raises(SCFeatError, match="missing-run/001 is not a checkpoint folder"):
        learning_stage1.describe_checkpoint(tmp_path / "missing-run" / "001")


def write_run(folder: Path, data: Path) -> None:
    """A random checkpoint with the config.yaml a stage-1 run on ``data`` would write."""
    from utils.config import save_config

    folder.mkdir(parents=True)
    save_random_checkpoint(folder, seed=0)
    save_config({"model": "SCFeatModel", "model_config": {"backbone_config": {"pretrained": False}},
                 "seed": 0, "epoch_step": 5, "data": "MegaDepth_SIFT",
                 "data_config_train": {"data_path": str(data), "mode": "train", "batch_size": 1,
                                       "workers": 0}},
                folder.parent / "config.yaml")


@pytest.mark.slow
def test_stage1_table_on_a_tiny_run(tmp_path, megadepth, monkeypatch, capsys):
    from tools import demo_stages

    monkeypatch.setattr(demo_stages, "BATCHNORM_BATCHES", 2)  # the calibration's batch count
    checkpoint = tmp_path / "run" / "002"
    write_run(checkpoint, megadepth)
    out = tmp_path / "out"
    argv = ["--checkpoints", str(checkpoint), "--out", str(out), "--scenes", "1", "--images", "4",
            "--pairs", "2", "--size", "64x96", "--sequences", "2", "--hpatches-size", "64x96",
            "--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "curve.png")]
    assert learning_stage1.main(argv) == 0
    rows = learning_stage1.json.loads((tmp_path / "rows.json").read_text())
    assert [(r["label"], r["steps"]) for r in rows] == [("untrained", 0), ("run/002", 10),
                                                         ("sift", None)]
    for row in rows:
        assert 0.0 <= row["epi"] <= 1.0 and row["dense_matches"] > 0
        assert all(0.0 <= v <= 1.0 for v in row["own"]["mma"] + row["sift_kp"]["mma"])
    # The untrained row is the run's own starting point: the same weights (same seed and model
    # settings), with BatchNorm statistics estimated on the training data instead of 0 / 1.
    untrained = torch.load(Path(rows[0]["folder"]) / "backbone.pth")
    random = torch.load(checkpoint / "backbone.pth")
    conv = [k for k in random if k.endswith("conv1.weight")][0]
    assert torch.equal(untrained[conv], random[conv])
    running = [k for k in random if k.endswith("running_var")][0]
    assert not torch.equal(untrained[running], random[running])
    assert rows[0]["epi"] != rows[1]["epi"]  # ... which changes the descriptors
    assert (tmp_path / "curve.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "run/002" in table and "sift" in table

    # A second call reuses every cached row: nothing is evaluated again.
    def fail(*args, **kwargs):
        raise AssertionError("evaluated again")
    monkeypatch.setattr(learning_stage1, "evaluate_network", fail)
    monkeypatch.setattr(learning_stage1, "evaluate_sift", fail)
    assert learning_stage1.main(argv) == 0
    assert learning_stage1.json.loads((tmp_path / "rows.json").read_text()) == rows


def test_a_run_without_training_data_is_named(tmp_path, capsys):
    checkpoint = tmp_path / "run" / "001"
    write_run(checkpoint, tmp_path / "nowhere")
    code = learning_stage1.main(["--checkpoints", str(checkpoint), "--out", str(tmp_path / "o"),
                                 "--scenes", "1", "--images", "2", "--pairs", "1", "--size",
                                 "64x96", "--sequences", "1", "--hpatches-size", "64x96"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
