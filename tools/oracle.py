"""Oracle descriptors for the synthetic scenes: descriptors whose quality is known per pixel.

Every pixel with a surface has a 3-D world point (depth, ``K``, ``R``, ``t``). A fixed random
Fourier embedding of that point (unit norm, ``dim`` channels, length scale ``length_scale``
world units) is the same in every view for corresponding pixels: those pixels are the
*informative* part. Two parts are *uninformative* by construction:

* pixels with no surface (sky): an independent random unit vector per pixel and per view;
* two textured planes (those carrying ``UNINFORMATIVE_PHOTOS``: a periodic brick wall and a
  coffee cup, together about half of the pixels): the embedding of the 3-D point shifted by a
  random offset drawn per view, so the descriptors are smooth within a view but unrelated
  across views.

``make_scene_pairs`` renders scenes in memory with :mod:`tools.synthetic`'s renderer and returns
the images, the ground truth, the informative masks and the ``H/4×W/4`` descriptor maps that
stand in for the backbone's ``local_map``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from tools import synthetic
from utils.errors import SCFeatError
from utils.image import NETWORK_STRIDE
from utils.geometry import fundamental_from_pose, relative_pose

UNINFORMATIVE_PHOTOS = ("brick", "coffee")
# five photographs, so every scene uses all of them and always holds the uninformative planes
SCENE_PHOTOS = ("brick", "astronaut", "coffee", "chelsea", "rocket")
DESCRIPTOR_STRIDE = 4  # local_map is H/4×W/4
VIEW_OFFSET_SCALE = 1000.0  # world units: shifts far beyond the length scale


def world_points(depth: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """World points ``H×W×3`` (float64) of the pixels of a depth map ``H×W`` (camera z).

    ``x_c = z·K⁻¹·(u, v, 1)``, ``x_w = Rᵀ·(x_c − t)`` for the world→camera pose ``x_c = R·x_w
    + t``. Pixels without a surface (``z = 0``) get the camera centre; callers mask them.
    """
    height, width = depth.shape
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rays = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(K).T
    points_cam = rays * depth[..., None].astype(np.float64)
    return (points_cam - t) @ R  # Rᵀ·(x_c − t), row-wise


class FourierEmbedding:
    """A fixed random embedding of 3-D points: ``cos(W·x + b)``, unit norm, ``dim`` channels.

    ``W ~ N(0, 1/length_scale²)``, ``b ~ U(0, 2π)`` from ``seed``; the dot product of two
    embeddings approximates ``exp(−‖x − y‖² / (2·length_scale²))``.
    """

    def __init__(self, dim: int = 128, length_scale: float = 0.15, seed: int = 0):
        if dim < 2 or not length_scale > 0:
            raise SCFeatError(f"oracle embedding: expected dim ≥ 2 and length_scale > 0, got "
                              f"{dim}, {length_scale}")
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.length_scale = float(length_scale)
        self.frequencies = rng.normal(0.0, 1.0 / length_scale, size=(3, dim))
        self.phases = rng.uniform(0.0, 2 * np.pi, size=dim)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Points ``...×3`` → unit embeddings ``...×dim`` (float32)."""
        features = np.cos(points @ self.frequencies + self.phases)
        norm = np.linalg.norm(features, axis=-1, keepdims=True)
        return (features / np.maximum(norm, 1e-12)).astype(np.float32)


def oracle_descriptors(points: np.ndarray, informative: np.ndarray, surface: np.ndarray,
                       embedding: FourierEmbedding, view_rng: np.random.Generator) -> np.ndarray:
    """Full-resolution oracle descriptors ``H×W×dim`` of one view.

    ``points H×W×3`` world points, ``informative``/``surface`` ``H×W`` bool. Informative pixels:
    ``embedding(point)``; surface pixels that are not informative: ``embedding(point + o)``
    with one random offset ``o`` per view; no surface: i.i.d. random unit vectors.
    """
    offset = view_rng.normal(0.0, VIEW_OFFSET_SCALE, size=3)
    shifted = np.where(informative[..., None], points, points + offset)
    desc = embedding(shifted)
    noise = view_rng.normal(size=desc.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
    return np.where(surface[..., None], desc, noise)


def local_map(descriptors: np.ndarray, stride: int = DESCRIPTOR_STRIDE) -> torch.Tensor:
    """``H×W×C`` full-resolution descriptors → ``C×H/s×W/s`` map (mean over each ``s×s``
    block, L2-normalised), the layout of the backbone's ``local_map`` (cell centres at
    ``s·k + (s−1)/2``, as ``grid_sample`` with ``align_corners=False`` reads them)."""
    height, width, _ = descriptors.shape
    if height % stride or width % stride:
        raise SCFeatError(f"oracle descriptors: image size {height}x{width} must be a multiple "
                          f"of {stride}")
    full = torch.from_numpy(np.ascontiguousarray(descriptors)).permute(2, 0, 1)[None]
    return F.normalize(F.avg_pool2d(full, stride), dim=1)[0]


@dataclass
class View:
    """One rendered view: ``image`` ``H×W×3`` uint8, ``depth`` ``H×W``, pose ``K, R, t``,
    ``informative`` and ``surface`` ``H×W`` bool, ``descriptors`` ``C×H/4×W/4``."""
    image: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    informative: np.ndarray
    surface: np.ndarray
    descriptors: torch.Tensor


def _plane_photos(rng: np.random.Generator, photos: dict, focal: float) -> tuple[list, list[str]]:
    """``random_scene`` plus the photograph each plane carries: the same draws are repeated
    on constant marker textures of the same shapes (so the random stream is consumed alike)."""
    names = sorted(photos)
    marker_rng = copy.deepcopy(rng)
    planes = synthetic.random_scene(rng, photos, focal)
    markers = {name: np.full_like(photos[name], k + 1) for k, name in enumerate(names)}
    marker_planes = synthetic.random_scene(marker_rng, markers, focal)
    return planes, [names[int(round(float(p.texture[0, 0, 0]))) - 1] for p in marker_planes]


def _plane_index(planes: list, camera: synthetic.Camera, height: int, width: int) -> np.ndarray:
    """Index of the plane seen at each pixel (``H×W`` int, −1 where nothing)."""
    flat = [replace(p, texture=np.full((2, 2, 3), k + 1, np.float32)) for k, p in enumerate(planes)]
    colour, _ = synthetic.render(flat, camera, height, width)
    return np.where(np.isnan(colour[..., 0]), 0, np.rint(np.nan_to_num(colour[..., 0]))).astype(int) - 1


def length_scale_for(width: int) -> float:
    """Embedding length scale (world units) of about 8 pixels at the scenes' typical depth
    (5 units, focal ≈ 0.95·width): two cells of the ``H/4×W/4`` map, so the pooled maps
    vary smoothly between cells and corresponding cells of two views agree."""
    return 8 * 5.0 / (0.95 * width)


def make_scene_pairs(n_scenes: int, images_per_scene: int, size: tuple[int, int], seed: int,
                     embedding: FourierEmbedding, min_overlap: float = 0.3) -> list[dict]:
    """Render ``n_scenes`` scenes of ``images_per_scene`` views each and pair the overlapping
    views. Returns pairs ``{'view1', 'view2', 'F1', 'F2'}`` (``F`` 3×3 float32 tensors,
    ``x2ᵀ·F1·x1 = 0``), views as :class:`View`."""
    height, width = size
    if height % NETWORK_STRIDE or width % NETWORK_STRIDE:
        raise SCFeatError(f"--size: expected H and W multiples of 16 (the backbone's stride), "
                          f"got {height}x{width}")
    photos = {name: synthetic.load_photo(name) for name in SCENE_PHOTOS}
    pairs = []
    for scene in range(n_scenes):
        rng = np.random.default_rng([seed, scene])
        cameras = [synthetic.random_camera(rng, height, width) for _ in range(images_per_scene)]
        focal = float(np.mean([c.K[0, 0] for c in cameras]))
        planes, plane_photos = _plane_photos(rng, photos, focal)
        sky = rng.uniform(90, 230, size=(2, 3)).astype(np.float32)
        views = []
        for camera in cameras:
            image, depth = synthetic._lit_image(rng, planes, camera, height, width, sky)
            plane = _plane_index(planes, camera, height, width)
            surface = (depth > 0) & (plane >= 0)
            bad_planes = [plane_photos.index(name) for name in UNINFORMATIVE_PHOTOS]
            informative = surface & ~np.isin(plane, bad_planes)
            points = world_points(depth, camera.K, camera.R, camera.t)
            desc = oracle_descriptors(points, informative, surface, embedding, rng)
            views.append((camera, View(image, depth, camera.K, camera.R, camera.t, informative,
                                       surface, local_map(desc))))
        for i in range(len(views)):
            for j in range(i + 1, len(views)):
                (cam1, v1), (cam2, v2) = views[i], views[j]
                overlap = min(synthetic.covisible_fraction(v1.depth, cam1, v2.depth, cam2)[0],
                              synthetic.covisible_fraction(v2.depth, cam2, v1.depth, cam1)[0])
                if overlap < min_overlap or synthetic._fundamental_norm(cam1, cam2) > 1e3:
                    continue
                pairs.append({"view1": v1, "view2": v2, "F1": fundamental(cam1, cam2),
                              "F2": fundamental(cam2, cam1)})
    if not pairs:
        raise SCFeatError("oracle scenes: no overlapping view pair; use more images per scene")
    return pairs


def fundamental(camera1: synthetic.Camera, camera2: synthetic.Camera) -> torch.Tensor:
    """``F`` (3×3 float32) with ``x2ᵀ·F·x1 = 0``, divided by ``F[2, 2]``."""
    pose1 = torch.from_numpy(camera1.pose)[None]
    pose2 = torch.from_numpy(camera2.pose)[None]
    rel = relative_pose(pose1, pose2)
    fmat = fundamental_from_pose(torch.from_numpy(camera1.K)[None], torch.from_numpy(camera2.K)[None],
                                 rel[:, :3, :3], rel[:, :3, 3])
    return fmat[0].float()
