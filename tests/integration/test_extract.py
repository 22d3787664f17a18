"""Feature extraction: the HPatches run (npz, h5, images, SIFT, unreadable files), the
Python API (`detect_and_describe`) and the errors of the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from conftest import assert_same_features, tf32_off

import extract_features
from dataloader.hpatches import sift_keypoints
from utils.image import to_tensor_normalized
from evaluation.hpatches import parse_hpatches_methods
from extraction import output_dir, run_extraction
from schemas import load_eval_hpatches_config, load_extract_config
from utils.cli import resolve_device
from registry import build_model
from tools.synthetic import load_photo
from utils.config import save_config
from utils.errors import SCFeatError
from model.keypoints import generate_kpts_single, sample_descriptors

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "config" / "extract_hpatches.yaml"
NUM_PTS = 256
# image name → (size, top-left corner in the photo); crops 96×128 and 80×112
IMAGES = {"1.ppm": ((100, 140), (150, 180)), "2.ppm": ((83, 121), (170, 200))}
DETECTOR = {"num_pts": NUM_PTS, "stable": True, "use_nms": True, "nms_radius": 1, "thr": 1.0,
            "thr_mod": "abs"}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_photo("astronaut")


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    """A random SCFeatModel and its checkpoint folder ``run/001`` (config.yaml in ``run``)."""
    torch.manual_seed(0)
    model_config = {"backbone_config": {"pretrained": False}}
    model = build_model("SCFeatModel", model_config).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "run" / "001"
    folder.mkdir(parents=True)
    torch.save(model.backbone.state_dict(), folder / "backbone.pth")
    torch.save(model.localheader.state_dict(), folder / "localheader.pth")
    save_config({"model": "SCFeatModel", "model_config": model_config},
                folder.parent / "config.yaml")
    return model, folder


@pytest.fixture(scope="module")
def hpatches(tmp_path_factory, photo) -> Path:
    """``i_photo/1.ppm`` (100×140), ``i_photo/2.ppm`` (83×121), ``v_bad/1.ppm`` unreadable."""
    root = tmp_path_factory.mktemp("hpatches")
    (root / "i_photo").mkdir()
    for name, ((height, width), (y, x)) in IMAGES.items():
        cv2.imwrite(str(root / "i_photo" / name), photo[y:y + height, x:x + width, ::-1])
    (root / "v_bad").mkdir()
    (root / "v_bad" / "1.ppm").write_bytes(b"P6 not really an image")
    return root


def overrides(data: Path, checkpoint: Path, out_root: Path, *extra: str) -> list[str]:
    """Outputs in ``<out_root>/hpatches-scfeat``; no score-map images unless ``extra`` asks."""
    return [f"load_path={checkpoint}", f"data_config_extract.data_path={data}",
            "data_config_extract.workers=0", f"output_root={out_root / 'hpatches-scfeat'}",
            "device=cpu", "output_img=false", f"detector_config.num_pts={NUM_PTS}", *extra]


def read_rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(path))[..., ::-1])


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def npz_run(hpatches, model_and_checkpoint, tmp_path_factory):
    """The shipped config, npz format with images; a stale file for the unreadable image."""
    out_root = tmp_path_factory.mktemp("out")
    stale = out_root / "hpatches-scfeat" / "desc" / "v_bad" / "1.ppm.scfeat"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"features of an earlier run")
    conf = load_extract_config(CONFIG, overrides(hpatches, model_and_checkpoint[1], out_root,
                                                 "output_img=true"))
    summary = run_extraction(conf)
    return out_root / "hpatches-scfeat", summary


def test_npz_files_hold_unit_descriptors_in_the_uncropped_frame(npz_run, hpatches):
    out, summary = npz_run
    assert summary["images"] == 2 and summary["mean_ms"] > 0
    for name, ((height, width), _) in IMAGES.items():
        path = out / "desc" / "i_photo" / f"{name}.scfeat"
        assert path.is_file() and not Path(f"{path}.npz").exists()
        features = read_npz(path)
        assert set(features) == {"keypoints", "scores", "descriptors"}
        assert all(v.dtype == np.float32 for v in features.values())
        keypoints, scores = features["keypoints"], features["scores"]
        descriptors = features["descriptors"]
        count = len(keypoints)
        assert 0 < count <= NUM_PTS
        assert keypoints.shape == (count, 2) and scores.shape == (count,)
        assert descriptors.shape == (count, 128)
        np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
        # ranked by the pixel's own score; the stored score is its 3×3 maximum (the original's)
        assert np.all(scores > 0)
        # Coordinates are pixels of the uncropped image; the crop (multiple of 16) is at the
        # right/bottom, so every keypoint lies inside it.
        crop_h, crop_w = height // 16 * 16, width // 16 * 16
        assert (crop_h, crop_w) != (height, width)
        assert keypoints.min() >= 0
        assert keypoints[:, 0].max() <= crop_w - 1 and keypoints[:, 1].max() <= crop_h - 1
        for kind in ("score", "kpts"):
            drawn = cv2.imread(str(out / "image" / "i_photo" / f"{Path(name).stem}_{kind}.png"))
            assert drawn.shape == (crop_h, crop_w, 3)
    assert not list(out.rglob("*.tmp"))


def test_unreadable_image_is_skipped_named_and_its_stale_file_removed(npz_run, hpatches):
    out, summary = npz_run
    assert summary["skipped"] == [hpatches / "v_bad" / "1.ppm"]
    assert not (out / "desc" / "v_bad" / "1.ppm.scfeat").exists()


def test_api_on_a_16_multiple_image_equals_the_extraction(npz_run, hpatches, model_and_checkpoint):
    out, _ = npz_run
    model, _ = model_and_checkpoint
    image = read_rgb(hpatches / "i_photo" / "1.ppm")[:96, :128]  # the loader's crop
    features = model.detect_and_describe(image, **DETECTOR)
    expected = read_npz(out / "desc" / "i_photo" / "1.ppm.scfeat")
    assert set(features) == set(expected)
    for key, value in expected.items():
        assert features[key].dtype == np.float32
        np.testing.assert_allclose(features[key], value, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_zero_texture_image_gives_an_empty_valid_feature_file(model_and_checkpoint, photo,
                                                              tmp_path):
    """A constant image has nothing to detect: its npz holds 0 keypoints (0×2, 0, 0×128
    float32), the textured image beside it is extracted as usual, and the evaluator reads both."""
    data = tmp_path / "hpatches"
    (data / "i_blank").mkdir(parents=True)
    cv2.imwrite(str(data / "i_blank" / "1.ppm"), np.full((64, 96, 3), 127, np.uint8))
    cv2.imwrite(str(data / "i_blank" / "2.ppm"), photo[100:164, 100:196, ::-1])
    conf = load_extract_config(CONFIG, overrides(data, model_and_checkpoint[1], tmp_path / "out"))
    summary = run_extraction(conf)
    assert summary["images"] == 2 and summary["skipped"] == []
    desc = tmp_path / "out" / "hpatches-scfeat" / "desc" / "i_blank"
    blank, textured = read_npz(desc / "1.ppm.scfeat"), read_npz(desc / "2.ppm.scfeat")
    assert blank["keypoints"].shape == (0, 2) and blank["scores"].shape == (0,)
    assert blank["descriptors"].shape == (0, 128)
    assert all(v.dtype == np.float32 for v in blank.values())
    assert len(textured["keypoints"]) > 0
    from evaluation.matching import read_feature_file
    keypoints, descriptors = read_feature_file(desc / "1.ppm.scfeat")
    assert keypoints.shape == (0, 2) and descriptors.shape == (0, 128)

    # The Python API agrees, for any constant colour; one textured pixel is enough to detect.
    model, _ = model_and_checkpoint
    image = np.zeros((48, 64, 3), np.uint8)
    image[...] = (10, 200, 30)
    features = model.detect_and_describe(image)
    assert features["keypoints"].shape == (0, 2) and features["descriptors"].shape == (0, 128)
    image[20, 30] = 0
    assert len(model.detect_and_describe(image)["keypoints"]) > 0


@pytest.mark.slow
def test_api_pads_an_odd_image_and_keeps_keypoints_inside(model_and_checkpoint, photo):
    model, _ = model_and_checkpoint
    image = np.ascontiguousarray(photo[200:245, 150:211])  # 45×61 → padded to 48×64
    features = model.detect_and_describe(image, num_pts=200)
    keypoints = features["keypoints"]
    assert 0 < len(keypoints) <= 200
    assert keypoints.min() >= 0 and keypoints[:, 0].max() <= 60 and keypoints[:, 1].max() <= 44

    # The same, spelled out: replicate-pad, run, crop the score map, select, sample.
    padded = np.pad(image, ((0, 3), (0, 3), (0, 0)), mode="edge")
    with torch.inference_mode():
        outputs = model.extract(to_tensor_normalized(padded)[None])
        kpts, scores = generate_kpts_single(outputs["local_point"][:, :, :45, :61], num_pts=200)
        descriptors = sample_descriptors(outputs["desc_map"], kpts, (48, 64))
    assert len(keypoints) == len(kpts)
    np.testing.assert_allclose(keypoints, kpts.numpy(), atol=1e-5)
    np.testing.assert_allclose(features["scores"], scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(features["descriptors"], descriptors.numpy(), atol=1e-5)
    # Without the crop, the padding would yield keypoints (the last rows/columns are candidates).
    unmasked, _ = generate_kpts_single(outputs["local_point"], num_pts=10_000)
    assert (unmasked[:, 0] > 60).any() or (unmasked[:, 1] > 44).any()

    local = model.detect_and_describe(image, descriptor_map="local_map", num_pts=200)
    np.testing.assert_allclose(local["keypoints"], keypoints, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(local["descriptors"], axis=1), 1.0, atol=1e-5)
    assert np.abs(local["descriptors"] - features["descriptors"]).max() > 1e-2


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_api_takes_tensors_and_grey_images_alike(model_and_checkpoint, photo, device):
    """A float tensor in [0, 1] (3×H×W, 1×3×H×W, LightGlue's load_image) gives the numpy
    image's features; a grey image (H×W, H×W×1, 1×H×W) gives those of its RGB copy; on the
    model's device whatever the image's. (On CUDA with TF32 off: the forms differ by a rounding
    of the input.)"""
    model = model_and_checkpoint[0].to(device)
    atol = 1e-5 if device == "cpu" else 1e-4
    try:
        with tf32_off():
            image = np.ascontiguousarray(photo[200:245, 150:211])  # 45×61: padded
            expected = model.detect_and_describe(image, num_pts=100)
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().to(device) / 255
            load_image = torch.tensor(image.transpose(2, 0, 1) / 255.0, dtype=torch.float)
            for name, form in (("3×H×W", tensor), ("1×3×H×W", tensor[None]),
                               ("on the CPU", tensor.cpu()), ("load_image", load_image)):
                assert_same_features(model.detect_and_describe(form, num_pts=100), expected,
                                     atol, name)
            grey = np.ascontiguousarray(image[:, :, 0])
            expected = model.detect_and_describe(np.repeat(grey[:, :, None], 3, axis=2),
                                                 num_pts=100)
            for name, form in (("H×W", grey), ("H×W×1", grey[:, :, None]),
                               ("1×H×W", torch.from_numpy(grey)[None].float() / 255)):
                found = model.detect_and_describe(form, num_pts=100)
                if device == "cpu":
                    for key, value in expected.items():
                        np.testing.assert_array_equal(found[key], value, err_msg=f"{name}: {key}")
                else:
                    assert_same_features(found, expected, atol, name)
    finally:
        model.to("cpu")


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), np.float32), "must be uint8"),
    (np.zeros((32, 32, 2), np.uint8), "H×W×3"),
    (np.zeros((32, 32, 4), np.uint8), "RGBA"),
    (np.zeros((10, 64, 3), np.uint8), "at least 16×16"),
    (torch.zeros(3, 10, 64), "at least 16×16"),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), r"float in \[0, 1\], got uint8"),
    (torch.full((3, 32, 32), 255.0), "divide it by 255"),
    (torch.zeros(2, 3, 32, 32), "one image at a time"),
    (torch.zeros(32, 32, 3), "channels last"),
    ([[0]], "numpy uint8 array"),
])
def test_api_rejects_bad_images(model_and_checkpoint, image, message):
    with pytest.raises(SCFeatError, match=message):
        model_and_checkpoint[0].detect_and_describe(image)


def test_api_rejects_bad_options(model_and_checkpoint):
    model = model_and_checkpoint[0]
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(SCFeatError, match="num_ptz.*did you mean 'num_pts'"):
        model.detect_and_describe(image, num_ptz=5)
    with pytest.raises(SCFeatError, match="thr_mod"):
        model.detect_and_describe(image, thr_mod="median")
    with pytest.raises(SCFeatError, match="descriptor_map"):
        model.detect_and_describe(image, descriptor_map="global_map")


@pytest.mark.slow
def test_h5_from_the_cli_matches_the_npz_files(npz_run, hpatches, model_and_checkpoint,
                                               tmp_path, capsys):
    out_npz, _ = npz_run
    argv = ["--config", str(CONFIG), "--format", "h5",
            *overrides(hpatches, model_and_checkpoint[1], tmp_path)]
    assert extract_features.main(argv) == 0
    stderr = capsys.readouterr().err
    assert "ms/image" in stderr
    assert f"skipped 1 image(s) that could not be read (or are smaller than 16 px): " \
           f"{hpatches / 'v_bad' / '1.ppm'}" in stderr
    path = tmp_path / "hpatches-scfeat" / "features.h5"
    assert not (tmp_path / "hpatches-scfeat" / "desc").exists()
    with h5py.File(path, "r") as handle:
        assert sorted(handle) == ["i_photo"] and sorted(handle["i_photo"]) == ["1.ppm", "2.ppm"]
        for name, ((height, width), _) in IMAGES.items():
            group = handle[f"i_photo/{name}"]
            assert sorted(group) == ["descriptors", "image_size", "keypoints", "scores"]
            assert group["image_size"][()].tolist() == [width, height]
            expected = read_npz(out_npz / "desc" / "i_photo" / f"{name}.scfeat")
            np.testing.assert_allclose(group["keypoints"][()], expected["keypoints"], atol=1e-5)
            np.testing.assert_allclose(group["scores"][()], expected["scores"], atol=1e-5)
            # hloc's layout: descriptors D×N
            np.testing.assert_allclose(group["descriptors"][()], expected["descriptors"].T,
                                       atol=1e-5)
    assert (tmp_path / "hpatches-scfeat" / "extract.log").is_file()


def test_use_sift_takes_sift_keypoints_and_network_descriptors(model_and_checkpoint, photo,
                                                               tmp_path):
    data = tmp_path / "data"
    (data / "i_one").mkdir(parents=True)
    cv2.imwrite(str(data / "i_one" / "1.ppm"), photo[150:250, 180:320, ::-1])
    conf = load_extract_config(CONFIG, overrides(data, model_and_checkpoint[1], tmp_path / "out",
                                                 "use_sift=true"))
    assert run_extraction(conf)["images"] == 1
    features = read_npz(tmp_path / "out" / "hpatches-scfeat" / "desc" / "i_one" / "1.ppm.scfeat")
    crop = read_rgb(data / "i_one" / "1.ppm")[:96, :128]
    expected = sift_keypoints(crop, conf["data_config_extract"]["sift_max_pts"])
    assert conf["data_config_extract"]["sift_max_pts"] == 0  # every SIFT keypoint, as the original
    assert len(expected) > 10
    np.testing.assert_array_equal(features["keypoints"], expected)
    np.testing.assert_allclose(np.linalg.norm(features["descriptors"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(features["scores"], np.ones(len(expected), np.float32))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = extract_features.main(["--config", str(CONFIG), *argv])
    return code, capsys.readouterr().err


def test_missing_checkpoint_file(model_and_checkpoint, hpatches, tmp_path, capsys):
    folder = tmp_path / "run" / "001"
    folder.mkdir(parents=True)
    os.symlink(model_and_checkpoint[1] / "backbone.pth", folder / "backbone.pth")
    os.symlink(model_and_checkpoint[1].parent / "config.yaml", folder.parent / "config.yaml")
    code, err = run_cli(capsys, *overrides(hpatches, folder, tmp_path))
    assert code == 2 and err.startswith("error: ")
    assert f"'{folder / 'localheader.pth'}' does not exist" in err and "Traceback" not in err
    code, err = run_cli(capsys, *overrides(hpatches, tmp_path / "nowhere", tmp_path))
    assert code == 2 and "checkpoint folder" in err and "nowhere" in err


def test_checkpoint_of_another_architecture(model_and_checkpoint, hpatches, tmp_path, capsys):
    folder = tmp_path / "run" / "001"
    folder.mkdir(parents=True)
    for name in ("backbone.pth", "localheader.pth"):
        os.symlink(model_and_checkpoint[1] / name, folder / name)
    save_config({"model_config": {"backbone_config": {"pretrained": False},
                                  "local_with_img": False}}, folder.parent / "config.yaml")
    code, err = run_cli(capsys, *overrides(hpatches, folder, tmp_path))
    assert code == 2 and "localheader.pth" in err and "unexpected keys: convimg" in err


def test_no_images_under_data_path(model_and_checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, *overrides(tmp_path / "empty", model_and_checkpoint[1], tmp_path))
    assert code == 2 and "no HPatches images" in err


def test_bad_config_values(model_and_checkpoint, hpatches, tmp_path):
    base = overrides(hpatches, model_and_checkpoint[1], tmp_path)
    for extra, message in [("loss_distance=l2", "loss_distance"),
                           ("detector_config.thr=high", "thr"),
                           ("detector_config.thr_mod=median", "thr_mod"),
                           ("detector_config.use_nms=soft", "use_nms"),
                           ("descriptor_map=global_map", "descriptor_map"),
                           ("data_config_extract.use_sift=true", "top-level 'use_sift'")]:
        with pytest.raises(SCFeatError, match=message):
            load_extract_config(CONFIG, [*base, extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_without_cuda():
    with pytest.raises(SCFeatError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.slow
def test_cli_bad_key_exits_2_without_traceback(model_and_checkpoint, tmp_path):
    config = tmp_path / "extract.yaml"
    config.write_text(CONFIG.read_text().replace("  num_pts: 8192", "  num_ptz: 8192"))
    line = next(i for i, text in enumerate(config.read_text().splitlines(), 1) if "num_ptz" in text)
    result = subprocess.run([sys.executable, "extract_features.py", "--config", str(config),
                             f"load_path={model_and_checkpoint[1]}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert f"{config}:{line}: key 'detector_config.num_ptz' is not a known key; did you mean " \
           f"'num_pts'?" in result.stderr


def test_shipped_configs_validate(model_and_checkpoint):
    checkpoint = f"load_path={model_and_checkpoint[1]}"
    for path in (CONFIG, REPO_ROOT / "config" / "demo" / "extract.yaml"):
        conf = load_extract_config(path, [checkpoint])
        assert conf["detector_config"]["thr"] == 1.0 and conf["descriptor_map"] == "desc_map"
    conf = load_extract_config(CONFIG, [checkpoint])
    assert (conf["output_root"], conf["postfix"], conf["detector_config"]["num_pts"]) == \
        ("hpatches/output", "scfeat", 8192)
    assert output_dir(conf) == Path("ckpts/hpatches/output")  # under ./ckpts, as the original
    assert output_dir({"output_root": "/abs/out"}) == Path("/abs/out")
    # The shipped evaluation configs read where the shipped extraction configs write.
    for extract, evaluate, method in [(CONFIG, "eval_hpatches.yaml", "scfeat"),
                                      (REPO_ROOT / "config" / "demo" / "extract.yaml",
                                       "demo/eval.yaml", "stage2")]:
        written = Path(os.path.normpath(output_dir(load_extract_config(extract, [checkpoint]))))
        methods = parse_hpatches_methods(load_eval_hpatches_config(REPO_ROOT / "config" / evaluate)["methods"])
        assert {m.name: m.features for m in methods}[method] == written / "desc"
    # model_config entries left as None come from the checkpoint run's config.yaml
    assert conf["model_config"]["backbone"] == "ResUNet_F2R"
    assert conf["model_config"]["backbone_config"]["encoder"] == "resnet50"
