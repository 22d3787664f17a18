"""MegaDepth_SIFT on a freshly generated synthetic set: ground-truth geometry, filtering,
subsampling, query points, skipping, augmentation and bad input."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloader.collate import collate_skip_none, summarize_skips
from dataloader.megadepth import MegaDepth_SIFT
from dataloader.query_points import query_points, sift_points
from utils.image import load_image
from tools.synthetic import make_megadepth
from utils.errors import SCFeatError
from utils.geometry import epipolar_lines, point_line_distance

HEIGHT, WIDTH = 96, 128


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("megadepth") / "train"
    make_megadepth(out, scenes=2, pairs=6, size=(HEIGHT, WIDTH), seed=0, images=4)
    return out


@pytest.fixture()
def data_copy(data_dir: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(data_dir, tmp_path / "train"))


def _aligned(root: Path) -> Path:
    return root / "synth_0000" / "dense0" / "aligned"


def _dataset(root: Path, **conf) -> MegaDepth_SIFT:
    return MegaDepth_SIFT({"data_path": str(root), **conf})


def _depth_correspondences(root: Path, name1: str, name2: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of image 1 with depth and their projections into image 2, from the generator's
    depth map and img_cam.txt (read independently of the loader)."""
    folder = root / Path(name1).parent.parent
    cams = {}
    for line in (folder / "img_cam.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            tok = line.split()
            v = np.array(tok[1:], dtype=np.float64)
            pose = np.eye(4)
            pose[:3, :3], pose[:3, 3] = v[6:15].reshape(3, 3), v[15:18]
            cams[tok[0]] = (np.array([[v[2], 0, v[4]], [0, v[3], v[5]], [0, 0, 1]]), pose)
    (K1, pose1), (K2, pose2) = cams[Path(name1).name], cams[Path(name2).name]
    depth = np.load(folder / "depths" / f"{Path(name1).stem}.npy")
    ys, xs = np.nonzero(depth > 0)
    points1 = np.stack([xs, ys], 1).astype(np.float64)
    cam1 = np.c_[points1, np.ones(len(xs))] @ np.linalg.inv(K1).T * depth[ys, xs, None]
    rel = pose2 @ np.linalg.inv(pose1)
    proj = (cam1 @ rel[:3, :3].T + rel[:3, 3]) @ K2.T
    return points1, proj[:, :2] / proj[:, 2:]


def _epipolar_errors(fmat1: torch.Tensor, fmat2: torch.Tensor, points1: np.ndarray,
                     points2: np.ndarray) -> tuple[float, float]:
    p1 = torch.from_numpy(points1).float()[None]
    p2 = torch.from_numpy(points2).float()[None]
    err1 = point_line_distance(epipolar_lines(fmat1[None], p1), p2).max().item()
    err2 = point_line_distance(epipolar_lines(fmat2[None], p2), p1).max().item()
    return err1, err2


def test_batches_agree_with_depth_ground_truth(data_dir: Path) -> None:
    dataset = _dataset(data_dir)
    loader = DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=collate_skip_none)
    seen = 0
    for batch in loader:
        assert batch["im1"].shape[1:] == (3, HEIGHT, WIDTH) and batch["im1"].dtype == torch.float32
        assert batch["F1"].dtype == torch.float32 and batch["pose1"].shape[1:] == (4, 4)
        assert batch["skipped"] == [] and "coord1" not in batch
        for b, (name1, name2) in enumerate(zip(batch["name1"], batch["name2"])):
            assert (data_dir / name1).is_file() and (data_dir / name2).is_file()
            points1, points2 = _depth_correspondences(data_dir, name1, name2)
            assert len(points1) > 1000
            err1, err2 = _epipolar_errors(batch["F1"][b], batch["F2"][b], points1, points2)
            assert err1 < 0.05 and err2 < 0.05  # exact geometry: far below the 0.5 px budget
            assert abs(batch["F1"][b][2, 2].item() - 1) < 1e-6
            seen += 1
    assert seen == len(dataset) == 12


def test_resize_scales_intrinsics(data_dir: Path) -> None:
    """Resized images keep exact geometry (half-pixel convention of cv2.resize)."""
    height, width = 64, 96
    dataset = _dataset(data_dir, mode="test", resize=[height, width])
    item = dataset[0]
    assert item["im1"].shape == (3, height, width)
    points1, points2 = _depth_correspondences(data_dir, item["name1"], item["name2"])
    scale = np.array([width / WIDTH, height / HEIGHT])
    err1, err2 = _epipolar_errors(item["F1"], item["F2"], (points1 + 0.5) * scale - 0.5,
                                  (points2 + 0.5) * scale - 0.5)
    assert err1 < 0.02 and err2 < 0.02
    with pytest.raises(SCFeatError, match="key 'resize' must be null or \\[H, W\\] with positive multiples of 16"):
        _dataset(data_dir, resize=[60, 96])


def test_images_smaller_than_img_cam_keep_exact_geometry(data_copy: Path) -> None:
    """Images stored at 3/4 of img_cam.txt's size: the scaled intrinsics give an F that the
    depth ground truth (in img_cam.txt's frame, mapped to the smaller image) satisfies."""
    height, width = HEIGHT * 3 // 4, WIDTH * 3 // 4
    for path in (_aligned(data_copy) / "images").glob("*.jpg"):
        image = cv2.imread(str(path))
        cv2.imwrite(str(path), cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
    item = _dataset(data_copy, mode="test")[0]
    assert item["im1"].shape == (3, height, width) and "synth_0000" in item["name1"]
    points1, points2 = _depth_correspondences(data_copy, item["name1"], item["name2"])
    err1, err2 = _epipolar_errors(item["F1"], item["F2"], (points1 + 0.5) * 0.75 - 0.5,
                                  (points2 + 0.5) * 0.75 - 0.5)
    assert err1 < 0.02 and err2 < 0.02


def test_rotation_threshold_filters_at_index_time(data_dir: Path, caplog) -> None:
    everything = _dataset(data_dir, mode="test", rot_thr=0)  # evaluation does not filter
    angles = []
    for record in everything.pairs:
        rel = record.camera2.pose[:3, :3] @ record.camera1.pose[:3, :3].T
        angles.append(np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1, 1))))
    threshold = float(np.median(angles))
    with caplog.at_level(logging.INFO, logger="scfeat.data"):
        filtered = _dataset(data_dir, rot_thr=threshold)
    kept = {(r.rel_folder, r.name1, r.name2) for r in filtered.pairs}
    expected = {(r.rel_folder, r.name1, r.name2)
                for r, a in zip(everything.pairs, angles) if a <= threshold}
    assert 0 < len(filtered) < len(everything) and kept == expected
    assert sum(filtered.dropped_at_index.values()) == len(everything) - len(filtered)
    assert "dropped while indexing" in caplog.text
    with pytest.raises(SCFeatError, match="no usable pairs"):
        _dataset(data_dir, rot_thr=0)


def test_max_pairs_subsample_is_seeded(data_dir: Path) -> None:
    def names(seed: int) -> list[tuple[str, str, str]]:
        dataset = _dataset(data_dir, max_pairs_per_scene=3, seed=seed)
        return [(r.rel_folder, r.name1, r.name2) for r in dataset.pairs]

    first = names(0)
    assert len(first) == 6 and sum(f.startswith("synth_0000") for f, _, _ in first) == 3
    assert names(0) == first
    assert any(names(seed) != first for seed in (1, 2, 3))


@pytest.mark.parametrize("mode", ["random", "sift", "mixed"])
def test_query_points_count_and_range(data_dir: Path, mode: str) -> None:
    dataset = _dataset(data_dir, mode="test", query_points=mode, num_pts=300)
    batch = collate_skip_none([dataset[0], dataset[1]])
    for key in ("coord1", "coord2"):
        coords = batch[key]
        assert coords.shape == (2, 300, 2) and coords.dtype == torch.float32
        assert coords.min() >= 0 and (coords[..., 0] <= WIDTH - 1).all() \
            and (coords[..., 1] <= HEIGHT - 1).all()
        assert coords.std(dim=1).min() > 10  # spread over the image, not collapsed


def test_query_points_modes_use_sift_where_asked(data_dir: Path) -> None:
    image = load_image(_aligned(data_dir) / "images" / "img_000.jpg")
    keypoints = sift_points(image, 20)
    assert len(keypoints) == 20  # a textured image has plenty
    torch.manual_seed(0)
    sift = query_points(image, "sift", 20, 0.5)
    mixed = query_points(image, "mixed", 40, 0.5)
    assert torch.equal(sift, keypoints)
    assert torch.equal(mixed[:20], keypoints) and not torch.equal(mixed[20:], keypoints)
    random = query_points(image, "random", 20, 0.5)
    assert not torch.equal(random, keypoints)
    flat = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)  # no SIFT at all: filled with random
    assert query_points(flat, "sift", 50, 0.5).shape == (50, 2)


def test_eval_is_deterministic_and_train_is_jittered(data_dir: Path) -> None:
    evaluation = _dataset(data_dir, mode="test")
    assert torch.equal(evaluation[0]["im1"], evaluation[0]["im1"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    raw = load_image(data_dir / evaluation[0]["name1"])
    restored = evaluation[0]["im1"] * std + mean
    assert torch.allclose(restored, torch.from_numpy(raw).permute(2, 0, 1) / 255.0, atol=1e-5)
    train = _dataset(data_dir, mode="train")
    torch.manual_seed(0)
    first = train[0]["im1"]
    second = train[0]["im1"]
    assert not torch.equal(first, second) and not torch.equal(first, evaluation[0]["im1"])
    torch.manual_seed(0)
    assert torch.equal(train[0]["im1"], first)  # reproducible under torch's seed


def test_collate_drops_skipped_items_and_lists_their_causes() -> None:
    item = {"im1": torch.zeros(3, 4, 4), "F1": torch.eye(3), "name1": "a"}
    bad = {"skipped": "missing image: /x/images/b.jpg (listed in /x/pairs.txt)"}
    batch = collate_skip_none([item, bad, item, None])
    assert batch["im1"].shape == (2, 3, 4, 4) and batch["name1"] == ["a", "a"]
    assert batch["skipped"] == [bad["skipped"], "unusable item: the dataset returned None"]
    assert collate_skip_none([item])["skipped"] == []
    assert collate_skip_none([bad, bad]) == {"skipped": [bad["skipped"]] * 2}
    assert summarize_skips(batch["skipped"] + [bad["skipped"]]) == {"missing image": 2,
                                                                     "unusable item": 1}
    assert summarize_skips([]) == {}
    other = {"im1": torch.zeros(3, 8, 4), "F1": torch.eye(3), "name1": "b"}
    with pytest.raises(SCFeatError, match="differ in size.*data.resize"):
        collate_skip_none([item, other])


def test_missing_and_undecodable_images_are_skipped(data_copy: Path, caplog) -> None:
    images = _aligned(data_copy) / "images"
    (images / "img_000.jpg").unlink()
    (images / "img_001.jpg").write_bytes(b"this is not a jpeg")
    dataset = _dataset(data_copy, mode="test")
    with caplog.at_level(logging.WARNING, logger="scfeat.data"):
        items = [dataset[i] for i in range(len(dataset))]
    bad = {"img_000.jpg", "img_001.jpg"}
    for record, item in zip(dataset.pairs, items):
        uses_bad = record.rel_folder.startswith("synth_0000") and {record.name1, record.name2} & bad
        assert ("skipped" in item) == bool(uses_bad)
        assert ("im1" in item) != bool(uses_bad)
    causes = [item["skipped"] for item in items if "skipped" in item]
    assert all(c.startswith(("missing image: ", "undecodable image: ")) for c in causes)
    assert dataset.skipped == summarize_skips(causes)
    assert dataset.skipped["missing image"] >= 2 and dataset.skipped["undecodable image"] >= 1
    assert caplog.text.count("pair skipped (missing image)") == 1  # logged once per cause
    assert "img_000.jpg" in caplog.text
    loader = DataLoader(dataset, batch_size=len(dataset), collate_fn=collate_skip_none)
    batch = next(iter(loader))
    assert len(batch["skipped"]) == len(causes) > 0
    assert len(batch["name1"]) == len(dataset) - len(causes)
    with pytest.raises(SCFeatError, match="img_001.jpg: cannot decode"):
        load_image(images / "img_001.jpg")


def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(SCFeatError, match=f"{tmp_path / 'nope'}: MegaDepth data folder not found"):
        _dataset(tmp_path / "nope")


def test_data_folder_without_scenes(tmp_path: Path) -> None:
    (tmp_path / "scene" / "images").mkdir(parents=True)
    with pytest.raises(SCFeatError, match="no <scene>/<dense\\*>/aligned folders"):
        _dataset(tmp_path)


@pytest.mark.parametrize("bad_line, message", [
    ("img_000.jpg 128 96 100 100 64 48 1 0 0 0 1 0 0 0 1 0 0", "expected 19 values.*got 18"),
    ("img_000.jpg 128 96 100 100 64 48 1 0 0 0 1 0 0 0 1 0 0 zero", "'zero' is not a number"),
])
def test_malformed_img_cam_line(data_copy: Path, bad_line: str, message: str) -> None:
    path = _aligned(data_copy) / "img_cam.txt"
    lines = path.read_text().splitlines()
    lines[3] = bad_line  # line 4: the comments take lines 1-2
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SCFeatError, match=f"img_cam.txt:4: {message}"):
        _dataset(data_copy)


def test_pair_naming_an_unknown_image(data_copy: Path) -> None:
    path = _aligned(data_copy) / "pairs.txt"
    path.write_text(path.read_text() + "\nimg_000.jpg ghost.jpg\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(SCFeatError, match=f"pairs.txt:{line}: image 'ghost.jpg' is not listed in"):
        _dataset(data_copy)


def test_unknown_config_key_and_bad_values(data_dir: Path) -> None:
    with pytest.raises(SCFeatError, match="key 'image_size' is not a known key"):
        _dataset(data_dir, image_size=[64, 64])
    with pytest.raises(SCFeatError, match="data: key 'query_points' must be one of"):
        _dataset(data_dir, query_points="harris")
    with pytest.raises(SCFeatError, match="data: key 'mode' must be one of"):
        _dataset(data_dir, mode="training")
    with pytest.raises(SCFeatError, match="key 'random_percent' must be at most 1"):
        _dataset(data_dir, random_percent=1.5)
    with pytest.raises(SCFeatError, match="key 'num_pts' must be at least 1"):
        _dataset(data_dir, num_pts=0)
