"""utils/image.py: reading pixels as stored (EXIF orientation ignored), grey reading, errors."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import with_exif_orientation
from utils.errors import SCFeatError
from utils.image import decode_image, load_image


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
