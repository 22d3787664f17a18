"""``python demo.py`` end to end at a tiny size (2 training steps, 64×96 training images, one
held-out photograph at 64×96, 128 keypoints), then a second run that reuses every stage, a
third without one peer's wheel, and the option errors."""
from __future__ import annotations

import contextlib
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
from evaluation.hpatches import method_feature_files
from evaluation.methods import parse_method
from tools import real_photos
from utils.checkpoint import is_checkpoint

TINY = ["--steps", "2", "--size", "64x96", "--keypoints", "128", "--device", "cpu"]
NETWORKS = ("untrained", "stage 1", "stage 2")
PEERS = ("disk", "aliked", "xfeat")
ROWS = (*NETWORKS, "sift", *PEERS)
TINY_PHOTO = ("coins.png", (90, 134), (64, 96))  # a centre of coins at its own scale
FEATURES = ("photos-untrained", "photos-untrained-siftkp", "photos-stage1",
            "photos-stage1-siftkp", "photos-stage2")


def table_rows(text: str) -> dict[str, list[float | None]]:
    """``label → [MMA@3 all, illumination, viewpoint, keypoints/image, MMA@3 all, illumination,
    viewpoint with SIFT's keypoints]`` of the printed table (``None`` for ``-``); asserts its
    two header lines."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == [
        "method", "all", "illum", "view", "kpts/image", "all", "illum", "view"])
    assert lines[header - 1].split() == ["own", "keypoints:", "MMA@3", "SIFT's", "keypoints:",
                                         "MMA@3"]
    rows = {}
    for line in lines[header + 1:]:
        if not line.strip():
            break
        label, *values = line.rsplit(maxsplit=7)  # labels may hold a space
        rows[label] = [None if v == "-" else float(v) for v in values]
    return rows


def global_step(run_dir: Path) -> int:
    state = torch.load(run_dir / "training_state.pth", map_location="cpu", weights_only=False,
                       mmap=True)
    return int(state["global_step"])


def outputs_mtimes(out: Path) -> dict[Path, int]:
    """Modification times of every checkpoint, training state and feature file."""
    files = [p for p in (out / "ckpts").rglob("*")
             if p.is_file() and p.suffix in (".pth", ".scfeat", ".npz")]
    return {p: p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def tiny_photos():
    """The demo's photographs replaced by one small one (64×96 sequences)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(real_photos.HELD_OUT_PHOTOS, "tiny", TINY_PHOTO)
        patch.setattr(demo, "PHOTOS", ("tiny",))
        yield


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_photos):
    """The first run: ``(out folder, exit code, stdout, seconds)``."""
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = demo.main(TINY + ["--out", str(out)])
    return out, code, stdout.getvalue(), time.perf_counter() - start


def check_table(printed: str, rows_expected: tuple[str, ...] = ROWS) -> dict[str, list]:
    rows = table_rows(printed)
    assert list(rows) == list(rows_expected), printed
    for label, values in rows.items():
        own, keypoints, fixed = values[:3], values[3], values[4:]
        # the peers cannot describe given keypoints
        assert (fixed == [None] * 3) == (label in PEERS), (label, values)
        for every, illumination, viewpoint in (own, fixed) if label not in PEERS else (own,):
            assert all(0.0 <= v <= 1.0 for v in (every, illumination, viewpoint)), label
            # one illumination and one viewpoint sequence: all pairs = their mean
            assert abs(every - (illumination + viewpoint) / 2) <= 0.001, (label, values)
        # every network keeps the budget (no score threshold); the others at most the budget
        assert keypoints == 128 if label in NETWORKS else 0 < keypoints <= 128, (label, keypoints)
    assert rows["sift"][:3] == rows["sift"][4:]  # SIFT's own keypoints are SIFT's keypoints
    assert rows["stage 2"][4:] == rows["stage 1"][4:]  # stage 2 keeps stage 1's descriptors
    for note in ("MMA@3:", "Own keypoints:", "SIFT's keypoints:",
                 *(f"\n{label}:" for label in rows_expected)):
        assert note in printed, note
    return rows


@pytest.mark.slow
def test_first_run_trains_extracts_and_evaluates(demo_run, monkeypatch):
    out, code, printed, _ = demo_run
    assert code == 0, printed
    check_table(printed)
    assert "Held-out real photographs (tiny: 2 sequences, 10 image pairs), at most 128 " \
           "keypoints per image" in printed
    assert "summary" in printed and str(out / "mma.png") in printed
    ckpts = out / "ckpts"
    assert global_step(ckpts / "demo-descriptor") == 2       # --steps 2 over the 2 epochs
    assert global_step(ckpts / "demo-keypoint") == 1         # stage 2: steps // 2
    for folder in ("demo-descriptor/002", "demo-keypoint/001", "demo-untrained/000"):
        assert is_checkpoint(ckpts / folder), folder
    assert (ckpts / "demo-untrained" / "config.yaml").is_file()
    # The untrained network: stage 1's random initialisation (same seed), with BatchNorm
    # statistics estimated on the training data instead of the initial mean 0 / variance 1.
    from registry import build_model
    from utils.checkpoint import load_state_dict_file
    untrained = load_state_dict_file(ckpts / "demo-untrained" / "000" / "backbone.pth")
    torch.manual_seed(0)
    fresh = build_model("SCFeatModel", {"backbone_config": {"pretrained": False}}).backbone.state_dict()
    assert torch.equal(untrained["firstconv.weight"], fresh["firstconv.weight"])
    assert torch.equal(untrained["layer1.0.conv1.weight"], fresh["layer1.0.conv1.weight"])
    assert not torch.allclose(untrained["firstbn.running_var"], fresh["firstbn.running_var"])
    assert not torch.allclose(untrained["layer3.0.bn1.running_mean"], fresh["layer3.0.bn1.running_mean"])

    images = sorted((out / "data" / "photos").glob("*/*.ppm"))
    assert [p.parent.name for p in images[::6]] == ["i_tiny", "v_tiny"] and len(images) == 12
    for features in FEATURES:
        for image in images:
            path = ckpts / features / "desc" / image.parent.name / f"{image.name}.scfeat"
            assert path.is_file(), path
    # the networks with SIFT's keypoints describe the points the SIFT row matches: the files
    # the evaluation extracted for the method 'sift' at the budget (found, not extracted here)
    monkeypatch.setattr("evaluation.methods.make_extractor", None)
    cache = out.resolve() / "eval" / "cache"
    sift = method_feature_files(parse_method("sift", "m"), out / "data" / "photos",
                                ["i_tiny", "v_tiny"], cache, 128)
    for image in images:
        name = f"{image.parent.name}/{image.name}"
        with np.load(sift[(image.parent.name, int(image.stem))]) as own, \
                np.load(ckpts / "photos-stage1-siftkp" / "desc" / f"{name}.scfeat") as fixed:
            assert len(own["keypoints"]) <= 128
            assert np.allclose(np.sort(own["keypoints"], axis=0),
                               np.sort(fixed["keypoints"], axis=0), atol=1e-3)
    # stage 2's descriptors at SIFT's keypoints are stage 1's (the same backbone): not extracted
    assert not (ckpts / "photos-stage2-siftkp").exists()
    caches = sorted((out / "eval" / "cache").glob("*.npy"))
    assert sorted(p.name.rsplit("-", 1)[0] for p in caches) == sorted(
        ["untrained", "untrained-siftkp", "stage1", "stage1-siftkp", "stage2", "sift", *PEERS])
    table = (out / "eval" / "mma.txt").read_text()
    assert all(f"\n{name} " in table for name in ("stage1-siftkp", "sift", *PEERS)), table
    plot = out / "mma.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_second_run_reuses_every_stage(demo_run, capsys):
    out, code, first_printed, first_seconds = demo_run
    assert code == 0
    capsys.readouterr()
    before = outputs_mtimes(out)
    caches = sorted((out / "eval" / "cache").glob("*.npy"))
    start = time.perf_counter()
    assert demo.main(TINY + ["--out", str(out)]) == 0
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out

    assert check_table(printed) == table_rows(first_printed)
    assert not re.search(r"^(training|extracting) ", printed, re.MULTILINE), printed
    # data, photographs, 2 runs, the untrained net, 5 feature sets of the networks, SIFT's and
    # the 3 peers'
    assert printed.count("reusing") == 14
    reused = [line for line in printed.splitlines() if line.startswith("  ") and " reused " in line]
    assert len(reused) == 14
    assert global_step(out / "ckpts" / "demo-descriptor") == 2
    assert global_step(out / "ckpts" / "demo-keypoint") == 1
    assert outputs_mtimes(out) == before  # nothing retrained or re-extracted
    assert sorted((out / "eval" / "cache").glob("*.npy")) == caches  # the caches were reused
    assert seconds < first_seconds / 3, (seconds, first_seconds)


@pytest.mark.slow
def test_a_peer_without_its_wheel_is_skipped_with_one_line(demo_run, capsys, monkeypatch):
    from evaluation import peers

    out = demo_run[0]
    capsys.readouterr()
    monkeypatch.setitem(peers.WEIGHT_FILES, "xfeat", ("scm_absent.weights", "xfeat.pt"))
    assert demo.main(TINY + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    check_table(captured.out, tuple(row for row in ROWS if row != "xfeat"))
    skipped = [line for line in captured.out.splitlines() if line.startswith("xfeat: skipped")]
    assert len(skipped) == 1 and "package scm-absent, which is not installed" in skipped[0], skipped
    assert "Traceback" not in captured.out + captured.err


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory) -> Path:
    """A tiny COLMAP scene folder (sparse/, images/): 5 synthetic views at 96×128, 10 pairs by
    the pose protocol's rule."""
    from test_pose import colmap_copy
    from tools.synthetic import make_megadepth1500

    root = tmp_path_factory.mktemp("scene")
    make_megadepth1500(root / "views", scenes=1, images=5, pairs=4, size=(96, 128), seed=0)
    return colmap_copy(root / "views", root / "scene", binary=False)


def pose_rows(text: str) -> dict[str, list[float]]:
    """``label → [AUC@5, AUC@10, AUC@20, P(epi), matches, inliers, failed]`` of the printed
    relative-pose table (``evaluation.pose.format_table``), after its header."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == [
        "method", "AUC@5", "AUC@10", "AUC@20"])
    rows = {}
    for line in lines[header + 2:]:
        if not line.strip():
            break
        label, *values, failed = line.rsplit(maxsplit=7)
        rows[label] = [float(v) for v in values] + [int(failed.split("/")[0])]
    return rows


@pytest.mark.slow
def test_a_pose_scene_adds_the_relative_pose_rows(demo_run, tiny_scene, capsys):
    from evaluation.pose import run_pose_evaluation
    from schemas import load_eval_pose_config

    out, _, first_printed, _ = demo_run
    # without the option: no pose stage, no pose output
    assert "Relative pose" not in first_printed and not (out / "eval" / "pose-cache").exists()
    capsys.readouterr()
    assert demo.main(TINY + ["--out", str(out), "--pose-scene", str(tiny_scene)]) == 0
    printed = capsys.readouterr().out
    assert check_table(printed) == table_rows(first_printed)  # the HPatches table is unchanged
    assert f"Relative pose on {tiny_scene} (10 pairs of a COLMAP model" in printed
    rows = pose_rows(printed)
    assert list(rows) == list(ROWS)
    for label, (auc5, auc10, auc20, precision, *_rest) in rows.items():
        assert 0 <= auc5 <= auc10 <= auc20 <= 100 and 0 <= precision <= 100, label
    # the evaluation's own protocol: SIFT's row is evaluate_pose's with the same config
    conf = load_eval_pose_config(demo.demo_stages.POSE_CONFIG, [
        f"data_path={tiny_scene}", "methods=[sift]", "max_keypoints=128", "output_json=null",
        "output_plot=null", f"cache_dir={out / 'separate-cache'}"])
    sift = run_pose_evaluation(conf, print_fn=lambda line: None)["sift"]
    assert rows["sift"][:3] == [round(100 * sift["auc"][t], 1) for t in ("5", "10", "20")]
    assert rows["sift"][4] == round(sift["mean_matches"])
    assert (out / "eval" / "pose.txt").is_file() and (out / "pose.png").is_file()


def test_pose_scene_without_a_folder_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo.demo_stages, "STRECHA_SCENE", tmp_path / "strecha" / "Herz-Jesus-P25")
    assert demo.main(["--out", str(tmp_path / "out"), "--pose-scene"]) == 2
    err = capsys.readouterr().err
    assert "--pose-scene" in err and "lacks sparse/ and images/" in err and \
        "without DIR" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work
    (tmp_path / "scene" / "sparse").mkdir(parents=True)
    assert demo.main(["--out", str(tmp_path / "out"), "--pose-scene", str(tmp_path / "scene")]) == 2
    assert "lacks images/" in capsys.readouterr().err


@pytest.mark.slow
def test_other_settings_for_the_same_out_are_refused(demo_run, capsys):
    out = demo_run[0]
    capsys.readouterr()
    for option, value, message in (("--steps", "3", "--steps 2 (now 3)"),
                                   ("--keypoints", "256", "--keypoints 128 (now 256)")):
        args = [*TINY, "--out", str(out)]
        if option in args:
            args[args.index(option) + 1] = value
        assert demo.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "--out" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("option, value, message", [
    ("--size", "60x96", "multiples of 16"),
    ("--size", "big", "expected HEIGHTxWIDTH"),
    ("--keypoints", "100", "at least 128"),
])
def test_bad_options_are_reported(tmp_path, capsys, option, value, message):
    assert demo.main(["--out", str(tmp_path / "out"), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and option in err and message in err
    assert not (tmp_path / "out").exists()


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--out", "--device", "--size", "--keypoints", "--seed",
                   "--pose-scene"):
        assert option in text


def test_the_table_lists_every_row_and_marks_what_a_method_cannot_do():
    from tools.demo_stages import results_table

    def summary(mma3: float, keypoints: float) -> dict:
        curve = np.array([-0.1, -0.05, 0.0, 0.01, 0.02])  # MMA@1..5 around MMA@3
        return {"mma": mma3 + curve, "mma_i": mma3 + 0.1 + curve, "mma_v": mma3 - 0.1 + curve,
                "mean_features": keypoints}
    results = {"untrained": summary(0.3, 512), "untrained-siftkp": summary(0.4, 300),
               "stage1": summary(0.35, 512), "stage1-siftkp": summary(0.5, 300),
               "sift": summary(0.8, 300), "disk": summary(0.7, 512)}
    text = results_table(results, [("untrained", "untrained", "untrained-siftkp"),
                                   ("stage 1", "stage1", "stage1-siftkp"),
                                   ("sift", "sift", "sift"), ("disk", "disk", None)])
    rows = table_rows(text)
    assert list(rows) == ["untrained", "stage 1", "sift", "disk"]
    assert rows["untrained"] == [0.3, 0.4, 0.2, 512, 0.4, 0.5, 0.3]  # all, illum, view @3
    assert rows["stage 1"][4:] == [0.5, 0.6, 0.4]
    assert rows["disk"] == [0.7, 0.8, 0.6, 512, None, None, None]


@pytest.mark.slow
def test_untrained_statistics_depend_on_the_seed_alone(tmp_path, monkeypatch):
    """The untrained network's BatchNorm statistics come from colour-jittered training images;
    whatever ran before in the process (the training stages) must not change them."""
    from schemas import load_train_config
    from tools import demo_stages
    from tools.synthetic import make_megadepth
    from utils.checkpoint import load_state_dict_file

    monkeypatch.setattr(demo_stages, "BATCHNORM_BATCHES", 2)
    data = tmp_path / "megadepth"
    make_megadepth(data, scenes=1, pairs=4, size=(64, 96), seed=0)
    conf = load_train_config(demo_stages.DESC_CONFIG,
                             [f"data_config_train.data_path={demo_stages.yaml_str(data)}"])
    statistics = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # another history of the global generator
        torch.rand(global_seed)
        folder = demo_stages.make_untrained(tmp_path / f"run{global_seed}", conf,
                                            demo_stages.DemoResult())
        state = load_state_dict_file(folder / "backbone.pth")
        statistics.append({k: v for k, v in state.items() if "running_" in k})
    assert statistics[0].keys() == statistics[1].keys() and statistics[0]
    assert all(torch.equal(statistics[0][k], statistics[1][k]) for k in statistics[0])
