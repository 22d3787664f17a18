"""dataloader/colmap_model.py: COLMAP models (text and binary) written by the tests, the
pixel-centre convention against pycolmap's own projection, both pair rules, bad input."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from dataloader.colmap_model import (check_images, point_overlaps, read_model, select_pairs,
                                     view_overlaps, write_model)
from dataloader.pair_geometry import pair_fundamentals
from utils.errors import SCFeatError

WIDTH, HEIGHT, FOCAL = 96, 64, 80.0


def look_at(centre: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World→camera ``R, t`` of a camera at ``centre`` looking at ``target`` (y down)."""
    z = (target - centre) / np.linalg.norm(target - centre)
    x = np.cross([0.0, -1.0, 0.0], z)
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    return R, -R @ centre


def arc_images(count: int, spread_deg: float = 40.0, radius: float = 5.0):
    """``count`` cameras on an arc around the origin, all looking at it."""
    images = []
    for k, angle in enumerate(np.radians(np.linspace(-spread_deg / 2, spread_deg / 2, count))):
        R, t = look_at(radius * np.array([np.sin(angle), 0.1 * k, -np.cos(angle)]), np.zeros(3))
        images.append((f"im_{k}.png", 0, R, t, np.zeros((0, 3))))
    return images


CAMERA = ("PINHOLE", WIDTH, HEIGHT, [FOCAL, FOCAL + 1, WIDTH / 2 + 1.25, HEIGHT / 2 - 0.75])


@pytest.mark.parametrize("binary", [False, True])
def test_read_model_text_and_binary(tmp_path, binary):
    images = arc_images(3)
    write_model(tmp_path, [CAMERA], images, binary=binary)
    model = read_model(tmp_path)
    assert model.format == ("binary" if binary else "text")
    assert model.names == [name for name, *_ in images]
    for (_, _, R, t, _), camera in zip(images, model.cameras):
        np.testing.assert_allclose(camera.pose[:3, :3], R, atol=1e-12)
        np.testing.assert_allclose(camera.pose[:3, 3], t, atol=1e-12)
        # COLMAP's principal point minus 0.5: pixel centres at integers.
        np.testing.assert_allclose(camera.K, [[FOCAL, 0, WIDTH / 2 + 0.75],
                                              [0, FOCAL + 1, HEIGHT / 2 - 1.25], [0, 0, 1]])
        assert (camera.width, camera.height) == (WIDTH, HEIGHT)


@pytest.mark.parametrize("binary", [False, True])
def test_projection_matches_pycolmap_minus_half_a_pixel(tmp_path, binary):
    pycolmap = pytest.importorskip("pycolmap")
    images = arc_images(2)
    write_model(tmp_path, [CAMERA], images, binary=binary)
    model = read_model(tmp_path)
    reference = pycolmap.Reconstruction(str(tmp_path))
    points = np.random.default_rng(0).uniform(-1, 1, (20, 3))
    projected = {}
    for image in reference.images.values():
        camera = reference.cameras[image.camera_id]
        cam_points = np.array([image.cam_from_world() * p for p in points])
        colmap_pixels = np.array(camera.img_from_cam(cam_points))[:, :2]
        record = model.records()[image.name]
        x_cam = points @ record.pose[:3, :3].T + record.pose[:3, 3]
        ours = x_cam @ record.K.T
        ours = ours[:, :2] / ours[:, 2:]
        np.testing.assert_allclose(ours, colmap_pixels - 0.5, atol=1e-9)
        projected[image.name] = ours
    # The pair's F (the loader's) holds for those pixels.
    a, b = model.cameras
    fmat1, _ = pair_fundamentals(a.K[None], b.K[None], a.pose[None], b.pose[None])
    x1 = np.c_[projected[model.names[0]], np.ones(len(points))]
    x2 = np.c_[projected[model.names[1]], np.ones(len(points))]
    residual = np.einsum("ni,ij,nj->n", x2, fmat1[0].numpy(), x1)
    lines = x1 @ fmat1[0].numpy().T
    assert np.abs(residual / np.linalg.norm(lines[:, :2], axis=1)).max() < 1e-6


def test_binary_is_read_before_text(tmp_path):
    write_model(tmp_path, [CAMERA], arc_images(2), binary=False)
    write_model(tmp_path, [CAMERA], arc_images(3), binary=True)
    assert len(read_model(tmp_path).names) == 3


def test_point_overlap_ratio_by_hand():
    ids = [np.array([1, 2, 3, 4]), np.array([3, 4, 5]), np.array([9]), np.array([1, 2, 3, 4, 5, 6])]
    i, j, shared, ratio = point_overlaps(ids)
    got = {(a, b): (s, r) for a, b, s, r in zip(i, j, shared, ratio)}
    # shared / min(points of either image)
    assert got == {(0, 1): (2, 2 / 3), (0, 3): (4, 1.0), (1, 3): (3, 1.0)}


def test_points_rule_selects_by_the_overlap_range(tmp_path):
    images = arc_images(3)
    observations = [[1, 2, 3, 4, 5], [4, 5, 6, 7, 8], [1, 2, 3, 4, 6]]  # (0,1) 0.4, (0,2) 0.8, (1,2) 0.4
    images = [(name, cam, R, t, np.array([[1.0, 1.0, p] for p in obs] + [[2.0, 2.0, -1]]))
              for (name, cam, R, t, _), obs in zip(images, observations)]
    write_model(tmp_path, [CAMERA], images, binary=True)
    model = read_model(tmp_path)
    assert model.has_points
    pairs = select_pairs(model)  # auto → points, [0.1, 0.7]
    assert pairs.rule == "points"
    assert list(zip(pairs.i, pairs.j)) == [(0, 1), (1, 2)]
    np.testing.assert_allclose(pairs.overlap, [0.4, 0.4])
    pairs = select_pairs(model, {"min_overlap": 0.5, "max_overlap": 1.0})
    assert list(zip(pairs.i, pairs.j)) == [(0, 2)]
    with pytest.raises(SCFeatError, match=r"leaves no pair.*largest overlap ratio is 0.800"):
        select_pairs(model, {"min_overlap": 0.9, "max_overlap": 1.0})


def test_view_overlap_of_a_sideways_shift_by_hand(tmp_path):
    # Same camera, shifted sideways: at depth D a shift of b moves every pixel by f·b/D.
    R = np.eye(3)
    shift = 0.25 * WIDTH  # pixels
    depth = 4.0
    baseline = shift * depth / FOCAL
    images = [("a.png", 0, R, np.zeros(3), np.zeros((0, 3))),
              ("b.png", 0, R, np.array([-baseline, 0.0, 0.0]), np.zeros((0, 3)))]
    write_model(tmp_path, [("PINHOLE", WIDTH, HEIGHT, [FOCAL, FOCAL, WIDTH / 2, HEIGHT / 2])],
                images)
    model = read_model(tmp_path)
    i, j, angle, overlap = view_overlaps(model.cameras, 60.0, 8, depth)
    assert (list(i), list(j)) == ([0], [1]) and angle[0] == pytest.approx(0, abs=1e-6)
    # 8 columns of cell centres, a quarter of the width off: 6 of 8 stay inside.
    assert overlap[0] == pytest.approx(6 / 8)
    pairs = select_pairs(model, {"rule": "cameras", "depth": depth, "grid": 8,
                                 "min_view_overlap": 0.7})
    assert len(pairs) == 1
    with pytest.raises(SCFeatError, match="largest view overlap is 0.750"):
        select_pairs(model, {"rule": "cameras", "depth": depth, "grid": 8,
                             "min_view_overlap": 0.8})
    # Parallel axes give no scene depth of their own.
    with pytest.raises(SCFeatError, match="scene depth is unknown"):
        select_pairs(model, {"rule": "cameras"})


def test_cameras_rule_depth_from_converging_axes(tmp_path):
    write_model(tmp_path, [CAMERA], arc_images(5, spread_deg=40, radius=5.0))
    model = read_model(tmp_path)
    pairs = select_pairs(model)  # auto → cameras: no 3-D points
    assert pairs.rule == "cameras"
    # The axes all pass near the origin, about 5 units away.
    assert "at depth 5" in pairs.description or "at depth 4.9" in pairs.description
    assert len(pairs) == 10  # neighbours on a 40° arc all overlap
    # Cameras looking in opposite directions never pair.
    R, t = look_at(np.array([0.0, 0.0, 5.0]), np.array([0.0, 0.0, 10.0]))
    write_model(tmp_path / "opposite", [CAMERA], arc_images(2) + [("back.png", 0, R, t,
                                                                   np.zeros((0, 3)))])
    pairs = select_pairs(read_model(tmp_path / "opposite"))
    assert list(zip(pairs.i, pairs.j)) == [(0, 1)]


def test_distortion_is_refused_with_the_way_out(tmp_path):
    write_model(tmp_path, [("SIMPLE_RADIAL", WIDTH, HEIGHT, [FOCAL, 48, 32, 0.01])], arc_images(2))
    with pytest.raises(SCFeatError, match=r"cameras.txt:3: a SIMPLE_RADIAL camera with "
                                          r"distortion.*--undistort"):
        read_model(tmp_path)
    # No distortion: a pinhole.
    write_model(tmp_path, [("OPENCV", WIDTH, HEIGHT, [FOCAL, FOCAL, 48, 32, 0, 0, 0, 0])],
                arc_images(2), binary=True)
    assert read_model(tmp_path).cameras[0].K[0, 2] == 47.5


def test_bad_models_name_the_file(tmp_path):
    with pytest.raises(SCFeatError, match="not a COLMAP model"):
        read_model(tmp_path)
    write_model(tmp_path, [CAMERA], [])
    with pytest.raises(SCFeatError, match=r"images.txt: the model has no images"):
        read_model(tmp_path)
    write_model(tmp_path, [CAMERA], arc_images(2))
    text = (tmp_path / "images.txt").read_text().replace(" 1 im_1.png", " 7 im_1.png")
    (tmp_path / "images.txt").write_text(text)
    with pytest.raises(SCFeatError, match=r"images.txt:5: camera 7 of im_1.png is not in"):
        read_model(tmp_path)
    (tmp_path / "images.txt").write_text(text.replace(" 7 im_1.png", " 1 im_0.png"))
    with pytest.raises(SCFeatError, match=r"images.txt:5: image 'im_0.png' is listed twice"):
        read_model(tmp_path)
    (tmp_path / "cameras.txt").write_text("1 PINHOLE 96 64 80 80 48\n")
    with pytest.raises(SCFeatError, match=r"cameras.txt:1: a PINHOLE camera has 4 parameters"):
        read_model(tmp_path)
    binary = tmp_path / "bin"
    write_model(binary, [CAMERA], arc_images(2), binary=True)
    data = (binary / "images.bin").read_bytes()
    (binary / "images.bin").write_bytes(data[:-10])
    with pytest.raises(SCFeatError, match=r"images.bin: .*truncated or non-COLMAP binary file"):
        read_model(binary)
    (binary / "images.bin").write_bytes(struct.pack("<Q", 0))
    with pytest.raises(SCFeatError, match=r"images.bin: the model has no images"):
        read_model(binary)


def test_check_images_names_missing_and_wrong_sized_images(tmp_path):
    write_model(tmp_path / "model", [CAMERA], arc_images(3))
    model = read_model(tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (WIDTH, HEIGHT)).save(folder / "im_0.png")
    with pytest.raises(SCFeatError, match=r"lacks 2 of the 3 images .*im_1.png, im_2.png"):
        check_images(model, folder)
    Image.new("RGB", (WIDTH, HEIGHT)).save(folder / "im_1.png")
    Image.new("RGB", (WIDTH // 2, HEIGHT // 2)).save(folder / "im_2.png")
    with pytest.raises(SCFeatError, match=r"im_2.png: the image is 48x32 .*says 96x64"):
        check_images(model, folder)
    Image.new("RGB", (WIDTH, HEIGHT)).save(folder / "im_2.png")
    assert [p.name for p in check_images(model, folder)] == ["im_0.png", "im_1.png", "im_2.png"]


def test_pair_options_are_checked(tmp_path):
    write_model(tmp_path, [CAMERA], arc_images(2))
    model = read_model(tmp_path)
    with pytest.raises(SCFeatError, match="overlap range"):
        select_pairs(model, {"min_overlap": 0.8, "max_overlap": 0.2})
    with pytest.raises(SCFeatError, match="unknown pair option"):
        select_pairs(model, {"min_overlapp": 0.1})
    with pytest.raises(SCFeatError, match="'points' pair rule has nothing to count"):
        select_pairs(model, {"rule": "points"})
