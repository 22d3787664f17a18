"""tools/colmap_to_megadepth.py: a COLMAP model (text and binary, written here) → the CAPS
layout that MegaDepth_SIFT indexes with every pair kept and the ground-truth geometry exact;
bad input through the CLI; undistortion."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dataloader.colmap_model import write_model
from dataloader.megadepth import MegaDepth_SIFT
from tests.unit.test_colmap_model import CAMERA, HEIGHT, WIDTH, arc_images
from tools.colmap_to_megadepth import convert, default_scene_name, main


def write_scene(root, binary=False, count=4, camera=CAMERA):
    images = arc_images(count)
    write_model(root / "scene_a" / "sparse", [camera], images, binary=binary)
    folder = root / "scene_a" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, *_ in images:
        Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / name)
    return root / "scene_a" / "sparse", folder, images


@pytest.mark.parametrize("binary", [False, True])
def test_converted_model_trains_with_exact_geometry(tmp_path, binary):
    model, images, posed = write_scene(tmp_path, binary)
    out = tmp_path / "md"
    result = convert(model, images, out)
    assert result["scene"] == "scene_a" and result["pairs"] == 6 and result["indexed"] == 6
    folder = out / "scene_a" / "dense0" / "aligned"
    assert (folder / "images" / "im_0.png").is_symlink()
    dataset = MegaDepth_SIFT({"data_path": str(out), "mode": "train", "workers": 0})
    assert len(dataset) == 6 and not dataset.dropped_at_index
    item = dataset[0]
    assert "skipped" not in item
    fx, fy, cx, cy = CAMERA[3]
    np.testing.assert_allclose(item["intrinsic1"].numpy(),
                               [[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]], rtol=1e-6)
    # Points projected as COLMAP does (pixel centres at +0.5), then minus 0.5, satisfy F1.
    names = {name: (R, t) for name, _, R, t, _ in posed}
    points = np.random.default_rng(1).uniform(-0.5, 0.5, (30, 3))
    K_colmap = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    pixels = []
    for key in ("name1", "name2"):
        R, t = names[item[key].rsplit("/", 1)[1]]
        x = (points @ R.T + t) @ K_colmap.T
        pixels.append(np.c_[x[:, :2] / x[:, 2:] - 0.5, np.ones(len(points))])
    fmat = item["F1"].double().numpy()
    lines = pixels[0] @ fmat.T
    distance = np.abs(np.sum(lines * pixels[1], 1)) / np.linalg.norm(lines[:, :2], axis=1)
    assert distance.max() < 1e-3


def test_default_scene_name_skips_model_folders(tmp_path):
    assert default_scene_name(tmp_path / "castle" / "sparse" / "0") == "castle"
    assert default_scene_name(tmp_path / "out" / "sparse-sift" / "0") == "out"


def test_cli_names_a_missing_image_and_counts_pairs(tmp_path, capsys):
    model, images, _ = write_scene(tmp_path, binary=True)
    (images / "im_2.png").unlink()
    assert main(["--model", str(model), "--images", str(images), "--out", str(tmp_path / "o")]) == 2
    assert "lacks 1 of the 4 images" in capsys.readouterr().err
    Image.new("RGB", (WIDTH, HEIGHT)).save(images / "im_2.png")
    assert main(["--model", str(model), "--images", str(images), "--out", str(tmp_path / "o"),
                 "--copy", "--no-check"]) == 0
    assert "4 images, 6 pairs (cameras rule" in capsys.readouterr().out
    lines = (tmp_path / "o/scene_a/dense0/aligned/pairs.txt").read_text().split("\n")
    assert lines[0] == "im_0.png im_1.png" and len(lines) == 7
    assert not (tmp_path / "o/scene_a/dense0/aligned/images/im_0.png").is_symlink()
    # A rule that leaves nothing: one message, the model named.
    assert main(["--model", str(model), "--images", str(images), "--out", str(tmp_path / "o"),
                 "--max-angle", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{model}: the pair rule" in err and "leaves no pair" in err


def test_distorted_model_is_refused_or_undistorted(tmp_path, capsys):
    pytest.importorskip("pycolmap")
    camera = ("SIMPLE_RADIAL", WIDTH, HEIGHT, [80.0, WIDTH / 2, HEIGHT / 2, 0.05])
    model, images, _ = write_scene(tmp_path, camera=camera)
    args = ["--model", str(model), "--images", str(images), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "SIMPLE_RADIAL camera with distortion" in capsys.readouterr().err
    assert main(args + ["--undistort"]) == 0
    assert "MegaDepth_SIFT indexes 6 of them" in capsys.readouterr().out
    first = (tmp_path / "o/scene_a/dense0/aligned/img_cam.txt").read_text().split("\n")[3]
    assert first.startswith("im_0.png ")
