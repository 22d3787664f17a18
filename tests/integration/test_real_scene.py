"""``python -m tools.real_scene``: both stages on a CAPS-layout folder, and the held-out
measure, which is the trainer's own validation pass (tiny synthetic pairs at 64×96)."""
from __future__ import annotations

import re

import pytest

import train
from tools import real_scene
from utils.checkpoint import is_checkpoint
from utils.config import read_yaml

DEMO_DESC = str(real_scene.REPO / "config" / "demo" / "train_desc.yaml")


@pytest.mark.slow
def test_train_runs_both_stages_and_the_second_starts_from_the_first(megadepth, tmp_path):
    out = tmp_path / "runs"
    args = ["train", "--data", str(megadepth), "--run", "tiny", "--out", str(out),
            "--desc-steps", "2", "--desc-epochs", "1", "--det-steps", "1", "--det-epochs", "1",
            "--size", "64x96", "--untrained"]
    assert real_scene.main(args) == 0
    for folder in ("tiny-desc/001", "tiny-det/001", "tiny-untrained/ckpts/demo-untrained/000"):
        assert is_checkpoint(out / folder), folder
    det = read_yaml(out / "tiny-det" / "config.yaml")
    assert det["load_path"] == str((out / "tiny-desc" / "001").resolve())
    assert det["data_config_train"]["resize"] == [64, 96]
    assert det["val_config"]["max_pairs"] == 0  # no --val: no validation
    desc = read_yaml(out / "tiny-desc" / "config.yaml")
    assert (desc["epoch"], desc["epoch_step"], desc["seed"]) == (1, 2, 0)


@pytest.mark.slow
def test_the_held_out_loss_is_the_trainers_validation_loss(megadepth, tmp_path, capsys,
                                                            monkeypatch):
    val = (f"val_config={{data_config_val: {{data_path: {megadepth}, batch_size: 1, workers: 0}}, "
           f"max_pairs: 3}}")
    assert train.main(["--config", DEMO_DESC, f"data_config_train.data_path={megadepth}",
                       f"output_root={tmp_path}", "data_config_train.batch_size=1", "epoch=1",
                       "epoch_step=2", val]) == 0
    run = tmp_path / "demo-descriptor"
    logged = re.search(r"validation after epoch 1 \(3 pairs, 3 batches\): loss=([\d.]+)",
                       (run / "train.log").read_text())
    assert logged, (run / "train.log").read_text()
    capsys.readouterr()
    args = ["measure", "--pairs", str(megadepth), "--checkpoints", str(run / "001"),
            str(run / "000"), "--out", str(tmp_path / "measure"), "--max-pairs", "3",
            "--size", "64x96", "--plot", str(tmp_path / "curves.png")]
    assert real_scene.main(args) == 0
    printed = capsys.readouterr().out
    rows = re.findall(r"^demo-descriptor/(\d+)\s+(\d+)\s+loss ([\d.]+) .* epi@2 ([\d.]+)$",
                      printed, re.MULTILINE)
    assert [(name, steps) for name, steps, _, _ in rows] == [("001", "2"), ("000", "0")], printed
    # the same network, pairs and query points as the trainer's validation after epoch 1
    assert float(rows[0][2]) == pytest.approx(float(logged.group(1)), rel=2e-3)
    assert rows[0][2] != rows[1][2]  # the starting weights give another loss
    assert all(0.0 <= float(epi) <= 1.0 for *_, epi in rows)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # a second call reads the cached rows
    monkeypatch.setattr(real_scene, "measure_network", None)
    assert real_scene.main(args) == 0
    assert capsys.readouterr().out.splitlines()[:2] == printed.splitlines()[:2]


def test_a_missing_checkpoint_is_one_clear_error(tmp_path, capsys, megadepth):
    code = real_scene.main(["measure", "--pairs", str(megadepth), "--checkpoints",
                            str(tmp_path / "nothing"), "--out", str(tmp_path / "m")])
    captured = capsys.readouterr()
    assert code == 2 and "is not a checkpoint folder" in captured.err
    assert "Traceback" not in captured.err


def test_training_losses_number_the_steps_across_epochs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epoch_step: 50\n")
    (run / "train.log").write_text(
        "x INFO scfeat.train: epoch 1 step 10 loss 9.5 EpipolarLoss_Line2Window=9.5\n"
        "x INFO scfeat.train: epoch 1 step 50 loss 8.25 a=1\n"
        "x INFO scfeat.train: epoch 2 step 10 loss 7.0 a=1\n"
        "x INFO scfeat.train: epoch 2 step 10 loss 7.5 a=1\n")   # resumed: logged again
    assert real_scene.training_losses(run) == ([10, 50, 60], [9.5, 8.25, 7.5])
