"""The original's three config files (tests/fixtures/original_configs, key for key and value for
value) run unchanged through train.py and extract_features.py, with only data paths, worker
counts, run lengths and `pretrained: false` overridden, and their chain of names works as
written: descriptor-100k/000 → keypoint-1k/001 → ckpts/hpatches/output."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import extract_features
import train
from tools.synthetic import make_hpatches
from utils.checkpoint import load_state_dict_file

ORIGINAL = Path(__file__).resolve().parents[1] / "fixtures" / "original_configs"

pytestmark = pytest.mark.slow


def stage1_args(megadepth: Path) -> list[str]:
    return ["--config", str(ORIGINAL / "train_desc.yaml"),
            f"data_config_train.data_path={megadepth}", "data_config_train.workers=0",
            f"val_config.data_config_val.data_path={megadepth}", "val_config.data_config_val.workers=0",
            "epoch=1", "epoch_step=2", "model_config.backbone_config.pretrained=false"]


def stage2_args(megadepth: Path, *extra: str) -> list[str]:
    return ["--config", str(ORIGINAL / "train_det.yaml"),
            f"data_config_train.data_path={megadepth}", "data_config_train.workers=0",
            f"val_config.data_config_val.data_path={megadepth}", "val_config.data_config_val.workers=0",
            "epoch_step=2", *extra]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_state_dict_file(a), load_state_dict_file(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_original_files_run_as_a_chain(megadepth, tmp_path, monkeypatch, capsys):
    hpatches = tmp_path / "hpatches"
    make_hpatches(hpatches, sequences=2, size=(96, 128), seed=0)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the files name ckpts/... relative to the cwd

    assert train.main(stage1_args(megadepth)) == 0
    stage1 = work / "ckpts" / "descriptor-100k"
    assert (stage1 / "000" / "backbone.pth").is_file() and (stage1 / "001" / "backbone.pth").is_file()
    err = capsys.readouterr().err
    assert "accepted for compatibility with the original's configs, has no effect" in err
    assert "no_cuda" in err and "test_kp" in err and "val_config.vis_topk" in err
    # The original's data_config_val is the training set: its 6 pairs, under the default cap of 200.
    assert "validation after epoch 1 (6 pairs, 3 batches)" in err

    # Stage 2 from 000, as the original's train_det.yaml is written; model_config None → the
    # stage-1 run's settings.
    assert train.main(stage2_args(megadepth)) == 0
    stage2 = work / "ckpts" / "keypoint-1k"
    assert_same_weights(stage1 / "000" / "backbone.pth", stage2 / "001" / "backbone.pth")
    assert (stage2 / "000" / "localheader.pth").is_file()

    # Stage 2 from the last stage-1 epoch, in another working folder.
    other = tmp_path / "other"
    shutil.copytree(stage1, other / "ckpts" / "descriptor-100k")
    monkeypatch.chdir(other)
    assert train.main(stage2_args(megadepth, "load_path=ckpts/descriptor-100k/001")) == 0
    assert_same_weights(stage1 / "001" / "backbone.pth",
                        other / "ckpts" / "keypoint-1k" / "001" / "backbone.pth")

    # Extraction from ./ckpts/keypoint-1k/001 into ./ckpts/hpatches/output, as the original.
    monkeypatch.chdir(work)
    assert extract_features.main(["--config", str(ORIGINAL / "extract_hpatches.yaml"),
                                  f"data_config_extract.data_path={hpatches}",
                                  "data_config_extract.workers=0"]) == 0
    images = sorted(hpatches.glob("*/*.ppm"))
    output = work / "ckpts" / "hpatches" / "output"
    assert not (work / "hpatches").exists()
    for image in images:
        assert (output / "desc" / image.parent.name / f"{image.name}.scfeat").is_file()
    assert any((output / "image").rglob("*.png"))  # output_img: True
    err = capsys.readouterr().err
    assert "local_thr" in err and "data_config_extract.prune_kp" in err
