"""evaluation/methods.py: method names and their errors, budgets, extractors, matchers and the
per-method feature caches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import save_random_checkpoint
from evaluation.matching import Features, read_features
from evaluation.methods import (CHECKPOINT, CHECKPOINT_DETECTOR, CHECKPOINT_MAX_KEYPOINTS,
                                EXTRACTORS, LIGHTGLUE, MNN, Method, budget,
                                cached_features, make_extractor, make_matcher, method_signature,
                                missing_requirement, parse_method, parse_methods)
from utils.errors import SCFeatError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpts") / "run" / "001"
    save_random_checkpoint(folder)
    return folder


def test_names_parse_into_features_and_matcher(checkpoint):
    assert parse_method("disk", "m") == Method("disk", "disk", MNN)
    assert parse_method("aliked+lightglue", "m") == Method("aliked+lightglue", "aliked", LIGHTGLUE)
    assert parse_method("xfeat+lightglue", "m").label == "xfeat+lightglue"
    assert parse_method("aliked-n32", "m").features == "aliked-n32"
    method = parse_method(str(checkpoint), "m")
    assert method.features == CHECKPOINT and method.checkpoint == checkpoint
    assert method.label == method.features_label == "run-001"


@pytest.mark.parametrize("entry, message", [
    ("disc", r"^--features: unknown method 'disc'; did you mean 'disk'\? \(expected sift, disk"),
    ("disk+superglue", r"unknown matcher '\+superglue' in 'disk\+superglue' \(expected "
                       r"<features>\+lightglue"),
    ("disk+", r"unknown matcher '\+'"),
    ("sift+lightglue", r"no LightGlue weights for 'sift' \(they exist for aliked, disk, xfeat\)"),
    ("aliked-n32+lightglue", "no LightGlue weights for 'aliked-n32'"),
    ("runs/absent/001", r"'runs/absent/001' is not a checkpoint folder \(expected one of sift, "
                        r"disk.*missing backbone.pth, localheader.pth"),
    ("", "expected a method"),
    (3, "expected a method"),
    (None, "expected a method"),
])
def test_bad_names_say_what_is_expected(entry, message):
    with pytest.raises(SCFeatError, match=message):
        parse_method(entry, "--features")


def test_checkpoints_have_no_lightglue_and_lists_are_checked(checkpoint):
    with pytest.raises(SCFeatError, match="no LightGlue weights for SCFeat checkpoints"):
        parse_method(f"{checkpoint}+lightglue", "m")
    with pytest.raises(SCFeatError, match=r"config key 'methods\[1\]': unknown method 'alked'"):
        parse_methods(["sift", "alked"])
    with pytest.raises(SCFeatError, match=r"two methods share a name: \['disk'\]"):
        parse_methods(["disk", "disk"])
    with pytest.raises(SCFeatError, match="config key 'methods': expected a non-empty list"):
        parse_methods([])
    assert [m.label for m in parse_methods(["disk", "disk+lightglue", str(checkpoint)])] == \
        ["disk", "disk+lightglue", "run-001"]


def test_budgets_are_the_published_defaults_unless_given(checkpoint):
    assert budget(parse_method("sift", "m"), None) is None
    assert budget(parse_method("disk+lightglue", "m"), None) == 2048
    assert budget(parse_method("aliked", "m"), None) == 2048
    assert budget(parse_method("xfeat", "m"), None) == 4096
    assert budget(parse_method("xfeat", "m"), 500) == 500
    assert budget(parse_method(str(checkpoint), "m"), None) == 8192  # the original's extraction


def test_every_extractor_is_built_with_its_budget(checkpoint):
    for name in [*EXTRACTORS, str(checkpoint)]:
        extractor = make_extractor(parse_method(name, "m"), 300)
        assert extractor.conf["max_keypoints"] == 300
        assert callable(extractor.extract)
    assert make_extractor(parse_method("aliked-t16", "m")).conf["model_name"] == "aliked-t16"


def test_a_checkpoint_extracts_as_the_original_hpatches_extraction(checkpoint):
    """The keypoint selection of config/extract_hpatches.yaml, num_pts the budget (at least
    128: the detector's minimum)."""
    from utils.config import read_yaml
    detector = read_yaml(Path(__file__).parents[2] / "config" / "extract_hpatches.yaml")[
        "detector_config"]
    assert CHECKPOINT_DETECTOR == {key: detector[key] for key in CHECKPOINT_DETECTOR}
    assert CHECKPOINT_MAX_KEYPOINTS == detector["num_pts"]
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    extractor = make_extractor(parse_method(str(checkpoint), "m"), 300)
    expected = extractor.model.detect_and_describe(image, num_pts=300, thr=1.0, thr_mod="abs")
    found = extractor.extract(image)
    for key, value in expected.items():
        np.testing.assert_array_equal(found[key], value)
    found = make_extractor(parse_method(str(checkpoint), "m"), 20).extract(image)
    assert len(found["keypoints"]) == 128 and found["descriptors"].shape == (128, 128)


def test_signatures_separate_extractors_not_matchers(checkpoint):
    signature = {name: method_signature(parse_method(name, "m"))
                 for name in ("sift", "disk", "disk+lightglue", "aliked", "aliked-n32",
                              str(checkpoint))}
    assert signature["disk"] == signature["disk+lightglue"]
    assert len(set(signature.values())) == 5
    assert method_signature(parse_method("disk", "m"), "a") != signature["disk"]


def test_cached_features_store_the_image_size_and_are_written_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    calls = []

    def image(height: int, width: int):
        def load():
            calls.append((height, width))
            return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), {"extra": np.ones(2)}
        return load

    method = parse_method("sift", "m")
    images = {"a/1": image(64, 96), "b": image(80, 48)}
    files = cached_features(method, images, tmp_path / "f")
    assert files == {"a/1": tmp_path / "f" / "a" / "1.npz", "b": tmp_path / "f" / "b.npz"}
    features = read_features(files["b"])
    assert features.image_size == (48, 80)
    with np.load(files["b"]) as data:
        assert set(data.files) == {"keypoints", "descriptors", "scores", "image_size", "extra"}
    monkeypatch.setattr("evaluation.methods.make_extractor", None)  # no second extraction
    assert cached_features(method, images, tmp_path / "f") == files
    assert calls == [(64, 96), (80, 48)]


def test_matchers_are_mutual_nearest_neighbours_or_lightglue():
    one_hot = np.eye(4, dtype=np.float32)
    first = Features(np.zeros((4, 2)), one_hot)
    second = Features(np.zeros((3, 2)), one_hot[[2, 0, 1]])
    mnn = make_matcher(parse_method("sift", "m"))
    assert mnn(first, second).tolist() == [[0, 1], [1, 2], [2, 0]]
    lightglue = make_matcher(parse_method("disk+lightglue", "m"))
    with pytest.raises(SCFeatError, match="disk\\+lightglue: LightGlue needs the image size"):
        lightglue(first, second)


def test_missing_requirements_name_the_wheel_or_kornia(checkpoint, monkeypatch):
    import importlib.util

    from evaluation import peers

    for name in ("sift", "disk", "aliked", "xfeat+lightglue", str(checkpoint)):
        assert missing_requirement(parse_method(name, "m")) is None, name
    monkeypatch.setitem(peers.WEIGHT_FILES, "xfeat+lightglue", ("scm_absent.weights", "lg.pt"))
    assert missing_requirement(parse_method("xfeat", "m")) is None  # LightGlue not needed
    assert "scm-absent" in missing_requirement(parse_method("xfeat+lightglue", "m"))
    monkeypatch.setitem(peers.WEIGHT_FILES, "aliked-n16", ("scm_absent.weights", "a.pth"))
    assert "package scm-absent" in missing_requirement(parse_method("aliked", "m"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "kornia" else find_spec(name, *a))
    assert "kornia" in missing_requirement(parse_method("disk", "m"))
    assert missing_requirement(parse_method("sift", "m")) is None
