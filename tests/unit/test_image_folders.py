"""dataloader/image_folders.py: the extraction layouts (Aachen Day-Night, ETH, InLoc): listing,
feature keys, query images, InLoc's scale, and layout errors that name the path."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataloader.image_folders import ETH_LFB, Aachen_Day_Night, InLoc
from utils.errors import SCFeatError


def write_image(path: Path, size: tuple[int, int] = (40, 56), seed: int = 0) -> np.ndarray:
    """A random smooth ``size`` (H, W) image at ``path`` (lossless for .png); returns its BGR."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 255, (*size, 3), dtype=np.uint8), (0, 0), 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return image


def test_aachen_keys_are_below_images_upright_and_queries_are_marked(tmp_path):
    """data_path is images_upright itself (the original's level)."""
    upright = tmp_path / "images" / "images_upright"
    for name in ("db/2.jpg", "db/10.jpg", "sequences/gopro3/a.png", "query/night/nexus5x/q.jpg",
                 "query/day/milestone/r.JPG"):
        write_image(upright / name)
    (upright / "db" / "notes.txt").write_text("not an image")
    dataset = Aachen_Day_Night({"data_path": str(upright)})
    keys = [dataset.key(p) for p in dataset.paths]
    assert keys == ["db/10.jpg", "db/2.jpg", "query/day/milestone/r.JPG",
                    "query/night/nexus5x/q.jpg", "sequences/gopro3/a.png"]
    assert [dataset.is_query(p) for p in dataset.paths] == [False, False, True, True, False]
    item = dataset[2]
    assert item["key"] == "query/day/milestone/r.JPG" and item["query"] is True
    assert item["image"].shape == (3, 32, 48) and item["orig_size"].tolist() == [40, 56]
    assert item["resized"] == (1.0, 1.0)


@pytest.mark.parametrize("above", ["images/images_upright", "images_upright"])
def test_aachen_data_path_above_images_upright_is_read_and_named(tmp_path, caplog, above):
    """A data_path above images_upright (the dataset folder, or the folder holding
    images_upright) reads the same images under the same keys, with one log line."""
    upright = tmp_path / above
    for name in ("db/1.jpg", "query/night/nexus5x/q.jpg"):
        write_image(upright / name)
    with caplog.at_level(logging.INFO, logger="dataloader.image_folders"):
        dataset = Aachen_Day_Night({"data_path": str(tmp_path)})
    assert [dataset.key(p) for p in dataset.paths] == ["db/1.jpg", "query/night/nexus5x/q.jpg"]
    assert [dataset.is_query(p) for p in dataset.paths] == [False, True]
    lines = [r.getMessage() for r in caplog.records if "above images_upright" in r.getMessage()]
    assert lines == [f"Aachen Day-Night: data_path {tmp_path} is above images_upright; "
                     f"reading {upright}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dataloader.image_folders"):
        Aachen_Day_Night({"data_path": str(upright)})  # the original's level: no line
    assert "above images_upright" not in caplog.text


def test_aachen_ambiguous_data_path_is_refused_naming_both(tmp_path):
    write_image(tmp_path / "db" / "1.jpg")
    write_image(tmp_path / "images" / "images_upright" / "db" / "1.jpg")
    with pytest.raises(SCFeatError, match=f"ambiguous Aachen Day-Night data_path: both "
                                          f"{tmp_path} and {tmp_path / 'images' / 'images_upright'}"):
        Aachen_Day_Night({"data_path": str(tmp_path)})


def test_aachen_layout_errors_name_the_path(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(SCFeatError, match=f"{tmp_path}: no db, sequences, query folder here, nor "
                                          f"{tmp_path / 'images_upright'} or "
                                          f"{tmp_path / 'images' / 'images_upright'}"):
        Aachen_Day_Night({"data_path": str(tmp_path)})
    (tmp_path / "images" / "images_upright" / "db").mkdir(parents=True)
    with pytest.raises(SCFeatError, match=f"no Aachen Day-Night images under {tmp_path}"):
        Aachen_Day_Night({"data_path": str(tmp_path)})
    with pytest.raises(SCFeatError, match=f"{tmp_path / 'absent'} is not a folder"):
        Aachen_Day_Night({"data_path": str(tmp_path / "absent")})


def test_eth_keys_are_scene_images_name(tmp_path, caplog):
    write_image(tmp_path / "Fountain" / "images" / "0001.jpg")
    write_image(tmp_path / "Fountain" / "images" / "0000.png")
    write_image(tmp_path / "Herzjesu" / "images" / "a.JPG")
    (tmp_path / "notes").mkdir()
    with caplog.at_level(logging.WARNING):
        dataset = ETH_LFB({"data_path": str(tmp_path)})
    assert [dataset.key(p) for p in dataset.paths] == [
        "Fountain/images/0000.png", "Fountain/images/0001.jpg", "Herzjesu/images/a.JPG"]
    assert f"{tmp_path / 'notes'}: no images folder; scene skipped" in caplog.text
    assert not any(dataset.is_query(p) for p in dataset.paths)
    with pytest.raises(SCFeatError, match=r"no ETH local-feature benchmark images under .*: "
                                          r"expected <data_path>/<scene>/images/<image>"):
        ETH_LFB({"data_path": str(tmp_path / "notes")})


def test_eth_subfolder_reads_one_scene_with_the_originals_keys(tmp_path):
    """subfolder (the original's key): only <data_path>/<subfolder>/images, keys
    <subfolder>/<name>; without it every scene, keys <scene>/images/<name>."""
    write_image(tmp_path / "Fountain" / "images" / "0001.jpg")
    write_image(tmp_path / "Fountain" / "images" / "0000.png")
    write_image(tmp_path / "Herzjesu" / "images" / "a.JPG")
    dataset = ETH_LFB({"data_path": str(tmp_path), "subfolder": "Fountain"})
    assert [dataset.key(p) for p in dataset.paths] == ["Fountain/0000.png", "Fountain/0001.jpg"]
    assert dataset[0]["key"] == "Fountain/0000.png"
    every = ETH_LFB({"data_path": str(tmp_path)})
    assert len(every) == 3 and every.key(every.paths[0]) == "Fountain/images/0000.png"
    with pytest.raises(SCFeatError, match=f"{tmp_path / 'Castle' / 'images'}: folder not found"):
        ETH_LFB({"data_path": str(tmp_path), "subfolder": "Castle"})
    for bad in ("../Fountain", "/abs", ""):
        with pytest.raises(SCFeatError, match="key 'subfolder' must be a scene folder"):
            ETH_LFB({"data_path": str(tmp_path), "subfolder": bad})


def test_inloc_keys_and_scale(tmp_path):
    write_image(tmp_path / "database" / "cutouts" / "DUC1" / "024" / "cut.jpg", (64, 96))
    write_image(tmp_path / "query" / "iphone7" / "IMG_0731.JPG", (100, 75))
    (tmp_path / "database" / "scans").mkdir()
    (tmp_path / "database" / "scans" / "x.ptx.mat").write_bytes(b"")
    dataset = InLoc({"data_path": str(tmp_path), "scale": 0.5})
    assert [dataset.key(p) for p in dataset.paths] == [
        "database/cutouts/DUC1/024/cut.jpg", "query/iphone7/IMG_0731.JPG"]
    item = dataset[1]  # 100×75 → 50×38 (rounded) → crop 48×32
    assert item["orig_size"].tolist() == [100, 75]
    assert item["image"].shape == (3, 48, 32) and item["resized"] == (38 / 75, 50 / 100)
    small = cv2.resize(cv2.imread(str(dataset.paths[1])), (38, 50), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(item["image_rgb"].numpy(), small[:48, :32, ::-1])
    assert InLoc({"data_path": str(tmp_path)})[1]["image"].shape == (3, 96, 64)
    assert isinstance(item["image"], torch.Tensor) and item["query"] is False


def test_inloc_layout_and_scale_errors(tmp_path):
    with pytest.raises(SCFeatError, match=f"{tmp_path}: neither {tmp_path / 'database'} nor "
                                          f"{tmp_path / 'query'} exists"):
        InLoc({"data_path": str(tmp_path)})
    write_image(tmp_path / "query" / "iphone7" / "q.jpg")
    for bad in (0, -1.0):
        with pytest.raises(SCFeatError, match="key 'scale' must be greater than 0"):
            InLoc({"data_path": str(tmp_path), "scale": bad})
    write_image(tmp_path / "query" / "iphone7" / "tiny.jpg", (20, 20))
    assert InLoc({"data_path": str(tmp_path), "scale": 0.5})[1] is None  # 10×10 < 16 px
