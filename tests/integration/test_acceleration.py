"""The amp / compile options (utils/acceleration.py) and their wiring into extraction and
training. CPU only: amp runs bf16 autocast on the CPU; torch.compile is replaced by a spy (a
real compilation of the network takes minutes on two cores; the benchmark checks it on CUDA)."""
from __future__ import annotations

import pytest

import re

import numpy as np
import torch
import torch.nn as nn

import train
import training.loop
from conftest import REPO_ROOT, save_random_checkpoint
from extraction import run_extraction
from schemas import load_extract_config
from registry import build_model
from utils.acceleration import TOLERANCE, accelerated, to_float32
from model.keypoints import generate_kpts_single, sample_descriptors

CPU = torch.device("cpu")
EXTRACT_CONFIG = REPO_ROOT / "config" / "extract_hpatches.yaml"
DESC_CONFIG = str(REPO_ROOT / "config" / "demo" / "train_desc.yaml")


def test_to_float32_converts_floating_tensors_only():
    outputs = {"a": torch.ones(2, dtype=torch.bfloat16),
               "b": (torch.ones(1, dtype=torch.float16), torch.arange(3)), "c": "name"}
    converted = to_float32(outputs)
    assert converted["a"].dtype == torch.float32 and converted["b"][0].dtype == torch.float32
    assert converted["b"][1].dtype == torch.int64 and isinstance(converted["b"], tuple)
    assert converted["c"] == "name"


def test_without_options_the_function_is_unchanged():
    module = nn.Linear(2, 2)
    assert accelerated(module, CPU) is module


def test_amp_runs_bf16_inside_and_returns_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    seen = []
    net[0].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    image = torch.randn(1, 3, 16, 16)
    reference = net(image)
    output = accelerated(net, CPU, amp=True)(image)
    assert seen == [torch.float32, torch.bfloat16]
    assert output.dtype == torch.float32
    assert (output - reference).abs().max() <= TOLERANCE["amp"] * reference.abs().max()


def test_compile_wraps_the_function_with_torch_compile(monkeypatch):
    compiled = []

    def spy(fn):
        compiled.append(fn)
        return lambda *args: ("compiled", fn(*args))

    monkeypatch.setattr(torch, "compile", spy)
    module = nn.Identity()
    run = accelerated(module, CPU, compile=True)
    assert compiled == [module] and run(torch.ones(1))[0] == "compiled"
    run_amp = accelerated(module, CPU, amp=True, compile=True)
    assert compiled == [module, module] and run_amp(torch.ones(1))[0] == "compiled"


@pytest.mark.slow
def test_extraction_under_amp_is_within_the_stated_tolerance():
    """The network in eval mode on a 64×96 photograph crop: the score map and the descriptors
    at the float32 keypoints, bf16 autocast against float32 eager."""
    from tools.synthetic import load_photo
    from utils.image import to_tensor_normalized

    torch.manual_seed(0)
    model = build_model("SCFeatModel", {"backbone_config": {"pretrained": False}}).eval()
    image = to_tensor_normalized(np.ascontiguousarray(load_photo("astronaut")[100:164, 150:246]))[None]
    with torch.inference_mode():
        reference = model.extract(image)
        outputs = accelerated(model.extract, CPU, amp=True)(image)
        keypoints, _ = generate_kpts_single(reference["local_point"], num_pts=256)
        expected = sample_descriptors(reference["desc_map"], keypoints, (64, 96))
        descriptors = sample_descriptors(outputs["desc_map"], keypoints, (64, 96))
    assert all(v.dtype == torch.float32 for v in outputs.values())
    score, score_ref = outputs["local_point"], reference["local_point"]
    assert (score - score_ref).abs().max() <= TOLERANCE["amp"] * score_ref.abs().max()
    assert (descriptors - expected).abs().max() <= TOLERANCE["amp"]


def spy_on_accelerated(monkeypatch, module) -> list[tuple[bool, bool]]:
    """Record the ``(amp, compile)`` of every ``accelerated`` call made by ``module``."""
    calls = []

    def recording(fn, device, amp, compile):
        calls.append((amp, compile))
        return accelerated(fn, device, amp, compile)

    monkeypatch.setattr(module, "accelerated", recording)
    return calls


@pytest.mark.slow
def test_extraction_and_training_take_the_options(tmp_path, megadepth, monkeypatch):
    """``amp=true`` (config key) reaches the extraction run, ``--amp`` (flag) the trainer; both
    produce valid outputs."""
    import cv2

    import extraction
    from tools.synthetic import load_photo

    checkpoint = tmp_path / "run" / "001"
    save_random_checkpoint(checkpoint)
    data = tmp_path / "hpatches"
    (data / "i_photo").mkdir(parents=True)
    cv2.imwrite(str(data / "i_photo" / "1.ppm"), load_photo("astronaut")[100:164, 100:196, ::-1])
    calls = spy_on_accelerated(monkeypatch, extraction)
    conf = load_extract_config(EXTRACT_CONFIG, [
        f"load_path={checkpoint}", f"data_config_extract.data_path={data}",
        "data_config_extract.workers=0", f"output_root={tmp_path / 'out'}", "device=cpu",
        "output_img=false", "amp=true"])
    summary = run_extraction(conf)
    assert calls == [(True, False)] and summary["images"] == 1
    with np.load(summary["features"] / "i_photo" / "1.ppm.scfeat") as features:
        assert len(features["keypoints"]) > 0
        np.testing.assert_allclose(np.linalg.norm(features["descriptors"], axis=1), 1, atol=1e-5)

    calls = spy_on_accelerated(monkeypatch, training.loop)
    assert train.main(["--config", DESC_CONFIG, f"data_config_train.data_path={megadepth}",
                       f"output_root={tmp_path / 'ckpts'}", "data_config_train.batch_size=1",
                       "epoch=1", "epoch_step=1", "log_freq=1", "--amp"]) == 0
    assert calls == [(True, False)]
    log = (tmp_path / "ckpts" / "demo-descriptor" / "train.log").read_text()
    assert np.isfinite(float(re.search(r"step 1 loss ([-\d.e+]+)", log).group(1)))


def test_bad_option_values_are_config_errors(tmp_path, capsys):
    assert train.main(["--config", DESC_CONFIG, f"output_root={tmp_path}", "amp=maybe"]) == 2
    assert "amp" in capsys.readouterr().err
