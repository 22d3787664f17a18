"""tools/real_photos.py: held-out photographs, sequences at the photographs' own scale."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from tools import real_photos
from tools.synthetic import MEGADEPTH_PHOTOS, PHOTO_FILES
from utils.errors import SCFeatError


def test_held_out_photos_are_not_training_photos_and_not_rescaled():
    used = {PHOTO_FILES[name] for name in MEGADEPTH_PHOTOS}
    for name, (file, _, size) in real_photos.HELD_OUT_PHOTOS.items():
        assert file not in used
        assert size[0] % 16 == 0 and size[1] % 16 == 0  # the extraction crops nothing
        photo = real_photos.load_held_out(name)
        # make_hpatches_sequence covers 1.4× the output size: the photograph keeps its scale
        scale = 1.4 * max(size[0] / photo.shape[0], size[1] / photo.shape[1])
        assert abs(scale - 1) < 0.02, name


def test_sequences_hold_warped_and_relit_images(tmp_path):
    out = real_photos.make_sequences(tmp_path / "seq", ["motorcycle_right"], seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["i_motorcycle_right", "v_motorcycle_right"]
    first = cv2.imread(str(out / "v_motorcycle_right" / "1.ppm"))
    assert first.shape[:2] == real_photos.HELD_OUT_PHOTOS["motorcycle_right"][2]
    homography = np.loadtxt(out / "v_motorcycle_right" / "H_1_6")
    assert not np.allclose(homography, np.eye(3))
    assert np.allclose(np.loadtxt(out / "i_motorcycle_right" / "H_1_6"), np.eye(3))


def test_checkpoint_arguments_are_checked(tmp_path):
    with pytest.raises(SCFeatError, match="LABEL=DIR"):
        real_photos.parse_checkpoints(["no-label"])
    with pytest.raises(SCFeatError, match="not a method name"):
        real_photos.parse_checkpoints([f"disk={tmp_path}"])
    with pytest.raises(SCFeatError, match="not a checkpoint folder"):
        real_photos.parse_checkpoints([f"trained={tmp_path}"])


@pytest.mark.slow
def test_peers_are_evaluated_beside_sift(tmp_path, capsys):
    assert real_photos.main(["--methods", "sift", "xfeat", "xfeat+lightglue", "--photos",
                             "motorcycle_right", "--max-keypoints", "300",
                             "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("kpts/image"):].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["sift", "xfeat", "xfeat+lightglue"]
    assert all(0 < float(line.split()[1]) <= 300 for line in table)
    for label in ("sift", "xfeat", "xfeat+lightglue"):
        assert any(line.startswith(f"{label} ") and "all 10" in line for line in out.splitlines())
    photo = out[out.index("per photograph"):].splitlines()
    assert photo[1].split() == ["method", "motorcycle_right"]
    assert [line.split()[0] for line in photo[2:5]] == ["sift", "xfeat", "xfeat+lightglue"]
    assert all(0 < float(line.split()[1]) <= 1 for line in photo[2:5])
    assert real_photos.main(["--methods", "dsik", "--out", str(tmp_path)]) == 2
    assert "did you mean 'disk'" in capsys.readouterr().err
    assert real_photos.main(["--methods", "--out", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
