"""Tests of utils/geometry.py: conventions, epipolar helpers, the normalised 8-point solver."""
from __future__ import annotations

import math

import pytest
import torch

from utils.geometry import (denormalize_coords, eight_point_fundamental, epipolar_distance_matrix,
                            epipolar_lines, fundamental_from_pose, normalize_coords,
                            normalize_points_hartley, point_line_distance, relative_pose,
                            sample_features, skew, to_homogeneous)


def rotation(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues: axis-angle ``3`` → rotation ``3×3``."""
    angle = axis_angle.norm()
    k = skew((axis_angle / angle)[None])[0]
    eye = torch.eye(3, dtype=axis_angle.dtype)
    return eye + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def two_view_scene(n_points: int, generator: torch.Generator, dtype=torch.float64) -> dict:
    """Random non-planar points (depths 3..12) seen by two cameras with known K, R, t.

    Returns pixels ``x1, x2`` (``N×2``), ``K1, K2``, ``R, t`` (camera 1 → 2), ``F1`` (maps
    image-1 points to lines in image 2) and ``F2`` (the reverse), both divided by ``[2, 2]``.
    """
    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=dtype)

    K1 = torch.tensor([[500.0, 0, 320], [0, 510, 240], [0, 0, 1]], dtype=dtype)
    K2 = torch.tensor([[450.0, 0, 300], [0, 455, 250], [0, 0, 1]], dtype=dtype)
    R = rotation((rand(3) - 0.5) * 0.3)
    t = torch.tensor([1.0, 0.2, 0.1], dtype=dtype) + (rand(3) - 0.5) * 0.2
    depth = 3 + 9 * rand(n_points)
    rays = torch.cat([(rand(n_points, 2) - 0.5) * 1.0, torch.ones(n_points, 1, dtype=dtype)], 1)
    cam1 = rays * depth[:, None]
    cam2 = cam1 @ R.T + t
    proj1, proj2 = cam1 @ K1.T, cam2 @ K2.T
    x1, x2 = proj1[:, :2] / proj1[:, 2:], proj2[:, :2] / proj2[:, 2:]
    F1 = fundamental_from_pose(K1[None], K2[None], R[None], t[None])[0]
    F2 = fundamental_from_pose(K2[None], K1[None], R.T[None], (-R.T @ t)[None])[0]
    return {"x1": x1, "x2": x2, "K1": K1, "K2": K2, "R": R, "t": t, "F1": F1, "F2": F2}


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# --------------------------------------------------------------------------- coordinates

def test_normalize_denormalize_round_trip_and_corners(generator):
    height, width = 48, 80
    pixels = torch.rand(2, 7, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])
    assert torch.allclose(denormalize_coords(normalize_coords(pixels, height, width),
                                             height, width), pixels, atol=1e-5)
    corners = torch.tensor([[0.0, 0.0], [width - 1.0, height - 1.0]])
    assert torch.allclose(normalize_coords(corners, height, width),
                          torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))


# --------------------------------------------------------------------------- lines, distances

def test_epipolar_lines_is_f_times_homogeneous_point(generator):
    fmat = torch.randn(2, 3, 3, generator=generator)
    points = torch.randn(2, 5, 2, generator=generator)
    expected = torch.einsum("bij,bnj->bni", fmat, to_homogeneous(points))
    assert torch.allclose(epipolar_lines(fmat, points), expected, atol=1e-6)


def test_point_line_distance_regular_and_degenerate_line():
    # the line y = 2 (0·x + 1·y − 2 = 0), scaled by 3: distance of (5, 7) is 5
    lines = torch.tensor([[[0.0, 3.0, -6.0], [0.0, 0.0, 0.0]]])
    points = torch.tensor([[[5.0, 7.0], [1.0, 1.0]]])
    dist = point_line_distance(lines, points)
    assert dist[0, 0].item() == pytest.approx(5.0)
    assert torch.isfinite(dist).all() and dist[0, 1].item() == 0.0


def test_epipolar_distance_matrix_matches_per_pair_function(generator):
    fmat = torch.randn(2, 3, 3, generator=generator)
    points1 = torch.randn(2, 4, 2, generator=generator) * 10
    points2 = torch.randn(2, 6, 2, generator=generator) * 10
    matrix = epipolar_distance_matrix(fmat, points1, points2)
    assert matrix.shape == (2, 4, 6)
    lines = epipolar_lines(fmat, points1)  # B×N×3
    for j in range(6):
        per_pair = point_line_distance(lines, points2[:, j:j + 1].expand(-1, 4, -1))
        assert torch.allclose(matrix[:, :, j], per_pair, rtol=1e-5, atol=1e-5)


def test_skew_times_vector_is_cross_product(generator):
    t, v = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    assert torch.allclose((skew(t) @ v[..., None])[..., 0], torch.linalg.cross(t, v), atol=1e-6)


# --------------------------------------------------------------------------- fundamental matrix

def test_fundamental_from_pose_satisfies_epipolar_constraint(generator):
    scene = two_view_scene(30, generator)
    residual = (to_homogeneous(scene["x2"]) @ scene["F1"] * to_homogeneous(scene["x1"])).sum(-1)
    lines_in_2 = epipolar_lines(scene["F1"][None], scene["x1"][None])
    assert residual.abs().max() < 1e-9
    assert point_line_distance(lines_in_2, scene["x2"][None]).max() < 1e-8
    assert scene["F1"][2, 2] == 1.0
    # the reverse direction (from the inverse pose) is the transpose
    assert torch.allclose(scene["F2"], scene["F1"].T, rtol=1e-9, atol=1e-12)


def test_relative_pose_maps_camera1_points_to_camera2(generator):
    scene = two_view_scene(5, generator)
    pose1 = torch.eye(4, dtype=torch.float64)
    pose1[:3, :3] = rotation(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    pose1[:3, 3] = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64)
    rel = torch.eye(4, dtype=torch.float64)
    rel[:3, :3], rel[:3, 3] = scene["R"], scene["t"]
    pose2 = rel @ pose1
    assert torch.allclose(relative_pose(pose1[None], pose2[None])[0], rel, atol=1e-12)


# --------------------------------------------------------------------------- sampling

def test_sample_features_at_pixel_centres(generator):
    height, width = 5, 7
    fmap = torch.randn(2, 3, height, width, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pixels = torch.stack([xs, ys], -1).reshape(1, -1, 2).float().expand(2, -1, -1)
    # pixel centres under grid_sample's align_corners=False: (2p + 1) / size − 1
    size = torch.tensor([width, height], dtype=torch.float32)
    centres_n = (2 * pixels + 1) / size - 1
    samples = sample_features(fmap, centres_n, normalize=False)
    assert samples.shape == (2, height * width, 3)
    assert torch.allclose(samples, fmap.flatten(2).transpose(1, 2), atol=1e-6)
    unit = sample_features(fmap, centres_n)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(2, height * width), atol=1e-6)
    # the project's normalisation maps the centre pixel of an odd-sized map to 0 → that pixel
    centre = normalize_coords(torch.tensor([[[3.0, 2.0]]]), height, width)
    assert torch.allclose(sample_features(fmap[:1], centre, normalize=False)[0, 0],
                          fmap[0, :, 2, 3], atol=1e-6)


# --------------------------------------------------------------------------- 8-point

def test_hartley_normalisation_centroid_and_mean_distance(generator):
    points = torch.rand(3, 2, 10, 2, generator=generator, dtype=torch.float64) * 600
    points_n, transform = normalize_points_hartley(points)
    assert torch.allclose(points_n.mean(-2), torch.zeros(3, 2, 2, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(points_n.norm(dim=-1).mean(-1),
                          torch.full((3, 2), math.sqrt(2), dtype=torch.float64))
    mapped = to_homogeneous(points) @ transform.transpose(-1, -2)
    assert torch.allclose(mapped[..., :2], points_n) and (mapped[..., 2] == 1).all()
    # coinciding points: finite (scale 1), no division by zero
    same_n, same_t = normalize_points_hartley(torch.full((1, 8, 2), 5.0))
    assert torch.isfinite(same_n).all() and torch.isfinite(same_t).all()


def test_eight_point_recovers_f2_batched(generator):
    scenes = [[two_view_scene(8, generator) for _ in range(3)] for _ in range(2)]
    x1 = torch.stack([torch.stack([s["x1"] for s in row]) for row in scenes])  # 2×3×8×2
    x2 = torch.stack([torch.stack([s["x2"] for s in row]) for row in scenes])
    fmat2 = torch.stack([torch.stack([s["F2"] for s in row]) for row in scenes])
    estimate = eight_point_fundamental(x1, x2)
    assert estimate.shape == (2, 3, 3, 3)
    estimate = estimate / estimate[..., 2:3, 2:3]
    assert (estimate - fmat2).abs().max() < 1e-6
    assert ((estimate - fmat2).abs().max() / fmat2.abs().max()) < 1e-8
    # the scene's points lie on the estimated lines in image 1 (x1ᵀ·F·x2 = 0 convention)
    scene = scenes[0][0]
    lines_in_1 = epipolar_lines(estimate[0, 0][None], scene["x2"][None])
    assert point_line_distance(lines_in_1, scene["x1"][None]).max() < 1e-6


def test_eight_point_least_squares_and_rank_two(generator):
    scene = two_view_scene(40, generator)
    estimate = eight_point_fundamental(scene["x1"], scene["x2"])  # N > 8 works too
    estimate = estimate / estimate[2, 2]
    assert torch.allclose(estimate, scene["F2"], rtol=1e-6, atol=1e-9)
    # unrelated random correspondences: the raw null vector is full rank, the estimate is not
    noise1 = torch.rand(5, 8, 2, generator=generator, dtype=torch.float64) * 640
    noise2 = torch.rand(5, 8, 2, generator=generator, dtype=torch.float64) * 640
    sing = torch.linalg.svdvals(eight_point_fundamental(noise1, noise2))
    assert (sing[:, 2] / sing[:, 0] < 1e-12).all()
    assert (sing[:, 1] / sing[:, 0] > 1e-6).all()
