"""Data faults planted in a freshly generated synthetic MegaDepth set: the loader never trains on
garbage, never stops on one bad pair or line, and says what it dropped (index time) or skipped
(load time)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloader.pair_geometry import epipolar_lines_miss
from dataloader.collate import summarize_skips
from dataloader.megadepth import MegaDepth_SIFT
from conftest import with_exif_orientation
from tools.synthetic import make_megadepth
from training.data import BatchSource
from utils.errors import SCFeatError
from utils.geometry import fundamental_from_pose, relative_pose

HEIGHT, WIDTH = 64, 96
PAIRS_PER_SCENE = 6  # all 6 pairs of 4 images overlap in the seed-0 scenes (checked below)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "train"
    make_megadepth(out, scenes=2, pairs=PAIRS_PER_SCENE, size=(HEIGHT, WIDTH), seed=0, images=4)
    return out


@pytest.fixture()
def data(clean: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(clean, tmp_path / "train"))


def _aligned(root: Path, scene: int = 0) -> Path:
    return root / f"synth_{scene:04d}" / "dense0" / "aligned"


def _dataset(root: Path, **conf) -> MegaDepth_SIFT:
    return MegaDepth_SIFT({"data_path": str(root), "mode": "test", **conf})


def _pairs_of(root: Path, scene: int = 0) -> list[tuple[str, str]]:
    text = (_aligned(root, scene) / "pairs.txt").read_text()
    return [tuple(line.split()) for line in text.splitlines() if line.strip()]


def _img_cam_line(root: Path, name: str, scene: int = 0) -> tuple[int, list[str]]:
    """(1-based line number, tokens) of ``name`` in img_cam.txt."""
    for number, line in enumerate((_aligned(root, scene) / "img_cam.txt").read_text().splitlines(), 1):
        if line.split()[:1] == [name]:
            return number, line.split()
    raise AssertionError(f"{name} not in img_cam.txt")


def _set_img_cam(root: Path, name: str, change, scene: int = 0) -> int:
    """Rewrite the values of ``name``'s line with ``change(values) -> values`` → its line."""
    path = _aligned(root, scene) / "img_cam.txt"
    lines = path.read_text().splitlines()
    number, tokens = _img_cam_line(root, name, scene)
    values = change(np.array(tokens[1:], dtype=np.float64))
    lines[number - 1] = " ".join([name, tokens[1], tokens[2]] + [f"{v:.12g}" for v in values[2:]])
    path.write_text("\n".join(lines) + "\n")
    return number


def _keys(dataset: MegaDepth_SIFT) -> set[tuple[str, str, str]]:
    return {(r.rel_folder.split("/")[0], r.name1, r.name2) for r in dataset.pairs}


def _cause_lines(caplog, cause: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(cause)]


def test_clean_set_drops_nothing(clean: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="scfeat.data"):
        dataset = _dataset(clean)
    assert len(dataset) == 2 * PAIRS_PER_SCENE and not dataset.dropped_at_index
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # The epipolar check keeps every genuine pair, in train mode too.
    assert len(MegaDepth_SIFT({"data_path": str(clean), "mode": "train", "rot_thr": 180})) == 12


# ----------------------------------------------------------------------------- load time

def _load_all(dataset: MegaDepth_SIFT) -> list[dict]:
    items = [dataset[i] for i in range(len(dataset))]
    for item in items:
        assert ("skipped" in item) != ("im1" in item)
        if "im1" in item:  # never garbage: finite, normalised images of the listed size
            assert item["im1"].shape == (3, HEIGHT, WIDTH) and torch.isfinite(item["im1"]).all()
    return items


def _uses(record, scene: int, name: str) -> bool:
    return record.rel_folder.startswith(f"synth_{scene:04d}") and name in (record.name1, record.name2)


@pytest.mark.parametrize("damage, cause", [
    (lambda data: data[:len(data) // 2], "truncated image"),
    (lambda data: np.random.default_rng(0).bytes(len(data)), "undecodable image"),
    (lambda data: b"", "undecodable image"),
])
def test_corrupt_image_is_skipped_at_load_time(data: Path, caplog, damage, cause: str) -> None:
    path = _aligned(data) / "images" / "img_002.jpg"
    path.write_bytes(damage(path.read_bytes()))
    dataset = _dataset(data)
    assert len(dataset) == 12  # the index does not open images
    with caplog.at_level(logging.WARNING, logger="scfeat.data"):
        items = _load_all(dataset)
    for record, item in zip(dataset.pairs, items):
        if _uses(record, 0, "img_002.jpg"):
            assert item["skipped"].startswith(f"{cause}: {path}")
        else:
            assert "im1" in item
    assert dataset.skipped == {cause: 3}
    assert caplog.text.count(f"pair skipped ({cause}): {path}") == 1  # once per cause


def test_truncated_jpeg_is_caught_even_where_opencv_decodes_it(data: Path, monkeypatch) -> None:
    """Some OpenCV builds decode a JPEG cut short with a mere warning, the rest grey: the
    end-of-image check must catch it before decoding; a JPEG with bytes after its end is fine."""
    grey = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: grey.copy())
    images = _aligned(data) / "images"
    cut = images / "img_000.jpg"
    cut.write_bytes(cut.read_bytes()[:-200])
    trailer = images / "img_003.jpg"
    trailer.write_bytes(trailer.read_bytes() + b"camera maker notes")
    dataset = _dataset(data)
    items = _load_all(dataset)
    for record, item in zip(dataset.pairs, items):
        assert ("skipped" in item) == _uses(record, 0, "img_000.jpg")
    assert dataset.skipped == {"truncated image": 3}


def test_image_of_another_size_is_used_with_intrinsics_scaled_to_it(clean: Path, data: Path,
                                                                   caplog) -> None:
    """An image whose size on disk is not img_cam.txt's is used, never skipped: its intrinsics
    are scaled by the size ratio (pixel centres at integers: c' = (c + 0.5)·s - 0.5) and F
    follows; the warning comes once per scene however many pairs and loader processes see it."""
    path = _aligned(data) / "images" / "img_001.jpg"
    cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (72, 48), interpolation=cv2.INTER_AREA))
    line, tokens = _img_cam_line(data, "img_001.jpg")
    dataset = _dataset(data)
    index = next(i for i, r in enumerate(dataset.pairs) if _uses(r, 0, "img_001.jpg"))
    item = dataset[index]
    assert "skipped" not in item and not dataset.skipped
    side = 1 if dataset.pairs[index].name1 == "img_001.jpg" else 2
    assert item[f"im{side}"].shape == (3, 48, 72)
    fx, fy, cx, cy = (float(v) for v in tokens[3:7])
    sx, sy = 72 / 96, 48 / 64
    expected = np.array([[fx * sx, 0, (cx + 0.5) * sx - 0.5], [0, fy * sy, (cy + 0.5) * sy - 0.5],
                         [0, 0, 1]])
    np.testing.assert_allclose(item[f"intrinsic{side}"].numpy(), expected, rtol=1e-6)
    K1, K2 = item["intrinsic1"].double()[None], item["intrinsic2"].double()[None]
    rel = relative_pose(item["pose1"].double()[None], item["pose2"].double()[None])
    fmat = fundamental_from_pose(K1, K2, rel[:, :3, :3], rel[:, :3, 3])[0]
    np.testing.assert_allclose(item["F1"].numpy(), (fmat / fmat[2, 2]).numpy(), rtol=1e-4, atol=1e-9)
    assert item["note"][0] == dataset.pairs[index].rel_folder
    assert f"img_001.jpg is 72x48 (w x h) on disk, {_aligned(data) / 'img_cam.txt'}:{line} says " \
           f"96x64" in item["note"][1] and "aspect ratio" not in item["note"][1]
    # With resize, the returned intrinsics are those of a file of img_cam.txt's size.
    clean_item = _dataset(clean, resize=[32, 48])[index]
    np.testing.assert_allclose(_dataset(data, resize=[32, 48])[index][f"intrinsic{side}"].numpy(),
                               clean_item[f"intrinsic{side}"].numpy(), rtol=1e-6)

    # Every pair trains; one warning for the scene, from the batches of two worker processes.
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=dataset.collate_fn)
    source = BatchSource(max_unusable_fraction=0.0)
    iterator = iter(loader)
    with caplog.at_level(logging.WARNING):
        used = sum(len(source.next_batch(iterator)[0]["im1"]) for _ in range(len(dataset)))
    assert used == 12 and not source.skip_causes
    assert caplog.text.count("image sizes differ from img_cam.txt") == 1


def test_exif_tagged_images_load_as_stored(clean: Path, data: Path) -> None:
    """JPEGs with an EXIF orientation tag (6: display rotated) give the pixels as stored, of
    img_cam.txt's size, with nothing skipped or noted."""
    for path in (_aligned(data) / "images").glob("*.jpg"):
        path.write_bytes(with_exif_orientation(path.read_bytes()))
    tagged, plain = _dataset(data), _dataset(clean)
    items = _load_all(tagged)
    assert not tagged.skipped and not any("note" in item for item in items)
    for item, reference in zip(items, (plain[i] for i in range(len(plain)))):
        assert torch.equal(item["im1"], reference["im1"]) and torch.equal(item["im2"], reference["im2"])


def test_a_change_of_aspect_ratio_is_named_in_the_warning(data: Path) -> None:
    path = _aligned(data) / "images" / "img_001.jpg"
    cv2.imwrite(str(path), np.ascontiguousarray(cv2.imread(str(path)).transpose(1, 0, 2)))
    dataset = _dataset(data)
    index = next(i for i, r in enumerate(dataset.pairs) if _uses(r, 0, "img_001.jpg"))
    item = dataset[index]
    assert "im1" in item and "cropped or rotated" in item["note"][1]


def test_load_time_causes_are_counted_across_worker_processes(data: Path) -> None:
    images = _aligned(data) / "images"
    (images / "img_000.jpg").write_bytes((images / "img_000.jpg").read_bytes()[:500])
    (images / "img_003.jpg").unlink()
    (_aligned(data, 1) / "images" / "img_001.jpg").write_bytes(b"\x89PNG garbage")
    dataset = _dataset(data)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=dataset.collate_fn,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    causes, used = [], 0
    for batch in loader:
        assert isinstance(batch["skipped"], list)
        causes += batch["skipped"]
        if "im1" in batch:
            used += len(batch["im1"])
        else:
            assert list(batch) == ["skipped"] and len(batch["skipped"]) == 2
    # scene 0: the 3 pairs of img_000, and (img_001|img_002, img_003); scene 1: img_001's 3.
    # A pair with two bad images reports its first one.
    assert summarize_skips(causes) == {"truncated image": 3, "undecodable image": 3,
                                       "missing image": 2}
    assert used == 12 - 8
    assert dataset.skipped == {}  # the main process loaded nothing: only the batches tell


# ----------------------------------------------------------------------------- index time

def test_nonfinite_and_singular_intrinsics_drop_the_images_pairs(data: Path, caplog) -> None:
    zero_fx = _set_img_cam(data, "img_000.jpg", lambda v: np.r_[v[:2], 0.0, v[3:]])
    nan_cx = _set_img_cam(data, "img_001.jpg", lambda v: np.r_[v[:4], np.nan, v[5:]])
    _set_img_cam(data, "img_002.jpg", lambda v: np.r_[v[:3], -v[3], v[4:]], scene=1)
    with caplog.at_level(logging.INFO, logger="scfeat.data"):
        dataset = _dataset(data)
    pairs = _pairs_of(data)
    with_000 = sum("img_000.jpg" in p for p in pairs)
    with_001_only = sum("img_001.jpg" in p and "img_000.jpg" not in p for p in pairs)
    with_002_scene1 = sum("img_002.jpg" in p for p in _pairs_of(data, 1))
    singular = "singular intrinsics (fx or fy <= 0)"
    assert dataset.dropped_at_index == {singular: with_000 + with_002_scene1,
                                        "non-finite intrinsics": with_001_only}
    assert len(dataset) == 12 - with_000 - with_001_only - with_002_scene1
    assert all("img_000.jpg" not in k and "img_001.jpg" not in k
               for k in _keys(dataset) if k[0] == "synth_0000")
    img_cam = _aligned(data) / "img_cam.txt"
    (line,) = _cause_lines(caplog, singular)
    assert f"{with_000 + with_002_scene1} pair(s) dropped" in line and "2 image(s)" in line
    assert f"{img_cam}:{zero_fx} (img_000.jpg)" in line
    (line,) = _cause_lines(caplog, "non-finite intrinsics")
    assert f"{img_cam}:{nan_cx} (img_001.jpg)" in line


def _rotate(angle_deg: float, axis: int) -> np.ndarray:
    a = np.radians(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def test_non_rotation_drops_the_images_pairs_and_unparseable_lines_still_fail(data: Path,
                                                                             caplog) -> None:
    # values: w h fx fy cx cy R(9) t(3)
    def flip(v):  # det = -1, RᵀR = I
        R = v[6:15].reshape(3, 3).copy()
        R[2] *= -1
        return np.r_[v[:6], R.ravel(), v[15:]]

    def stretch(v):  # det ≈ 1.1, RᵀR ≠ I
        return np.r_[v[:6], v[6:15] * 1.1 ** (1 / 3), v[15:]]

    def nudge(v):  # within the tolerance: kept
        return np.r_[v[:6], v[6:15] + 1e-4, v[15:]]

    flipped = _set_img_cam(data, "img_003.jpg", flip)
    stretched = _set_img_cam(data, "img_000.jpg", stretch, scene=1)
    _set_img_cam(data, "img_001.jpg", nudge, scene=1)
    with caplog.at_level(logging.WARNING, logger="scfeat.data"):
        dataset = _dataset(data)
    cause = "not a rotation matrix (RtR != I or det != 1)"
    assert dataset.dropped_at_index == {cause: 6}  # 3 pairs each
    assert len(dataset) == 6 and ("synth_0001", "img_001.jpg", "img_002.jpg") in _keys(dataset)
    (line,) = _cause_lines(caplog, cause)
    assert f"{_aligned(data) / 'img_cam.txt'}:{flipped} (img_003.jpg)" in line
    assert f"{_aligned(data, 1) / 'img_cam.txt'}:{stretched} (img_000.jpg)" in line
    # A line that cannot be parsed is still an error naming file:line.
    path = _aligned(data) / "img_cam.txt"
    path.write_text(path.read_text() + "img_009.jpg 96 64 1 1 1 1 1 0 0 0 1 0 0 0 1 0 0 x\n")
    line_no = len(path.read_text().splitlines())
    with pytest.raises(SCFeatError, match=f"img_cam.txt:{line_no}: 'x' is not a number"):
        _dataset(data)


def test_duplicate_reversed_and_self_pairs_are_dropped(data: Path, caplog) -> None:
    path = _aligned(data) / "pairs.txt"
    first = _pairs_of(data)[0]
    path.write_text(path.read_text() + f"{first[0]} {first[1]}\n# comment\n\n"
                    f"{first[1]} {first[0]}\nimg_002.jpg img_002.jpg\n")
    with caplog.at_level(logging.WARNING, logger="scfeat.data"):
        dataset = _dataset(data)
    assert len(dataset) == 12
    assert dataset.dropped_at_index == {"duplicate pair (repeated or reversed)": 2, "self pair": 1}
    assert len({(r.rel_folder, frozenset((r.name1, r.name2))) for r in dataset.pairs}) == 12
    (line,) = _cause_lines(caplog, "duplicate pair")
    assert line.startswith("duplicate pair (repeated or reversed): 2 pair(s) dropped")
    assert f"{path}:7; {path}:10" in line
    (line,) = _cause_lines(caplog, "self pair")
    assert f"{path}:11" in line


def test_empty_pairs_file(data: Path, caplog) -> None:
    (_aligned(data) / "pairs.txt").write_text("# no pairs yet\n\n")
    with caplog.at_level(logging.WARNING, logger="scfeat.data"):
        dataset = _dataset(data)
    assert len(dataset) == 6 and {k[0] for k in _keys(dataset)} == {"synth_0001"}
    assert f"{_aligned(data) / 'pairs.txt'}: no pairs listed" in caplog.text
    (_aligned(data, 1) / "pairs.txt").write_text("")
    with pytest.raises(SCFeatError, match=f"{data}: no pairs listed in any of the 2 pairs.txt "
                                          f"files \\(expected lines 'name1 name2'"):
        _dataset(data)


def test_folder_without_img_cam_is_skipped_unless_it_is_the_only_one(data: Path, caplog) -> None:
    (_aligned(data) / "img_cam.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="scfeat.data"):
        dataset = _dataset(data)
    assert len(dataset) == 6 and {k[0] for k in _keys(dataset)} == {"synth_0001"}
    assert f"{_aligned(data) / 'img_cam.txt'}: img_cam.txt not found" in caplog.text
    assert "folder skipped" in caplog.text
    shutil.rmtree(data / "synth_0001")
    with pytest.raises(SCFeatError, match="synth_0000/dense0/aligned/img_cam.txt: img_cam.txt "
                                          "not found \\(expected one line per image"):
        _dataset(data)


def _plant_far_pose(root: Path) -> None:
    """Make img_001 look 90° sideways from img_000 (same intrinsics), its centre moved along
    img_000's y axis: every epipolar line of the pair is then a vertical line far outside the
    other image (FOV < 90°)."""
    _, tokens = _img_cam_line(root, "img_000.jpg")
    v0 = np.array(tokens[1:], dtype=np.float64)  # w h fx fy cx cy R(9) t(3)
    R1, t1 = v0[6:15].reshape(3, 3), v0[15:18]
    centre1 = -R1.T @ t1
    R2 = _rotate(90, axis=1) @ R1
    centre2 = centre1 + R1.T @ np.array([0.0, 1.0, 0.0])
    _set_img_cam(root, "img_001.jpg", lambda v: np.r_[v[:6], R2.ravel(), -R2 @ centre2])


def _dense_lines_cross(fmat: np.ndarray, width: int, height: int) -> bool:
    """Independent check: does any epipolar line of a 12×8 grid of image points cross a
    ``width×height`` image (sampled along its longer extent)?"""
    xs, ys = np.meshgrid(np.linspace(-0.5, width - 0.5, 12), np.linspace(-0.5, height - 0.5, 8))
    points = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 1)
    for a, b, c in points @ fmat.T:
        if abs(b) > abs(a):
            y = -(a * np.linspace(-0.5, width - 0.5, 400) + c) / b
            if ((y >= -0.5) & (y <= height - 0.5)).any():
                return True
        else:
            x = -(b * np.linspace(-0.5, height - 0.5, 400) + c) / a
            if ((x >= -0.5) & (x <= width - 0.5)).any():
                return True
    return False


def test_pair_whose_epipolar_lines_miss_the_other_image(data: Path, caplog) -> None:
    _plant_far_pose(data)
    with caplog.at_level(logging.WARNING, logger="scfeat.data"):
        dataset = _dataset(data)
    cause = "epipolar lines miss the other image"
    assert ("synth_0000", "img_000.jpg", "img_001.jpg") not in _keys(dataset)
    assert dataset.dropped_at_index == {cause: 1} and len(dataset) == 11
    (line,) = _cause_lines(caplog, cause)
    assert f"{_aligned(data) / 'pairs.txt'}:1" in line
    # The planted pose really is garbage: a dense grid's lines miss too, both ways.
    cams = {}
    for name in ("img_000.jpg", "img_001.jpg"):
        v = np.array(_img_cam_line(data, name)[1][1:], dtype=np.float64)
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = v[6:15].reshape(3, 3), v[15:18]
        cams[name] = (torch.tensor([[v[2], 0, v[4]], [0, v[3], v[5]], [0, 0, 1]])[None],
                      torch.from_numpy(pose)[None])
    (K1, P1), (K2, P2) = cams["img_000.jpg"], cams["img_001.jpg"]
    for Ka, Kb, Pa, Pb in ((K1, K2, P1, P2), (K2, K1, P2, P1)):
        rel = relative_pose(Pa, Pb)
        fmat = fundamental_from_pose(Ka, Kb, rel[:, :3, :3], rel[:, :3, 3])[0].numpy()
        assert np.isfinite(fmat).all() and not _dense_lines_cross(fmat, WIDTH, HEIGHT)
    # A rectified stereo pair (horizontal lines y' = y) does reach the other image, and a
    # line at infinity does not.
    sizes = np.array([[WIDTH, HEIGHT]] * 2, dtype=np.float64)
    rectified = np.array([[0, 0, 0], [0, 0, -1], [0, 1, 0.0]])
    at_infinity = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1.0]])
    fmats = np.stack([rectified, at_infinity])
    assert epipolar_lines_miss(fmats, fmats, sizes, sizes).tolist() == [False, True]
