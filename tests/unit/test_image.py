"""utils/image.py: reading pixels as stored (EXIF orientation ignored), grey reading, errors;
every accepted form of an image gives the same tensor, the rest is refused clearly."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import with_exif_orientation
from utils.errors import SCFeatError
from utils.image import decode_image, image_tensor, load_image


@pytest.fixture()
def tagged(tmp_path):
    """A 40×60 JPEG carrying EXIF orientation 6, and the RGB / grey pixels it stores."""
    rng = np.random.default_rng(0)
    bgr = cv2.GaussianBlur(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), (0, 0), 2)
    ok, encoded = cv2.imencode(".jpg", bgr)
    assert ok
    plain = encoded.tobytes()
    path = tmp_path / "tagged.jpg"
    path.write_bytes(with_exif_orientation(plain))
    stored_rgb = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    stored_grey = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    return path, stored_rgb, stored_grey


def test_the_tag_is_real(tagged):
    """What the tag does elsewhere: PIL reads it, and OpenCV's default reading rotates."""
    path, stored, _ = tagged
    with Image.open(path) as image:
        assert image.getexif().get(0x0112) == 6 and image.size == (60, 40)
    assert cv2.imread(str(path), cv2.IMREAD_COLOR).shape == (60, 40, 3)


def test_exif_orientation_is_ignored(tagged):
    path, stored_rgb, stored_grey = tagged
    rgb = load_image(path)
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, stored_rgb)
    grey = load_image(path, grey=True)
    assert grey.shape == (40, 60)
    np.testing.assert_array_equal(grey, stored_grey)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), stored_rgb)


def test_grey_files_read_as_rgb(tmp_path):
    image = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    cv2.imwrite(str(tmp_path / "g.png"), image)
    rgb = load_image(tmp_path / "g.png")
    assert rgb.shape == (12, 20, 3)
    np.testing.assert_array_equal(rgb[..., 1], image)


def test_missing_and_undecodable_files_name_the_path(tmp_path):
    with pytest.raises(SCFeatError, match=f"{tmp_path / 'absent.jpg'}: image file not found"):
        load_image(tmp_path / "absent.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(SCFeatError, match="bad.jpg: cannot decode the image"):
        load_image(tmp_path / "bad.jpg")
    assert decode_image(b"") is None and decode_image(b"garbage") is None


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rgb_and_grey() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
            rng.integers(0, 256, (20, 30), dtype=np.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_every_form_of_an_rgb_image_gives_the_same_tensor(device):
    rgb, _ = rgb_and_grey()
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    chw = expected[0].to(device)
    forms = [rgb, chw, chw[None], chw.double(),  # float64: LightGlue's load_image before .float()
             torch.tensor(rgb.transpose(2, 0, 1) / 255.0, dtype=torch.float).to(device)]
    for form in forms:
        tensor = image_tensor(form, "test")
        assert tensor.shape == (1, 3, 20, 30) and tensor.dtype == torch.float32
        assert tensor.device.type == (device if isinstance(form, torch.Tensor) else "cpu")
        torch.testing.assert_close(tensor.cpu(), expected, atol=1e-7, rtol=0)
    assert torch.equal(image_tensor(chw, "test").cpu(), image_tensor(rgb, "test"))


def test_grey_forms_give_one_channel():
    _, grey = rgb_and_grey()
    expected = torch.from_numpy(grey).float()[None, None] / 255
    for form in (grey, grey[:, :, None], expected[0], expected):
        assert torch.equal(image_tensor(form, "test"), expected)


@pytest.mark.parametrize("image, message", [
    (np.zeros((20, 30, 3), np.float32), "must be uint8"),
    (np.zeros((20, 30, 3), np.uint16), "must be uint8"),
    (np.zeros((20, 30, 4), np.uint8), r"RGBA: image\[..., :3\]"),
    (np.zeros((3, 20, 30), np.uint8), r"channels first: image.transpose\(1, 2, 0\)"),
    (np.zeros((2, 20, 30, 3), np.uint8), "H×W×3"),
    (torch.zeros(3, 20, 30, dtype=torch.uint8), r"got uint8 \(use image.float\(\) / 255\)"),
    (torch.zeros(3, 20, 30, dtype=torch.int64), "float in"),
    (torch.full((3, 20, 30), 255.0), r"\[0, 1\], got \[255, 255\] \(a 0..255 image\?"),
    (torch.full((3, 20, 30), -0.5), r"\[0, 1\], got \[-0.5, -0.5\]"),
    (torch.full((3, 20, 30), float("nan")), "values in"),
    (torch.zeros(2, 3, 20, 30), "one image at a time, got a batch of 2"),
    (torch.zeros(20, 30, 3), r"channels last: image.permute\(2, 0, 1\)"),
    (torch.zeros(20, 30), r"grey: image\[None\]"),
    (torch.zeros(4, 20, 30), "3×H×W"),
    ([[0, 1]], "got list"),
    (np.zeros((8, 30, 3), np.uint8), "is 8×30; at least 16×16"),
    (torch.zeros(1, 30, 8), "is 30×8; at least 16×16"),
])
def test_other_inputs_are_refused_clearly(image, message):
    with pytest.raises(SCFeatError, match=f"^extract: image.*{message}"):
        image_tensor(image, "extract: image", min_size=16)
