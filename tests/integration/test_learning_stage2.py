"""Stage-2 learning check (tools/learning_stage2.py, tools/learning_check.py): the controls
do what they claim, the CLI checks its input, and a small run of the real DetNet trained by
KeypointLoss on oracle descriptors beats both controls."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tools import learning_check, learning_stage2, synthetic
from tools.learning_stage2 import ControlledKeypointLoss
from tools.oracle import fundamental
from utils.errors import SCFeatError


def _loss_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    cam1, cam2 = synthetic.random_camera(rng, 48, 64), synthetic.random_camera(rng, 48, 64)
    torch.manual_seed(seed)
    batch = {"F1": fundamental(cam1, cam2)[None], "F2": fundamental(cam2, cam1)[None]}
    score1 = torch.randn(1, 1, 48, 64, requires_grad=True)
    score2 = torch.randn(1, 1, 48, 64, requires_grad=True)
    out1 = {"local_point": score1, "local_map": torch.randn(1, 16, 12, 16)}
    out2 = {"local_point": score2, "local_map": torch.randn(1, 16, 12, 16)}
    return batch, out1, out2, (score1, score2)


@pytest.mark.parametrize("reward", ["fmat", "posfeat"])
def test_zero_control_leaves_only_the_penalty(reward):
    conf = learning_stage2.loss_conf_for(reward, {"grid_size": 4})
    batch, out1, out2, _ = _loss_inputs()
    torch.manual_seed(1)
    loss, parts = ControlledKeypointLoss(conf)(batch, out1, out2, None, 0)
    assert float(parts["reinforce"]) != 0
    torch.manual_seed(1)  # the same keypoint draws
    loss0, parts0 = ControlledKeypointLoss(conf, "zero")(batch, out1, out2, None, 0)
    assert float(parts0["reinforce"]) == 0
    assert float(parts0["kp_penalty"]) == pytest.approx(float(parts["kp_penalty"]))
    assert float(loss0.detach()) == pytest.approx(-float(parts0["kp_penalty"]))


def test_shuffled_control_moves_the_good_pairs_and_keeps_their_count():
    conf = learning_stage2.loss_conf_for("fmat", {"grid_size": 4})
    batch, out1, out2, _ = _loss_inputs()
    plain, shuffled = ControlledKeypointLoss(conf), ControlledKeypointLoss(conf, "shuffled")
    keypoints1 = torch.rand(2, 192, 2) * torch.tensor([63.0, 47.0])
    keypoints2 = torch.rand(2, 192, 2) * torch.tensor([63.0, 47.0])
    fmat1, fmat2 = batch["F1"].expand(2, 3, 3), batch["F2"].expand(2, 3, 3)
    good = plain.reward_terms(keypoints1, keypoints2, fmat1, fmat2)
    moved = shuffled.reward_terms(keypoints1, keypoints2, fmat1, fmat2)
    assert good["good_index"].shape[0] >= 16
    for b in range(2):
        assert int((moved["good_index"][:, 0] == b).sum()) == int((good["good_index"][:, 0] == b).sum())
    assert ((moved["good_index"][:, 1:] >= 0) & (moved["good_index"][:, 1:] < 192)).all()
    same = {tuple(r) for r in good["good_index"].tolist()} & {tuple(r) for r in moved["good_index"].tolist()}
    assert len(same) < 0.2 * good["good_index"].shape[0]
    assert moved["base"] == good["base"] and moved["fmat_error"] == good["fmat_error"]


def test_cli_rejects_bad_input():
    with pytest.raises(SCFeatError, match="unknown command"):
        learning_check.main(["stage3"])
    with pytest.raises(SCFeatError, match="--size"):
        learning_stage2.main(["--size", "50x64"])
    with pytest.raises(SCFeatError, match="--controls"):
        learning_stage2.main(["--controls", "random"])


@pytest.mark.slow
def test_reward_teaches_free_score_maps_beyond_both_controls(capsys):
    """Free per-pixel logits, SGD (lr 10), 150 steps at 64×96: measured over seeds 0, 1, 2 the
    trained maps reach 0.681 / 0.624 / 0.673 against zero-reward 0.288 / 0.266 / 0.271 and
    shuffled 0.358 / 0.351 / 0.342 (docs/training.md, "Does stage 2 learn?"): at least 1.78× the
    better control, so 1.3× leaves room for platform differences in the random draws."""
    argv = ["--detector", "free", "--optimizer", "sgd", "--lr", "10", "--steps", "150",
            "--size", "64x96", "--eval-every", "150"]
    assert learning_stage2.main(argv) == 0
    final = capsys.readouterr().out.strip().splitlines()[-2]
    numbers = re.match(r"stage2 match_precision: start ([\d.]+) end ([\d.]+) \| zero-reward "
                       r"control ([\d.]+) \| shuffled control ([\d.]+)$", final)
    assert numbers, final
    start, end, zero, shuffled = (float(v) for v in numbers.groups())
    assert end > 1.3 * max(zero, shuffled)
    assert end > 1.3 * start
