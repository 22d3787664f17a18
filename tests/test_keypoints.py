"""Keypoint selection: the original's output on the reference map, and hand-made maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.errors import SCFeatError
from utils.keypoints import MIN_KEYPOINTS, generate_kpts_single, sample_descriptors


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
    order = np.argsort(-ref_scores, kind="stable")
    assert keypoints.shape == (len(ref_scores), 2) and keypoints.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), ref_scores[order], atol=1e-4)
    np.testing.assert_allclose(keypoints.numpy(), f2r_reference[f"{prefix}/keypoints"][order],
                               atol=1e-3)
    np.testing.assert_allclose(descriptors.numpy(), f2r_reference[f"{prefix}/descriptors"][order],
                               atol=1e-4)


def test_single_peak_subpixel_location_and_score():
    score = torch.zeros(1, 1, 12, 16)
    score[0, 0, 5, 7] = 3.0
    score[0, 0, 5, 8] = 1.0  # pulls x right by 1/4 of a pixel
    score[0, 0, 4, 7] = 2.0  # pulls y up by 2/6 of a pixel
    keypoints, scores = generate_kpts_single(score, num_pts=1)
    assert scores.tolist() == [3.0]
    torch.testing.assert_close(keypoints, torch.tensor([[7 + 1 / 6, 5 - 2 / 6]]))


@pytest.mark.parametrize("distance, radius, expected", [
    (1, 1, [1.0]),          # adjacent: the weaker one is suppressed
    (2, 1, [1.0, 0.9]),     # outside each other's 3×3 window: both survive
    (2, 2, [1.0]),          # radius 2 window reaches the second peak
    (3, 2, [1.0, 0.9]),
])
def test_nms_two_peaks(distance, radius, expected):
    score = torch.zeros(20, 20)
    score[10, 6] = 1.0
    score[10, 6 + distance] = 0.9
    _, scores = generate_kpts_single(score, num_pts=1000, nms_radius=radius)
    # background plateau pixels survive too, with score 0 (their 3×3 holds no peak)
    np.testing.assert_allclose(scores[scores > 0].numpy(), expected)


def test_without_nms_every_interior_pixel_is_a_candidate():
    score = torch.rand(10, 12)
    keypoints, _ = generate_kpts_single(score, num_pts=10_000, use_nms=False)
    assert keypoints.shape[0] == 8 * 10


def test_border_pixels_are_dropped_and_ties_keep_raster_order():
    score = torch.ones(6, 9)  # a plateau: every interior pixel is its window's max
    keypoints, scores = generate_kpts_single(score, num_pts=10_000, stable=True)
    assert keypoints.shape[0] == 4 * 7  # (H-2)×(W-2), the one-pixel border never selected
    assert keypoints[:, 0].min() == 1 and keypoints[:, 0].max() == 7
    assert keypoints[:, 1].min() == 1 and keypoints[:, 1].max() == 4
    torch.testing.assert_close(keypoints[:3], torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]))


def test_border_values_still_weight_the_neighbourhood():
    """The 3×3 neighbourhood is read from the full map (the fixture's x min 0.77 needs it)."""
    score = torch.zeros(10, 10)
    score[5, 1] = 1.0
    score[5, 0] = 1.0  # a border pixel: not a candidate, but it pulls x to 0.5
    keypoints, scores = generate_kpts_single(score, num_pts=1)
    torch.testing.assert_close(keypoints, torch.tensor([[0.5, 5.0]]))
    assert scores.item() == 1.0


@pytest.mark.parametrize("thr, thr_mod", [(0.6, "abs"), (0.5, "max"), (3.0, "mean")])
def test_threshold_modes(thr, thr_mod):
    score, values = _peak_grid()
    interior = score[1:-1, 1:-1]
    reference = {"abs": 1.0, "max": float(interior.max()), "mean": float(interior.mean())}[thr_mod]
    expected = np.sort(values[values > thr * reference])[::-1]
    assert len(expected) >= MIN_KEYPOINTS  # otherwise the fallback below applies
    _, scores = generate_kpts_single(score, num_pts=10_000, thr=thr, thr_mod=thr_mod)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)


def test_too_few_above_threshold_keeps_best_nms_survivors():
    score, values = _peak_grid()
    assert (values > 0.95).sum() < MIN_KEYPOINTS
    _, scores = generate_kpts_single(score, num_pts=300, thr=0.95)
    # threshold ignored: the 300 best NMS survivors, most of them below 0.95
    np.testing.assert_allclose(scores.numpy(), np.sort(values)[::-1][:300], rtol=1e-6)
    _, capped = generate_kpts_single(score, num_pts=200, thr=0.3)
    assert len(capped) == 200 and capped.min() > 0.3


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
    with pytest.raises(SCFeatError, match="thr_mod"):
        generate_kpts_single(torch.rand(8, 8), thr=0.5, thr_mod="median")
    with pytest.raises(SCFeatError, match="score map"):
        generate_kpts_single(torch.rand(2, 1, 8, 8))
    with pytest.raises(SCFeatError, match="smaller than 3"):
        generate_kpts_single(torch.rand(2, 8))
    with pytest.raises(SCFeatError, match="descriptor map"):
        sample_descriptors(torch.rand(8, 8, 8), torch.zeros(1, 2), (32, 32))


def test_descriptors_of_a_bf16_map_are_sampled_at_float32_positions():
    import torch
    from utils.keypoints import sample_descriptors

    torch.manual_seed(0)
    desc_map = torch.randn(1, 8, 120, 160)
    keypoints = torch.tensor([[301.0, 257.0], [601.5, 333.25]])  # bf16 would round these
    expected = sample_descriptors(desc_map, keypoints, (480, 640))
    got = sample_descriptors(desc_map.bfloat16(), keypoints, (480, 640))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)
