"""tools.synthetic: geometry of the MegaDepth scenes, HPatches homographies, determinism and
atomic output."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tools import synthetic
from tools.synthetic import make_hpatches, make_megadepth
from utils.errors import SCFeatError

SIZE = (96, 128)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _read_cams(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Independent parse of img_cam.txt → {name: (K, 4×4 world→camera pose)}."""
    cams = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        tok = line.split()
        v = np.array(tok[1:], dtype=np.float64)
        K = np.array([[v[2], 0, v[4]], [0, v[3], v[5]], [0, 0, 1]])
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = v[6:15].reshape(3, 3), v[15:18]
        cams[tok[0]] = (K, pose)
    return cams


def _gray(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY).astype(np.float32)


@pytest.fixture(scope="module")
def megadepth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "megadepth"
    make_megadepth(out, scenes=2, pairs=6, size=SIZE, seed=0, images=4)
    return out


def test_megadepth_layout(megadepth_dir: Path) -> None:
    folders = sorted(megadepth_dir.glob("*/*dense*/aligned"))
    assert len(folders) == 2
    for folder in folders:
        cams = _read_cams(folder / "img_cam.txt")
        assert len(cams) == 4
        for name in cams:
            image = cv2.imread(str(folder / "images" / name))
            assert image.shape == (*SIZE, 3)
            depth = np.load(folder / "depths" / f"{Path(name).stem}.npy")
            assert depth.dtype == np.float32 and depth.shape == SIZE
            assert (depth >= 0).all() and (depth > 0).mean() > 0.5
        pairs = [line.split() for line in (folder / "pairs.txt").read_text().splitlines()]
        assert 1 <= len(pairs) <= 6 and all(len(p) == 2 and p[0] in cams and p[1] in cams
                                            for p in pairs)


def test_megadepth_pairs_obey_their_epipolar_geometry(megadepth_dir: Path) -> None:
    """Pixels lifted with their depth and projected into the other image lie on the epipolar
    line of an F built (independently, in numpy) from img_cam.txt; they land on the same surface
    (depth agrees), look alike, overlap well, and do not all fit one homography (not planar)."""
    for folder in sorted(megadepth_dir.glob("*/*dense*/aligned")):
        cams = _read_cams(folder / "img_cam.txt")
        for line in (folder / "pairs.txt").read_text().splitlines():
            name1, name2 = line.split()
            (K1, pose1), (K2, pose2) = cams[name1], cams[name2]
            depth1 = np.load(folder / "depths" / f"{Path(name1).stem}.npy")
            depth2 = np.load(folder / "depths" / f"{Path(name2).stem}.npy")
            ys, xs = np.nonzero(depth1 > 0)
            points1 = np.stack([xs, ys], 1).astype(np.float64)
            cam1 = np.c_[points1, np.ones(len(xs))] @ np.linalg.inv(K1).T * depth1[ys, xs, None]
            rel = pose2 @ np.linalg.inv(pose1)
            cam2 = cam1 @ rel[:3, :3].T + rel[:3, 3]
            proj = cam2 @ K2.T
            points2 = proj[:, :2] / proj[:, 2:]

            t = rel[:3, 3]
            t_cross = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
            fmat = np.linalg.inv(K2).T @ t_cross @ rel[:3, :3] @ np.linalg.inv(K1)
            lines = np.c_[points1, np.ones(len(xs))] @ fmat.T
            dist = np.abs((lines * np.c_[points2, np.ones(len(xs))]).sum(1)) \
                / np.linalg.norm(lines[:, :2], axis=1)
            assert dist.max() < 0.5

            inside = ((points2 > -0.5) & (points2 < np.array([SIZE[1], SIZE[0]]) - 0.5)).all(1)
            col, row = np.rint(points2[inside]).astype(int).T
            seen = depth2[row, col]
            visible = (seen > 0) & (np.abs(seen - cam2[inside, 2]) < 0.02 * cam2[inside, 2])
            assert visible.sum() > 0.3 * depth1.size  # listed pairs overlap well

            p1, p2 = points1[inside][visible], points2[inside][visible]
            values1 = _gray(folder / "images" / name1)[p1[:, 1].astype(int), p1[:, 0].astype(int)]
            values2 = cv2.remap(_gray(folder / "images" / name2), p2[:, :1].astype(np.float32),
                                p2[:, 1:].astype(np.float32), cv2.INTER_LINEAR)[:, 0]
            assert np.corrcoef(values1, values2)[0, 1] > 0.6  # lit differently, same texture

            _, inliers = cv2.findHomography(p1.astype(np.float32), p2.astype(np.float32),
                                            cv2.RANSAC, 2.0)
            assert inliers.mean() < 0.9  # several planes: no single homography explains it

            angle = np.degrees(np.arccos(np.clip((np.trace(rel[:3, :3]) - 1) / 2, -1, 1)))
            assert angle < 80


def test_megadepth_is_deterministic(tmp_path: Path) -> None:
    kwargs = dict(scenes=1, pairs=3, size=(64, 96), images=3)
    make_megadepth(tmp_path / "a", seed=5, **kwargs)
    make_megadepth(tmp_path / "b", seed=5, **kwargs)
    make_megadepth(tmp_path / "c", seed=6, **kwargs)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b and len(files_a) == 3 + 3 + 2
    assert files_a != _files(tmp_path / "c")


def test_hpatches_layout_homographies_and_determinism(tmp_path: Path) -> None:
    make_hpatches(tmp_path / "a", sequences=4, size=(64, 96), seed=1)
    make_hpatches(tmp_path / "b", sequences=4, size=(64, 96), seed=1)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    sequences = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(sequences) == 4 and sum(s.startswith("i_") for s in sequences) == 2 \
        and sum(s.startswith("v_") for s in sequences) == 2
    for name in sequences:
        folder = tmp_path / "a" / name
        first = _gray(folder / "1.ppm")
        assert first.shape == (64, 96)
        for k in range(2, 7):
            homography = np.loadtxt(folder / f"H_1_{k}")
            assert homography.shape == (3, 3)
            image = _gray(folder / f"{k}.ppm")
            if name.startswith("i_"):
                # Same pixels, new lighting (gain, gamma, colour, a gradient across the image).
                assert np.array_equal(homography, np.eye(3))
                assert np.abs(image - first).mean() > 2
                assert np.corrcoef(first.ravel(), image.ravel())[0, 1] > 0.3
                continue
            assert np.abs(homography - np.eye(3)).max() > 1e-3
            # H maps image-1 pixels to image-k pixels: pulling image k back through H recovers
            # image 1 where it is defined (a wrong or inverted H decorrelates them).
            back = cv2.warpPerspective(image, np.linalg.inv(homography), (96, 64),
                                       flags=cv2.INTER_LINEAR, borderValue=-1)
            valid = cv2.erode((back >= 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            assert valid.mean() > 0.3
            assert np.corrcoef(first[valid], back[valid])[0, 1] > 0.85
            if k == 6:  # the strongest warp: the inverse direction must fit clearly worse
                wrong = cv2.warpPerspective(image, homography, (96, 64), borderValue=-1)
                both = valid & (wrong >= 0)
                assert np.corrcoef(first[both], wrong[both])[0, 1] < \
                    np.corrcoef(first[both], back[both])[0, 1] - 0.1


def test_photo_sets_are_disjoint_and_load() -> None:
    assert not set(synthetic.MEGADEPTH_PHOTOS) & set(synthetic.HPATCHES_PHOTOS)
    for name in synthetic.MEGADEPTH_PHOTOS + synthetic.HPATCHES_PHOTOS:
        photo = synthetic.load_photo(name)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3


def test_refuses_non_empty_out_and_overwrites_on_request(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SCFeatError, match="not empty.*--overwrite"):
        make_hpatches(out, sequences=1, size=(64, 96))
    assert (out / "keep.txt").exists()
    make_hpatches(out, sequences=1, size=(64, 96), overwrite=True)
    assert not (out / "keep.txt").exists() and len(list(out.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fail_on_second_scene(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = synthetic.make_megadepth_scene
    monkeypatch.setattr(synthetic, "make_megadepth_scene", fail_on_second_scene)
    with pytest.raises(KeyboardInterrupt):
        make_megadepth(tmp_path / "out", scenes=2, pairs=2, size=(64, 96), images=2)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "md"
    assert synthetic.main(["megadepth", "--out", str(out), "--scenes", "1", "--images", "2",
                           "--size", "64x96"]) == 0
    assert (out / "synth_0000" / "dense0" / "aligned" / "img_cam.txt").is_file()
    assert synthetic.main(["hpatches", "--out", str(tmp_path / "hp"), "--size", "64by96"]) == 2
    assert "--size '64by96'" in capsys.readouterr().err
    assert not (tmp_path / "hp").exists()
