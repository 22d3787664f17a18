"""Synthetic MegaDepth (CAPS layout) and HPatches-sequences data from the photographs in
scikit-image's wheel, so the pipeline can be tried in minutes without any download.

``python -m tools.synthetic megadepth --out DIR [--scenes N] [--images N] [--pairs N]
[--size HxW] [--seed S] [--overwrite]`` writes::

    DIR/<scene>/dense0/aligned/images/img_XXX.jpg
    DIR/<scene>/dense0/aligned/depths/img_XXX.npy   (H×W float32 camera z, 0 where nothing)
    DIR/<scene>/dense0/aligned/img_cam.txt          (name w h fx fy cx cy R(9) t(3), world→camera)
    DIR/<scene>/dense0/aligned/pairs.txt            (name1 name2, overlapping pairs only)

Each scene is a handful of textured rectangles at different depths and orientations (never a
single plane, which would make the fundamental matrix degenerate), rendered by ray casting with
a z-buffer, with per-image lighting.

``python -m tools.synthetic megadepth1500 --out DIR [--scenes N] [--images N] [--pairs N]
[--size HxW] [--seed S] [--overwrite]`` writes relative-pose test pairs at varied overlaps in
both MegaDepth-1500 layouts (glue-factory's ``pairs_calibrated.txt`` and LoFTR's
``megadepth_test_1500_scene_info/*.npz``), with the ground-truth cameras of every scene (see
:func:`make_megadepth1500`), for ``evaluate_pose.py``, ``reconstruct.py`` and ``localize.py``.

``python -m tools.synthetic hpatches --out DIR [--sequences N] [--size HxW] [--seed S]`` writes
``DIR/{i,v}_<photo>/{1..6}.ppm`` and ``H_1_2 .. H_1_6`` (3×3 text, image-1 pixels → image-k
pixels): viewpoint sequences by random homographies, illumination sequences by photometric
changes, from photographs disjoint from the MegaDepth ones.

Both outputs depend only on the seed (same seed → identical bytes) and are built in a temporary
folder beside ``out`` that is renamed into place at the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch

from utils.cli import parse_size
from utils.errors import SCFeatError
from utils.image import load_image
from utils.geometry import fundamental_from_pose, relative_pose

log = logging.getLogger("scfeat.synthetic")

# Colour photographs (and textures) shipped inside the scikit-image wheel; the two sets are
# disjoint so that HPatches evaluation never sees a training texture.
MEGADEPTH_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                    "brick", "grass", "gravel")
HPATCHES_PHOTOS = ("camera", "coins", "motorcycle", "clock", "page", "text", "moon",
                   "hubble_deep_field")

MIN_PAIR_OVERLAP = 0.3  # fraction of image-1 pixels seen (unoccluded) in image 2, both ways
MAX_FUNDAMENTAL_NORM = 1e3  # ‖F/F[2,2]‖: larger means F[2,2] ≈ 0, a bad normaliser


# ----------------------------------------------------------------------------- helpers

# Files of skimage.data read directly (cv2 is much faster than importing skimage.io).
PHOTO_FILES = {"astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png",
               "rocket": "rocket.jpg", "immunohistochemistry": "ihc.png", "brick": "brick.png",
               "grass": "grass.png", "gravel": "gravel.png", "camera": "camera.png",
               "coins": "coins.png", "motorcycle": "motorcycle_left.png",
               "clock": "clock_motion.png", "page": "page.png", "text": "text.png",
               "moon": "moon.png", "hubble_deep_field": "hubble_deep_field.jpg"}


def load_photo(name: str) -> np.ndarray:
    """A photograph shipped in scikit-image's wheel → ``H×W×3`` uint8 RGB (grey ones expanded)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SCFeatError("tools.synthetic needs scikit-image (pip install scikit-image): its "
                          "sample photographs texture the synthetic scenes")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / PHOTO_FILES[name]
    return load_image(path)


@contextmanager
def atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` that replaces ``out`` only if the block succeeds.

    Refuses an existing non-empty ``out`` unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SCFeatError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SCFeatError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _encode(image_rgb: np.ndarray, ext: str, params: Sequence[int] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), list(params))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {ext} image")
    return buf.tobytes()


def _rotation(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation (degrees) about y (yaw), then x (pitch), then z (roll) → 3×3."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rot_y = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot_z = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rot_z @ rot_x @ rot_y


def _fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:.12g}" for v in np.asarray(values, dtype=np.float64).ravel())


# ----------------------------------------------------------------------------- MegaDepth

@dataclass
class Plane:
    """A textured rectangle: ``center + a·axis_u + b·axis_v`` for ``|a| ≤ half_u, |b| ≤ half_v``."""
    center: np.ndarray  # 3
    axis_u: np.ndarray  # 3, unit, texture x
    axis_v: np.ndarray  # 3, unit, texture y
    half_u: float
    half_v: float
    texture: np.ndarray  # h×w×3 float32, 0..255

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.axis_u, self.axis_v)


@dataclass
class Camera:
    """Pinhole camera: ``K`` 3×3 and the world→camera pose ``x_c = R·x_w + t``."""
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray

    @property
    def pose(self) -> np.ndarray:
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = self.R, self.t
        return pose


def _make_plane(rng: np.random.Generator, photos: dict[str, np.ndarray], photo: str,
                center: Sequence[float], rotation: np.ndarray, half_u: float, half_v: float,
                focal: float) -> Plane:
    """A plane whose texture is ``photo``, randomly flipped and pre-shrunk to about its on-screen
    size (so bilinear lookup does not alias)."""
    texture = photos[photo]
    if rng.random() < 0.5:
        texture = texture[:, ::-1]
    if rng.random() < 0.3:
        texture = texture[::-1]
    center = np.asarray(center, dtype=np.float64)
    screen_width = 1.5 * 2 * half_u * focal / max(np.linalg.norm(center), 1.0)
    tex_w = int(np.clip(screen_width, 24, texture.shape[1]))
    tex_h = int(np.clip(tex_w * half_v / half_u, 24, texture.shape[0]))
    texture = cv2.resize(np.ascontiguousarray(texture), (tex_w, tex_h), interpolation=cv2.INTER_AREA)
    return Plane(center, rotation[:, 0].copy(), rotation[:, 1].copy(), half_u, half_v,
                 texture.astype(np.float32))


def random_scene(rng: np.random.Generator, photos: dict[str, np.ndarray], focal: float) -> list[Plane]:
    """Five textured rectangles (x right, y down, z forward): a back wall, a floor, a side wall and
    two slanted panels in the middle, with randomised placement and textures."""
    names = [str(n) for n in rng.permutation(sorted(photos))]
    u = rng.uniform
    return [
        _make_plane(rng, photos, names[0], (u(-0.5, 0.5), u(-0.3, 0.3), u(7.5, 9.0)),
                    _rotation(u(-12, 12), u(-6, 6)), 9.0, 6.0, focal),  # back wall
        _make_plane(rng, photos, names[1], (u(-0.5, 0.5), u(1.8, 2.2), 4.5),
                    _rotation(u(-5, 5), 90 + u(-4, 4)), 9.0, 5.0, focal),  # floor
        _make_plane(rng, photos, names[2], (u(-5.0, -4.0), u(-0.5, 0.5), u(4.5, 6.0)),
                    _rotation(u(60, 75), u(-5, 5)), 4.0, 3.0, focal),  # left wall
        _make_plane(rng, photos, names[3], (u(-2.0, -0.6), u(-0.6, 0.4), u(3.5, 5.0)),
                    _rotation(u(25, 50), u(-15, 15), u(-10, 10)), 1.3, 1.0, focal),  # panel
        _make_plane(rng, photos, names[4 % len(names)], (u(0.6, 2.0), u(-0.8, 0.3), u(3.0, 4.5)),
                    _rotation(u(-50, -20), u(-15, 15), u(-10, 10)), 1.0, 1.2, focal),  # panel
    ]


def random_camera(rng: np.random.Generator, height: int, width: int) -> Camera:
    """A camera near the origin looking at a jittered point in the middle of the scene.

    The look-at point is jittered per camera: were all principal rays to meet in one point, they
    would be coplanar with every baseline and ``F[2,2]`` (the normaliser) would vanish.
    """
    focal = width * rng.uniform(0.85, 1.05)
    K = np.array([[focal, 0.0, (width - 1) / 2 + rng.uniform(-3, 3)],
                  [0.0, focal, (height - 1) / 2 + rng.uniform(-3, 3)],
                  [0.0, 0.0, 1.0]])
    center = np.array([rng.uniform(-1.5, 1.5), rng.uniform(-0.6, 0.4), rng.uniform(-1.0, 0.5)])
    target = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-0.4, 0.6), rng.uniform(4.0, 6.0)])
    z_axis = (target - center) / np.linalg.norm(target - center)
    x_axis = np.cross([0.0, 1.0, 0.0], z_axis)  # world y points down
    x_axis /= np.linalg.norm(x_axis)
    y_axis = np.cross(z_axis, x_axis)
    R = _rotation(0.0, 0.0, rng.uniform(-10, 10)) @ np.stack([x_axis, y_axis, z_axis])
    return Camera(K, R, -R @ center)


def render(planes: Sequence[Plane], camera: Camera, height: int, width: int,
           shading: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast every pixel centre into every plane and keep the nearest hit.

    Returns the colour ``H×W×3`` float32 (0..255, NaN where nothing was hit) and the depth
    ``H×W`` float32 (camera z; 0 where nothing was hit). ``shading`` scales each plane's colour.
    """
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rays_cam = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(camera.K).T  # z = 1
    rays_world = rays_cam @ camera.R  # Rᵀ·ray, row-wise
    origin = -camera.R.T @ camera.t
    best_depth = np.full((height, width), np.inf)
    colour = np.full((height, width, 3), np.nan, dtype=np.float32)
    for index, plane in enumerate(planes):
        normal = plane.normal
        denom = rays_world @ normal
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(np.abs(denom) > 1e-9, ((plane.center - origin) @ normal) / denom, -1.0)
        offset = origin[None, None] + depth[..., None] * rays_world - plane.center
        a, b = offset @ plane.axis_u, offset @ plane.axis_v
        hit = (depth > 1e-3) & (np.abs(a) <= plane.half_u) & (np.abs(b) <= plane.half_v) \
            & (depth < best_depth)
        if not hit.any():
            continue
        tex_h, tex_w = plane.texture.shape[:2]
        map_x = ((a + plane.half_u) / (2 * plane.half_u) * (tex_w - 1)).astype(np.float32)
        map_y = ((b + plane.half_v) / (2 * plane.half_v) * (tex_h - 1)).astype(np.float32)
        sampled = cv2.remap(plane.texture, map_x, map_y, cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT)
        if shading is not None:
            sampled = sampled * np.float32(shading[index])
        best_depth[hit] = depth[hit]
        colour[hit] = sampled[hit]
    depth_map = np.where(np.isfinite(best_depth), best_depth, 0.0).astype(np.float32)
    return colour, depth_map


def _lit_image(rng: np.random.Generator, planes: Sequence[Plane], camera: Camera,
               height: int, width: int, sky: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Render with a random light per image (Lambertian per plane), gain, gamma, colour cast,
    a sky gradient where nothing was hit, and a little noise → (uint8 RGB, depth)."""
    light = rng.normal(size=3) + np.array([0.0, -1.0, -1.0])
    light /= np.linalg.norm(light)
    ambient = rng.uniform(0.45, 0.7)
    shading = [ambient + (1.0 - ambient) * abs(float(p.normal @ light)) for p in planes]
    colour, depth = render(planes, camera, height, width, shading)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    background = (1 - rows) * sky[0] + rows * sky[1]
    colour = np.where(np.isnan(colour), np.broadcast_to(background, colour.shape), colour)
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, size=3)
    gamma = rng.uniform(0.8, 1.25)
    colour = 255.0 * np.clip(colour * gain / 255.0, 0.0, 1.0) ** gamma
    colour += rng.normal(0.0, 1.5, size=colour.shape)
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8), depth


def covisible_fraction(depth1: np.ndarray, camera1: Camera, depth2: np.ndarray,
                       camera2: Camera, rel_tol: float = 0.02) -> tuple[float, np.ndarray]:
    """Fraction of image-1 pixels whose surface point is seen, unoccluded, by camera 2.

    Returns the fraction (over all ``H×W`` pixels) and the ``H×W`` boolean mask.
    """
    height, width = depth1.shape
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    valid = depth1 > 0
    points_cam1 = (np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(camera1.K).T) \
        * depth1[..., None]
    rel = camera2.pose @ np.linalg.inv(camera1.pose)
    points_cam2 = points_cam1 @ rel[:3, :3].T + rel[:3, 3]
    z2 = points_cam2[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = points_cam2 @ camera2.K.T
        u2, v2 = proj[..., 0] / proj[..., 2], proj[..., 1] / proj[..., 2]
    h2, w2 = depth2.shape
    inside = valid & (z2 > 0) & (u2 > -0.5) & (u2 < w2 - 0.5) & (v2 > -0.5) & (v2 < h2 - 0.5)
    col = np.clip(np.rint(np.where(inside, u2, 0)), 0, w2 - 1).astype(int)
    row = np.clip(np.rint(np.where(inside, v2, 0)), 0, h2 - 1).astype(int)
    seen = depth2[row, col]
    mask = inside & (seen > 0) & (np.abs(seen - z2) < rel_tol * np.abs(z2))
    return float(mask.mean()), mask


def _fundamental_norm(camera1: Camera, camera2: Camera) -> float:
    """‖F1‖ after division by F1[2,2] (``inf`` when F1[2,2] = 0)."""
    pose1 = torch.from_numpy(camera1.pose)[None]
    pose2 = torch.from_numpy(camera2.pose)[None]
    rel = relative_pose(pose1, pose2)
    fmat = fundamental_from_pose(torch.from_numpy(camera1.K)[None], torch.from_numpy(camera2.K)[None],
                                 rel[:, :3, :3], rel[:, :3, 3])
    norm = float(fmat.norm())
    return norm if np.isfinite(norm) else float("inf")


def _rotation_angle_deg(camera1: Camera, camera2: Camera) -> float:
    rel = camera2.R @ camera1.R.T
    return float(np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1.0, 1.0))))


def render_views(rng: np.random.Generator, photos: dict[str, np.ndarray], images: int,
                 size: tuple[int, int], image_dir: Path, depth_dir: Path | None = None,
                 ) -> tuple[list[str], list[Camera], list[np.ndarray], list[str]]:
    """Random cameras and scene, ``images`` lit views written as ``<image_dir>/img_XXX.jpg``
    (and their depths as ``<depth_dir>/img_XXX.npy``) → names, cameras, depths ``H×W`` and
    the ``img_cam.txt`` lines."""
    height, width = size
    cameras = [random_camera(rng, height, width) for _ in range(images)]
    planes = random_scene(rng, photos, float(np.mean([c.K[0, 0] for c in cameras])))
    sky = rng.uniform(90, 230, size=(2, 3)).astype(np.float32)
    names = [f"img_{i:03d}.jpg" for i in range(images)]
    depths = []
    cam_lines = ["# image_name width height fx fy cx cy R11 R12 R13 R21 R22 R23 R31 R32 R33 t1 t2 t3",
                 "# [R|t] maps world to camera coordinates; synthetic data from tools.synthetic"]
    for name, camera in zip(names, cameras):
        image, depth = _lit_image(rng, planes, camera, height, width, sky)
        depths.append(depth)
        _write_bytes(image_dir / name, _encode(image, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]))
        if depth_dir is not None:
            depth_dir.mkdir(parents=True, exist_ok=True)
            np.save(depth_dir / f"{Path(name).stem}.npy", depth)
        K = camera.K
        cam_lines.append(f"{name} {width} {height} {_fmt([K[0, 0], K[1, 1], K[0, 2], K[1, 2]])} "
                         f"{_fmt(camera.R)} {_fmt(camera.t)}")
    return names, cameras, depths, cam_lines


def make_megadepth_scene(out_dir: Path, rng: np.random.Generator, photos: dict[str, np.ndarray],
                         images: int, pairs: int, size: tuple[int, int]) -> int:
    """Render one scene into ``out_dir`` (the ``aligned`` folder) → number of pairs listed."""
    names, cameras, depths, cam_lines = render_views(rng, photos, images, size,
                                                     out_dir / "images", out_dir / "depths")
    candidates = []
    for i in range(images):
        for j in range(i + 1, images):
            overlap = min(covisible_fraction(depths[i], cameras[i], depths[j], cameras[j])[0],
                          covisible_fraction(depths[j], cameras[j], depths[i], cameras[i])[0])
            if (overlap >= MIN_PAIR_OVERLAP and _rotation_angle_deg(cameras[i], cameras[j]) < 60
                    and _fundamental_norm(cameras[i], cameras[j]) < MAX_FUNDAMENTAL_NORM):
                candidates.append((i, j))
    if len(candidates) > pairs:
        keep = np.sort(rng.choice(len(candidates), size=pairs, replace=False))
        candidates = [candidates[k] for k in keep]
    (out_dir / "img_cam.txt").write_text("\n".join(cam_lines) + "\n")
    (out_dir / "pairs.txt").write_text("".join(f"{names[i]} {names[j]}\n" for i, j in candidates))
    return len(candidates)


def make_megadepth(out: str | Path, scenes: int = 3, pairs: int = 20,
                   size: tuple[int, int] = (128, 160), seed: int = 0, images: int = 8,
                   overwrite: bool = False) -> dict[str, int]:
    """Write a synthetic MegaDepth training set in the CAPS layout (see the module docstring).

    ``pairs`` caps the overlapping pairs listed per scene; ``images`` is the images per scene.
    Returns counts ``{'scenes', 'images', 'pairs'}``.
    """
    if scenes < 1 or images < 2 or pairs < 1:
        raise SCFeatError(f"synthetic megadepth: need scenes ≥ 1, images ≥ 2 and pairs ≥ 1 "
                          f"(got {scenes}, {images}, {pairs})")
    photos = {name: load_photo(name) for name in MEGADEPTH_PHOTOS}
    total_pairs = 0
    with atomic_directory(Path(out), overwrite) as tmp:
        for scene in range(scenes):
            # One generator per scene: scene k does not depend on how many scenes are asked for.
            rng = np.random.default_rng([seed, scene])
            total_pairs += make_megadepth_scene(tmp / f"synth_{scene:04d}" / "dense0" / "aligned",
                                                rng, photos, images, pairs, size)
    return {"scenes": scenes, "images": scenes * images, "pairs": total_pairs}


# ----------------------------------------------------------------------------- MegaDepth-1500

OVERLAP_BINS = ((0.3, 0.5), (0.5, 0.7), (0.7, 1.0))  # pairs are drawn evenly from each bin
SCENE_INFO_DIR = "megadepth_test_1500_scene_info"
PAIRS_CALIBRATED = "pairs_calibrated.txt"


def _pair_candidates(cameras: list[Camera], depths: list[np.ndarray]) -> list[tuple[int, int, float]]:
    """``(i, j, overlap)`` of the pairs usable for relative pose: both-way covisible fraction
    ≥ 0.3, rotation < 60°, a baseline (a pure rotation has no translation direction)."""
    candidates = []
    for i in range(len(cameras)):
        for j in range(i + 1, len(cameras)):
            overlap = min(covisible_fraction(depths[i], cameras[i], depths[j], cameras[j])[0],
                          covisible_fraction(depths[j], cameras[j], depths[i], cameras[i])[0])
            centres = [-c.R.T @ c.t for c in (cameras[i], cameras[j])]
            if (overlap >= OVERLAP_BINS[0][0] and _rotation_angle_deg(cameras[i], cameras[j]) < 60
                    and np.linalg.norm(centres[0] - centres[1]) > 0.2):
                candidates.append((i, j, overlap))
    return candidates


def make_megadepth1500_scene(out: Path, scene: str, rng: np.random.Generator,
                             photos: dict[str, np.ndarray], images: int, pairs: int,
                             size: tuple[int, int]) -> list[str]:
    """Render one scene into ``out`` (images, poses, LoFTR scene-info files) → its lines of
    ``pairs_calibrated.txt``."""
    names, cameras, depths, pose_lines = render_views(rng, photos, images, size,
                                                      out / "images" / scene)
    _write_bytes(out / "poses" / f"{scene}.txt", ("\n".join(pose_lines) + "\n").encode())
    candidates = _pair_candidates(cameras, depths)
    lines = []
    for index, (low, high) in enumerate(OVERLAP_BINS):
        in_bin = [c for c in candidates if low <= c[2] < high or (high == 1.0 and c[2] == 1.0)]
        quota = pairs // len(OVERLAP_BINS) + (index < pairs % len(OVERLAP_BINS))
        if len(in_bin) > quota:
            keep = np.sort(rng.choice(len(in_bin), size=quota, replace=False))
            in_bin = [in_bin[k] for k in keep]
        if not in_bin:
            continue
        pair_infos = np.empty(len(in_bin), dtype=object)
        for k, (i, j, overlap) in enumerate(in_bin):
            pair_infos[k] = ((i, j), float(overlap), np.zeros((0, 2)))  # LoFTR's (ids, score, central matches)
            relative = cameras[j].pose @ np.linalg.inv(cameras[i].pose)
            lines.append(f"{scene}/{names[i]} {scene}/{names[j]} {_fmt(cameras[i].K)} "
                         f"{_fmt(cameras[j].K)} {_fmt(relative[:3, :3])} {_fmt(relative[:3, 3])}")
        scene_info = out / SCENE_INFO_DIR / f"{scene}_{low:.1f}_{high:.1f}.npz"
        scene_info.parent.mkdir(parents=True, exist_ok=True)
        with open(scene_info, "wb") as handle:  # a handle keeps np.savez from appending .npz
            np.savez(handle, image_paths=np.array([f"images/{scene}/{n}" for n in names], object),
                     depth_paths=np.array([None] * images, object),
                     intrinsics=np.stack([c.K for c in cameras]),
                     poses=np.stack([c.pose for c in cameras]), pair_infos=pair_infos)
    return lines


def make_megadepth1500(out: str | Path, scenes: int = 3, images: int = 12, pairs: int = 15,
                       size: tuple[int, int] = (240, 320), seed: int = 0,
                       overwrite: bool = False) -> dict[str, int]:
    """Write a synthetic relative-pose test set in the MegaDepth-1500 layouts::

        DIR/images/<scene>/img_XXX.jpg
        DIR/pairs_calibrated.txt                       (glue-factory: name0 name1 K0 K1 R t)
        DIR/megadepth_test_1500_scene_info/<scene>_<lo>_<hi>.npz   (LoFTR, one per overlap bin)
        DIR/poses/<scene>.txt                          (img_cam.txt layout: ground-truth cameras)

    ``pairs`` per scene, drawn evenly from the overlap bins ``OVERLAP_BINS`` (fewer where a
    bin has too few). Returns counts ``{'scenes', 'images', 'pairs'}``.
    """
    if scenes < 1 or images < 2 or pairs < 1:
        raise SCFeatError(f"synthetic megadepth1500: need scenes ≥ 1, images ≥ 2 and pairs ≥ 1 "
                          f"(got {scenes}, {images}, {pairs})")
    photos = {name: load_photo(name) for name in MEGADEPTH_PHOTOS}
    lines = []  # no comment line: glue-factory's reader takes every line as a pair
    with atomic_directory(Path(out), overwrite) as tmp:
        for scene in range(scenes):
            rng = np.random.default_rng([seed, 20_000 + scene])  # disjoint from the training scenes
            lines += make_megadepth1500_scene(tmp, f"synth_{scene:04d}", rng, photos, images,
                                              pairs, size)
        (tmp / PAIRS_CALIBRATED).write_text("\n".join(lines) + "\n")
    return {"scenes": scenes, "images": scenes * images, "pairs": len(lines)}


# ----------------------------------------------------------------------------- HPatches

def _cover(photo: np.ndarray, height: int, width: int, margin: float) -> np.ndarray:
    """Resize ``photo`` (keeping its aspect) to cover ``margin``× the output size."""
    scale = margin * max(height / photo.shape[0], width / photo.shape[1])
    new_size = (int(np.ceil(photo.shape[1] * scale)), int(np.ceil(photo.shape[0] * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(photo, new_size, interpolation=interp)


def _random_homography(rng: np.random.Generator, height: int, width: int, strength: float) -> np.ndarray:
    """A homography of the output frame: rotation, scale and a corner perturbation about the
    image centre, all growing with ``strength`` (0..1)."""
    centre = np.array([[1, 0, (width - 1) / 2], [0, 1, (height - 1) / 2], [0, 0, 1.0]])
    angle = np.deg2rad(rng.uniform(-30, 30) * strength)
    scale = np.exp(rng.uniform(-0.35, 0.35) * strength)
    similarity = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0],
                           [scale * np.sin(angle), scale * np.cos(angle), 0], [0, 0, 1.0]])
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]],
                       dtype=np.float32)
    jitter = rng.uniform(-0.15, 0.15, size=(4, 2)) * strength * np.array([width, height])
    perspective = cv2.getPerspectiveTransform(corners, (corners + jitter).astype(np.float32))
    homography = perspective @ centre @ similarity @ np.linalg.inv(centre)
    return homography / homography[2, 2]


def _photometric(rng: np.random.Generator, image: np.ndarray, strength: float) -> np.ndarray:
    """Gain, gamma, colour cast and a smooth illumination gradient, growing with ``strength``."""
    height, width = image.shape[:2]
    gain = np.exp(rng.uniform(-0.7, 0.5) * strength)
    gamma = np.exp(rng.uniform(-0.5, 0.5) * strength)
    cast = np.exp(rng.uniform(-0.25, 0.25, size=3) * strength)
    angle = rng.uniform(0, 2 * np.pi)
    xs, ys = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    gradient = 1.0 + 0.4 * strength * (np.cos(angle) * xs + np.sin(angle) * ys)
    values = (image.astype(np.float64) / 255.0) ** gamma * gain * cast * gradient[..., None]
    return np.clip(np.rint(255.0 * values), 0, 255).astype(np.uint8)


def make_hpatches_sequence(out_dir: Path, rng: np.random.Generator, photo: np.ndarray,
                           viewpoint: bool, size: tuple[int, int]) -> None:
    """Write ``1.ppm .. 6.ppm`` and ``H_1_2 .. H_1_6`` of one sequence into ``out_dir``."""
    height, width = size
    source = _cover(photo, height, width, margin=1.4)
    offset_x = rng.uniform(0, source.shape[1] - width)
    offset_y = rng.uniform(0, source.shape[0] - height)
    source_to_first = np.array([[1, 0, -offset_x], [0, 1, -offset_y], [0, 0, 1.0]])
    first = cv2.warpPerspective(source, source_to_first, (width, height), flags=cv2.INTER_LINEAR)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_bytes(out_dir / "1.ppm", _encode(first, ".ppm"))
    for k in range(2, 7):
        strength = (k - 1) / 5
        if viewpoint:
            homography = _random_homography(rng, height, width, strength)
            image = cv2.warpPerspective(source, homography @ source_to_first, (width, height),
                                        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            image = _photometric(rng, image, 0.15)  # real viewpoint sequences vary a little too
        else:
            homography = np.eye(3)
            image = _photometric(rng, first, strength)
        _write_bytes(out_dir / f"{k}.ppm", _encode(image, ".ppm"))
        (out_dir / f"H_1_{k}").write_text(
            "".join(" ".join(f"{v:.10e}" for v in row) + "\n" for row in homography))


def make_hpatches(out: str | Path, sequences: int = 8, size: tuple[int, int] = (240, 320),
                  seed: int = 0, overwrite: bool = False) -> dict[str, int]:
    """Write synthetic HPatches sequences (half illumination ``i_*``, half viewpoint ``v_*``).

    Returns counts ``{'sequences', 'images'}``.
    """
    if sequences < 1:
        raise SCFeatError(f"synthetic hpatches: need sequences ≥ 1 (got {sequences})")
    photos = {name: load_photo(name) for name in HPATCHES_PHOTOS}
    order = [str(n) for n in np.random.default_rng([seed, 10_000]).permutation(HPATCHES_PHOTOS)]
    with atomic_directory(Path(out), overwrite) as tmp:
        for index in range(sequences):
            viewpoint = index % 2 == 1
            photo = order[(index // 2) % len(order)]
            repeat = index // (2 * len(order))
            name = f"{'v' if viewpoint else 'i'}_{photo}" + (f"_{repeat}" if repeat else "")
            rng = np.random.default_rng([seed, index])
            make_hpatches_sequence(tmp / name, rng, photos[photo], viewpoint, size)
    return {"sequences": sequences, "images": 6 * sequences}


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.synthetic", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    mega = sub.add_parser("megadepth", help="MegaDepth training data in the CAPS layout")
    mega.add_argument("--out", required=True, help="output folder")
    mega.add_argument("--scenes", type=int, default=3)
    mega.add_argument("--images", type=int, default=8, help="images per scene")
    mega.add_argument("--pairs", type=int, default=20, help="at most this many pairs per scene")
    mega.add_argument("--size", default="128x160", help="HEIGHTxWIDTH")
    pose = sub.add_parser("megadepth1500", help="relative-pose test pairs in the MegaDepth-1500 "
                                                "layouts (glue-factory and LoFTR)")
    pose.add_argument("--out", required=True, help="output folder")
    pose.add_argument("--scenes", type=int, default=3)
    pose.add_argument("--images", type=int, default=12, help="images per scene")
    pose.add_argument("--pairs", type=int, default=15, help="at most this many pairs per scene")
    pose.add_argument("--size", default="240x320", help="HEIGHTxWIDTH")
    hpatch = sub.add_parser("hpatches", help="HPatches-sequences evaluation data")
    hpatch.add_argument("--out", required=True, help="output folder")
    hpatch.add_argument("--sequences", type=int, default=8)
    hpatch.add_argument("--size", default="240x320", help="HEIGHTxWIDTH")
    for p in (mega, pose, hpatch):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        size = parse_size(args.size)
        if args.kind == "megadepth":
            counts = make_megadepth(args.out, args.scenes, args.pairs, size, args.seed, args.images,
                                    args.overwrite)
        elif args.kind == "megadepth1500":
            counts = make_megadepth1500(args.out, args.scenes, args.images, args.pairs, size,
                                        args.seed, args.overwrite)
        else:
            counts = make_hpatches(args.out, args.sequences, size, args.seed, args.overwrite)
    except SCFeatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    print(f"wrote {args.out}: {summary} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
