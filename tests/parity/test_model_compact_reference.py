"""The networks against the original on a fresh clone: ``tests/fixtures/f2r_detnet_compact.npz``
stores only inputs and outputs; the weights come from the closed formula of its section in the
reference README (implemented here from that text)."""
from __future__ import annotations

import copy
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from registry import build_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "f2r_detnet_compact.npz"
MAPS = ("global_map", "desc_map", "local_map", "local_map_first", "score")
MODEL_CONFIG = {"backbone": "ResUNet_F2R",
                "backbone_config": {"encoder": "resnet50", "pretrained": False,
                                    "fusion_out_ch": 128},
                "localheader": "DetNet", "localheader_config": {"in_channels": 192},
                "local_input_elements": ["local_map", "local_map_first"],
                "local_with_img": True}


def formula_uniforms(name: str, count: int) -> np.ndarray:
    """``u_i`` in [-1, 1), float64: the fractional part of a hashed sine, seeded by the crc32
    of the tensor's name."""
    seed = zlib.crc32(name.encode("utf-8")) % 1000
    x = np.sin(np.arange(1, count + 1, dtype=np.float64) * 12.9898 + (seed + 1) * 78.233)
    x = x * 43758.5453
    return 2.0 * (x - np.floor(x)) - 1.0


def formula_tensor(module: str, key: str, like: torch.Tensor, state: dict) -> torch.Tensor:
    """The value of ``state[key]`` of ``module`` (``backbone`` / ``localheader``)."""
    leaf = key.rsplit(".", 1)[-1]
    owner = key[:-len(leaf)]  # "" or "name.": the module holding the tensor
    shape = tuple(like.shape)
    if leaf == "num_batches_tracked":
        return torch.zeros_like(like)
    if leaf in ("fuse_weight_fusion_1", "fuse_weight_fusion_2"):
        return torch.full_like(like, 0.7 if leaf.endswith("1") else 0.3)
    u = formula_uniforms(f"{module}.{key}", like.numel()).reshape(shape)
    if like.dim() == 4:
        value = u * np.sqrt(3.0 / (shape[1] * shape[2] * shape[3]))
    elif leaf == "running_mean":
        value = 0.1 * u
    elif leaf == "running_var":
        value = 1 + 0.25 * u
    elif leaf == "weight" and like.numel() == 1:  # the PReLU
        value = np.full(shape, 0.2)
    elif leaf == "weight":
        value = 1 + 0.1 * u
    elif leaf == "bias" and f"{owner}running_var" in state:  # BatchNorm
        value = 0.1 * u
    elif leaf == "bias":
        value = 0.05 * u
    else:
        raise AssertionError(f"the formula does not cover {module}.{key}")
    return torch.from_numpy(np.ascontiguousarray(value)).to(like.dtype)


def formula_state(module: str, network: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = network.state_dict()
    return {key: formula_tensor(module, key, value, state) for key, value in state.items()}


@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    network = build_model("SCFeatModel", MODEL_CONFIG)
    for module in ("backbone", "localheader"):
        part = getattr(network, module)
        part.load_state_dict(formula_state(module, part), strict=True)
    return network.eval()


def assert_maps_close(outputs: dict, reference: dict, prefix: str, loose=()) -> None:
    for name in MAPS:
        expected = reference[f"{prefix}/{name}"]
        ours = outputs["local_point" if name == "score" else name].detach().numpy()
        assert ours.shape == expected.shape, f"{prefix}/{name}"
        tolerance = 1e-3 if name in loose else 1e-4
        error = np.abs(ours - expected).max() / np.abs(expected).max()
        assert error <= tolerance, f"{prefix}/{name}: {error:.1e} of the largest magnitude"


def test_formula_matches_its_check_values(reference, model):
    checks = [key for key in reference if key.startswith("check/")]
    assert len(checks) == 4
    for key in checks:
        module, name = key[len("check/"):].split(".", 1)
        ours = getattr(model, module).state_dict()[name].flatten()[:8].double().numpy()
        np.testing.assert_allclose(ours, reference[key], rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", ["a", "b"])
def test_eval_mode_matches_original(reference, model, name):
    with torch.no_grad():
        outputs = model(torch.from_numpy(reference[f"input/{name}"]))
    assert_maps_close(outputs, reference, f"eval_{name}")


def test_train_mode_matches_original(reference, model):
    network = copy.deepcopy(model).train()  # fresh running statistics: a copy
    with torch.no_grad():
        outputs = network(torch.from_numpy(reference["input/a"]))
    assert_maps_close(outputs, reference, "train_a", loose=("local_map_first", "score"))
    # batch statistics, not the running ones
    assert not np.allclose(reference["train_a/local_map_first"],
                           reference["eval_a/local_map_first"])
