"""Keypoint selection: the original's output on the reference map, and hand-made maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.errors import SCFeatError
from model.keypoints import make_detector
from model.keypoints import (MIN_KEYPOINTS, generate_kpts_single, hard_nms_mask,
                             sample_descriptors, select_keypoints)


def _peak_grid(size: int = 64, spacing: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """A zero map with isolated peaks every `spacing` px (values 0.1 .. 1, all distinct)."""
    score = torch.zeros(size, size)
    positions = np.arange(2, size - 2, spacing)
    values = np.linspace(0.1, 1.0, len(positions) ** 2).reshape(len(positions), -1)
    rng = np.random.default_rng(0)
    values = rng.permutation(values.ravel()).reshape(values.shape)
    for i, y in enumerate(positions):
        for j, x in enumerate(positions):
            score[y, x] = float(values[i, j])
    return score, values.ravel()


@pytest.mark.parametrize("prefix, options", [
    ("kp_thr_abs", {"num_pts": 8192, "nms_radius": 1, "thr": 1.0, "thr_mod": "abs"}),
    ("kp_top200", {"num_pts": 200, "nms_radius": 1, "thr": None}),
])
def test_matches_reference_selection(f2r_reference, prefix, options):
    score = torch.from_numpy(f2r_reference["eval_a/score"])
    desc_map = torch.from_numpy(f2r_reference["eval_a/desc_map"])
    image_hw = tuple(f2r_reference["input/a"].shape[-2:])
    keypoints, scores = generate_kpts_single(score, **options)
    descriptors = sample_descriptors(desc_map, keypoints, image_hw)

    ref_scores = f2r_reference[f"{prefix}/scores"].ravel()
    assert keypoints.shape == (len(ref_scores), 2) and keypoints.dtype == torch.float32
    # the reference is sorted by score, ours by the pixel's own value: compare as sets
    ours = np.concatenate([keypoints.numpy(), scores.numpy()[:, None], descriptors.numpy()], 1)
    theirs = np.concatenate([f2r_reference[f"{prefix}/keypoints"], ref_scores[:, None],
                             f2r_reference[f"{prefix}/descriptors"]], 1)
    ours = ours[np.lexsort(np.round(ours[:, :2], 2).T)]
    theirs = theirs[np.lexsort(np.round(theirs[:, :2], 2).T)]
    np.testing.assert_allclose(ours[:, 2], theirs[:, 2], atol=1e-4)
    np.testing.assert_allclose(ours[:, :2], theirs[:, :2], atol=1e-3)
    np.testing.assert_allclose(ours[:, 3:], theirs[:, 3:], atol=1e-4)


def test_single_peak_subpixel_location_and_score():
    score = torch.zeros(1, 1, 12, 16)
    score[0, 0, 5, 7] = 3.0
    score[0, 0, 5, 8] = 1.0  # pulls x right by 1/4 of a pixel
    score[0, 0, 4, 7] = 2.0  # pulls y up by 2/6 of a pixel
    result = select_keypoints(score, num_pts=1)
    assert result["n_valid"].tolist() == [1]
    assert result["scores"][0, 0].item() == 3.0
    torch.testing.assert_close(result["keypoints_px"][0, :1], torch.tensor([[7 + 1 / 6, 5 - 2 / 6]]))


@pytest.mark.parametrize("distance, radius, expected", [
    (1, 1, [1.0]),          # adjacent: the weaker one is suppressed
    (2, 1, [1.0, 0.9]),     # outside each other's 3×3 window: both survive
    (2, 2, [1.0]),          # radius 2 window reaches the second peak
    (3, 2, [1.0, 0.9]),
])
def test_nms_two_peaks(distance, radius, expected):
    score = 0.01 * torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    score[0, 0, 10, 6] = 1.0
    score[0, 0, 10, 6 + distance] = 0.9
    result = select_keypoints(score, num_pts=None, nms_radius=radius)
    ranked = result["masked"].flatten().sort(descending=True).values
    np.testing.assert_allclose(ranked[:len(expected)].numpy(), expected)
    assert ranked[len(expected)] < 0.01  # the rest: background maxima


def test_without_nms_every_interior_pixel_is_a_candidate():
    score = torch.rand(14, 16) + 0.1
    keypoints, _ = generate_kpts_single(score, num_pts=10_000, use_nms=False)
    assert keypoints.shape[0] == 12 * 14
    small = torch.rand(10, 12) + 0.1  # 80 interior pixels, fewer than the 128 minimum
    keypoints, _ = generate_kpts_single(small, num_pts=10_000, use_nms=False)
    assert keypoints.shape[0] == 8 * 10  # capped at the interior (the original fails)


def test_plateau_keeps_its_raster_first_pixel_and_nothing_at_the_top_left_edge():
    score = torch.full((1, 1, 12, 12), 0.1)
    score[0, 0, 5:7, 5:8] = 2.0   # a 2×3 plateau inside: only (5, 5) survives
    score[0, 0, 1:3, 9] = 3.0     # straddles the first two interior rows: nothing survives
    score[0, 0, 10, 9:11] = 1.5   # on the bottom edge: the raster-first pixel survives
    result = select_keypoints(score, num_pts=None, thr=0.5, thr_mod="abs")
    survivors = torch.nonzero(result["masked"][0] > 0) + 1  # full-map (row, col)
    assert sorted(map(tuple, survivors.tolist())) == [(5, 5), (10, 9)]
    assert result["n_valid"].tolist() == [2]


def test_ranking_uses_the_pixel_value_and_the_score_is_the_3x3_maximum():
    score = torch.full((1, 1, 10, 10), 0.1)
    score[0, 0, 4, 8] = 4.2       # an interior peak ...
    score[0, 0, 4, 9] = 5.5       # ... next to a larger value in the outer ring
    score[0, 0, 6, 3] = 5.0       # a larger interior peak
    result = select_keypoints(score, num_pts=None, thr=1.0, thr_mod="abs")
    assert result["n_valid"].tolist() == [2]
    # ranked 5.0 before 4.2 (own values), but the second returns the ring's 5.5
    assert result["scores"][0, :2].tolist() == [5.0, 5.5]
    assert result["keypoints_px"][0, 1, 0] > 8  # pulled towards the ring


def test_border_values_still_weight_the_neighbourhood():
    """The 3×3 neighbourhood is read from the full map (the fixture's x min 0.77 needs it)."""
    score = torch.zeros(12, 14)
    score[5, 1] = 1.0
    score[5, 0] = 1.0  # a border pixel: not a candidate, but it pulls x to 0.5
    keypoints, scores = generate_kpts_single(score, num_pts=1)
    torch.testing.assert_close(keypoints[:1], torch.tensor([[0.5, 5.0]]))
    assert scores[0].item() == 1.0


@pytest.mark.parametrize("thr, thr_mod", [(0.6, "abs"), (0.5, "max"), (3.0, "mean")])
def test_threshold_modes(thr, thr_mod):
    score, values = _peak_grid()
    interior = score[1:-1, 1:-1]
    reference = {"abs": 1.0, "max": float(interior.max()), "mean": float(interior.mean())}[thr_mod]
    expected = np.sort(values[values > thr * reference])[::-1]
    assert len(expected) >= MIN_KEYPOINTS  # otherwise the tail below applies
    _, scores = generate_kpts_single(score, num_pts=10_000, thr=thr, thr_mod=thr_mod)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("no_threshold", [None, False, 0, 0.0])
def test_falsy_thr_means_no_threshold(no_threshold):
    score, values = _peak_grid()
    _, scores = generate_kpts_single(score, num_pts=300, thr=no_threshold)
    np.testing.assert_allclose(scores.numpy(), np.sort(values)[::-1][:300], rtol=1e-6)


def test_fewer_than_128_candidates_fill_the_tail_with_suppressed_pixels():
    score, values = _peak_grid()
    assert 0 < (values > 0.95).sum() < MIN_KEYPOINTS
    result = select_keypoints(score[None, None], num_pts=300, thr=0.95, thr_mod="abs")
    n_valid = int((values > 0.95).sum())
    assert result["keypoints_px"].shape == (1, MIN_KEYPOINTS, 2)  # raised to 128, not 300
    assert result["n_valid"].tolist() == [n_valid]
    np.testing.assert_allclose(result["scores"][0, :n_valid].numpy(),
                               np.sort(values[values > 0.95])[::-1], rtol=1e-6)
    ranked = result["masked"].flatten().sort(descending=True).values
    assert (ranked[n_valid:] == 0).all()  # the tail ranks with value 0
    _, capped = generate_kpts_single(score, num_pts=200, thr=0.3, thr_mod="abs")
    assert len(capped) == 200 and capped.min() > 0.3


def test_batch_returns_the_poorest_elements_count():
    score, values = _peak_grid()
    rich = score[None, None]
    poor = rich.clone()
    poor[0, 0, 30:] = 0.0  # fewer peaks: the batch gets this element's count
    result = select_keypoints(torch.cat([rich, poor]), num_pts=None, thr=0.05, thr_mod="abs")
    n_poor = int((poor[0, 0, 1:-1, 1:-1] > 0.05).sum())
    assert result["keypoints_px"].shape[1] == n_poor
    assert result["n_valid"].tolist() == [n_poor, n_poor]


def test_sample_descriptors_uses_image_size_and_normalises():
    height, width = 32, 48  # image; the map is 1/4 of it
    xs = torch.arange(width // 4, dtype=torch.float32)
    desc_map = torch.stack([xs.expand(height // 4, -1), torch.ones(height // 4, width // 4)])[None]
    keypoints = torch.tensor([[0.0, 0.0], [23.5, 15.5], [40.0, 8.0]])
    desc = sample_descriptors(desc_map, keypoints, (height, width))
    torch.testing.assert_close(desc.norm(dim=1), torch.ones(3))
    # align_corners=False: map x = (n + 1) * w / 2 - 0.5 with n the image-normalised x
    n = (keypoints[:, 0] - (width - 1) / 2) / ((width - 1) / 2)
    map_x = ((n + 1) * (width // 4) / 2 - 0.5).clamp(min=0)  # x = -0.5 blends 0 with padding 0
    torch.testing.assert_close(desc[:, 0] / desc[:, 1], map_x)


def test_bad_inputs_raise():
    with pytest.raises(SCFeatError, match="thr_mod.*cannot run"):
        generate_kpts_single(torch.rand(8, 8), thr=0.5, thr_mod="median")
    with pytest.raises(SCFeatError, match="softnms.*thr.*cannot run"):
        generate_kpts_single(torch.rand(8, 8), use_nms="softnms", thr=False)
    with pytest.raises(SCFeatError, match="stride.*cannot run"):
        generate_kpts_single(torch.rand(8, 8), stride=2)
    with pytest.raises(SCFeatError, match="use_nms"):
        generate_kpts_single(torch.rand(8, 8), use_nms="gaussian")
    with pytest.raises(SCFeatError, match="nms_radius"):
        generate_kpts_single(torch.rand(8, 8), nms_radius=-1)


def test_tiny_maps_that_the_original_cannot_select_from_still_work():
    """A 3×3 map (interior 1 pixel; the original fails: radius ≥ the interior, N = 128 >
    pixels): the radius shrinks to fit and N is capped, so option probes can run."""
    keypoints, scores = generate_kpts_single(torch.rand(3, 3) + 0.5, nms_radius=2)
    assert keypoints.shape == (1, 2) and scores.shape == (1,)
    score = torch.full((1, 1, 6, 6), 0.1)
    score[0, 0, 4, 4] = 1.0  # the last interior pixel: its mirrored copies come later
    result = select_keypoints(score, nms_radius=4, num_pts=None)
    assert result["keypoints_px"].shape == (1, 16, 2) and result["n_valid"].item() == 1
    assert result["scores"][0, 0].item() == 1.0
    with pytest.raises(SCFeatError, match="score map"):
        generate_kpts_single(torch.rand(2, 1, 8, 8))
    with pytest.raises(SCFeatError, match="smaller than 3"):
        generate_kpts_single(torch.rand(2, 8))
    with pytest.raises(SCFeatError, match="descriptor map"):
        sample_descriptors(torch.rand(8, 8, 8), torch.zeros(1, 2), (32, 32))


def test_descriptors_of_a_bf16_map_are_sampled_at_float32_positions():
    import torch
    from model.keypoints import sample_descriptors

    torch.manual_seed(0)
    desc_map = torch.randn(1, 8, 120, 160)
    keypoints = torch.tensor([[301.0, 257.0], [601.5, 333.25]])  # bf16 would round these
    expected = sample_descriptors(desc_map, keypoints, (480, 640))
    got = sample_descriptors(desc_map.bfloat16(), keypoints, (480, 640))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


ORIGINAL_DEFAULTS = {"num_pts": False, "stable": True, "use_nms": True, "nms_radius": 1,
                     "thr": False, "thr_mod": "mean", "temperature": 1}


def test_options_left_out_take_the_originals_defaults():
    """A detector config without num_pts, thr, thr_mod, temperature selects as the original's
    function with those defaults: every NMS candidate (here more than 8192), no threshold."""
    score = torch.rand(1, 1, 320, 320, generator=torch.Generator().manual_seed(0))
    keypoints, scores = make_detector("generate_kpts_single", {})(score)
    expected, expected_scores = generate_kpts_single(score, **ORIGINAL_DEFAULTS)
    count = int(hard_nms_mask(score[:, 0, 1:-1, 1:-1], 1).sum())
    assert len(keypoints) == count > 8192
    assert torch.equal(keypoints, expected) and torch.equal(scores, expected_scores)
    # a threshold without thr_mod is relative to the mean
    thresholded, _ = make_detector("generate_kpts_single", {"thr": 1.5})(score)
    mean_relative, _ = generate_kpts_single(score, **{**ORIGINAL_DEFAULTS, "thr": 1.5})
    assert torch.equal(thresholded, mean_relative)
    assert len(thresholded) == int((hard_nms_mask(score[:, 0, 1:-1, 1:-1], 1)
                                    & (score[:, 0, 1:-1, 1:-1] > 1.5 * score[:, 0, 1:-1, 1:-1].mean())).sum())


def test_gumbel_temperature_left_out_is_one():
    score = torch.rand(1, 1, 20, 24, generator=torch.Generator().manual_seed(1))

    def draw(select, **options):
        torch.manual_seed(5)  # the Gumbel noise comes from the global generator
        return select(score, stable=False, num_pts=130, **options)[0]

    left_out = draw(make_detector("generate_kpts_single", {"stable": False, "num_pts": 130}))
    assert torch.equal(left_out, draw(generate_kpts_single, temperature=1.0))
    assert not torch.allclose(left_out, draw(generate_kpts_single, temperature=0.1))
