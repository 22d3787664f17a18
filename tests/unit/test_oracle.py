"""Oracle descriptors (tools/oracle.py): equal for corresponding pixels where informative,
unrelated across views where not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.oracle import (FourierEmbedding, length_scale_for, local_map, make_scene_pairs,
                          oracle_descriptors, world_points)
from utils.errors import SCFeatError
from utils.geometry import normalize_coords, sample_features


def test_world_points_project_back_to_their_pixels():
    rng = np.random.default_rng(0)
    K = np.array([[50.0, 0, 23.5], [0, 52.0, 15.5], [0, 0, 1]])
    R, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    t = rng.normal(size=3)
    depth = rng.uniform(2, 9, size=(32, 48)).astype(np.float32)
    points = world_points(depth, K, R, t)
    cam = points @ R.T + t
    assert np.allclose(cam[..., 2], depth, rtol=1e-6)
    pix = cam @ K.T
    ys, xs = np.mgrid[:32, :48]
    assert np.allclose(pix[..., 0] / pix[..., 2], xs, atol=1e-6)
    assert np.allclose(pix[..., 1] / pix[..., 2], ys, atol=1e-6)


def test_same_point_same_descriptor_only_where_informative():
    embedding = FourierEmbedding(128, 0.2, seed=3)
    rng = np.random.default_rng(1)
    points = rng.uniform(-3, 3, size=(8, 12, 3))
    informative = np.zeros((8, 12), bool)
    informative[:, :6] = True
    surface = np.ones((8, 12), bool)
    surface[:2, 6:] = False  # sky in the top right
    view1 = oracle_descriptors(points, informative, surface, embedding, np.random.default_rng(10))
    view2 = oracle_descriptors(points, informative, surface, embedding, np.random.default_rng(11))
    assert np.allclose(np.linalg.norm(view1, axis=-1), 1, atol=1e-5)
    cosine = (view1 * view2).sum(-1)
    assert np.allclose(cosine[informative], 1, atol=1e-5)
    # uninformative plane and sky: about orthogonal across views (128-D: |cos| ~ 0.09)
    assert np.abs(cosine[~informative]).mean() < 0.2
    # nearby points are similar, far ones are not (the embedding's kernel)
    near = embedding(points + 0.02) * embedding(points)
    far = embedding(points + 2.0) * embedding(points)
    assert near.sum(-1).mean() > 0.95 and np.abs(far.sum(-1)).mean() < 0.2


def test_local_map_is_pooled_and_normalised():
    desc = np.random.default_rng(0).normal(size=(16, 24, 8)).astype(np.float32)
    pooled = local_map(desc)
    assert pooled.shape == (8, 4, 6)
    assert torch.allclose(pooled.norm(dim=0), torch.ones(4, 6), atol=1e-5)
    expected = desc[4:8, 8:12].mean((0, 1))
    assert torch.allclose(pooled[:, 1, 2], torch.from_numpy(expected / np.linalg.norm(expected)),
                          atol=1e-5)
    with pytest.raises(SCFeatError, match="multiple of 4"):
        local_map(desc[:15])


def test_corresponding_pixels_of_rendered_views_match_where_informative():
    """Project every pixel of view 1 into view 2 with the true depth and pose: the local_map
    descriptors sampled at both positions agree on informative covisible pixels only."""
    pairs = make_scene_pairs(1, 3, (48, 64), seed=0, embedding=FourierEmbedding(128, length_scale_for(64), 0))
    pair = pairs[0]
    v1, v2 = pair["view1"], pair["view2"]
    points = world_points(v1.depth, v1.K, v1.R, v1.t)
    cam2 = points @ v2.R.T + v2.t
    pix = cam2 @ v2.K.T
    u, v = pix[..., 0] / pix[..., 2], pix[..., 1] / pix[..., 2]
    inside = (cam2[..., 2] > 0) & (u > 2) & (u < 61) & (v > 2) & (v < 45) & v1.surface
    row = np.clip(np.rint(v), 0, 47).astype(int)
    col = np.clip(np.rint(u), 0, 63).astype(int)
    visible = inside & (np.abs(v2.depth[row, col] - cam2[..., 2]) < 0.02 * cam2[..., 2])
    ys, xs = np.nonzero(visible)
    kp1 = torch.tensor(np.stack([xs, ys], -1), dtype=torch.float32)[None]
    kp2 = torch.tensor(np.stack([u[ys, xs], v[ys, xs]], -1), dtype=torch.float32)[None]
    d1 = sample_features(v1.descriptors[None], normalize_coords(kp1, 48, 64))[0]
    d2 = sample_features(v2.descriptors[None], normalize_coords(kp2, 48, 64))[0]
    cosine = (d1 * d2).sum(-1).numpy()
    informative = v1.informative[ys, xs] & v2.informative[row[ys, xs], col[ys, xs]]
    uninformative = ~v1.informative[ys, xs] & ~v2.informative[row[ys, xs], col[ys, xs]]
    assert informative.sum() > 100 and uninformative.sum() > 20
    assert np.median(cosine[informative]) > 0.9
    assert np.abs(cosine[uninformative]).mean() < 0.3
    # pairs are epipolar-consistent: x2ᵀ·F1·x1 ≈ 0 for the projected pixels
    h1 = torch.cat([kp1[0], torch.ones(len(xs), 1)], 1)
    h2 = torch.cat([kp2[0], torch.ones(len(xs), 1)], 1)
    lines = h1 @ pair["F1"].T
    dist = (lines * h2).sum(-1).abs() / lines[:, :2].norm(dim=-1)
    assert float(dist.max()) < 0.05
