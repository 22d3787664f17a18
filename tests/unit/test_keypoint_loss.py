"""Tests of losses/keypoint.py: sampling, F-error reward, REINFORCE loss."""
from __future__ import annotations

import math

import pytest
import torch

from losses.keypoint import KeypointLoss, match_log_probabilities
from losses.keypoint_reward import (draw_index_sets, fundamental_error, fundamental_trial_errors,
                                    good_pair_mask, good_pairs, threshold_scales)
from losses.keypoint_sampling import sample_keypoints
from utils.errors import SCFeatError
from utils.geometry import (epipolar_distance_matrix, fundamental_from_pose, normalize_coords,
                            sample_features, skew)


def shifted_stereo(shift: float, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``F1, F2`` (``B×3×3``) of ``y2 = y1 + shift``: ``F1·x̃1 = (0, 1, −y1 − shift)``,
    ``F2 = F1ᵀ``; their ``[2, 2]`` entry is ``−shift``."""
    fmat1 = torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, -1, -shift]])
    return fmat1.expand(batch, 3, 3).clone(), fmat1.T.expand(batch, 3, 3).clone()


def rotation(axis_angle: torch.Tensor) -> torch.Tensor:
    angle = axis_angle.norm()
    k = skew((axis_angle / angle)[None])[0]
    eye = torch.eye(3, dtype=axis_angle.dtype)
    return eye + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def exact_matches(n_points: int, seed: int, identity_motion: bool = False,
                  size: tuple[int, int] = (480, 640)) -> dict:
    """Pixels ``x1, x2`` (``1×N×2``, float32) of random non-planar points and ``F1, F2``
    (``1×3×3``, float32) of an image of ``size`` (H, W). ``identity_motion``: same K, R = I,
    t along x, so ``F[2,2] = 0`` and F is left undivided."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    focal = 0.8 * max(size)
    K = torch.tensor([[focal, 0, size[1] / 2], [0, focal, size[0] / 2], [0, 0, 1]], dtype=dtype)
    if identity_motion:
        R, t = torch.eye(3, dtype=dtype), torch.tensor([1.0, 0, 0], dtype=dtype)
    else:
        R = rotation(torch.tensor([0.05, -0.1, 0.03], dtype=dtype))
        t = torch.tensor([1.0, 0.2, 0.1], dtype=dtype)
    depth = 4 + 8 * torch.rand(n_points, generator=gen, dtype=dtype)
    rays = torch.cat([torch.rand(n_points, 2, generator=gen, dtype=dtype) - 0.5,
                      torch.ones(n_points, 1, dtype=dtype)], 1)
    cam1 = rays * depth[:, None]
    proj1, proj2 = cam1 @ K.T, (cam1 @ R.T + t) @ K.T
    x1, x2 = proj1[:, :2] / proj1[:, 2:], proj2[:, :2] / proj2[:, 2:]
    if identity_motion:
        fmat1 = torch.linalg.inv(K).T @ skew(t[None])[0] @ R @ torch.linalg.inv(K)
        fmat2 = fmat1.T
    else:
        fmat1 = fundamental_from_pose(K[None], K[None], R[None], t[None])[0]
        fmat2 = fmat1.T / fmat1.T[2, 2]
    return {"x1": x1.float()[None], "x2": x2.float()[None], "F1": fmat1.float()[None],
            "F2": fmat2.float()[None]}


def make_outputs(score: torch.Tensor, channels: int = 8, gen: torch.Generator | None = None,
                 constant_desc: bool = False) -> dict:
    batch, _, height, width = score.shape
    if constant_desc:
        local_map = torch.ones(batch, channels, height // 4, width // 4)
    else:
        local_map = torch.randn(batch, channels, height // 4, width // 4, generator=gen)
    return {"local_point": score, "local_map": local_map}


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("conf, key", [
    ({"loss_distance": "l2"}, "loss_distance"),
    ({"reward": "disk"}, "reward"),
    ({"reward_config": {"rescale_thr": "yes"}}, "rescale_thr"),
    ({"reward_config": {"reward_threshold": 2.0}}, "reward_config"),
    ({"grid_size": 0}, "grid_size"),
    ({"fmat_trials": 0}, "fmat_trials"),
])
def test_rejects_unsupported_config(conf, key):
    with pytest.raises(SCFeatError, match=key):
        KeypointLoss(conf)


def test_partial_reward_config_keeps_defaults():
    loss = KeypointLoss({"reward_config": {"reward_thr": 3.0}})
    assert loss.conf["reward_config"] == {"reward_thr": 3.0, "rescale_thr": False}
    assert loss.conf["reward"] == "fmat"
    assert KeypointLoss.needs_detector is True


# --------------------------------------------------------------------------- sampling

def test_sample_keypoints_one_cell_logp_by_hand():
    values = [[0.5, -1.0], [2.0, 0.1]]
    score = torch.tensor(values)[None, None]
    flat = [v for row in values for v in row]
    log_norm = math.log(sum(math.exp(v) for v in flat))
    for seed in range(6):
        torch.manual_seed(seed)
        keypoints, logp, accepted = sample_keypoints(score, grid_size=2)
        assert keypoints.shape == (1, 1, 2) and logp.shape == accepted.shape == (1, 1)
        x, y = (int(v) for v in keypoints[0, 0])
        s = values[y][x]
        p_accept = 1 / (1 + math.exp(-s))
        expected = s - log_norm + math.log(p_accept if accepted[0, 0] else 1 - p_accept)
        assert logp[0, 0].item() == pytest.approx(expected, abs=1e-5)


def test_sample_keypoints_cell_offsets_and_crop():
    # 5×9 map, g = 2: 2×4 cells, the last row and column are not sampled
    score = torch.full((1, 1, 5, 9), -20.0)
    score[0, 0, 3, 7] = 20.0  # the cell at row 1, column 3
    score[0, 0, 0, 1] = 20.0  # the cell at row 0, column 0
    keypoints, _, accepted = sample_keypoints(score, grid_size=2)
    assert keypoints.shape == (1, 8, 2)
    assert keypoints[0, 7].tolist() == [7.0, 3.0] and bool(accepted[0, 7])
    assert keypoints[0, 0].tolist() == [1.0, 0.0] and bool(accepted[0, 0])
    cells = torch.div(keypoints[0], 2, rounding_mode="floor")
    assert cells.tolist() == [[c, r] for r in range(2) for c in range(4)]


def test_sample_keypoints_frequencies():
    torch.manual_seed(0)
    cell = torch.tensor([[1.0, -0.5], [0.0, 2.0]])
    score = cell.repeat(1, 1, 60, 60)  # 3600 identical 2×2 cells
    keypoints, _, accepted = sample_keypoints(score, grid_size=2)
    index = (keypoints[0, :, 1] % 2 * 2 + keypoints[0, :, 0] % 2).long()
    freq = torch.bincount(index, minlength=4).float() / index.numel()
    assert torch.allclose(freq, torch.softmax(cell.flatten(), 0), atol=0.03)
    for k in range(4):
        rate = accepted[0, index == k].float().mean().item()
        expected = torch.sigmoid(cell.flatten()[k]).item()
        sigma = math.sqrt(expected * (1 - expected) / int((index == k).sum()))
        assert abs(rate - expected) < 4 * sigma


# --------------------------------------------------------------------------- index sets

def test_draw_index_sets_distinct_varied_and_seeded():
    counts = torch.tensor([30, 8, 3])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    sets = draw_index_sets(counts, n_trials=100, set_size=8, generator=gen)
    assert sets.shape == (3, 100, 8)
    for b in range(2):
        assert (sets[b] >= 0).all() and (sets[b] < counts[b]).all()
        assert all(len(set(row.tolist())) == 8 for row in sets[b])
    assert len({tuple(sorted(row.tolist())) for row in sets[0]}) > 90  # not one set reused
    assert (sets[1].sort(-1).values == torch.arange(8)).all()
    # roughly uniform: each of the 30 indices in 8/30 of the sets
    freq = torch.bincount(sets[0].flatten(), minlength=30).float() / 100
    assert (freq - 8 / 30).abs().max() < 0.2
    # the generator advances; restoring its state reproduces the draw
    assert not torch.equal(draw_index_sets(counts, 100, 8, gen), sets)
    gen.set_state(state)
    assert torch.equal(draw_index_sets(counts, 100, 8, gen), sets)


def test_loss_generator_state_round_trip():
    loss = KeypointLoss({"fmat_seed": 3})
    state = loss.generator_state()
    first = draw_index_sets(torch.tensor([20]), 10, 8, loss.generator)
    loss.load_generator_state(state)
    assert torch.equal(draw_index_sets(torch.tensor([20]), 10, 8, loss.generator), first)
    other = KeypointLoss({"fmat_seed": 4})
    assert not torch.equal(draw_index_sets(torch.tensor([20]), 10, 8, other.generator), first)


# --------------------------------------------------------------------------- F-error, reward

def test_trial_errors_exact_small_degenerate_inf():
    scene = exact_matches(8, seed=1)
    points1 = torch.stack([scene["x1"][0], torch.full((8, 2), 100.0)])[None]  # 1×2×8×2
    points2 = torch.stack([scene["x2"][0], torch.full((8, 2), 50.0)])[None]
    errors = fundamental_trial_errors(points1, points2, scene["F2"])
    assert errors.shape == (1, 2)
    assert errors[0, 0] < 1e-6 and torch.isinf(errors[0, 1])


def test_reward_exact_matches_uses_fmat_error():
    scene = exact_matches(24, seed=2)
    loss = KeypointLoss()
    reward, good, fmat_error, n_pairs = loss.reward(scene["x1"], scene["x2"], scene["F1"],
                                                    scene["F2"])
    assert good[0].diagonal().all() and int(n_pairs) == 1
    assert fmat_error is not None and 0 <= fmat_error.item() < 1e-3
    assert torch.equal(reward[good], torch.full_like(reward[good], 1 - fmat_error.item()))
    assert torch.equal(reward[~good], torch.full_like(reward[~good], -fmat_error.item()))
    # posfeat: never an F-error, good_reward / bad_reward
    posfeat, good_posfeat, fmat_posfeat, n_posfeat = KeypointLoss({"reward": "posfeat"}).reward(
        scene["x1"], scene["x2"], scene["F1"], scene["F2"])
    assert fmat_posfeat is None and int(n_posfeat) == 0 and torch.equal(good_posfeat, good)
    assert (posfeat[good] == 1.0).all() and (posfeat[~good] == -0.25).all()


def test_reward_fallback_with_fewer_than_eight_good_pairs():
    scene = exact_matches(6, seed=3)
    loss = KeypointLoss()
    reward, good, fmat_error, n_pairs = loss.reward(scene["x1"], scene["x2"], scene["F1"],
                                                    scene["F2"])
    assert fmat_error is None and int(n_pairs) == 0 and good[0].diagonal().all()
    assert (reward[good] == 1.0).all() and (reward[~good] == -0.25).all()
    assert (~good).any()


def test_fmat_error_ignores_all_degenerate_pair():
    # 8 coinciding keypoints: every set is degenerate, the pair contributes no F-error
    keypoints = torch.full((1, 8, 2), 10.0)
    good = torch.ones(1, 8, 8, dtype=torch.bool)
    error, has_error = fundamental_error(keypoints, keypoints, torch.nonzero(good),
                                         torch.eye(3)[None], 20,
                                         torch.Generator().manual_seed(0))
    assert not has_error.any() and error.item() == 0.0


def test_reward_zero_corner_fundamental_matrix_no_nan():
    scene = exact_matches(24, seed=4, identity_motion=True)
    assert scene["F1"][0, 2, 2].abs() < 1e-12
    reward, good, fmat_error, _ = KeypointLoss().reward(scene["x1"], scene["x2"], scene["F1"],
                                                        scene["F2"])
    assert good[0].diagonal().all() and torch.isfinite(reward).all()
    assert fmat_error is None or 0 <= fmat_error.item() <= 1


# --------------------------------------------------------------------------- loss

def one_cell_batch(shift: float) -> tuple[dict, dict, dict]:
    score = torch.full((1, 1, 4, 4), 30.0, requires_grad=True)  # always accepted, uniform
    fmat1, fmat2 = shifted_stereo(shift)
    return {"F1": fmat1, "F2": fmat2}, make_outputs(score), make_outputs(score)


@pytest.mark.parametrize("shift, reward", [(0.0, 1.0), (10.0, -0.25)])
def test_one_cell_loss_by_hand(shift, reward):
    batch, out1, out2 = one_cell_batch(shift)
    conf = {"grid_size": 4, "reward_config": {"reward_thr": 5.0}}  # any y1, y2 in 0..3 good
    loss, comp = KeypointLoss(conf)(batch, out1, out2, {}, epoch=0)
    logp = math.log(1 / 16) + math.log(1 / (1 + math.exp(-30.0)))  # P = 1, log P = 0
    kp_penalty_term = -0.001 * 1.0 * 2 * logp  # kp_penalty · (1 without F-error) · Σ logp
    expected = -reward * 2 * logp - kp_penalty_term
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert comp["n_kps"].item() == 2 and comp["n_good"].item() == (1 if reward > 0 else 0)
    # the original's signs: reinforce = Σ reward·P·(…), kp_penalty positive, loss = −both
    assert comp["reinforce"].item() == pytest.approx(reward * 2 * logp, rel=1e-6)
    assert comp["kp_penalty"].item() == pytest.approx(-0.002 * logp, rel=1e-6)
    assert comp["kp_penalty"].item() > 0
    assert comp["fmat_error"].item() == 0.0
    assert loss.item() == pytest.approx(-comp["reinforce"].item() - comp["kp_penalty"].item())


def naive_loss(loss_module, batch, out1, out2, epoch) -> torch.Tensor:
    """The spec's formula with broadcasting, for comparison with the module."""
    conf = loss_module.conf
    height, width = out1["local_point"].shape[-2:]
    kp1, lp1, acc1 = sample_keypoints(out1["local_point"], conf["grid_size"])
    kp2, lp2, acc2 = sample_keypoints(out2["local_point"], conf["grid_size"])
    d1 = sample_features(out1["local_map"], normalize_coords(kp1, height, width))
    d2 = sample_features(out2["local_map"], normalize_coords(kp2, height, width))
    temperature = min(conf["temperature_base"] + epoch, conf["temperature_max"])
    log_p = match_log_probabilities(d1, d2, temperature).detach()
    reward, _, fmat_error, _ = loss_module.reward(kp1, kp2, batch["F1"], batch["F2"])
    both = (acc1[:, :, None] & acc2[:, None, :]).float()
    terms = reward * log_p.exp() * (log_p + lp1[:, :, None] + lp2[:, None, :]) * both
    scale = 1.0 if fmat_error is None else fmat_error
    penalty = conf["kp_penalty"] * scale * ((lp1 * acc1).sum() + (lp2 * acc2).sum())
    return -terms.sum() - penalty


def test_loss_matches_naive_formula_with_fmat_error():
    gen = torch.Generator().manual_seed(5)
    scene = exact_matches(8, seed=5, size=(32, 32))
    batch = {"F1": scene["F1"].expand(2, 3, 3), "F2": scene["F2"].expand(2, 3, 3)}
    score1 = (torch.randn(2, 1, 32, 32, generator=gen) + 2).requires_grad_()
    score2 = (torch.randn(2, 1, 32, 32, generator=gen) + 2).requires_grad_()
    out1, out2 = make_outputs(score1, gen=gen), make_outputs(score2, gen=gen)
    conf = {"grid_size": 4, "reward_config": {"reward_thr": 4.0}, "temperature_base": 5}
    module, reference = KeypointLoss(conf), KeypointLoss(conf)
    torch.manual_seed(11)
    loss, comp = module(batch, out1, out2, {}, epoch=2)
    grads = torch.autograd.grad(loss, [score1, score2])
    torch.manual_seed(11)
    expected = naive_loss(reference, batch, out1, out2, epoch=2)
    expected_grads = torch.autograd.grad(expected, [score1, score2])
    assert comp["n_fmat_pairs"].item() >= 1 and 0 < comp["fmat_error"].item() <= 1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
        assert grad.abs().sum() > 0
    # good_fraction: the good pairs among all accepted pairs (the same draws again)
    torch.manual_seed(11)
    _, _, accepted1 = sample_keypoints(score1, 4)
    _, _, accepted2 = sample_keypoints(score2, 4)
    accepted_pairs = (accepted1.sum(1) * accepted2.sum(1)).sum().item()
    assert 0 < comp["n_good"].item() < accepted_pairs
    assert comp["good_fraction"].item() == pytest.approx(comp["n_good"].item() / accepted_pairs)


@pytest.mark.parametrize("match_grad", [False, True])
def test_gradients_reach_local_map_only_with_match_grad(match_grad):
    gen = torch.Generator().manual_seed(6)
    score1 = (torch.randn(1, 1, 16, 16, generator=gen) + 3).requires_grad_()
    score2 = (torch.randn(1, 1, 16, 16, generator=gen) + 3).requires_grad_()
    out1, out2 = make_outputs(score1, gen=gen), make_outputs(score2, gen=gen)
    out1["local_map"].requires_grad_()
    out2["local_map"].requires_grad_()
    fmat1, fmat2 = shifted_stereo(0.0)
    torch.manual_seed(0)
    loss, _ = KeypointLoss({"grid_size": 4, "match_grad": match_grad})(
        {"F1": fmat1, "F2": fmat2}, out1, out2, {}, epoch=0)
    loss.backward()
    assert score1.grad.abs().sum() > 0 and score2.grad.abs().sum() > 0
    for out in (out1, out2):
        if match_grad:
            assert out["local_map"].grad is not None and out["local_map"].grad.abs().sum() > 0
        else:
            assert out["local_map"].grad is None


@pytest.mark.parametrize("case", ["equal_descriptors", "zero_corner_f", "few_good"])
def test_loss_finite_in_degenerate_cases(case):
    gen = torch.Generator().manual_seed(7)
    score1 = torch.randn(2, 1, 24, 32, generator=gen).requires_grad_()
    score2 = torch.randn(2, 1, 24, 32, generator=gen).requires_grad_()
    out1 = make_outputs(score1, gen=gen, constant_desc=case == "equal_descriptors")
    out2 = make_outputs(score2, gen=gen, constant_desc=case == "equal_descriptors")
    if case == "zero_corner_f":
        scene = exact_matches(8, seed=8, identity_motion=True)
        fmat1, fmat2 = scene["F1"].expand(2, 3, 3), scene["F2"].expand(2, 3, 3)
        conf = {"grid_size": 4, "reward_config": {"reward_thr": 8.0}}
    else:
        fmat1, fmat2 = shifted_stereo(0.0 if case == "equal_descriptors" else 100.0, batch=2)
        conf = {"grid_size": 4}
    torch.manual_seed(1)
    loss, comp = KeypointLoss(conf)({"F1": fmat1, "F2": fmat2}, out1, out2, {}, epoch=0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(value) for value in comp.values())
    assert torch.isfinite(score1.grad).all() and torch.isfinite(score2.grad).all()
    if case == "few_good":
        assert comp["n_good"].item() == 0 and comp["fmat_error"].item() == 0.0
    if case == "zero_corner_f":
        assert comp["n_good"].item() >= 8


def test_good_pairs_match_dense_epipolar_distances():
    gen = torch.Generator().manual_seed(9)
    scene = exact_matches(8, seed=9, size=(48, 64))
    fmat1, fmat2 = scene["F1"].expand(2, 3, 3), scene["F2"].expand(2, 3, 3)
    keypoints1 = torch.rand(2, 50, 2, generator=gen) * torch.tensor([63.0, 47.0])
    keypoints2 = torch.rand(2, 40, 2, generator=gen) * torch.tensor([63.0, 47.0])
    accepted1 = torch.rand(2, 50, generator=gen) < 0.7
    accepted2 = torch.rand(2, 40, generator=gen) < 0.7
    dist_in_2 = epipolar_distance_matrix(fmat1, keypoints1, keypoints2)
    dist_in_1 = epipolar_distance_matrix(fmat2, keypoints2, keypoints1).transpose(1, 2)
    expected = ((dist_in_2 < 3.0) & (dist_in_1 < 3.0)
                & accepted1[:, :, None] & accepted2[:, None, :])
    mask = good_pair_mask(keypoints1, keypoints2, fmat1, fmat2, 3.0, accepted1, accepted2)
    assert 20 < int(expected.sum()) < expected.numel() // 4  # a meaningful mix
    # rounding may decide differently within 1e-4 px of the threshold
    clear = ((dist_in_2 - 3.0).abs() > 1e-4) & ((dist_in_1 - 3.0).abs() > 1e-4)
    assert torch.equal(mask[clear], expected[clear])


@pytest.mark.parametrize("grid_size, threshold", [(4, 2.0), (8, 2.0), (4, 9.0)])
def test_grid_candidates_find_every_dense_good_pair(grid_size, threshold):
    gen = torch.Generator().manual_seed(grid_size)
    height, width = 45, 62  # not multiples of the grid: a border is cropped
    random_f = torch.randn(3, 3, 3, generator=gen)
    u, sing, vh = torch.linalg.svd(random_f)
    random_f = u @ torch.diag_embed(sing * torch.tensor([1.0, 1.0, 0.0])) @ vh
    horizontal, _ = shifted_stereo(3.0, batch=1)  # lines y = const
    vertical = horizontal[:, [1, 0, 2]][:, :, [1, 0, 2]]  # lines x = const
    scene = exact_matches(8, seed=grid_size, size=(height, width))
    fmat1 = torch.cat([random_f, horizontal, vertical, scene["F1"]])  # 6 pairs
    fmat2 = fmat1.transpose(1, 2)
    keypoints1, _, accepted1 = sample_keypoints(torch.randn(6, 1, height, width, generator=gen),
                                                grid_size)
    keypoints2, _, accepted2 = sample_keypoints(torch.randn(6, 1, height, width, generator=gen),
                                                grid_size)
    grid = (grid_size, height // grid_size, width // grid_size)
    sparse = good_pairs(keypoints1, keypoints2, fmat1, fmat2, threshold, accepted1, accepted2,
                        grid)
    dense = good_pairs(keypoints1, keypoints2, fmat1, fmat2, threshold, accepted1, accepted2)
    dist_in_2 = epipolar_distance_matrix(fmat1, keypoints1, keypoints2)
    dist_in_1 = epipolar_distance_matrix(fmat2, keypoints2, keypoints1).transpose(1, 2)
    clear = ((dist_in_2 - threshold).abs() > 1e-4) & ((dist_in_1 - threshold).abs() > 1e-4)
    as_mask = torch.zeros_like(dist_in_2, dtype=torch.bool)
    as_mask[sparse.unbind(-1)] = True
    dense_mask = torch.zeros_like(as_mask)
    dense_mask[dense.unbind(-1)] = True
    assert int(dense_mask.sum()) > 50 and int(dense_mask.flatten(1).any(1).sum()) >= 4
    assert torch.equal(as_mask[clear], dense_mask[clear])
    if torch.equal(as_mask, dense_mask):
        assert torch.equal(sparse, dense)  # same order, for the same F-error draws


def test_forward_walks_the_grid_when_cheaper_with_the_same_result(monkeypatch):
    import losses.keypoint as keypoint_module
    import losses.keypoint_reward as reward_module
    gen = torch.Generator().manual_seed(10)
    height, width = 140, 152  # 35×38 cells of 4 px: the walk (38·4 cells/line) pays
    scene = exact_matches(8, seed=10, size=(height, width))
    batch = {"F1": scene["F1"], "F2": scene["F2"]}
    score1 = torch.randn(1, 1, height, width, generator=gen).requires_grad_()
    score2 = torch.randn(1, 1, height, width, generator=gen).requires_grad_()
    out1, out2 = make_outputs(score1, gen=gen), make_outputs(score2, gen=gen)
    conf = {"grid_size": 4}
    assert 8 * keypoint_module.grid_walk_size(2.0, 4, 35, 38) < 35 * 38
    walked_calls = []
    original_candidates = reward_module.grid_candidates

    def counting_candidates(*args):
        walked_calls.append(args[2:])
        return original_candidates(*args)

    monkeypatch.setattr(reward_module, "grid_candidates", counting_candidates)
    torch.manual_seed(3)
    loss_walked, comp_walked = KeypointLoss(conf)(batch, out1, out2, {}, epoch=0)
    assert walked_calls == [(4, 35, 38)]
    monkeypatch.setattr(keypoint_module, "grid_walk_size", lambda *args: 10 ** 9)  # dense
    torch.manual_seed(3)
    loss_dense, comp_dense = KeypointLoss(conf)(batch, out1, out2, {}, epoch=0)
    assert len(walked_calls) == 1
    assert comp_walked["n_good"].item() == comp_dense["n_good"].item() > 100
    assert comp_walked["fmat_error"].item() == comp_dense["fmat_error"].item()
    assert loss_walked.item() == pytest.approx(loss_dense.item(), rel=1e-6)


def test_generator_state_travels_with_state_dict():
    loss = KeypointLoss()
    draw_index_sets(torch.tensor([20]), 5, 8, loss.generator)  # advance the stream
    state = loss.state_dict()
    expected = draw_index_sets(torch.tensor([20]), 5, 8, loss.generator)
    restored = KeypointLoss()
    restored.load_state_dict(state)
    assert torch.equal(draw_index_sets(torch.tensor([20]), 5, 8, restored.generator), expected)


# --------------------------------------------------------------------------- rescale_thr

def halved_height() -> tuple[torch.Tensor, torch.Tensor]:
    """``F1, F2`` (``1×3×3``) of ``y1 = 2·y2``: the line of ``x1`` in image 2 is
    ``y = y1/2``, that of ``x2`` in image 1 is ``y = 2·y2``; every distance in image 1 is twice
    the same pair's distance in image 2."""
    fmat1 = torch.tensor([[[0.0, 0, 0], [0, 0, 1], [0, -0.5, 0]]])
    fmat2 = torch.tensor([[[0.0, 0, 0], [0, 0, 1], [0, -2.0, 0]]])
    return fmat1, fmat2


def test_threshold_scales_are_mean_distances_over_the_smaller_mean():
    """m1 = 2·m2 gives scales 2 and 1; the thresholds become 4 px in image 1 and 2 px in image
    2, which makes a pair good that the plain 2 px threshold rejects (3 px in image 1)."""
    fmat1, fmat2 = halved_height()
    keypoints1 = torch.tensor([[[10.0, 4.0], [20.0, 12.0]]])  # lines y = 2 and y = 6 in image 2
    keypoints2 = torch.tensor([[[5.0, 3.5], [30.0, 6.5]]])
    scale1, scale2 = threshold_scales(keypoints1, keypoints2, fmat1, fmat2)
    assert scale1.tolist() == pytest.approx([2.0]) and scale2.tolist() == [1.0]
    rescaled = KeypointLoss({"reward_config": {"reward_thr": 2.0, "rescale_thr": True}})
    plain = KeypointLoss({"reward_config": {"reward_thr": 2.0}})
    # pair (0, 0): 1.5 px in image 2, 3 px in image 1; pair (1, 1): 0.5 and 1 px
    _, good, _, _ = rescaled.reward(keypoints1, keypoints2, fmat1, fmat2, scales=(scale1, scale2))
    assert good[0].nonzero().tolist() == [[0, 0], [1, 1]]
    _, good, _, _ = plain.reward(keypoints1, keypoints2, fmat1, fmat2)
    assert good[0].nonzero().tolist() == [[1, 1]]
    # swapping the images swaps the scales
    swapped = threshold_scales(keypoints2, keypoints1, fmat2, fmat1)
    assert swapped[0].tolist() == [1.0] and swapped[1].tolist() == pytest.approx([2.0])


def test_threshold_scales_are_one_when_a_mean_distance_is_zero():
    fmat1, fmat2 = halved_height()
    keypoints1 = torch.tensor([[[10.0, 4.0], [20.0, 4.0]]])
    keypoints2 = torch.tensor([[[5.0, 2.0], [30.0, 2.0]]])  # every pair exact: both means 0
    scale1, scale2 = threshold_scales(keypoints1, keypoints2, fmat1, fmat2)
    assert scale1.tolist() == scale2.tolist() == [1.0]


def test_the_loss_reports_and_uses_the_scales_only_with_rescale_thr():
    """Through the loss: 8×8 score maps, grid 4 (4 proposals per image, pinned). Image 1's
    scale is 2, image 2's 1; the components carry the original's names: ``scale1`` is image
    2's scale, ``scale2`` image 1's."""
    fmat1, fmat2 = halved_height()
    batch = {"F1": fmat1, "F2": fmat2}
    gen = torch.Generator().manual_seed(0)
    outputs = [make_outputs(torch.randn(1, 1, 8, 8, generator=gen), gen=gen) for _ in range(2)]
    # proposals k → pixel (4c + k mod 4, 4r + k div 4): image 1 y = 0, 0, 4, 4 (lines y = 0, 2)
    # image 2 y = 1, 1, 5, 5: pairs at 1 px (2 px in image 1) or 3 px (6 px) in image 2
    draws = {"proposals1": torch.tensor([[0, 0, 0, 0]]), "proposals2": torch.tensor([[4] * 4]),
             "accept1": torch.ones(1, 4, dtype=torch.bool),
             "accept2": torch.ones(1, 4, dtype=torch.bool)}
    counts = {}
    for rescale in (False, True):
        loss = KeypointLoss({"grid_size": 4, "reward_config": {"reward_thr": 2.0,
                                                               "rescale_thr": rescale}})
        result = loss.evaluate(batch, *outputs, epoch=1, draws=draws)
        comp = result["components"]
        scales = (comp["scale1"].item(), comp["scale2"].item())
        assert scales == pytest.approx((1.0, 2.0)) if rescale else scales == (1.0, 1.0)
        counts[rescale] = result["good_index"].shape[0]
    # 1 px in image 2 and 2 px in image 1: rejected at 2 px, good at 4 px in image 1
    assert counts == {False: 0, True: 8}


def test_the_declared_components_are_those_reported():
    """``KeypointLoss.components`` (what ``tb_component`` may name) is what forward reports."""
    batch, out1, out2 = one_cell_batch(0.0)
    _, comp = KeypointLoss({"grid_size": 4})(batch, out1, out2, {}, epoch=1)
    assert sorted(comp) == sorted(KeypointLoss.components)
