"""Extraction on the other benchmarks' layouts with the shipped configs (config/extract_aachen,
extract_eth, extract_inloc.yaml): the files each benchmark reads, keypoints in the image file's
pixels, Aachen's query detector, InLoc's scale, save_npz, and the keys that belong to one
dataset only."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import save_random_checkpoint
from extraction import run_extraction
from schemas import load_extract_config
from tools.synthetic import load_photo
from utils.errors import SCFeatError

CONFIG = Path(__file__).resolve().parents[2] / "config"
UNTHRESHOLDED = ["detector_config.thr=false"]  # counts set by num_pts alone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "run" / "001"
    save_random_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_photo("astronaut")


def write_crop(path: Path, photo: np.ndarray, top: int, left: int, size=(96, 128)) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(photo[top:top + size[0], left:left + size[1], ::-1]))


def extract(config: str, data: Path, checkpoint: Path, out: Path, *extra: str) -> dict:
    conf = load_extract_config(CONFIG / config, [
        f"load_path={checkpoint}", f"data_config_extract.data_path={data}",
        "data_config_extract.workers=0", f"output_root={out}", "device=cpu", *extra])
    summary = run_extraction(conf)
    assert summary["skipped"] == []
    return summary


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def assert_features_inside(features: dict, height: int, width: int) -> None:
    keypoints, descriptors = features["keypoints"], features["descriptors"]
    assert keypoints.ndim == 2 and keypoints.shape[1] == 2 and len(keypoints) > 0
    assert descriptors.shape == (len(keypoints), 128)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    assert keypoints.min() >= 0
    assert keypoints[:, 0].max() <= width - 1 and keypoints[:, 1].max() <= height - 1


def test_aachen_npz_files_and_the_query_detector(checkpoint, photo, tmp_path):
    """save_npz: npz files named by the path below images_upright; the query images take
    detector_config_query (150 keypoints), the database images detector_config (300)."""
    upright = tmp_path / "aachen" / "images" / "images_upright"
    names = {"db/1.jpg": (0, 0), "sequences/gopro3/2.jpg": (60, 200),
             "query/night/nexus5x/q1.jpg": (150, 180), "query/day/milestone/q2.jpg": (300, 40)}
    for name, (top, left) in names.items():
        write_crop(upright / name, photo, top, left)
    out = tmp_path / "out"
    summary = extract("extract_aachen.yaml", upright, checkpoint, out,
                      *UNTHRESHOLDED, "detector_config.num_pts=300",
                      "detector_config_query={num_pts: 150, thr: false}")
    assert summary["images"] == 4 and summary["features"] == out / "desc"
    for name in names:
        features = read_npz(out / "desc" / f"{name}.scfeat")
        assert_features_inside(features, 96, 128)
        if name.startswith("query/"):
            assert len(features["keypoints"]) == 150
        else:
            assert 150 < len(features["keypoints"]) <= 300
    assert not (out / "features.h5").exists()


def test_eth_files_beside_each_scene_image(checkpoint, photo, tmp_path):
    data = tmp_path / "eth"
    write_crop(data / "Fountain" / "images" / "0000.jpg", photo, 0, 0)
    write_crop(data / "Fountain" / "images" / "0001.jpg", photo, 40, 60)
    write_crop(data / "Herzjesu" / "images" / "0000.png", photo, 200, 100, size=(83, 121))
    out = tmp_path / "out"
    assert extract("extract_eth.yaml", data, checkpoint, out, *UNTHRESHOLDED)["images"] == 3
    assert sorted(p.relative_to(out / "desc").as_posix() for p in (out / "desc").rglob("*")
                  if p.is_file()) == ["Fountain/images/0000.jpg.scfeat",
                                      "Fountain/images/0001.jpg.scfeat",
                                      "Herzjesu/images/0000.png.scfeat"]
    features = read_npz(out / "desc" / "Herzjesu" / "images" / "0000.png.scfeat")
    assert set(features) == {"keypoints", "scores", "descriptors"}
    assert_features_inside(features, 80, 112)  # the crop of the 83×121 file
    # subfolder (the original's key): one scene per run, <scene>/<image> files, one output folder
    single = tmp_path / "single"
    for scene in ("Fountain", "Herzjesu"):
        extract("extract_eth.yaml", data, checkpoint, single, *UNTHRESHOLDED,
                f"data_config_extract.subfolder={scene}")
    assert sorted(p.relative_to(single / "desc").as_posix() for p in (single / "desc").rglob("*")
                  if p.is_file()) == ["Fountain/0000.jpg.scfeat", "Fountain/0001.jpg.scfeat",
                                      "Herzjesu/0000.png.scfeat"]
    same = read_npz(single / "desc" / "Herzjesu" / "0000.png.scfeat")
    np.testing.assert_array_equal(same["keypoints"], features["keypoints"])


@pytest.mark.slow
def test_inloc_scale_maps_keypoints_to_the_file_pixels(checkpoint, photo, tmp_path):
    """scale 0.5 on a 192×256 image gives the features of the image resized to 96×128 with
    every keypoint mapped back (x = (x' + 0.5)·2 - 0.5); one h5 group per image, hloc's names."""
    import cv2

    big, small = tmp_path / "big", tmp_path / "small"
    name = "database/cutouts/DUC1/024/cut.png"
    write_crop(big / name, photo, 100, 100, size=(192, 256))
    resized = cv2.resize(cv2.imread(str(big / name)), (128, 96), interpolation=cv2.INTER_AREA)
    (small / name).parent.mkdir(parents=True)
    cv2.imwrite(str(small / name), resized)
    write_crop(big / "query" / "iphone7" / "IMG_0731.JPG", photo, 0, 0, size=(160, 128))
    extract("extract_inloc.yaml", big, checkpoint, tmp_path / "out_big", *UNTHRESHOLDED,
            "data_config_extract.scale=0.5")
    extract("extract_inloc.yaml", small, checkpoint, tmp_path / "out_small", *UNTHRESHOLDED)
    with h5py.File(tmp_path / "out_big" / "features.h5", "r") as scaled, \
            h5py.File(tmp_path / "out_small" / "features.h5", "r") as direct:
        assert scaled[name]["image_size"][()].tolist() == [256, 192]
        assert scaled["query/iphone7/IMG_0731.JPG"]["image_size"][()].tolist() == [128, 160]
        expected = (direct[name]["keypoints"][()] + 0.5) * 2.0 - 0.5
        np.testing.assert_allclose(scaled[name]["keypoints"][()], expected, atol=1e-4)
        np.testing.assert_allclose(scaled[name]["descriptors"][()], direct[name]["descriptors"][()],
                                   atol=1e-5)
        assert scaled[name]["keypoints"][()][:, 0].max() > 128  # beyond the resized image


@pytest.mark.parametrize("config, override, message", [
    ("extract_hpatches.yaml", "detector_config_query={num_pts: 100}",
     "key 'detector_config_query' .* is only for data: Aachen_Day_Night, got data: HPatch_SIFT"),
    ("extract_aachen.yaml", "detector_config_query={num_ptz: 100}", "did you mean 'num_pts'"),
    ("extract_aachen.yaml", "detector_config_query={thr_mod: median}", "thr_mod"),
    ("extract_hpatches.yaml", "data_config_extract.scale=0.5",
     "key 'data_config_extract.scale' is not a known key"),
    ("extract_aachen.yaml", "use_sift=true", "key 'use_sift' .* only for data: HPatch_SIFT"),
    ("extract_inloc.yaml", ("save_npz=false", "format=npz"),
     "'format' is npz but 'save_npz: false' means no npz files"),
    ("extract_aachen.yaml", "format=h5", "'format' is h5 but 'save_npz: true' means npz files"),
    ("extract_inloc.yaml", "data=Aachen_Day_Night", "key 'data_config_extract.scale' is not a known key"),
])
def test_keys_of_one_dataset_only(checkpoint, config, override, message):
    with pytest.raises(SCFeatError, match=message):
        overrides = [override] if isinstance(override, str) else list(override)
        load_extract_config(CONFIG / config, [f"load_path={checkpoint}", *overrides])


def test_save_npz_decides_the_format_when_format_is_not_given(checkpoint):
    def fmt(config: str, *extra: str) -> str | None:
        return load_extract_config(CONFIG / config, [f"load_path={checkpoint}", *extra])["format"]

    assert fmt("extract_inloc.yaml") == "h5" and fmt("extract_aachen.yaml") == "npz"
    assert fmt("extract_aachen.yaml", "save_npz=null") == "npz"
    assert fmt("extract_aachen.yaml", "save_npz=false") is None  # no feature files (the original)
    assert fmt("extract_aachen.yaml", "save_npz=false", "format=h5") == "h5"
    assert fmt("extract_inloc.yaml", "format=npz") == "npz"
    assert fmt("extract_hpatches.yaml", "format=h5") == "h5"  # no save_npz: format alone


def test_the_format_flag_replaces_save_npz(checkpoint):
    """``--format h5`` on a config with save_npz: true (Aachen's) gives h5, not a conflict."""
    import extract_features

    for flag, expected in (("h5", "h5"), ("npz", "npz")):
        args = extract_features.parse_args(["--config", str(CONFIG / "extract_aachen.yaml"),
                                            "--format", flag, f"load_path={checkpoint}"])
        conf = load_extract_config(args.config, extract_features.config_overrides(args))
        assert conf["format"] == expected and conf["save_npz"] is None


def test_save_npz_false_alone_writes_no_feature_files(checkpoint, photo, tmp_path, caplog):
    """The original's save_npz: false writes no features (a warning says so); the same run with
    format: h5 writes features.h5."""
    data = tmp_path / "eth"
    write_crop(data / "Fountain" / "images" / "0000.jpg", photo, 0, 0)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="scfeat.extract"):
        summary = extract("extract_eth.yaml", data, checkpoint, out, "save_npz=false")
    assert summary["images"] == 1 and summary["features"] is None
    assert not (out / "desc").exists() and not (out / "features.h5").exists()
    assert "no feature files are written" in caplog.text
    summary = extract("extract_eth.yaml", data, checkpoint, out, "save_npz=false", "format=h5")
    assert summary["features"] == out / "features.h5"
    with h5py.File(out / "features.h5", "r") as handle:
        assert list(handle) == ["Fountain"] and len(handle["Fountain/images/0000.jpg/keypoints"])
