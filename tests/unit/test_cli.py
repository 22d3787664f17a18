"""utils/cli.py (the scripts' shared helpers) and the flags every script shares."""
from __future__ import annotations

import logging

import pytest
import torch

import train
from model import fast
from utils.cli import parse_size, resolve_device, run_cli, setup_logging
from utils.errors import SCFeatError


def test_parse_size():
    assert parse_size("480x640") == (480, 640)
    assert parse_size("100X100") == (100, 100)
    assert parse_size("480x640", multiple=16) == (480, 640)
    for bad, message in [("100x100", "multiples of 16"), ("480", "HEIGHTxWIDTH"),
                         ("0x640", "between 32 and 4096"), ("axb", "HEIGHTxWIDTH")]:
        with pytest.raises(SCFeatError, match=message):
            parse_size(bad, multiple=16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_resolve_device_names_the_key_or_flag():
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(SCFeatError, match=r"key 'device': cuda .* \(use device=auto or device=cpu\)"):
        resolve_device("cuda")
    with pytest.raises(SCFeatError, match=r"^--device: cuda .* \(use --device auto or --device cpu\)"):
        resolve_device("cuda", "--device")


def test_run_cli_exit_codes(capsys):
    assert run_cli(lambda: None) == 0
    assert run_cli(lambda: 3) == 3

    def user_error():
        raise SCFeatError("config.yaml:3: key 'x' is wrong")

    def interrupted():
        raise KeyboardInterrupt

    assert run_cli(user_error) == 2
    assert capsys.readouterr().err == "error: config.yaml:3: key 'x' is wrong\n"
    assert run_cli(interrupted, interrupted="state kept") == 130
    assert capsys.readouterr().err == "interrupted: state kept\n"
    with pytest.raises(KeyboardInterrupt):
        run_cli(interrupted)


def test_setup_logging_writes_the_log_file(tmp_path):
    setup_logging(tmp_path / "run" / "train.log")
    logging.getLogger("scfeat.test").info("one line")
    setup_logging()  # closes the file handler
    assert "INFO scfeat.test: one line" in (tmp_path / "run" / "train.log").read_text()


def test_reference_ops_flag_reaches_the_training_run(monkeypatch):
    """``train.py --reference-ops`` runs the original composition of operators."""
    seen = []

    class Done:
        stop_requested = False

    monkeypatch.setattr(train, "run_training", lambda conf, path, resume: seen.append(
        (fast.DEFAULT.lowres_conv, fast.DEFAULT.fused)) or Done())
    try:
        assert train.main(["--config", "config/train_desc.yaml", "--reference-ops"]) == 0
        assert seen == [(False, False)]
        assert train.main(["--config", "config/train_desc.yaml"]) == 0
        assert seen[1][0] is True
    finally:
        fast.use_reference_ops(False)


def test_older_flags_become_the_overrides_they_stand_for():
    from utils.cli import flags_as_overrides
    flags = {"--images": ("images", "list"), "--out": ("out", "str"),
             "--max-keypoints": ("max_keypoints", "yaml")}
    argv = ["--config", "c.yaml", "--images", "a b", "c", "--out=o 1", "--max-keypoints", "512",
            "seed=3"]
    assert flags_as_overrides(argv, flags) == [
        "--config", "c.yaml", 'images=["a b", "c"]', 'out="o 1"', "max_keypoints=512", "seed=3"]
    from utils.config import parse_override
    assert parse_override('images=["a b", "c"]') == (["images"], ["a b", "c"])
    with pytest.raises(SCFeatError, match="--out: expected a value"):
        flags_as_overrides(["--out"], flags)
