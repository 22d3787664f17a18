"""Keypoint selection against the original's (``tests/fixtures/keypoint_selection_reference.npz``;
its section in the reference README gives the rule and the tolerances)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.keypoints import detector_schema
from utils.config import validate
from model.keypoints import generate_kpts_single, select_keypoints

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "keypoint_selection_reference.npz"
CASES = {
    "nms_r1": ("crafted", {"nms_radius": 1, "thr": None, "num_pts": None}),
    "nms_r2": ("crafted", {"nms_radius": 2, "thr": False, "num_pts": None}),
    "nms_r1_abs1": ("crafted", {"nms_radius": 1, "thr": 1.0, "thr_mod": "abs", "num_pts": 8192}),
    "nms_r1_max05": ("crafted", {"nms_radius": 1, "thr": 0.5, "thr_mod": "max", "num_pts": None}),
    "nms_r1_mean15": ("crafted", {"nms_radius": 1, "thr": 1.5, "thr_mod": "mean",
                                  "num_pts": None}),
    "nms_r1_n100": ("crafted", {"nms_radius": 1, "thr": 0, "num_pts": 100}),
    "nonms": ("crafted", {"use_nms": False, "num_pts": None}),
    "nonms_mean15": ("crafted", {"use_nms": False, "thr": 1.5, "thr_mod": "mean",
                                 "num_pts": None}),
    "softnms_r1_mean15": ("crafted", {"use_nms": "softnms", "nms_radius": 1, "thr": 1.5,
                                      "thr_mod": "mean", "num_pts": None}),
    "softnms_r2_abs1": ("crafted", {"use_nms": "softnms", "nms_radius": 2, "thr": 1.0,
                                    "thr_mod": "abs", "num_pts": 130}),
    "real_nms_r1_abs1": ("real", {"nms_radius": 1, "thr": 1.0, "thr_mod": "abs",
                                  "num_pts": 8192}),
    "real_nms_r1_n200": ("real", {"nms_radius": 1, "num_pts": 200}),
    "real_nms_r2": ("real", {"nms_radius": 2, "num_pts": None}),
    "real_nonms_n150": ("real", {"use_nms": False, "num_pts": 150}),
}


@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def as_sorted_rows(keypoints: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rows ``x, y, score`` in a canonical order (equal ranking values have no defined order)."""
    rows = np.concatenate([keypoints, scores[:, None]], axis=1).astype(np.float64)
    return rows[np.lexsort(np.round(rows, 4).T[::-1])]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_original(reference, case):
    name, options = CASES[case]
    check_case(reference, case, select_keypoints(torch.from_numpy(reference[f"map_{name}"]),
                                                 **options))


@pytest.mark.parametrize("options, case", [({}, "nms_r1"), ({"thr": 1.5}, "nms_r1_mean15"),
                                           ({"use_nms": False, "thr": 1.5}, "nonms_mean15")])
def test_a_config_leaving_keys_out_selects_as_the_original(reference, options, case):
    """Options a detector config leaves out (num_pts, thr, thr_mod) take the original
    function's defaults: all candidates, no threshold, a threshold relative to the mean."""
    conf = validate(options, detector_schema("generate_kpts_single"))
    check_case(reference, case, select_keypoints(torch.from_numpy(reference["map_crafted"]),
                                                 **conf))


def check_case(reference: dict, case: str, result: dict) -> None:
    """``result`` of :func:`select_keypoints` equals the fixture's ``case`` (tolerances of the
    reference README)."""
    expected_masked = reference[f"{case}/masked"]
    scale = np.abs(expected_masked).max()
    assert np.abs(result["masked"].numpy() - expected_masked).max() <= 1e-6 * scale
    keypoints, scores = reference[f"{case}/keypoints"], reference[f"{case}/scores"][..., 0]
    n_valid = reference[f"{case}/n_valid"]
    assert result["keypoints"].shape == keypoints.shape  # N exactly
    assert result["n_valid"].tolist() == n_valid.tolist()
    for b, count in enumerate(n_valid):  # the first n_valid entries, as sets
        ours = as_sorted_rows(result["keypoints"][b, :count].numpy(),
                              result["scores"][b, :count].numpy())
        theirs = as_sorted_rows(keypoints[b, :count], scores[b, :count])
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5, err_msg=f"{case}[{b}]")


def test_gumbel_matches_original(reference):
    result = select_keypoints(torch.from_numpy(reference["map_crafted"][:1]), stable=False,
                              nms_radius=1, num_pts=None,
                              temperature=float(reference["gumbel_nms_r1/temperature"]),
                              uniform_noise=torch.from_numpy(reference["gumbel_nms_r1/uniform_noise"]))
    np.testing.assert_allclose(result["keypoints"].numpy(), reference["gumbel_nms_r1/keypoints"],
                               rtol=0, atol=2e-5)
    np.testing.assert_allclose(result["scores"].numpy(), reference["gumbel_nms_r1/scores"][..., 0],
                               rtol=0, atol=2e-5)


def test_gumbel_noise_drawn_from_the_generator_in_blocks(reference, monkeypatch):
    """Without stored noise the uniforms come from ``generator``; drawing them in blocks
    (memory) gives the values of one draw of the whole ``B×N×P`` tensor."""
    import model.keypoints as keypoints_module
    score = torch.from_numpy(reference["map_crafted"][:1])
    uniform = torch.rand(1, 128, 18 * 22, generator=torch.Generator().manual_seed(3))
    expected = select_keypoints(score, stable=False, num_pts=None, uniform_noise=uniform)
    monkeypatch.setattr(keypoints_module, "_GUMBEL_BLOCK", 18 * 22 * 5)  # blocks of 5 draws
    drawn = select_keypoints(score, stable=False, num_pts=None,
                             generator=torch.Generator().manual_seed(3))
    # torch.rand on one generator fills block after block in the same order
    torch.testing.assert_close(drawn["keypoints"], expected["keypoints"])
    torch.testing.assert_close(drawn["scores"], expected["scores"])


def test_generate_kpts_single_is_the_per_image_selection_in_pixels(reference):
    """The per-image wrapper returns all N points (tail included) in pixels."""
    score = torch.from_numpy(reference["map_crafted"][1:2])
    keypoints, scores = generate_kpts_single(score, num_pts=8192, thr=1.0, thr_mod="abs")
    batched = select_keypoints(score, num_pts=8192, thr=1.0, thr_mod="abs")
    height, width = score.shape[-2:]
    torch.testing.assert_close(keypoints, batched["keypoints_px"][0])
    torch.testing.assert_close(scores, batched["scores"][0])
    assert keypoints.shape == (128, 2)
    pixels_n = torch.from_numpy(reference["nms_r1_abs1/keypoints"][1])
    pixels = (pixels_n + 1) * torch.tensor([(width - 1) / 2, (height - 1) / 2])
    count = int(reference["nms_r1_abs1/n_valid"][1])
    ours = as_sorted_rows(keypoints[:count].numpy(), scores[:count].numpy())
    theirs = as_sorted_rows(pixels[:count].numpy(), reference["nms_r1_abs1/scores"][1, :count, 0])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
