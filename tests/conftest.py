"""Shared pytest fixtures: the reference outputs of the original implementation."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# ../shared/reference beside the clone (CI lays it out the same way); SCFEAT_REFERENCE overrides.
REFERENCE_DIR = Path(os.environ.get("SCFEAT_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))
# The small reference files travel with the repository, so a fresh clone runs the parity tests.
FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"


def reference_path(name: str) -> Path:
    """``tests/fixtures/<name>`` when the repository carries it, else ``../shared/reference``."""
    local = FIXTURE_DIR / name
    return local if local.is_file() else REFERENCE_DIR / name


def _load_reference(name: str) -> dict:
    path = reference_path(name)
    if not path.is_file():
        pytest.skip(f"reference file {path} is absent: these tests compare against the original "
                    f"implementation's outputs and cannot run without ../shared/reference")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference folder {REFERENCE_DIR} is absent")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def f2r_reference() -> dict:
    """Arrays of ``f2r_detnet_reference.npz`` (networks and keypoint selection)."""
    return _load_reference("f2r_detnet_reference.npz")


@pytest.fixture(scope="session")
def line2window_reference() -> dict:
    """Arrays of ``line2window_reference.npz`` (the stage-1 loss, with gradients)."""
    return _load_reference("line2window_reference.npz")


@pytest.fixture(scope="session")
def megadepth(tmp_path_factory) -> Path:
    """A tiny synthetic MegaDepth set for training runs (1 scene, 4 images, 6 pairs, 64×96);
    read-only: tests that plant faults make their own."""
    from tools.synthetic import make_megadepth
    out = tmp_path_factory.mktemp("data") / "megadepth"
    make_megadepth(out, scenes=1, images=4, pairs=6, size=(64, 96), seed=0)
    return out


def save_random_checkpoint(folder: Path, seed: int = 0) -> None:
    """A random SCFeat checkpoint folder (as stage 1 would write it), with config.yaml above."""
    import torch

    from registry import build_model
    from utils.checkpoint import save_checkpoint
    from utils.config import save_config

    torch.manual_seed(seed)
    model_config = {"backbone_config": {"pretrained": False}}
    model = build_model("SCFeatModel", model_config)
    save_checkpoint(model, folder)
    save_config({"model": "SCFeatModel", "model_config": model_config}, folder.parent / "config.yaml")


def with_exif_orientation(jpeg: bytes, orientation: int = 6) -> bytes:
    """``jpeg`` (the bytes of a JPEG file) with an EXIF APP1 segment holding only the orientation
    tag (0x0112) inserted after the start-of-image marker; the compressed pixels are untouched.
    Orientation 6 means "rotate 90° clockwise to display"."""
    import struct

    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    ifd_entry = struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)  # tag, SHORT, count, value
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + ifd_entry + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@contextlib.contextmanager
def tf32_off():
    """CUDA convolutions and matrix products in full float32 for the block (PyTorch's default
    TF32 rounds their inputs to 10 bits, which amplifies a last-bit difference between two
    forms of an image beyond any useful tolerance); the previous settings restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_same_features(found: dict, expected: dict, atol: float, what: str,
                         rtol: float = 0.0) -> None:
    """Equal features up to ``atol`` (and ``rtol``), in any order (near-equal scores may swap
    places)."""
    assert len(found["keypoints"]) == len(expected["keypoints"]), what
    order_found = np.lexsort(np.round(found["keypoints"], 2).T[::-1])
    order_expected = np.lexsort(np.round(expected["keypoints"], 2).T[::-1])
    for key, value in expected.items():
        np.testing.assert_allclose(found[key][order_found], value[order_expected], atol=atol,
                                   rtol=rtol, err_msg=f"{what}: {key}")

