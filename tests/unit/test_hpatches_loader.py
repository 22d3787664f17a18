"""HPatch_SIFT: listing, cropping, normalisation, SIFT keypoints, unreadable images."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloader.collate import collate_skip_none
from dataloader.hpatches import HPatch_SIFT
from utils.image import IMAGENET_MEAN, IMAGENET_STD
from utils.errors import SCFeatError


@pytest.fixture
def layout(tmp_path):
    """Two sequences; image k of 'i_a' is 50×70, the others 40×33 (crops 48×64 and 32×32)."""
    rng = np.random.default_rng(0)
    for seq in ("v_b", "i_a"):
        for k in (1, 2, 10):
            size = (50, 70) if seq == "i_a" else (40, 33)
            image = cv2.GaussianBlur(rng.integers(0, 255, (*size, 3), dtype=np.uint8), (0, 0), 1.5)
            (tmp_path / seq).mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / seq / f"{k}.ppm"), image)
    (tmp_path / "i_a" / "H_1_2").write_text("1 0 0\n0 1 0\n0 0 1\n")
    return tmp_path


def test_items_are_sorted_cropped_and_normalised(layout):
    dataset = HPatch_SIFT({"data_path": str(layout)})
    assert [(p.parent.name, p.name) for p in dataset.paths] == [
        ("i_a", "1.ppm"), ("i_a", "2.ppm"), ("i_a", "10.ppm"),
        ("v_b", "1.ppm"), ("v_b", "2.ppm"), ("v_b", "10.ppm")]
    item = dataset[0]
    assert item["image"].shape == (3, 48, 64) and item["image"].dtype == torch.float32
    assert item["image_rgb"].shape == (48, 64, 3) and item["image_rgb"].dtype == torch.uint8
    assert item["orig_size"].tolist() == [50, 70]
    assert (item["seq"], item["name"]) == ("i_a", "1.ppm")
    bgr = cv2.imread(item["path"])
    np.testing.assert_array_equal(item["image_rgb"].numpy(), bgr[:48, :64, ::-1])  # RGB, top-left
    expected = (bgr[5, 7, ::-1] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(item["image"][:, 5, 7].numpy(), expected, atol=1e-5)
    assert dataset[3]["image"].shape == (3, 32, 32)
    assert "sift_kpts" not in item


def test_sift_keypoints_on_the_crop(layout):
    dataset = HPatch_SIFT({"data_path": str(layout), "use_sift": True, "sift_max_pts": 10})
    kpts = dataset[0]["sift_kpts"]
    assert kpts.dtype == torch.float32 and kpts.ndim == 2 and kpts.shape[1] == 2
    assert 0 < len(kpts) <= 12  # OpenCV may keep a few ties beyond nfeatures
    assert kpts[:, 0].max() < 64 and kpts[:, 1].max() < 48


def test_unreadable_image_is_skipped_with_a_warning(layout, caplog):
    (layout / "v_b" / "2.ppm").write_bytes(b"not an image")
    dataset = HPatch_SIFT({"data_path": str(layout)})
    with caplog.at_level(logging.WARNING):
        assert dataset[4] is None
    assert "v_b/2.ppm" in caplog.text
    loader = DataLoader(dataset, batch_size=1, num_workers=0, collate_fn=collate_skip_none)
    batches = list(loader)
    assert sum("image" not in batch for batch in batches) == 1
    names = [(b["seq"][0], b["name"][0]) for b in batches if "image" in b]
    assert ("v_b", "2.ppm") not in names and len(names) == 5
    assert batches[0]["image"].shape == (1, 3, 48, 64)


def test_image_smaller_than_stride_is_skipped(tmp_path, caplog):
    (tmp_path / "i_tiny").mkdir()
    cv2.imwrite(str(tmp_path / "i_tiny" / "1.ppm"), np.zeros((10, 40, 3), np.uint8))
    with caplog.at_level(logging.WARNING):
        assert HPatch_SIFT({"data_path": str(tmp_path)})[0] is None
    assert "smaller than 16" in caplog.text


def test_collate_skip_none():
    assert collate_skip_none([None, None]) == {"skipped": ["unusable item: the dataset returned None"] * 2}
    batch = collate_skip_none([None, {"x": torch.ones(2)}])
    assert batch["x"].shape == (1, 2) and len(batch["skipped"]) == 1


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "i_a").mkdir()
    (tmp_path / "i_a" / "1.png").write_bytes(b"")  # not a .ppm
    with pytest.raises(SCFeatError, match=f"no HPatches images under {tmp_path}"):
        HPatch_SIFT({"data_path": str(tmp_path)})
    with pytest.raises(SCFeatError, match="is not a folder"):
        HPatch_SIFT({"data_path": str(tmp_path / "absent")})
