"""HPatches evaluation: MMA on hand-made features with known errors, caches, errors, the CLI."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import evaluate_hpatches
from evaluation.hpatches import (HIGH_RES_SEQUENCES, FeatureFolder, evaluate_method,
                                 list_sequences, load_cache, parse_hpatches_methods,
                                 run_evaluation, save_cache, summarize)
from evaluation.matching import mnn_matches
from utils.files import files_signature
from utils.errors import SCFeatError

POSTFIX = "test"
# Four image-1 points; one-hot descriptors make the mutual nearest neighbours exact (i ↔ i).
POINTS = np.array([[10.0, 10.0], [30.0, 12.0], [20.0, 30.0], [40.0, 25.0]])
ONE_HOT = np.eye(4, 8, dtype=np.float32)
# Offsets of lengths 0.5, 2.5, 7, 0.5 px from the true projection.
OFFSETS = np.array([[0.3, 0.4], [1.5, 2.0], [0.0, 7.0], [0.5, 0.0]])
ACCURACY_OFFSETS = {t: np.mean(np.linalg.norm(OFFSETS, axis=1) <= t) for t in range(1, 16)}
SHIFT = np.array([3.0, -2.0])  # the viewpoint sequence's translation


def translation(shift: np.ndarray) -> np.ndarray:
    return np.array([[1, 0, shift[0]], [0, 1, shift[1]], [0, 0, 1]], dtype=np.float64)


def make_layout(root: Path, shifts: dict[str, np.ndarray], size: tuple[int, int] = (48, 64),
                texture: np.ndarray | None = None) -> Path:
    """``<root>/<seq>/1..6.ppm`` and ``H_1_2..6`` (image k = image 1 translated by the shift)."""
    rng = np.random.default_rng(0)
    height, width = size
    for seq, shift in shifts.items():
        folder = root / seq
        folder.mkdir(parents=True)
        for k in range(1, 7):
            if texture is None:
                image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            else:  # content at p in image 1 is at p + shift in image k
                dx, dy = (0, 0) if k == 1 else (int(shift[0]), int(shift[1]))
                image = texture[20 - dy:20 - dy + height, 20 - dx:20 - dx + width]
            cv2.imwrite(str(folder / f"{k}.ppm"), image)
            if k > 1:
                np.savetxt(folder / f"H_1_{k}", translation(shift))
    return root


def write_features(folder: Path, seq: str, k: int, keypoints: np.ndarray,
                   descriptors: np.ndarray) -> Path:
    path = folder / seq / f"{k}.ppm.{POSTFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # a handle keeps np.savez from appending .npz
        np.savez(handle, keypoints=keypoints.astype(np.float32),
                 scores=np.ones(len(keypoints), np.float32), descriptors=descriptors)
    return path


@pytest.fixture
def synthetic(tmp_path):
    """One illumination sequence (identity H, errors 0.5/2.5/7/0.5 px in every pair) and one
    viewpoint sequence (translation, every match 2.5 px off in pairs 2..5, no features in 6)."""
    data = make_layout(tmp_path / "hpatches", {"i_syn": np.zeros(2), "v_syn": SHIFT})
    features = tmp_path / "features"
    for seq in ("i_syn", "v_syn"):
        write_features(features, seq, 1, POINTS, ONE_HOT)
    for k in range(2, 7):
        write_features(features, "i_syn", k, POINTS + OFFSETS, ONE_HOT)
    for k in range(2, 6):
        write_features(features, "v_syn", k, POINTS + SHIFT + [1.5, 2.0], ONE_HOT)
    write_features(features, "v_syn", 6, np.zeros((0, 2)), np.zeros((0, 8), np.float32))
    return data, features, FeatureFolder("syn", features, POSTFIX)


def test_mma_on_known_errors(synthetic, tmp_path):
    data, _, method = synthetic
    cache, cache_path = evaluate_method(method, data, list_sequences(data), tmp_path / "cache")
    i_err, v_err, (seq_type, n_feats, n_matches) = cache
    for t in range(1, 16):
        assert i_err[t] == pytest.approx(5 * ACCURACY_OFFSETS[t])
        assert v_err[t] == pytest.approx(4 * float(t >= 2.5))  # the empty pair adds 0
    assert seq_type.tolist() == ["i"] * 5 + ["v"] * 5
    assert n_feats.tolist() == [4] * 6 + [4] * 5 + [0]
    assert n_matches.tolist() == [4] * 9 + [0]

    summary = summarize(cache, max_threshold=10)
    np.testing.assert_allclose(summary["mma_i"], [0.5, 0.5, 0.75, 0.75, 0.75, 0.75, 1, 1, 1, 1])
    np.testing.assert_allclose(summary["mma_v"], [0, 0, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])
    np.testing.assert_allclose(summary["mma"], (summary["mma_i"] + summary["mma_v"]) / 2)
    assert summary["mean_features"] == pytest.approx(44 / 12)
    assert summary["mean_matches"] == pytest.approx(36 / 10)
    # The written cache has D2-Net's layout and reads back identically.
    raw = np.load(cache_path, allow_pickle=True)
    assert raw.dtype == object and raw.shape == (3,) and isinstance(raw[0], dict)
    assert load_cache(cache_path)[1] == v_err


def test_published_caches_reproduce_their_numbers(reference_dir):
    summary = summarize(load_cache(reference_dir / "hpatches_cache" / "scfeat-20k.npy"))
    assert (summary["pairs_i"], summary["pairs_v"]) == (260, 280)
    np.testing.assert_allclose(summary["mma"][[0, 2, 4, 9]], [0.507, 0.822, 0.893, 0.919],
                               atol=5e-4)


def test_cache_reused_then_invalidated_when_a_feature_file_changes(synthetic, tmp_path,
                                                                   monkeypatch):
    data, features, method = synthetic
    sequences = list_sequences(data)
    first, first_path = evaluate_method(method, data, sequences, tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("a valid cache must be reused, not recomputed")

    monkeypatch.setattr("evaluation.hpatches.evaluate_sequences", fail)
    again, again_path = evaluate_method(method, data, sequences, tmp_path / "cache")
    assert again_path == first_path and again[0] == first[0]
    monkeypatch.undo()

    # Rewrite one pair with exact matches: same file size, a later modification time.
    path = write_features(features, "i_syn", 2, POINTS, ONE_HOT)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    updated, updated_path = evaluate_method(method, data, sequences, tmp_path / "cache")
    assert updated_path != first_path
    assert updated[0][1] == pytest.approx(first[0][1] + 0.5)  # that pair went from 0.5 to 1


def test_signature_changes_with_size_and_set_of_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1234")
    b.write_bytes(b"5678")
    base = files_signature([a, b])
    assert files_signature([b, a]) == base  # order-independent
    assert files_signature([a]) != base
    a.write_bytes(b"12345")
    assert files_signature([a, b]) != base


def test_high_resolution_sequences_are_excluded(tmp_path):
    data = make_layout(tmp_path / "hp", {"i_dc": np.zeros(2), "v_talent": np.zeros(2),
                                         "i_ok": np.zeros(2), "v_ok": np.zeros(2)}, size=(16, 16))
    (data / "notes").mkdir()  # not a sequence folder
    assert list_sequences(data) == ["i_ok", "v_ok"]
    assert list_sequences(data, exclude_high_res=False) == ["i_dc", "i_ok", "v_ok", "v_talent"]
    assert len(HIGH_RES_SEQUENCES) == 8


def test_missing_homography_writes_no_cache(synthetic, tmp_path):
    data, _, method = synthetic
    (data / "v_syn" / "H_1_3").unlink()
    with pytest.raises(SCFeatError, match=r"missing homography file: .*v_syn/H_1_3"):
        evaluate_method(method, data, list_sequences(data), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_feature_file_writes_no_cache(synthetic, tmp_path):
    data, features, method = synthetic
    (features / "i_syn" / f"4.ppm.{POSTFIX}").unlink()
    with pytest.raises(SCFeatError, match=rf"missing feature .*i_syn/4.ppm.{POSTFIX}"):
        evaluate_method(method, data, list_sequences(data), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_bad_feature_file_names_file_and_key(synthetic, tmp_path):
    data, features, method = synthetic
    path = features / "v_syn" / f"2.ppm.{POSTFIX}"
    with open(path, "wb") as handle:
        np.savez(handle, keypoints=POINTS)
    with pytest.raises(SCFeatError, match=r"v_syn/2.ppm.test lacks \['descriptors'\]"):
        evaluate_method(method, data, list_sequences(data), tmp_path / "cache")
    path.write_bytes(b"not an npz")
    with pytest.raises(SCFeatError, match="cannot read feature file"):
        evaluate_method(method, data, list_sequences(data), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_empty_or_missing_data_folder(tmp_path):
    with pytest.raises(SCFeatError, match="no HPatches sequences"):
        list_sequences(tmp_path)
    with pytest.raises(SCFeatError, match="is not a folder"):
        list_sequences(tmp_path / "absent")


def test_bad_cache_and_method_entries(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.arange(3))
    with pytest.raises(SCFeatError, match="not an HPatches cache"):
        load_cache(bad)
    with pytest.raises(SCFeatError, match=r"methods\[0\]"):
        parse_hpatches_methods([{"name": "x", "features": "f"}])
    with pytest.raises(SCFeatError, match="unique"):
        parse_hpatches_methods(["sift", "sift"])
    with pytest.raises(SCFeatError, match="letters, digits"):
        parse_hpatches_methods([{"name": "a/b", "features": "f", "postfix": "p"}])


def test_mutual_nearest_neighbours_chunked():
    desc1 = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    desc2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    expected = [[0, 0], [2, 1]]  # row 1's nearest is column 0, whose nearest is row 0
    assert mnn_matches(desc1, desc2).tolist() == expected
    assert mnn_matches(desc1, desc2, chunk=1).tolist() == expected
    assert mnn_matches(desc1[:0], desc2).shape == (0, 2)


def test_sift_baseline_on_translated_texture(tmp_path):
    rng = np.random.default_rng(1)
    texture = cv2.GaussianBlur(rng.integers(0, 255, (160, 200), dtype=np.uint8), (0, 0), 2)
    texture = cv2.cvtColor(cv2.equalizeHist(texture), cv2.COLOR_GRAY2BGR)
    data = make_layout(tmp_path / "hp", {"i_tex": np.zeros(2), "v_tex": np.array([5.0, 3.0])},
                       size=(120, 160), texture=texture)
    cache, _ = evaluate_method(parse_hpatches_methods(["sift"])[0], data, list_sequences(data),
                               tmp_path / "cache")
    summary = summarize(cache, 3)
    assert summary["mean_matches"] > 20
    assert summary["mma"][2] > 0.9


def test_cli_end_to_end_and_config_errors(synthetic, tmp_path, capsys):
    data, features, _ = synthetic
    config = tmp_path / "eval.yaml"
    config.write_text(f"data_path: {data}\ncache_dir: {tmp_path / 'cache'}\n"
                      f"output_plot: {tmp_path / 'mma.png'}\nthresholds: 5\n"
                      f"methods:\n  - {{name: syn, features: {features}, postfix: {POSTFIX}}}\n")
    assert evaluate_hpatches.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "syn" in out
    if evaluate_hpatches.default_compare_caches():  # the published caches are compared by default
        assert "scfeat-20k" in out and "0.822" in out
    assert (tmp_path / "mma.png").stat().st_size > 0
    assert len(list((tmp_path / "cache").glob("syn-*.npy"))) == 1

    assert evaluate_hpatches.main(["--config", str(config), "method=[sift]"]) == 2
    assert "did you mean 'methods'" in capsys.readouterr().err
    assert evaluate_hpatches.main(["--config", str(config), "methods=[{name: x}]"]) == 2
    assert "'methods=[{name: x}]'" in capsys.readouterr().err  # the override that is wrong


def test_run_evaluation_fails_before_work_on_bad_compare_cache(synthetic, tmp_path):
    data, features, _ = synthetic
    conf = {"data_path": str(data), "cache_dir": str(tmp_path / "cache"), "output_plot": None,
            "methods": [{"name": "syn", "features": str(features), "postfix": POSTFIX}],
            "compare_caches": [str(tmp_path / "absent.npy")]}
    with pytest.raises(SCFeatError, match="absent.npy does not exist"):
        run_evaluation(conf, print_fn=lambda _: None)
    assert not (tmp_path / "cache").exists()


def test_save_cache_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.npy"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError):
        save_cache(path, ({}, {}, [np.array([]), np.array([]), np.array([])]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_every_method_gets_a_row_and_features_are_shared_by_matchers(tmp_path, capsys):
    """``methods=[sift, disk, aliked, xfeat, <checkpoint>, disk+lightglue]``: one row each,
    features extracted once per extractor (disk+lightglue reuses disk's) with the budget."""
    from conftest import save_random_checkpoint
    from tools.synthetic import make_hpatches

    data = tmp_path / "hpatches"
    make_hpatches(data, sequences=2, size=(96, 128), seed=0)
    checkpoint = tmp_path / "run" / "000"
    save_random_checkpoint(checkpoint)
    methods = ["sift", "disk", "aliked", "xfeat", str(checkpoint), "disk+lightglue"]
    args = ["--config", "config/eval_hpatches.yaml", f"data_path={data}",
            f"methods=[{','.join(methods)}]", "max_keypoints=200", "compare_caches=[]",
            f"cache_dir={tmp_path / 'cache'}", f"output_plot={tmp_path / 'mma.png'}"]
    assert evaluate_hpatches.main(args) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
            if "all " in line}
    assert list(rows) == ["sift", "disk", "aliked", "xfeat", "run-000", "disk+lightglue"]
    for line in rows.values():
        mma = [float(v) for v in line.split()[3:13]]
        assert 0 <= mma[0] <= mma[-1] <= 1 and float(line.split()[-2]) <= 200  # features
    folders = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache" / "features").iterdir())
    assert folders == ["aliked", "disk", "run-000", "sift", "xfeat"]
    assert evaluate_hpatches.main(args[:3] + ["methods=[sift+lightglue]"] + args[4:]) == 2
    assert "no LightGlue weights for 'sift'" in capsys.readouterr().err
