"""Model settings of a config with ``load_path``: the checkpoint run's ``config.yaml`` wins over
entries given in the config (the original's ``model_config.update``), each differing entry
logged once; ``SCFeatModel.from_checkpoint`` applies the same rule."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import save_random_checkpoint
from schemas import load_extract_config, load_train_config
from utils.config import save_config

CONFIG = Path(__file__).resolve().parents[2] / "config"
RUN_MODEL_CONFIG = {"backbone_config": {"encoder": "resnet101", "pretrained": False,
                                        "fusion_out_ch": 128},
                    "localheader_config": {"in_channels": 192}, "align_local_grad": False}


def empty_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint folder (empty part files: only the settings are read) whose run used
    resnet101."""
    folder = tmp_path / "run" / "000"
    folder.mkdir(parents=True)
    for name in ("backbone.pth", "localheader.pth"):
        (folder / name).write_bytes(b"")
    save_config({"model": "SCFeatModel", "model_config": RUN_MODEL_CONFIG},
                folder.parent / "config.yaml")
    return folder


def model_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "checkpoint's run" in r.getMessage()]


def test_the_checkpoint_runs_entries_win_and_each_differing_one_is_logged(tmp_path, caplog):
    folder = empty_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING):
        conf = load_train_config(CONFIG / "train_det.yaml", [
            f"load_path={folder}", "model_config.backbone_config.fusion_out_ch=64",
            "model_config.backbone_config.encoder=resnet101",  # equal: no line
            "model_config.align_local_grad=true"])
    model_config = conf["model_config"]
    assert model_config["backbone_config"] == RUN_MODEL_CONFIG["backbone_config"]
    assert model_config["align_local_grad"] is False
    lines = model_warnings(caplog)
    assert len(lines) == 2, lines
    fusion, align = lines  # in the order the config gives them
    assert "model_config.align_local_grad is True here but False" in align
    assert "model_config.backbone_config.fusion_out_ch is 64 here but 128" in fusion
    assert all("the checkpoint's value is used" in line and str(folder.parent / "config.yaml")
               in line for line in lines)


def test_equal_or_open_entries_log_nothing(tmp_path, caplog):
    folder = empty_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING):
        conf = load_train_config(CONFIG / "train_det.yaml", [
            f"load_path={folder}", "model_config.backbone_config.encoder=resnet101",
            "model_config.localheader_config.in_channels=192", "model=SCFeatModel",
            # a model from a checkpoint never downloads weights: `pretrained` is not reported
            "model_config.backbone_config.pretrained=true"])
    assert conf["model_config"]["backbone_config"]["encoder"] == "resnet101"
    assert model_warnings(caplog) == []


def test_an_entry_the_run_lacks_is_kept(tmp_path, caplog):
    folder = empty_checkpoint(tmp_path)
    conf = load_extract_config(CONFIG / "extract_hpatches.yaml", [
        f"load_path={folder}", "model_config.local_with_img=false"])
    assert conf["model_config"]["local_with_img"] is False
    assert conf["model_config"]["backbone_config"]["encoder"] == "resnet101"
    assert model_warnings(caplog) == []


def test_the_checkpoint_runs_model_name_wins(tmp_path, caplog):
    folder = empty_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING):
        conf = load_extract_config(CONFIG / "extract_hpatches.yaml",
                                   [f"load_path={folder}", "model=SCFeatModle"])
    assert conf["model"] == "SCFeatModel"
    assert ["model is 'SCFeatModle' here but 'SCFeatModel'" in line
            for line in model_warnings(caplog)] == [True]


@pytest.mark.slow
def test_from_checkpoint_takes_the_runs_settings_over_given_ones(tmp_path, caplog):
    """Given settings that could not load these weights (no image input to the detector) give
    way to the run's, with a warning; without the run's file they are used as given."""
    from model.scfeat import SCFeatModel
    from utils.errors import SCFeatError

    folder = tmp_path / "run" / "000"
    save_random_checkpoint(folder)
    # the run's complete settings, as train.py writes them
    save_config({"model": "SCFeatModel", "model_config": {
        **SCFeatModel.default_conf, "backbone_config": {"pretrained": False}}},
        folder.parent / "config.yaml")
    with caplog.at_level(logging.WARNING):
        model = SCFeatModel.from_checkpoint(folder, "cpu", {"local_with_img": False})
    assert model.conf["local_with_img"] is True
    assert len(model_warnings(caplog)) == 1
    (folder.parent / "config.yaml").unlink()
    with pytest.raises(SCFeatError):
        SCFeatModel.from_checkpoint(folder, "cpu", {"local_with_img": False})
