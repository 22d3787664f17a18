"""KeypointLoss against the original's stage-2 loss with pinned draws
(``tests/fixtures/keypoint_loss_reference.npz``; its section in the reference README)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from losses.keypoint import KeypointLoss

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "keypoint_loss_reference.npz"
CASES = ("a1", "a2", "b1", "b2", "b2mix", "t1", "g1", "e1")
NO_FMAT_ERROR = ("a1", "a2", "t1", "e1")
SETTINGS = {"t1": {"temperature_base": 50, "temperature_max": 60},
            "g1": {"cor_detach": False, "match_grad": True},
            "e1": {"loss_distance": "euc"}}
TOLERANCE = 1e-4  # of the largest magnitude (the README's safe bound)


@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def assert_close(actual, expected, name: str, tolerance: float = TOLERANCE) -> None:
    actual = np.asarray(torch.as_tensor(actual).detach().double().numpy())
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, name
    scale = max(np.abs(expected).max(), 1e-12)
    error = np.abs(actual - expected).max() / scale
    assert error <= tolerance, f"{name}: {error:.2e} of the largest magnitude"


def run_case(reference: dict, case: str, **conf) -> tuple[dict, list[torch.Tensor]]:
    """Evaluate the case with its stored draws → (result of ``evaluate``, gradients of the
    loss w.r.t. local_point1, local_point2, local_map1, local_map2)."""
    def given(key):
        return torch.from_numpy(reference[f"{case}/in/{key}"])

    inputs = [given(k).clone().requires_grad_()
              for k in ("local_point1", "local_point2", "local_map1", "local_map2")]
    batch_size = inputs[0].shape[0]
    draws = {"proposals1": given("proposals1").reshape(batch_size, -1),
             "proposals2": given("proposals2").reshape(batch_size, -1),
             "accept1": given("accept1").reshape(batch_size, -1) > 0.5,
             "accept2": given("accept2").reshape(batch_size, -1) > 0.5}
    if f"{case}/in/fixed_ferr" in reference:
        draws["fmat_error"] = given("fixed_ferr")
    module = KeypointLoss({**SETTINGS.get(case, {}), **conf})
    result = module.evaluate({"F1": given("F1"), "F2": given("F2")},
                             {"local_point": inputs[0], "local_map": inputs[2]},
                             {"local_point": inputs[1], "local_map": inputs[3]},
                             int(reference[f"{case}/in/epoch"]), draws)
    grads = torch.autograd.grad(result["loss"], inputs, allow_unused=True)
    return result, list(grads)


def dense_good(result: dict, shape: tuple) -> torch.Tensor:
    good = torch.zeros(shape, dtype=torch.bool)
    good[result["good_index"].unbind(-1)] = True
    return good


@pytest.mark.parametrize("case", CASES)
def test_matches_original(reference, case):
    result, grads = run_case(reference, case)
    out = lambda key: reference[f"{case}/out/{key}"]  # noqa: E731
    good = dense_good(result, out("good").shape)
    assert np.array_equal(good.numpy(), out("good"))
    assert np.array_equal(result["keypoints1"].numpy(), out("coord1"))
    assert np.array_equal(result["keypoints2"].numpy(), out("coord2"))
    for name in ("logp1", "logp2"):
        assert_close(result[name].reshape(out(name).shape), out(name), name)
    assert_close(result["base"] + result["good_bonus"] * good.float(), out("reward"), "reward")
    if np.isnan(out("f")):
        assert result["fmat_error"] is None
    else:
        assert_close(result["fmat_error"], out("f"), "f")
    prob = result["log_match"].exp()
    assert_close(prob, out("dense_p"), "dense_p")
    visible = out("dense_p") > 1e-20
    assert_close(result["log_match"].detach().numpy()[visible], out("dense_logp")[visible],
                 "dense_logp")
    assert_close(result["loss"], reference[f"{case}/loss"], "loss")
    components = result["components"]
    names = [k.split("/")[-1] for k in reference if k.startswith(f"{case}/comp/")]
    assert len(names) == 13
    for name in names:
        assert_close(components[name], reference[f"{case}/comp/{name}"], name)
    assert_close(grads[0], reference[f"{case}/grad_local_point1"], "grad_local_point1")
    assert_close(grads[1], reference[f"{case}/grad_local_point2"], "grad_local_point2")
    if case == "g1":
        assert_close(grads[2], reference["g1/grad_local_map1"], "grad_local_map1")
        assert_close(grads[3], reference["g1/grad_local_map2"], "grad_local_map2")
    else:  # match_grad false: the descriptors are constants
        assert grads[2] is None and grads[3] is None


def test_good_pairs_include_rejected_proposals(reference):
    """b1: the F-error exists because good pairs are counted over all proposals; among the
    accepted ones alone there are fewer (the reason the fixture distinguishes the two)."""
    result, _ = run_case(reference, "b1")
    b, i, j = result["good_index"].unbind(-1)
    accepted = result["accepted1"][b, i] & result["accepted2"][b, j]
    assert result["good_index"].shape[0] == 70 and int(accepted.sum()) < 70
    assert result["components"]["n_good_all"].item() == 70
    assert result["components"]["n_good"].item() == int(accepted.sum())


@pytest.mark.parametrize("case", NO_FMAT_ERROR)
def test_posfeat_reward_equals_the_no_fmat_error_cases(reference, case):
    result, grads = run_case(reference, case, reward="posfeat")
    assert result["fmat_error"] is None
    assert_close(result["loss"], reference[f"{case}/loss"], "loss")
    assert_close(grads[0], reference[f"{case}/grad_local_point1"], "grad_local_point1")
    assert_close(grads[1], reference[f"{case}/grad_local_point2"], "grad_local_point2")
    for name in ("reinforce", "kp_penalty"):
        assert_close(result["components"][name], reference[f"{case}/comp/{name}"], name)


def test_posfeat_reward_never_uses_the_fmat_error(reference):
    """b1 has 70 good pairs: posfeat still gives good_reward / bad_reward and an unscaled
    penalty, i.e. exactly the no-F-error loss on b1's inputs (a1's formula)."""
    fmat, _ = run_case(reference, "b1")
    posfeat, _ = run_case(reference, "b1", reward="posfeat")
    good = dense_good(posfeat, reference["b1/out/good"].shape)
    assert posfeat["fmat_error"] is None and fmat["fmat_error"] is not None
    expected_reward = np.where(reference["b1/out/good"], 1.0, -0.25)
    assert_close(posfeat["base"] + posfeat["good_bonus"] * good.float(), expected_reward,
                 "reward")
    # the penalty of the no-F-error regime: kp_penalty × Σ accepted logp (scale 1)
    logp = sum((posfeat[f"logp{k}"] * posfeat[f"accepted{k}"]).sum() for k in (1, 2))
    assert posfeat["components"]["kp_penalty"].item() == pytest.approx(-0.001 * logp.item(),
                                                                       rel=1e-6)
    # f scales it under fmat: the same sum times f
    assert fmat["components"]["kp_penalty"].item() == pytest.approx(
        -0.001 * fmat["fmat_error"].item() * logp.item(), rel=1e-5)
