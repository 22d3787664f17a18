"""Every key of the original training and extraction schemas rejects a value of the wrong type
with a message naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import save_random_checkpoint
from schemas import EXTRACT_SCHEMA, TRAIN_SCHEMA, load_extract_config, load_train_config
from utils.config import Dynamic, Spec
from utils.errors import SCFeatError

CONFIG = Path(__file__).resolve().parents[2] / "config"


def wrong_value(rule):
    """A YAML value whose type the rule does not accept."""
    if isinstance(rule, Dynamic) or isinstance(rule, dict):
        return "5"  # a number where a mapping is expected
    if isinstance(rule, Spec):
        types = rule.types or (type(rule.default),)
        if str in types:
            return "[1, 2]"
        return "'text'"
    if rule is None:
        return None
    return "[1, 2]" if isinstance(rule, (str, int, float, bool)) else "5"


def cases(schema):
    for key, rule in schema.items():
        value = wrong_value(rule)
        if value is not None:
            yield key, value


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("run") / "run" / "001"
    save_random_checkpoint(folder)
    return str(folder)


@pytest.mark.parametrize("key, value", list(cases(TRAIN_SCHEMA)))
def test_training_key_with_wrong_type(key, value):
    with pytest.raises(SCFeatError, match=rf"key '{key}'"):
        load_train_config(CONFIG / "train_desc.yaml", [f"{key}={value}"])


# `model` is the checkpoint run's whatever the config says (tests/unit/test_registry.py).
@pytest.mark.parametrize("key, value", [(k, v) for k, v in cases(EXTRACT_SCHEMA)
                                        if k not in ("load_path", "model")])
def test_extraction_key_with_wrong_type(key, value, checkpoint):
    with pytest.raises(SCFeatError, match=rf"key '{key}'"):
        load_extract_config(CONFIG / "extract_hpatches.yaml",
                            [f"load_path={checkpoint}", f"{key}={value}"])


@pytest.mark.parametrize("key, value", [
    ("model_config.backbone_config.fusion_out_ch", "'wide'"),
    ("model_config.backbone_config.pretrained", "3"),
    ("model_config.align_local_grad", "'no'"),
    ("model_config.local_input_elements", "local_map"),
    ("data_config_train.batch_size", "two"),
    ("data_config_train.rot_thr", "[80]"),
    ("preprocess_train_config.line_search_config.use_nn", "'yes'"),
    ("preprocess_train_config.kps_generator_config.grid_size", "'16'"),
    ("preprocess_train_config.window_size", "small"),
    ("val_config.data_config_val.batch_size", "two"),
    ("val_config.vis_topk", "many"),
    ("val_config.max_pairs", "all"),
    ("no_cuda", "name1"),
    ("EpipolarLoss_Line2Window_config.weight_window", "heavy"),
])
def test_nested_training_keys_with_wrong_type(key, value):
    with pytest.raises(SCFeatError, match=rf"key '{key}'"):
        load_train_config(CONFIG / "train_desc.yaml", [f"{key}={value}"])


def test_keypoint_loss_keys_with_wrong_type(checkpoint):
    for key, value in [("KeypointLoss_config.grid_size", "'8'"),
                       ("KeypointLoss_config.reward_config.reward_thr", "near"),
                       ("KeypointLoss_config.cor_detach", "1")]:
        with pytest.raises(SCFeatError, match=rf"key '{key}'"):
            load_train_config(CONFIG / "train_det.yaml", [f"load_path={checkpoint}", f"{key}={value}"])


@pytest.mark.parametrize("key, value, message", [
    ("epoch_step", 0, "must be at least 1"), ("save_freq", -1, "must be at least 1"),
    ("max_unusable_fraction", 1.5, "must be at most 1"),
    ("val_config.max_pairs", -1, "must be at least 0")])
def test_out_of_range_training_values_name_the_key(key, value, message):
    with pytest.raises(SCFeatError, match=f"key '{key}' {message}"):
        load_train_config(CONFIG / "train_desc.yaml", [f"{key}={value}"])


def test_load_path_must_hold_both_checkpoint_parts(tmp_path):
    folder = tmp_path / "run" / "001"
    folder.mkdir(parents=True)
    (folder / "backbone.pth").write_bytes(b"")
    with pytest.raises(SCFeatError, match=r"key 'load_path': '.*localheader\.pth' does not exist"):
        load_train_config(CONFIG / "train_desc.yaml", [f"load_path={folder}"])
    with pytest.raises(SCFeatError, match=r"key 'load_path': checkpoint folder '.*missing' does not "
                                          r"exist \(expected a folder with backbone\.pth and "
                                          r"localheader\.pth, e\.g\. ckpts/descriptor-100k/010\)"):
        load_train_config(CONFIG / "train_desc.yaml", [f"load_path={tmp_path / 'missing'}"])
