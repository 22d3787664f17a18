"""Relative pose (MegaDepth-1500 protocol): AUC integration, exact and random correspondences,
both index layouts, bad input, the synthetic set and the CLI end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2

import numpy as np
import pytest

import evaluate_pose
import schemas
from evaluation.pose import (PosePair, default_conf, evaluate_pair, load_pairs, pose_auc,
                             read_pairs_calibrated, read_scene_info, relative_pose_error,
                             resize_long_side, run_pose_evaluation, scale_intrinsics,
                             summarize)
from utils.errors import SCFeatError

K0 = np.array([[300.0, 0.0, 160.0], [0.0, 310.0, 120.0], [0.0, 0.0, 1.0]])
K1 = np.array([[280.0, 0.0, 150.0], [0.0, 280.0, 125.0], [0.0, 0.0, 1.0]])


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    import cv2
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    return cv2.Rodrigues(axis * np.radians(degrees))[0]


def random_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A relative pose ``x1 = R·x0 + t``: 10–30° about a random axis, a sideways baseline."""
    R = rotation(rng.normal(size=3), rng.uniform(10, 30))
    t = np.array([rng.uniform(-1, 1), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)])
    return R, t


def project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    projected = points @ K.T
    return projected[:, :2] / projected[:, 2:]


def exact_correspondences(rng: np.random.Generator, R: np.ndarray, t: np.ndarray,
                          count: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in both images of random 3-D points in front of both cameras (a non-planar
    cloud, 3–8 units deep)."""
    points = np.stack([rng.uniform(-2, 2, count), rng.uniform(-1.5, 1.5, count),
                       rng.uniform(3, 8, count)], axis=1)
    in_cam1 = points @ R.T + t
    keep = in_cam1[:, 2] > 0.5
    return project(points[keep], K0), project(in_cam1[keep], K1)


def pose_pair(R: np.ndarray, t: np.ndarray) -> PosePair:
    return PosePair("a.jpg", "b.jpg", Path("a.jpg"), Path("b.jpg"), K0, K1, R, t, "test")


# --------------------------------------------------------------------------------- AUC


def test_auc_against_a_hand_computed_case():
    # Sorted errors 0 | 1, 3, 7, inf → recall 0, .25, .5, .75, 1 (the failure only lowers it).
    # AUC@5: trapezoids 0..1 (0→.25), 1..3 (.25→.5), 3..5 flat at .5 → (0.125 + 0.75 + 1) / 5.
    # AUC@10 adds 3..7 (.5→.75) and 7..10 at .75; AUC@20 runs the .75 plateau to 20.
    aucs = pose_auc([7.0, np.inf, 1.0, 3.0], (5, 10, 20))
    assert aucs == pytest.approx([1.875 / 5, 5.625 / 10, 13.125 / 20])
    assert pose_auc([0.0, 0.0], (5,)) == [1.0]
    assert pose_auc([np.inf, 30.0], (5, 10, 20)) == [0.0, 0.0, 0.0]
    assert pose_auc([], (5,)) == [0.0]


def test_relative_pose_error_ignores_the_sign_of_t():
    R = rotation([0, 1, 0], 20)
    t = np.array([1.0, 0.0, 0.0])
    assert relative_pose_error(R, t, R, -t) == pytest.approx((0.0, 0.0), abs=1e-6)
    t_error, R_error = relative_pose_error(R, t, rotation([0, 1, 0], 23), np.array([1.0, 1.0, 0]))
    assert t_error == pytest.approx(45.0)
    assert R_error == pytest.approx(3.0)


def run_pairs(estimator: str, shuffle: bool, count: int) -> list[dict]:
    """Records of ``count`` random relative poses from exact (or, ``shuffle``, permuted, so
    every match is wrong) correspondences."""
    rng = np.random.default_rng(0)
    conf = {**default_conf, "estimator": estimator}
    records = []
    for _ in range(count):
        R, t = random_pair(rng)
        points0, points1 = exact_correspondences(rng, R, t)
        if shuffle:
            points1 = points1[rng.permutation(len(points1))]
        records.append(evaluate_pair(pose_pair(R, t), points0, points1, K0, K1,
                                     ((320, 240), (320, 240)), conf))
    return records


@pytest.mark.parametrize("estimator", ["opencv", "poselib"])
def test_exact_correspondences_give_auc_1(estimator):
    records = run_pairs(estimator, shuffle=False, count=10)
    summary = summarize(records)
    assert min(summary["auc"].values()) > 0.999
    assert summary["epipolar_precision"] == 1.0 and summary["failed"] == 0
    assert max(r["error"] for r in records) < 0.05


@pytest.mark.parametrize("estimator", [
    "opencv", pytest.param("poselib", marks=pytest.mark.slow)])  # ~3 s a pair: 1e5 iterations
def test_random_correspondences_give_auc_near_0(estimator):
    summary = summarize(run_pairs(estimator, shuffle=True, count=10))
    assert summary["auc"]["5"] < 0.03 and summary["auc"]["20"] < 0.15
    assert summary["epipolar_precision"] < 0.2


# --------------------------------------------------------------------------------- resizing


def test_resize_scales_intrinsics_with_the_image():
    image = np.zeros((240, 320, 3), np.uint8)
    resized, scales = resize_long_side(image, 160)
    assert resized.shape == (120, 160, 3) and scales == pytest.approx([0.5, 0.5])
    assert resize_long_side(image, None)[1] == pytest.approx([1, 1])
    point = np.array([[0.3, -0.2, 4.0]])
    pixel = project(point, K0)
    # Pixel centres at integers: the resized image samples x' = (x + 0.5)·s − 0.5.
    assert project(point, scale_intrinsics(K0, scales)) == pytest.approx((pixel + 0.5) * 0.5 - 0.5)


# --------------------------------------------------------------------------------- loaders


def pair_line(name0: str, name1: str, R: np.ndarray, t: np.ndarray) -> str:
    values = np.concatenate([K0.ravel(), K1.ravel(), R.ravel(), t])
    return " ".join([name0, name1] + [f"{v:.17g}" for v in values])


def test_gluefactory_pairs_file(tmp_path):
    R, t = rotation([0, 1, 0], 15), np.array([0.5, 0.1, -0.2])
    path = tmp_path / "pairs_calibrated.txt"
    path.write_text(pair_line("s/a.jpg", "s/b.jpg", R, t) + "\n\n"
                    + pair_line("s/b.jpg", "s/c.jpg", R.T, -R.T @ t) + "\n")
    pairs = read_pairs_calibrated(path, tmp_path / "images")
    assert [(p.key0, p.key1) for p in pairs] == [("s/a.jpg", "s/b.jpg"), ("s/b.jpg", "s/c.jpg")]
    assert pairs[0].path1 == tmp_path / "images" / "s" / "b.jpg"
    assert pairs[0].K0 == pytest.approx(K0) and pairs[0].K1 == pytest.approx(K1)
    assert pairs[1].R == pytest.approx(R.T) and pairs[1].t == pytest.approx(-R.T @ t)
    assert pairs[1].source == f"{path}:3"


@pytest.mark.parametrize("two_dimensional", [False, True])
def test_loftr_scene_info(tmp_path, two_dimensional):
    """LoFTR's npz: world→camera poses give T_0to1 = T1·T0⁻¹; pair_infos as a 1-D array of
    tuples or (as numpy makes of a list of tuples) an N×3 object array."""
    poses = np.stack([np.eye(4)] * 3)
    poses[1, :3, :3], poses[1, :3, 3] = rotation([0, 1, 0], 10), [1.0, 0.0, 0.0]
    poses[2, :3, :3], poses[2, :3, 3] = rotation([1, 0, 0], 5), [0.0, 0.5, 0.2]
    infos = [((0, 1), 0.4, np.zeros((0, 2))), ((1, 2), 0.6, np.zeros((0, 2)))]
    if two_dimensional:
        pair_infos = np.empty((2, 3), object)
        for row, info in enumerate(infos):
            pair_infos[row] = info
    else:
        pair_infos = np.empty(2, object)
        pair_infos[:] = infos
    path = tmp_path / "0015_0.1_0.3.npz"
    np.savez(path, image_paths=np.array(["u/a.jpg", "u/b.jpg", "u/c.jpg"], object),
             depth_paths=np.array([None] * 3, object), intrinsics=np.stack([K0, K1, K0]),
             poses=poses, pair_infos=pair_infos)
    pairs = read_scene_info(path, tmp_path)
    assert [(p.key0, p.key1) for p in pairs] == [("u/a.jpg", "u/b.jpg"), ("u/b.jpg", "u/c.jpg")]
    relative = poses[2] @ np.linalg.inv(poses[1])
    assert pairs[1].R == pytest.approx(relative[:3, :3]) and pairs[1].t == pytest.approx(relative[:3, 3])
    assert pairs[1].K0 == pytest.approx(K1) and pairs[1].path0 == tmp_path / "u/b.jpg"


def test_bad_pairs_files_name_the_file_and_line(tmp_path):
    good = pair_line("a.jpg", "b.jpg", np.eye(3), np.array([1.0, 0, 0]))
    path = tmp_path / "pairs_calibrated.txt"
    with pytest.raises(SCFeatError, match="pairs file .*missing.txt not found"):
        read_pairs_calibrated(tmp_path / "missing.txt", tmp_path)
    path.write_text(good + "\n" + good.rsplit(" ", 1)[0] + "\n")
    with pytest.raises(SCFeatError, match=r"pairs_calibrated.txt:2: expected 32 values .* got 31"):
        read_pairs_calibrated(path, tmp_path)
    path.write_text(good.replace(" 300 ", " 3OO ", 1) + "\n")
    with pytest.raises(SCFeatError, match=r"pairs_calibrated.txt:1: '3OO' is not a number"):
        read_pairs_calibrated(path, tmp_path)
    path.write_text(pair_line("a.jpg", "b.jpg", 2 * np.eye(3), np.zeros(3)) + "\n")
    with pytest.raises(SCFeatError, match=r"pairs_calibrated.txt:1: R is not a rotation"):
        read_pairs_calibrated(path, tmp_path)
    path.write_text("# only a comment\n")
    with pytest.raises(SCFeatError, match="no pairs"):
        read_pairs_calibrated(path, tmp_path)


def test_bad_scene_info_names_the_file_and_pair(tmp_path):
    path = tmp_path / "scene.npz"
    np.savez(path, image_paths=np.array(["a.jpg"], object), intrinsics=K0[None],
             poses=np.eye(4)[None])
    with pytest.raises(SCFeatError, match=r"scene.npz: lacks \['pair_infos'\]"):
        read_scene_info(path, tmp_path)
    infos = np.empty(1, object)
    infos[0] = ((0, 3), 0.5, None)
    np.savez(path, image_paths=np.array(["a.jpg"], object), intrinsics=K0[None],
             poses=np.eye(4)[None], pair_infos=infos)
    with pytest.raises(SCFeatError, match=r"scene.npz: pair_infos\[0\]: image 3 has no entry"):
        read_scene_info(path, tmp_path)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(SCFeatError, match="broken.npz: cannot read it as an npz"):
        read_scene_info(tmp_path / "broken.npz", tmp_path)


def test_missing_images_are_named_before_any_work(tmp_path):
    (tmp_path / "pairs_calibrated.txt").write_text(
        pair_line("s/a.jpg", "s/b.jpg", np.eye(3), np.array([1.0, 0, 0])) + "\n")
    with pytest.raises(SCFeatError, match=r"missing image files: .*images/s/a.jpg, .*images/s/b.jpg"):
        run_pose_evaluation({**default_conf, "data_path": str(tmp_path), "output_json": None,
                             "output_plot": None, "cache_dir": str(tmp_path / "cache")})
    assert not (tmp_path / "cache").exists()


def test_missing_data_path_says_how_to_make_it(tmp_path):
    with pytest.raises(SCFeatError, match="tools.synthetic megadepth1500"):
        load_pairs({**default_conf, "data_path": str(tmp_path / "nothing")})


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory) -> Path:
    from tools.synthetic import make_megadepth1500
    out = tmp_path_factory.mktemp("pose") / "megadepth1500"
    make_megadepth1500(out, scenes=1, images=5, pairs=4, size=(96, 128), seed=0)
    return out


def test_synthetic_set_has_both_layouts_with_the_same_pairs(synthetic_set):
    glue, _ = load_pairs({**default_conf, "data_path": str(synthetic_set)})
    loftr, files = load_pairs({**default_conf, "data_path": str(synthetic_set), "layout": "loftr"})
    assert 2 <= len(glue) <= 4 and len(files) >= 1
    by_images = {(p.path0, p.path1): p for p in loftr}
    for pair in glue:
        other = by_images[(pair.path0, pair.path1)]
        assert pair.path0.is_file() and pair.path1.is_file()
        assert pair.R == pytest.approx(other.R, abs=1e-9) and pair.t == pytest.approx(other.t, abs=1e-9)
        assert pair.K0 == pytest.approx(other.K0) and pair.K1 == pytest.approx(other.K1)
    # The ground truth is consistent with the rendered poses file (img_cam.txt layout).
    from dataloader.megadepth_layout import read_img_cam
    cameras, _ = read_img_cam(synthetic_set / "poses" / "synth_0000.txt")
    pair = glue[0]
    pose0, pose1 = (cameras[p.name].pose for p in (pair.path0, pair.path1))
    relative = pose1 @ np.linalg.inv(pose0)
    assert pair.R == pytest.approx(relative[:3, :3], abs=1e-9)


def test_cli_runs_sift_caches_and_ends_with_the_auc_line(synthetic_set, tmp_path, capsys):
    args = ["--config", "config/eval_megadepth1500.yaml", f"data_path={synthetic_set}",
            "methods=[sift]", f"cache_dir={tmp_path / 'cache'}", "resize=128",
            f"output_json={tmp_path / 'pose.json'}", f"output_plot={tmp_path / 'pose.png'}"]
    assert evaluate_pose.main(args) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[-1].startswith("AUC@5/10/20 sift: ")
    a, b, c = (float(v) for v in lines[-1].split(": ")[1].split(" / "))
    assert 0 <= a <= b <= c <= 100
    results = json.loads((tmp_path / "pose.json").read_text())
    assert results["summaries"]["sift"]["auc"]["20"] == pytest.approx(c / 100, abs=1e-3)
    assert (tmp_path / "pose.png").stat().st_size > 0
    caches = sorted((tmp_path / "cache").glob("sift-*.json"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    assert evaluate_pose.main(args) == 0  # the second run reuses the cache
    assert capsys.readouterr().out.strip().split("\n")[-1] == lines[-1]
    assert caches[0].stat().st_mtime_ns == stamp
    assert evaluate_pose.main(args + ["estimator=poselib"]) == 0  # new settings, new cache
    assert len(list((tmp_path / "cache").glob("sift-*.json"))) == 2
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 1  # same features


def test_changed_images_are_extracted_again(synthetic_set, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_set, data)
    conf = {**default_conf, "data_path": str(data), "resize": 128, "output_json": None,
            "output_plot": None, "cache_dir": str(tmp_path / "cache")}
    first = run_pose_evaluation(conf, lambda line: None)["sift"]
    image = load_pairs(conf)[0][0].path0
    cv2.imwrite(str(image), cv2.imread(str(image))[:, ::-1])  # same name, other content
    second = run_pose_evaluation(conf, lambda line: None)["sift"]
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2
    assert second != first


def test_cli_rejects_bad_config_values(tmp_path, capsys):
    assert evaluate_pose.main(["estimator=magsac"]) == 2
    assert "estimator" in capsys.readouterr().err
    assert evaluate_pose.main([f"data_path={tmp_path}", f"methods=[{tmp_path}]"]) == 2
    err = capsys.readouterr().err
    assert "eval_megadepth1500.yaml" in err and "methods[0]" in err and "not a checkpoint" in err


@pytest.mark.slow
def test_a_checkpoint_method_runs(synthetic_set, tmp_path):
    from conftest import save_random_checkpoint
    checkpoint = tmp_path / "run" / "000"
    save_random_checkpoint(checkpoint)
    printed = []
    summaries = run_pose_evaluation({**default_conf, "data_path": str(synthetic_set),
                                     "methods": ["sift", str(checkpoint)], "resize": 96,
                                     "max_keypoints": 256, "cache_dir": str(tmp_path / "c"),
                                     "output_json": None, "output_plot": None},
                                    printed.append)
    assert list(summaries) == ["sift", "run-000"]
    assert printed[-1].startswith("AUC@5/10/20 run-000: ")
    assert summaries["run-000"]["mean_matches"] > 0


def test_shipped_config_validates_and_points_where_the_readme_generates():
    from utils.config import load_config
    conf = load_config("config/eval_megadepth1500.yaml", [], schemas.EVAL_POSE_SCHEMA)
    assert conf["layout"] == "gluefactory" and conf["estimator"] in ("opencv", "poselib")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"python -m tools.synthetic megadepth1500 --out {conf['data_path']}" in readme


@pytest.mark.slow
def test_peers_and_lightglue_run(synthetic_set, tmp_path):
    printed = []
    summaries = run_pose_evaluation({**default_conf, "data_path": str(synthetic_set),
                                     "methods": ["disk+lightglue", "aliked", "xfeat+lightglue"],
                                     "resize": 128, "max_keypoints": 256,
                                     "cache_dir": str(tmp_path / "c"), "output_json": None,
                                     "output_plot": None}, printed.append)
    assert list(summaries) == ["disk+lightglue", "aliked", "xfeat+lightglue"]
    assert printed[-1].startswith("AUC@5/10/20 xfeat+lightglue: ")
    for summary in summaries.values():
        assert summary["mean_matches"] > 10 and summary["failed"] < summary["pairs"]


def colmap_copy(synthetic_set: Path, out: Path, binary: bool) -> Path:
    """The synthetic scene ``synth_0000`` as a COLMAP model (principal points + 0.5) beside
    its images: ``out/sparse``, ``out/images``."""
    from dataloader.colmap_model import write_model
    from dataloader.megadepth_layout import read_img_cam
    cameras, _ = read_img_cam(synthetic_set / "poses" / "synth_0000.txt")
    models, images = [], []
    for index, (name, camera) in enumerate(sorted(cameras.items())):
        K = camera.K
        models.append(("PINHOLE", camera.width, camera.height,
                       [K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5]))
        images.append((name, index, camera.pose[:3, :3], camera.pose[:3, 3], np.zeros((0, 3))))
    write_model(out / "sparse", models, images, binary=binary)
    shutil.copytree(synthetic_set / "images" / "synth_0000", out / "images")
    return out


@pytest.mark.parametrize("binary", [False, True])
def test_colmap_layout_gives_the_gluefactory_pairs_records(synthetic_set, tmp_path, binary):
    data = colmap_copy(synthetic_set, tmp_path / "scene", binary)
    common = {"resize": 128, "output_json": None, "output_plot": None, "methods": ["sift"]}
    colmap = {**default_conf, **common, "layout": "colmap", "data_path": str(data),
              "cache_dir": str(tmp_path / "c1"),
              "colmap_pairs": {**default_conf["colmap_pairs"], "max_angle": 180.0,
                               "min_view_overlap": 0.0, "depth": 5.0}}
    pairs, files = load_pairs(colmap)
    assert len(pairs) == 10 and files[0].name == ("cameras.bin" if binary else "cameras.txt")
    glue, _ = load_pairs({**default_conf, "data_path": str(synthetic_set)})
    by_names = {(p.key0, p.key1): p for p in pairs}
    for pair in glue:
        other = by_names[(pair.path0.name, pair.path1.name)]
        assert other.K0 == pytest.approx(pair.K0, abs=1e-9)  # COLMAP's cx, cy - 0.5
        assert other.R == pytest.approx(pair.R, abs=1e-9) and other.t == pytest.approx(pair.t, abs=1e-9)
    # The same protocol: the records of the shared pairs are the glue-factory layout's.
    from evaluation.methods import parse_methods
    from evaluation.pose import evaluate_method
    sift = parse_methods(["sift"])[0]
    records, _ = evaluate_method(sift, pairs, files, colmap)
    glue_conf = {**default_conf, **common, "data_path": str(synthetic_set),
                 "cache_dir": str(tmp_path / "c2")}
    glue_records, _ = evaluate_method(sift, glue, [], glue_conf)
    mine = {(r["name0"], r["name1"]): r for r in records}
    for record in glue_records:
        other = mine[tuple(Path(record[k]).name for k in ("name0", "name1"))]
        assert other["matches"] == record["matches"]
        assert other["error"] == pytest.approx(record["error"], abs=1e-6)


def test_colmap_layout_cli_prints_a_row_and_keys_the_cache_by_the_pair_rule(
        synthetic_set, tmp_path, capsys):
    data = colmap_copy(synthetic_set, tmp_path / "scene", binary=False)
    args = [f"data_path={data}", "layout=colmap", "methods=[sift]", "resize=null",
            f"cache_dir={tmp_path / 'cache'}", "output_json=null", "output_plot=null",
            "colmap_pairs.depth=5.0", "colmap_pairs.min_view_overlap=0.1"]
    assert evaluate_pose.main(args) == 0
    out = capsys.readouterr().out
    assert "COLMAP model relative pose" in out and out.strip().split("\n")[-1].startswith(
        "AUC@5/10/20 sift: ")
    assert evaluate_pose.main(args + ["colmap_pairs.grid=12"]) == 0  # another rule: new records
    assert len(list((tmp_path / "cache").glob("sift-*.json"))) == 2
    # A rule that leaves no pair, and a missing image: one message naming the model / image.
    assert evaluate_pose.main(args + ["colmap_pairs.min_view_overlap=1.0"]) == 2
    assert "leaves no pair" in capsys.readouterr().err
    (data / "images" / "img_003.jpg").unlink()
    assert evaluate_pose.main(args) == 2
    err = capsys.readouterr().err
    assert "lacks 1 of the 5 images" in err and "img_003.jpg" in err
