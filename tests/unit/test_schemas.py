"""Cross-key rules of the training schema: ``tb_component`` names."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import save_random_checkpoint
from schemas import load_train_config
from utils.errors import SCFeatError

CONFIG = Path(__file__).resolve().parents[2] / "config"
ORIGINAL_SPACED = ["cor max", "cor mean", "cor minmax", "cor minmean", "cor summin",
                   "cor summax"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("run") / "run" / "000"
    save_random_checkpoint(folder)
    return str(folder)


def stage2(checkpoint: str, names: list[str]) -> dict:
    listed = ", ".join(f"'{name}'" for name in names)
    return load_train_config(CONFIG / "train_det.yaml",
                             [f"load_path={checkpoint}", f"tb_component=[{listed}]"])


def test_the_originals_spaced_component_names_are_accepted(checkpoint):
    conf = stage2(checkpoint, ORIGINAL_SPACED + ["reinforce", "kp_penalty"])
    assert conf["tb_component"] == [name.replace(" ", "_") for name in ORIGINAL_SPACED] + [
        "reinforce", "kp_penalty"]


def test_underscored_names_and_the_loss_name_are_accepted_as_they_are(checkpoint):
    names = ["cor_max", "cor_minmean", "scale1", "temperature", "n_kps", "n_pairs", "n_good",
             "KeypointLoss"]
    assert stage2(checkpoint, names)["tb_component"] == names


def test_any_spaced_name_is_read_with_underscores(checkpoint):
    """``n_kps``, ``n_pairs`` have underscores in the original; written with a space they are
    read as the underscored names, like every spaced name."""
    assert stage2(checkpoint, ["n kps", "n  pairs"])["tb_component"] == ["n_kps", "n_pairs"]


@pytest.mark.parametrize("name, hint", [("cor maxx", "cor_max"), ("cor_summ", "cor_summin"),
                                        ("n  pair", "n_pairs")])
def test_an_unknown_name_gets_the_closest_valid_one(checkpoint, name, hint):
    with pytest.raises(SCFeatError, match=rf"train_det\.yaml: key 'tb_component': '{name}' is not "
                                          rf"reported by the losses \['KeypointLoss'\]; did you "
                                          rf"mean '{hint}'\?"):
        stage2(checkpoint, [name])


def test_stage1_names():
    conf = load_train_config(CONFIG / "train_desc.yaml", ["tb_component=['loss w1', percent_w]"])
    assert conf["tb_component"] == ["loss_w1", "percent_w"]
    with pytest.raises(SCFeatError, match="'cor max' is not reported by the losses "
                                          r"\['EpipolarLoss_Line2Window'\]"):
        load_train_config(CONFIG / "train_desc.yaml", ["tb_component=['cor max']"])


def test_a_name_of_another_stage_lists_the_reported_ones(checkpoint):
    with pytest.raises(SCFeatError, match=r"'loss_w1' is not reported by the losses "
                                          r"\['KeypointLoss'\] \(reported: KeypointLoss, reinforce, "
                                          r"kp_penalty, scale1, "):
        stage2(checkpoint, ["loss_w1"])
