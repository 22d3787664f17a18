"""The shipped configs validate and carry the original hyper-parameters."""
from __future__ import annotations

from pathlib import Path

import pytest

from train import TRAIN_SCHEMA, loss_sections
from utils.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize("name", ["train_desc.yaml", "train_det.yaml", "demo/train_desc.yaml",
                                  "demo/train_det.yaml"])
def test_training_configs_validate(name):
    if not (CONFIG / name).is_file():
        pytest.fail(f"config/{name} is missing")
    conf = load_config(CONFIG / name, [], TRAIN_SCHEMA, loss_sections)
    assert conf["losses"] and conf["optimal_modules"]


def test_stage1_original_hyper_parameters():
    conf = load_config(CONFIG / "train_desc.yaml", [], TRAIN_SCHEMA, loss_sections)
    assert (conf["checkpoint_name"], conf["epoch"], conf["epoch_step"], conf["lr_decay_step"],
            conf["lr_decay_factor"], conf["log_freq"]) == ("descriptor-100k", 10, 10000, 9, 0.1, 1000)
    assert conf["optimal_modules"] == ["backbone"] and conf["optimal_lrs"] == [1e-4]
    assert conf["model_config"]["backbone_config"] == {"encoder": "resnet50", "pretrained": True,
                                                       "fusion_out_ch": 128}
    assert conf["model_config"]["local_input_elements"] == ["local_map", "local_map_first"]
    data = conf["data_config_train"]
    assert (data["num_pts"], data["batch_size"], data["random_percent"], data["rot_thr"]) == (2000, 2, 0.5, 80)
    assert data["query_points"] is None  # the descriptor stage needs no SIFT
    pre = conf["preprocess_train_config"]
    assert (pre["grid_size"], pre["window_size"], pre["line_step"], pre["use_nn"], pre["loc_rand"],
            pre["temperature_base"], pre["temperature_max"]) == (16, 0.1, 100, True, True, 60, 60)
    loss = conf["EpipolarLoss_Line2Window_config"]
    assert loss == {"grid_cost_thr": 0.5, "win_cost_thr": 0.1, "use_std_as_weight": True,
                    "weight_grid": 0.0, "weight_window": 1.0}


def test_stage2_original_hyper_parameters():
    conf = load_config(CONFIG / "train_det.yaml", [], TRAIN_SCHEMA, loss_sections)
    assert (conf["checkpoint_name"], conf["epoch"], conf["epoch_step"], conf["lr_decay_step"],
            conf["lr_decay_factor"], conf["log_freq"]) == ("keypoint-1k", 1, 1000, 40, 0.1, 200)
    assert conf["optimal_modules"] == ["localheader"] and conf["optimal_lrs"] == [1e-3]
    assert conf["load_path"] == "ckpts/descriptor-100k/010" and conf["preprocess_train"] is None
    assert conf["tb_component"] == ["reinforce", "kp_penalty"]
    kp = conf["KeypointLoss_config"]
    assert kp["reward_config"] == {"reward_thr": 2.0, "rescale_thr": False}
    assert (kp["grid_size"], kp["loss_distance"], kp["temperature_base"], kp["temperature_max"],
            kp["cor_detach"], kp["good_reward"], kp["bad_reward"], kp["kp_penalty"], kp["match_grad"]) == \
        (8, "cos", 60, 60, True, 1.0, -0.25, -0.001, False)
