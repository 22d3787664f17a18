"""The shipped configs validate and carry the original's keys and values (the original's three
files are in tests/fixtures/original_configs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import save_random_checkpoint
from schemas import load_extract_config, load_train_config
from utils.config import is_none_word, read_yaml

CONFIG = Path(__file__).resolve().parents[2] / "config"
ORIGINAL = Path(__file__).resolve().parents[1] / "fixtures" / "original_configs"
# Keys whose values the shipped files set on purpose (docs/differences.md says why).
OUR_VALUES = {"data_config_train.resize", "val_config.data_config_val.resize",
              "val_config.max_pairs"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("run") / "run" / "000"
    save_random_checkpoint(folder)
    return str(folder)


def leaves(conf: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in conf.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", ["train_desc.yaml", "train_det.yaml", "extract_hpatches.yaml"])
def test_shipped_files_hold_every_original_key_and_value(name):
    """The raw YAML of config/<name> equals the original's file on every key it has."""
    original, shipped = leaves(read_yaml(ORIGINAL / name)), leaves(read_yaml(CONFIG / name))
    for key, value in original.items():
        assert key in shipped, f"config/{name} lacks the original's key {key}"
        assert shipped[key] == value or (is_none_word(value) and is_none_word(shipped[key])), \
            f"config/{name}: {key} = {shipped[key]!r}, the original has {value!r}"
    extra = sorted(set(shipped) - set(original) - OUR_VALUES - {"descriptor_map", "format", "device"})
    assert not extra, f"config/{name} has keys the original does not: {extra}"


@pytest.mark.parametrize("name", ["train_desc.yaml", "train_det.yaml", "demo/train_desc.yaml",
                                  "demo/train_det.yaml", "strecha/train_desc.yaml",
                                  "strecha/train_det.yaml"])
def test_training_configs_validate(name, checkpoint):
    conf = load_train_config(CONFIG / name, [f"load_path={checkpoint}"] if "det" in name else [])
    assert conf["losses"] and conf["optimal_modules"]


def test_stage1_original_hyper_parameters():
    conf = load_train_config(CONFIG / "train_desc.yaml")
    assert (conf["checkpoint_name"], conf["epoch"], conf["epoch_step"], conf["lr_decay_step"],
            conf["lr_decay_factor"], conf["log_freq"]) == ("descriptor-100k", 10, 10000, 9, 0.1, 1000)
    assert (conf["grad_clip"], conf["clip_norm"], conf["save_freq"]) == (False, 10.0, 100)
    assert conf["optimal_modules"] == ["backbone"] and conf["optimal_lrs"] == [1e-4]
    assert conf["model_config"]["backbone_config"] == {"encoder": "resnet50", "pretrained": True,
                                                       "fusion_out_ch": 128}
    assert conf["model_config"]["local_input_elements"] == ["local_map", "local_map_first"]
    data = conf["data_config_train"]
    assert (data["num_pts"], data["batch_size"], data["random_percent"], data["rot_thr"]) == (2000, 2, 0.5, 80)
    assert data["query_points"] is None  # the descriptor stage needs no SIFT
    pre = conf["preprocess_train_config"]
    assert pre["kps_generator_config"] == {"grid_size": 16, "keep_spatial": True,
                                           "random_select": "random"}
    assert pre["line_search_config"] == {"line_step": 100, "use_nn": True, "loc_rand": True}
    assert (pre["window_size"], pre["loss_distance"], pre["temperature_base"],
            pre["temperature_max"]) == (0.1, "cos", 60, 60)
    loss = conf["EpipolarLoss_Line2Window_config"]
    assert loss == {"grid_cost_thr": 0.5, "win_cost_thr": 0.1, "use_std_as_weight": True,
                    "weight_grid": 0.0, "weight_window": 1.0}
    assert conf["val_config"]["data_config_val"]["rot_thr"] == 360


def test_stage2_original_hyper_parameters(checkpoint):
    assert read_yaml(CONFIG / "train_det.yaml")["load_path"] == "ckpts/descriptor-100k/000"
    conf = load_train_config(CONFIG / "train_det.yaml", [f"load_path={checkpoint}"])
    assert (conf["checkpoint_name"], conf["epoch"], conf["epoch_step"], conf["lr_decay_step"],
            conf["lr_decay_factor"], conf["log_freq"]) == ("keypoint-1k", 1, 1000, 40, 0.1, 200)
    assert conf["optimal_modules"] == ["localheader"] and conf["optimal_lrs"] == [1e-3]
    assert conf["preprocess_train"] is None
    assert conf["tb_component"] == ["reinforce", "kp_penalty"]
    # model_config: None in the file, the checkpoint run's settings here
    assert conf["model_config"]["backbone"] == "ResUNet_F2R"
    assert conf["model_config"]["localheader_config"] == {"in_channels": 192}
    kp = conf["KeypointLoss_config"]
    assert kp["reward_config"] == {"reward_thr": 2.0, "rescale_thr": False}
    assert (kp["grid_size"], kp["loss_distance"], kp["temperature_base"], kp["temperature_max"],
            kp["cor_detach"], kp["good_reward"], kp["bad_reward"], kp["kp_penalty"], kp["match_grad"]) == \
        (8, "cos", 60, 60, True, 1.0, -0.25, -0.001, False)
    assert conf["val_config"]["detector_config"]["thr"] is False


def test_extraction_original_settings(checkpoint):
    conf = load_extract_config(CONFIG / "extract_hpatches.yaml", [f"load_path={checkpoint}"])
    assert (conf["output_root"], conf["postfix"], conf["output_img"], conf["use_sift"]) == \
        ("hpatches/output", "scfeat", True, False)
    expected = {"num_pts": 8192, "stable": True, "use_nms": True, "nms_radius": 1, "thr": 1.0,
                "thr_mod": "abs"}
    assert {key: conf["detector_config"][key] for key in expected} == expected



# The settings that define what each stage learns: the preprocess step, the losses, the
# optimiser (the real-scene configs change the scale of a run, not its learning problem).
LEARNING_KEYS = ("optimal_modules", "optimal_lrs", "optimizer", "preprocess_train",
                 "preprocess_train_config", "losses", "losses_weight")


@pytest.mark.parametrize("stage", ["train_desc.yaml", "train_det.yaml"])
def test_the_real_scene_configs_keep_the_original_learning_settings(stage, checkpoint):
    load = [f"load_path={checkpoint}"] if "det" in stage else []
    original = load_train_config(CONFIG / stage, load)
    real = load_train_config(CONFIG / "strecha" / stage, load)
    for key in LEARNING_KEYS + tuple(f"{name}_config" for name in original["losses"]):
        assert real[key] == original[key], f"config/strecha/{stage}: {key}"
    # the original's query sampling and rotation filter; our size, batch and data
    for key in ("random_percent", "rot_thr"):
        assert real["data_config_train"][key] == original["data_config_train"][key], key
    assert real["data_config_train"]["resize"] == [256, 384]
    assert real["data_config_train"]["data_path"] == "data/strecha-megadepth/castle-P30"
    assert real["val_config"]["data_config_val"]["data_path"] == \
        "data/strecha-megadepth/Herz-Jesus-P25"
