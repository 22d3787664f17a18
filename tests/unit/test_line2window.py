"""Stage-1 line-to-window loss: geometry helpers, sampling, config, edge cases.

Parity with the original's outputs: ``test_line2window_parity.py``; the float32 spread:
``test_line2window_spread.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses.line2window import (EpipolarLoss_Line2Window, Preprocess_Line2Window,
                                inverse_std_weights, temperature_at)
from losses.line_search import line_border_intersections, line_search_centres, sample_along_lines
from losses.sampled_correlation import bilinear_taps, padded_table, sampled_correlation
from losses.window import window_correspondence, window_offsets
from utils.errors import SCFeatError
from utils.geometry import point_line_distance, skew

LOSS_CONF = {"grid_cost_thr": 0.5, "win_cost_thr": 0.1, "use_std_as_weight": True,
             "weight_grid": 0.0, "weight_window": 1.0}


def no_jitter(queries):
    """``U = 0.5`` for every query: the jitter ``0.707·ws·(2U − 1)`` is zero."""
    return tuple(torch.full_like(query, 0.5) for query in queries)


def run(map1, map2, fmat1, fmat2, queries, image_hw, pre_conf=None, loss_conf=None, epoch=1,
        image_hw2=None):
    """Preprocess (no jitter) + loss on given local maps; returns (processed, loss, components).
    ``image_hw2``: image 2's size when it differs from image 1's ``image_hw``."""
    batch = {"im1": torch.zeros(map1.shape[0], 3, *image_hw),
             "im2": torch.zeros(map2.shape[0], 3, *(image_hw2 or image_hw)), "F1": fmat1, "F2": fmat2}
    outputs1, outputs2 = {"local_map": map1}, {"local_map": map2}
    processed = Preprocess_Line2Window(pre_conf or {})(
        batch, outputs1, outputs2, epoch, queries=queries, jitter_uniform=no_jitter(queries))
    loss, components = EpipolarLoss_Line2Window({**LOSS_CONF, **(loss_conf or {})})(
        batch, outputs1, outputs2, processed, epoch)
    return processed, loss, components


def synthetic_pair(batch=2, channels=8, feat_hw=(24, 32), image_hw=(96, 128), seed=0):
    """Random local maps, a plausible F pair (sideways motion) and random queries."""
    gen = torch.Generator().manual_seed(seed)
    map1 = torch.randn(batch, channels, *feat_hw, generator=gen)
    map2 = torch.randn(batch, channels, *feat_hw, generator=gen)
    height, width = image_hw
    intr = torch.tensor([[width * 0.9, 0, width / 2], [0, width * 0.9, height / 2], [0, 0, 1.0]])
    angle = torch.tensor(0.15)
    rot = torch.tensor([[angle.cos(), 0, angle.sin()], [0, 1, 0], [-angle.sin(), 0, angle.cos()]])
    trans = torch.tensor([0.6, 0.1, 0.1])
    kinv = torch.linalg.inv(intr)
    fmat1 = kinv.T @ skew(trans[None])[0] @ rot @ kinv
    fmat1 = (fmat1 / fmat1[2, 2]).expand(batch, 3, 3).clone()
    fmat2 = fmat1.transpose(1, 2).clone()
    queries = tuple(torch.rand(batch, 10, 2, generator=gen) * 1.8 - 0.9 for _ in range(2))
    return map1, map2, fmat1, fmat2, queries


# --------------------------------------------------------------------------- geometry helpers

def test_line_border_intersections():
    height, width = 30, 40
    lines = torch.tensor([[[0.0, 1.0, -10.0],       # y = 10, through the image
                           [0.0, 1.0, 5.0],         # y = -5, misses it
                           [29.0, -39.0, 0.0],      # diagonal through two corners
                           [1.0, 1.0, 0.0],         # touches the corner (0, 0) only
                           [1.0, -2.0, 5.0],        # oblique, left to top-right part
                           [0.0, 0.0, 0.0]]])       # the epipole: no line at all
    ends, valid = line_border_intersections(lines, height, width)
    assert valid.tolist() == [[True, False, False, True, True, False]]
    torch.testing.assert_close(ends[0, 0], torch.tensor([[0.0, 10.0], [39.0, 10.0]]))
    torch.testing.assert_close(ends[0, 3], torch.zeros(2, 2))
    assert torch.isfinite(ends).all()
    assert (ends[~valid] == 0).all()
    oblique = ends[0, 4]  # x - 2y + 5 = 0: (0, 2.5) and (39, 22)
    torch.testing.assert_close(oblique, torch.tensor([[0.0, 2.5], [39.0, 22.0]]))
    points = sample_along_lines(ends, 7)
    assert points.shape == (1, 6, 7, 2)
    torch.testing.assert_close(points[0, 4, 0], oblique[0])
    torch.testing.assert_close(points[0, 4, -1], oblique[1])
    torch.testing.assert_close(points[0, 4, 3], oblique.mean(0))
    on_line = point_line_distance(lines[:, 4:5].expand(1, 7, 3), points[:, 4])
    assert on_line.abs().max() < 1e-5


def test_temperature_follows_epoch_schedule():
    assert [temperature_at(e, 50, 60) for e in (1, 4, 10, 25)] == [51.0, 54.0, 60.0, 60.0]
    map1, map2, fmat1, fmat2, queries = synthetic_pair()
    late, _, _ = run(map1, map2, fmat1, fmat2, queries, (96, 128),
                     {"temperature_base": 50, "temperature_max": 60}, epoch=4)
    fixed, _, _ = run(map1, map2, fmat1, fmat2, queries, (96, 128),
                      {"temperature_base": 54, "temperature_max": 54})
    early, _, _ = run(map1, map2, fmat1, fmat2, queries, (96, 128),
                      {"temperature_base": 50, "temperature_max": 60}, epoch=1)
    assert late["temperature"] == 54.0
    for key in ("feat1g_std", "feat1w_std", "feat2w_corloc"):
        torch.testing.assert_close(late[key], fixed[key])
    assert not torch.allclose(late["feat1g_std"], early["feat1g_std"])


# --------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_bilinear_taps_match_grid_sample(padding_mode):
    gen = torch.Generator().manual_seed(1)
    feature_map = torch.randn(2, 5, 6, 9, generator=gen)
    coords = torch.rand(2, 4, 30, 2, generator=gen) * 2.8 - 1.4  # many outside the map
    coords[0, 0, :4] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1 + 1 / 9, 0.0], [0.0, -1 - 1 / 6]])
    rows, weights = bilinear_taps(coords, 6, 9, padding_mode)
    table = padded_table(feature_map)
    sampled = (table[rows] * weights.unsqueeze(-1)).sum(-2)
    expected = F.grid_sample(F.normalize(feature_map, dim=1), coords, align_corners=False,
                             padding_mode=padding_mode).permute(0, 2, 3, 1)
    torch.testing.assert_close(sampled, expected, atol=1e-6, rtol=1e-5)


def test_sampled_correlation_values_and_gradients():
    gen = torch.Generator().manual_seed(2)
    desc = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    cols = torch.tensor([[0, 3, 3], [6, 1, 0], [2, 2, 2], [5, 4, 6], [1, 0, 2]])  # repeats
    expected = (table[cols] * desc.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(sampled_correlation(desc, table, cols), expected)
    assert torch.autograd.gradcheck(lambda d, t: sampled_correlation(d, t, cols), (desc, table),
                                    fast_mode=True)
    many = torch.randint(0, 7, (5, 9), generator=gen)  # more entries per row than table rows
    torch.testing.assert_close(sampled_correlation(desc, table, many),
                               (table[many] * desc.unsqueeze(1)).sum(-1))


def dense_window(desc, scaled_map, centres, offsets):
    """The window step written plainly with ``grid_sample``: location, std."""
    coords = centres.unsqueeze(2) + offsets
    samples = F.grid_sample(scaled_map, coords, align_corners=False)  # B×C×N×K
    prob = torch.softmax(torch.einsum("bnc,bcnk->bnk", desc, samples), -1)
    location = (prob.unsqueeze(-1) * coords).sum(2)
    var = (prob.unsqueeze(-1) * (coords - location.unsqueeze(2)).square()).sum(2)
    return location, var.clamp(min=1e-10).sqrt().sum(-1)


@pytest.mark.parametrize("window_size", [0.1, 0.13, 0.25])
def test_window_matches_dense_grid_sample(window_size):
    gen = torch.Generator().manual_seed(4)
    feature_map = torch.randn(2, 6, 24, 32, generator=gen)
    desc = F.normalize(torch.randn(2, 9, 6, generator=gen), dim=-1)
    centres = torch.rand(2, 9, 2, generator=gen) * 2.3 - 1.15  # some windows stick out
    centres[0, :3] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.999, -0.999]])
    offsets = window_offsets(window_size, 24, 32)
    assert offsets.shape == (int(window_size * 24) * int(window_size * 32), 2)
    assert offsets.abs().max() == pytest.approx(window_size)
    map_a = feature_map.clone().requires_grad_(True)
    desc_a = desc.clone().requires_grad_(True)
    location, std = window_correspondence(desc_a, padded_table(map_a, 20.0), (24, 32), centres,
                                          offsets, window_size)
    map_b = feature_map.clone().requires_grad_(True)
    desc_b = desc.clone().requires_grad_(True)
    expected_location, expected_std = dense_window(desc_b, 20.0 * F.normalize(map_b, dim=1),
                                                   centres, offsets)
    torch.testing.assert_close(location, expected_location, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std, expected_std, atol=1e-5, rtol=1e-4)
    direction = torch.randn(2, 9, 2, generator=gen)
    (location * direction).sum().backward()
    (expected_location * direction).sum().backward()
    torch.testing.assert_close(map_a.grad, map_b.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(desc_a.grad, desc_b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_nn", [True, False])
def test_line_search_matches_dense_grid_sample(use_nn):
    gen = torch.Generator().manual_seed(5)
    feature_map = torch.randn(2, 6, 12, 16, generator=gen)
    desc = F.normalize(torch.randn(2, 5, 6, generator=gen), dim=-1)
    ends = torch.rand(2, 5, 2, 2, generator=gen) * 2.2 - 1.1  # normalised, some off the map
    points = sample_along_lines(ends, 40)
    centres = line_search_centres(desc, padded_table(feature_map, 10.0), (12, 16), points, use_nn)
    samples = F.grid_sample(10.0 * F.normalize(feature_map, dim=1), points,
                            align_corners=False, padding_mode="border")
    logits = torch.einsum("bnc,bcnl->bnl", desc, samples)
    if use_nn:
        expected = torch.gather(points, 2, logits.argmax(-1)[..., None, None].expand(2, 5, 1, 2))
        torch.testing.assert_close(centres, expected.squeeze(2))
    else:
        expected = (torch.softmax(logits, -1).unsqueeze(-1) * points).sum(2)
        torch.testing.assert_close(centres, expected, atol=1e-5, rtol=1e-5)
        # a convex combination of points on a line stays on it
        direction = ends[..., 1, :] - ends[..., 0, :]
        offset = centres - ends[..., 0, :]
        cross = direction[..., 0] * offset[..., 1] - direction[..., 1] * offset[..., 0]
        assert cross.abs().max() < 1e-5


def test_line_search_nearest_sums_exact_ties():
    """The original's nearest sample is the sum of the samples of largest probability: on a
    constant map every sample ties, so the centre is the sum of all of them (far outside the
    image, hence invalid), while the mean is their average."""
    desc = F.normalize(torch.ones(1, 2, 3), dim=-1)
    table = padded_table(torch.ones(1, 3, 8, 8), 60.0)
    # samples on cell centres: every bilinear weight is 0 or 1, so the logits tie exactly
    ends = torch.tensor([[[[-0.875, -0.875], [0.125, 0.125]], [[0.125, -0.875], [0.125, 0.125]]]])
    points = sample_along_lines(ends, 5)
    nearest = line_search_centres(desc, table, (8, 8), points, use_nn=True)
    torch.testing.assert_close(nearest, points.sum(2))
    assert (nearest.abs() > 1).any(-1).all()
    torch.testing.assert_close(line_search_centres(desc, table, (8, 8), points, use_nn=False),
                               points.mean(2))
    # One sample clearly best: exactly that sample (no tie).
    feature_map = -torch.ones(1, 3, 8, 8)
    feature_map[..., 2, 2] = 1.0
    single = torch.tensor([[[[-0.375, -0.375], [0.9, 0.9]]]])  # through cell (2, 2)'s centre
    points = sample_along_lines(single, 11)
    centre = line_search_centres(desc[:, :1], padded_table(feature_map, 60.0), (8, 8), points,
                                 use_nn=True)
    torch.testing.assert_close(centre, points[:, :, 0])


# --------------------------------------------------------------------------- classes

def test_directions_mirror_each_other():
    map1, map2, fmat1, fmat2, (query1, query2) = synthetic_pair()
    forward, loss_a, comp_a = run(map1, map2, fmat1, fmat2, (query1, query2), (96, 128))
    swapped, loss_b, comp_b = run(map2, map1, fmat2, fmat1, (query2, query1), (96, 128))
    for name in ("g_corloc", "g_std", "w_corloc", "w_std"):
        torch.testing.assert_close(forward[f"feat1{name}"], swapped[f"feat2{name}"])
        torch.testing.assert_close(forward[f"feat2{name}"], swapped[f"feat1{name}"])
    assert torch.equal(forward["valid_epi1"], swapped["valid_epi2"])
    assert torch.equal(forward["coord1"], swapped["coord2"])
    for name in ("g", "w"):
        torch.testing.assert_close(comp_a[f"loss_{name}1"], comp_b[f"loss_{name}2"])
    torch.testing.assert_close(loss_a, loss_b)


def two_size_pair(seed=0):
    """Image 1 96×128, image 2 64×96 (a zoomed-out view: F from each image's own intrinsics),
    float64 local maps of each size, 10 and 12 queries."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    map1 = torch.randn(2, 8, 24, 32, generator=gen, dtype=dtype)
    map2 = torch.randn(2, 8, 16, 24, generator=gen, dtype=dtype)

    def intrinsics(height, width):
        return torch.tensor([[width * 0.9, 0, width / 2], [0, width * 0.9, height / 2],
                             [0, 0, 1.0]], dtype=dtype)

    angle = torch.tensor(0.15, dtype=dtype)
    rot = torch.tensor([[angle.cos(), 0, angle.sin()], [0, 1, 0], [-angle.sin(), 0, angle.cos()]],
                       dtype=dtype)
    trans = torch.tensor([0.6, 0.1, 0.1], dtype=dtype)
    fmat1 = (torch.linalg.inv(intrinsics(64, 96)).T @ skew(trans[None])[0] @ rot
             @ torch.linalg.inv(intrinsics(96, 128)))
    fmat1 = (fmat1 / fmat1[2, 2]).expand(2, 3, 3).clone()
    fmat2 = fmat1.transpose(1, 2) / fmat1[:, 2:, 2:]
    queries = (torch.rand(2, 10, 2, generator=gen, dtype=dtype) * 1.8 - 0.9,
               torch.rand(2, 12, 2, generator=gen, dtype=dtype) * 1.8 - 0.9)
    return map1, map2, fmat1, fmat2, queries


def test_each_image_uses_its_own_size():
    """Images of different sizes: image 2's queries, lines and correspondences are in image 2's
    pixels (its own H, W), and swapping the images swaps every output."""
    map1, map2, fmat1, fmat2, (query1, query2) = two_size_pair()
    hw1, hw2 = (96, 128), (64, 96)
    forward, loss_a, comp_a = run(map1, map2, fmat1, fmat2, (query1, query2), hw1,
                                  image_hw2=hw2)
    swapped, loss_b, comp_b = run(map2, map1, fmat2, fmat1, (query2, query1), hw2,
                                  image_hw2=hw1)
    for name in ("g_corloc", "g_std", "w_corloc", "w_std", "c_corloc_org"):
        torch.testing.assert_close(forward[f"feat1{name}"], swapped[f"feat2{name}"])
        torch.testing.assert_close(forward[f"feat2{name}"], swapped[f"feat1{name}"])
    for first, second in (("1", "2"), ("2", "1")):
        assert torch.equal(forward[f"valid_epi{first}"], swapped[f"valid_epi{second}"])
        torch.testing.assert_close(forward[f"coord{first}"], swapped[f"coord{second}"])
    for name in ("g", "w"):
        torch.testing.assert_close(comp_a[f"loss_{name}1"], comp_b[f"loss_{name}2"])
        torch.testing.assert_close(comp_a[f"percent_{name}"], comp_b[f"percent_{name}"])
    torch.testing.assert_close(loss_a, loss_b)

    # Computed independently: pixels x = (q + 1)·(W − 1)/2 with each image's W, H; the global
    # correspondence of an image-1 query is the softmax-weighted mean of image 2's query pixels.
    pixels2 = (query2 + 1) * torch.tensor([95 / 2, 63 / 2], dtype=torch.float64)
    torch.testing.assert_close(forward["coord2"], pixels2)
    desc1 = F.normalize(F.grid_sample(map1, query1[:, :, None], align_corners=False)[..., 0], dim=1)
    desc2 = F.normalize(F.grid_sample(map2, query2[:, :, None], align_corners=False)[..., 0], dim=1)
    weights = torch.softmax(60 * desc1.transpose(1, 2) @ desc2, dim=-1)  # B×10×12
    torch.testing.assert_close(forward["feat1g_corloc"], weights @ pixels2)
    centres = forward["feat1c_corloc_org"][forward["valid_epi1"]]  # on lines inside image 2
    assert forward["valid_epi1"].sum() > 10
    assert centres.min() >= -1e-9 and (centres <= torch.tensor([95.0, 63.0]) + 1e-9).all()
    # the thresholds (grid_cost_thr 0.5) use the shorter side of the image each distance is
    # measured in; any other choice of sides keeps another share of the global matches here
    def kept(shorter1: int, shorter2: int) -> float:
        masks = [(point_line_distance(forward[f"epi_line{i}"], forward[f"feat{i}g_corloc"])
                  < 0.5 * shorter) & forward[f"valid_epi{i}"]
                 for i, shorter in (("1", shorter1), ("2", shorter2))]
        return torch.cat([m.flatten() for m in masks]).double().mean().item()

    assert comp_a["percent_g"].item() == pytest.approx(kept(min(hw2), min(hw1)))
    others = {kept(96, 64), kept(64, 64), kept(96, 96)}
    assert all(abs(other - comp_a["percent_g"].item()) > 0.01 for other in others)


def test_inverse_std_weights():
    std = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    mask = torch.tensor([[True, True, False, True]])
    weight = inverse_std_weights(std, mask)
    raw = torch.tensor([1.0, 0.5, 0.25, 1e10])
    raw = raw / raw.mean() * mask[0]
    torch.testing.assert_close(weight[0], raw / (raw.mean() + 1e-8))


def test_only_weighted_terms_carry_gradient():
    map1, map2, fmat1, fmat2, queries = synthetic_pair()
    map1.requires_grad_(True)
    _, loss, comp = run(map1, map2, fmat1, fmat2, queries, (96, 128),
                        loss_conf={"weight_grid": 2.0, "weight_window": 0.0})
    torch.testing.assert_close(loss, 2.0 * (comp["loss_g1"] + comp["loss_g2"]))
    assert not comp["loss_w1"].requires_grad
    loss.backward()
    assert map1.grad.abs().sum() > 0


def test_no_nan_at_epipole_or_with_equal_descriptors():
    map1, map2, fmat1, fmat2, (query1, query2) = synthetic_pair()
    height, width = 96, 128
    query1 = query1.clone()
    query1[:, 0] = 0.0  # image centre, pixel (63.5, 47.5)
    fmat1 = skew(torch.tensor([[63.5, 47.5, 1.0]])).expand(2, 3, 3)  # F1·x̃1 = 0 there
    cases = {"epipole": (map1, map2, fmat1),
             "equal descriptors": (torch.ones_like(map1), torch.ones_like(map2), fmat1),
             "no valid line": (map1, map2, torch.zeros(2, 3, 3))}
    for name, (feat1, feat2, fmat) in cases.items():
        feat1 = feat1.clone().requires_grad_(True)
        feat2 = feat2.clone().requires_grad_(True)
        processed, loss, comp = run(feat1, feat2, fmat, fmat2, (query1, query2), (height, width),
                                    loss_conf={"weight_grid": 1.0})
        loss.backward()
        assert not processed["valid_epi1"][:, 0].any(), name
        assert torch.isfinite(loss), name
        assert all(torch.isfinite(value) for value in comp.values()), name
        assert torch.isfinite(feat1.grad).all() and torch.isfinite(feat2.grad).all(), name
        for key, value in processed.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), (name, key)


# The original's preprocess_train_config (config/train_desc.yaml of the original code).
ORIGINAL_PREPROCESS = {
    "kps_generator": "generate_kpts_regular_grid_random",
    "kps_generator_config": {"grid_size": 16, "keep_spatial": True, "random_select": "random"},
    "window_size": 0.1, "loss_distance": "cos", "use_nn_grid": False, "use_line_search": True,
    "line_search_config": {"line_step": 100, "use_nn": True, "loc_rand": True},
    "temperature_base": 60, "temperature_max": 60}


def test_default_confs_are_the_originals():
    assert Preprocess_Line2Window({}).conf == ORIGINAL_PREPROCESS
    assert Preprocess_Line2Window(ORIGINAL_PREPROCESS).conf == ORIGINAL_PREPROCESS
    assert EpipolarLoss_Line2Window({}).conf == LOSS_CONF
    assert EpipolarLoss_Line2Window.needs_detector is False
    # A partial nested section keeps the other nested defaults.
    conf = Preprocess_Line2Window({"line_search_config": {"use_nn": False}}).conf
    assert conf["line_search_config"] == {"line_step": 100, "use_nn": False, "loc_rand": True}
    assert Preprocess_Line2Window({}).conf["line_search_config"]["use_nn"] is True


@pytest.mark.parametrize("conf, key", [
    ({"window_size": 0}, "preprocess_train_config: key 'window_size' must be greater than 0"),
    ({"window_size": 1.5}, "key 'window_size' must be at most 1"),
    ({"window_size": "small"}, "key 'window_size' must be a number"),
    ({"temperature_max": None}, "key 'temperature_max' must be a number"),
    ({"line_search_config": {"line_step": 1}}, "line_search_config.line_step' must be at least 2"),
    ({"kps_generator_config": {"grid_size": 0}}, "kps_generator_config.grid_size"),
    ({"kps_generator_config": {"grid_size": 16.5}}, "kps_generator_config.grid_size"),
    ({"kps_generator_config": {"keep_spatial": "yes"}}, "kps_generator_config.keep_spatial"),
    ({"loss_distance": "l1"}, "key .loss_distance. must be one of"),
    ({"line_search_config": {"use_nn": 1}}, "line_search_config.use_nn"),
    ({"grid_size": 16}, "key 'grid_size' is not a known key"),
    ({"line_search_config": {"step": 3}}, "key 'line_search_config.step' is not a known key"),
    ({"line_search_config": 100}, "key 'line_search_config' must be a mapping"),
])
def test_bad_preprocess_config(conf, key):
    with pytest.raises(SCFeatError, match=key):
        Preprocess_Line2Window(conf)


@pytest.mark.parametrize("conf, key", [
    ({"use_line_search": False}, "use_line_search"),
    ({"use_nn_grid": True}, "use_nn_grid"),
    ({"line_search_config": {"loc_rand": False}}, "line_search_config.loc_rand"),
    ({"kps_generator_config": {"random_select": "regular"}}, "random_select"),
    ({"kps_generator": "generate_kpts_regular_grid"}, "kps_generator"),
])
def test_options_the_original_cannot_run_are_refused(conf, key):
    with pytest.raises(SCFeatError, match=rf"{key}.*cannot run it either"):
        Preprocess_Line2Window(conf)


def test_bad_loss_config():
    with pytest.raises(SCFeatError, match="EpipolarLoss_Line2Window_config: key 'win_cost_thr'"):
        EpipolarLoss_Line2Window({"win_cost_thr": 0.0})
    with pytest.raises(SCFeatError, match="use_std_as_weight.*cannot run it either"):
        EpipolarLoss_Line2Window({"use_std_as_weight": False})
    with pytest.raises(SCFeatError, match="key 'weight_grid' must be a number"):
        EpipolarLoss_Line2Window({"weight_grid": "1"})
    with pytest.raises(SCFeatError, match="key 'use_std' is not a known key"):
        EpipolarLoss_Line2Window({"use_std": True})


def descend(batch: dict, steps: int, sign: float) -> list[float]:
    """Adam on free local maps (``B×128×H/4×W/4``, random start) under the original's default
    settings (the demo's too), new random queries and jitter every step; ``sign`` −1 climbs
    the loss instead. Returns the losses."""
    preprocess = Preprocess_Line2Window({})
    loss_fn = EpipolarLoss_Line2Window({})
    height, width = batch["im1"].shape[-2:]
    torch.manual_seed(0)
    maps = [torch.nn.Parameter(torch.randn(len(batch["im1"]), 128, height // 4, width // 4))
            for _ in range(2)]
    optimizer = torch.optim.Adam(maps, lr=1e-2)
    losses = []
    for _ in range(steps):
        outputs1, outputs2 = {"local_map": maps[0]}, {"local_map": maps[1]}
        loss, _ = loss_fn(batch, outputs1, outputs2, preprocess(batch, outputs1, outputs2, 1), 1)
        optimizer.zero_grad()
        (sign * loss).backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_the_loss_gradient_teaches_epipolar_descriptors(tmp_path):
    """The learning signal of preprocess + loss on a real synthetic pair (128×160): descending
    the gradient on free descriptor maps lowers the loss by a margin, climbing it raises the
    loss. A sign error, a detached path or wrong coordinates would break one of the two.

    Free maps rather than the network: from random weights the full network's loss moves with
    any change of the weights (even gradient ascent lowers it at first) and its trend over the
    few dozen steps a CI run affords is noise (docs/training.md, "Training from random weights")."""
    from dataloader.megadepth import MegaDepth_SIFT
    from tools.synthetic import make_megadepth

    make_megadepth(tmp_path / "md", scenes=1, images=3, pairs=2, size=(128, 160), seed=1)
    dataset = MegaDepth_SIFT({"data_path": str(tmp_path / "md"), "mode": "val"})
    batch = dataset.collate_fn([dataset[i] for i in range(2)])
    assert len(batch["im1"]) == 2

    def first_and_last(losses: list[float]) -> tuple[float, float]:
        k = len(losses) // 5
        return sum(losses[:k]) / k, sum(losses[-k:]) / k

    first, last = first_and_last(descend(batch, 100, sign=1.0))
    assert last < 0.85 * first, (first, last)
    first_up, last_up = first_and_last(descend(batch, 100, sign=-1.0))
    assert last_up > 1.15 * first_up and last_up > first, (first_up, last_up)


def test_the_declared_components_are_those_reported():
    """``EpipolarLoss_Line2Window.components`` (what ``tb_component`` may name) is what
    forward reports."""
    _, _, components = run(*synthetic_pair(), image_hw=(96, 128))
    assert list(components) == list(EpipolarLoss_Line2Window.components)
