"""3-D reconstruction with pycolmap: a scene with exact correspondences reconstructs fully with
sub-pixel reprojection error and the true poses; bad input; the CLI on a synthetic scene."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import reconstruct
from dataloader.megadepth_layout import CameraRecord
from evaluation.matching import Features, mnn_matcher
from evaluation.reconstruction import (build_database, exhaustive_matches, list_images,
                                       pose_errors, read_ground_truth,
                                       reconstruction_statistics, run_mapper)
from utils.errors import SCFeatError

pytest.importorskip("pycolmap")

WIDTH, HEIGHT = 320, 240


def look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World→camera pose ``4×4`` of a camera at ``centre`` looking at ``target`` (y down)."""
    z = (target - centre) / np.linalg.norm(target - centre)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R, -R @ centre
    return pose


def exact_scene(folder: Path, images: int = 6, points: int = 300, seed: int = 0):
    """Blank images (COLMAP reads only their size), ground-truth cameras and exact features:
    every 3-D point's projection in every image that sees it, with a one-hot descriptor per
    point so mutual nearest neighbours are exactly the true correspondences.

    Returns ``(names, cameras {name: CameraRecord}, features {name: Features(keypoints,
    descriptors)}, world points points×3)``.
    """
    rng = np.random.default_rng(seed)
    world = np.stack([rng.uniform(-2, 2, points), rng.uniform(-1.5, 1.5, points),
                      rng.uniform(4, 8, points)], axis=1)
    folder.mkdir(parents=True, exist_ok=True)
    names, cameras, features = [], {}, {}
    for index in range(images):
        name = f"view_{index:02d}.png"
        angle = np.radians(-25 + 50 * index / max(images - 1, 1))
        centre = np.array([3.0 * np.sin(angle), rng.uniform(-0.3, 0.3), 6 - 6.0 * np.cos(angle)])
        pose = look_at(centre, np.array([0.0, 0.0, 6.0]) + rng.uniform(-0.3, 0.3, 3))
        focal = rng.uniform(280, 320)
        K = np.array([[focal, 0, (WIDTH - 1) / 2], [0, focal, (HEIGHT - 1) / 2], [0, 0, 1.0]])
        in_camera = world @ pose[:3, :3].T + pose[:3, 3]
        pixels = in_camera @ K.T
        pixels = pixels[:, :2] / pixels[:, 2:]
        visible = (in_camera[:, 2] > 0.1) & (pixels[:, 0] >= 0) & (pixels[:, 0] <= WIDTH - 1) \
            & (pixels[:, 1] >= 0) & (pixels[:, 1] <= HEIGHT - 1)
        cv2.imwrite(str(folder / name), np.full((HEIGHT, WIDTH, 3), 128, np.uint8))
        names.append(name)
        cameras[name] = CameraRecord(WIDTH, HEIGHT, K, pose)
        features[name] = Features(pixels[visible], np.eye(points, dtype=np.float32)[visible])
    return names, cameras, features, world


def test_exact_correspondences_reconstruct_every_image_sub_pixel(tmp_path):
    names, cameras, features, _ = exact_scene(tmp_path / "images")
    assert min(len(f[0]) for f in features.values()) > 150  # the scene is well covered
    matches = exhaustive_matches(features, names, mnn_matcher())
    database = tmp_path / "scene.db"
    build_database(database, tmp_path / "images", names, features, matches, cameras)
    reconstruction = run_mapper(database, tmp_path / "images", tmp_path / "sparse",
                                fixed_intrinsics=True)
    statistics = reconstruction_statistics(reconstruction, len(names))
    assert statistics["registered"] == len(names) == 6
    assert statistics["mean_reprojection_error"] < 0.1  # exact points: well below a pixel
    assert statistics["points3D"] > 200 and statistics["mean_track_length"] > 3
    assert statistics["observations"] == pytest.approx(statistics["points3D"]
                                                       * statistics["mean_track_length"])
    errors = pose_errors(reconstruction, cameras)
    assert errors["aligned"] == 6
    assert errors["rotation_error_max"] < 0.05 and errors["centre_error_max"] < 0.01


def test_pose_errors_see_a_wrong_camera(tmp_path):
    """The alignment does not hide a wrong camera: turn one ground-truth camera by 5° about its
    centre (the centres, hence the alignment, are unchanged)."""
    names, cameras, features, _ = exact_scene(tmp_path / "images")
    database = tmp_path / "scene.db"
    build_database(database, tmp_path / "images", names, features,
                   exhaustive_matches(features, names, mnn_matcher()), cameras)
    reconstruction = run_mapper(database, tmp_path / "images", tmp_path / "sparse", True)
    wrong = dict(cameras)
    pose = cameras[names[2]].pose.copy()
    centre = -pose[:3, :3].T @ pose[:3, 3]
    pose[:3, :3] = cv2.Rodrigues(np.array([0.0, np.radians(5.0), 0.0]))[0] @ pose[:3, :3]
    pose[:3, 3] = -pose[:3, :3] @ centre
    wrong[names[2]] = CameraRecord(WIDTH, HEIGHT, cameras[names[2]].K, pose)
    errors = pose_errors(reconstruction, wrong)
    assert errors["rotation_error_max"] == pytest.approx(5.0, abs=0.05)
    assert errors["rotation_error_median"] < 0.05 and errors["centre_error_max"] < 0.01


def test_bad_input_names_the_folder_or_file(tmp_path):
    with pytest.raises(SCFeatError, match="not a folder of images"):
        list_images(tmp_path / "missing")
    (tmp_path / "one").mkdir()
    cv2.imwrite(str(tmp_path / "one" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(SCFeatError, match="at least 2 images"):
        list_images(tmp_path / "one")
    poses = tmp_path / "poses.txt"
    poses.write_text("a.png 32 32 30 30 15.5 15.5 1 0 0 0 1 0 0 0 1 0 0 0\n")
    with pytest.raises(SCFeatError, match=r"poses.txt: no camera for b.png"):
        read_ground_truth(poses, ["a.png", "b.png"])
    poses.write_text("a.png 32 32 30 30 15.5 15.5 1 0 0 0 1 0 0 0 1 0 0\n")
    with pytest.raises(SCFeatError, match=r"poses.txt:1: expected 19 values"):
        read_ground_truth(poses, ["a.png"])
    assert reconstruct.main(["--images", str(tmp_path / "one"), "--features", "sift",
                             "--out", str(tmp_path / "out")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sift", "xfeat+lightglue"])
def test_cli_reconstructs_a_synthetic_scene(method, tmp_path, capsys):
    from tools.synthetic import make_megadepth1500
    data = tmp_path / "data"
    make_megadepth1500(data, scenes=1, images=6, pairs=3, size=(180, 240), seed=1)
    out = tmp_path / "out"
    assert reconstruct.main(["--images", str(data / "images" / "synth_0000"), "--features",
                             method, "--max-keypoints", "512", "--out", str(out), "--gt",
                             str(data / "poses" / "synth_0000.txt")]) == 0
    printed = capsys.readouterr().out
    statistics = json.loads((out / f"{method}.json").read_text())
    assert f"{method}: {statistics['registered']} of 6 images registered" in printed
    assert statistics["registered"] >= 5 and statistics["mean_reprojection_error"] < 1.5
    assert statistics["rotation_error_median"] < 1.0


def test_an_unknown_matcher_is_refused(tmp_path, capsys):
    assert reconstruct.main(["--images", str(tmp_path), "--features", "xfeat+lighterglue",
                             "--out", str(tmp_path / "out")]) == 2
    assert "unknown matcher '+lighterglue'" in capsys.readouterr().err


def write_colmap_ground_truth(folder: Path, names, cameras, binary: bool) -> Path:
    """The ground-truth cameras as a COLMAP model (principal points + 0.5, COLMAP's pixels)."""
    from dataloader.colmap_model import write_model
    models = [("PINHOLE", cameras[n].width, cameras[n].height,
               [cameras[n].K[0, 0], cameras[n].K[1, 1], cameras[n].K[0, 2] + 0.5,
                cameras[n].K[1, 2] + 0.5]) for n in names]
    images = [(n, k, cameras[n].pose[:3, :3], cameras[n].pose[:3, 3], np.zeros((0, 3)))
              for k, n in enumerate(names)]
    return write_model(folder, models, images, binary=binary)


@pytest.mark.parametrize("binary", [False, True])
def test_ground_truth_from_a_colmap_model_gives_exact_poses_and_maa_1(tmp_path, binary):
    names, cameras, features, _ = exact_scene(tmp_path / "images")
    model = write_colmap_ground_truth(tmp_path / "gt", names, cameras, binary)
    read = read_ground_truth(model, names, tmp_path / "images")
    for name in names:
        assert read[name].K == pytest.approx(cameras[name].K, abs=1e-9)
        assert read[name].pose == pytest.approx(cameras[name].pose, abs=1e-9)
    database = tmp_path / "scene.db"
    build_database(database, tmp_path / "images", names, features,
                   exhaustive_matches(features, names, mnn_matcher()), read)
    reconstruction = run_mapper(database, tmp_path / "images", tmp_path / "sparse", True)
    errors = pose_errors(reconstruction, read)
    assert errors["aligned"] == 6 and errors["rotation_error_max"] < 0.05
    assert errors["maa"] == 1.0
    # Two images fewer in the count of the scene: the same errors, mAA over 8 images.
    assert pose_errors(reconstruction, read, num_images=8)["maa"] == pytest.approx(6 / 8)


def test_mean_average_accuracy_by_hand():
    from evaluation.reconstruction import MAA_CENTRE, MAA_ROTATION_DEG, mean_average_accuracy
    assert MAA_ROTATION_DEG[0] == 1 and MAA_ROTATION_DEG[-1] == 10
    assert MAA_CENTRE[0] == pytest.approx(0.2) and MAA_CENTRE[-1] == pytest.approx(5)
    # Image a: accurate at every threshold; b: rotation 5.5° passes thresholds 6..10 (5 of 10)
    # but its centre error 1.0 passes only from the 6th threshold (geomspace(0.2, 5)[5] ≈ 1.20):
    # both from the 6th on → 5 of 10; c never; a 4th image is not registered.
    value = mean_average_accuracy(np.array([0.1, 5.5, 20.0]), np.array([0.01, 1.0, 0.01]), 4)
    assert value == pytest.approx((10 + 5 + 0 + 0) / 40)


def test_ground_truth_model_must_match_the_images(tmp_path):
    names, cameras, _, _ = exact_scene(tmp_path / "images", images=3, points=20)
    model = write_colmap_ground_truth(tmp_path / "gt", names[:2], cameras, binary=False)
    with pytest.raises(SCFeatError, match=r"gt: no camera for view_02.png \(expected an image "
                                          r"entry in .*images.txt\)"):
        read_ground_truth(model, names, tmp_path / "images")
    cv2.imwrite(str(tmp_path / "images" / names[0]), np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(SCFeatError, match=r"view_00.png: the image is 20x10 .*says 320x240"):
        read_ground_truth(model, names[:2], tmp_path / "images")
