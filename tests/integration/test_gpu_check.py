"""tools/gpu_check.py: the CUDA smoke script, exercised on the CPU (CI has no GPU)."""
from __future__ import annotations

import pytest
import torch

from tools import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message needs a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_0(capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_unknown_check_names_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(["--skip", "compile,bogus"])
    assert stop.value.code == 2
    assert "unknown check(s) ['bogus']" in capsys.readouterr().err


def test_a_failing_check_is_reported_not_raised():
    results = []

    def broken() -> str:
        raise AssertionError("3 of 6 steps logged a loss")

    gpu_check.run_check("broken", broken, results)
    gpu_check.run_check("fine", lambda: "all good", results)
    assert [(r.name, r.passed) for r in results] == [("broken", False), ("fine", True)]
    assert results[0].detail == "AssertionError: 3 of 6 steps logged a loss"
    table = gpu_check.format_results(results)
    assert "FAILED" in table.splitlines()[1] and "ok" in table.splitlines()[2]


def test_loss_recorder_reads_the_trainers_step_lines():
    import logging
    recorder = gpu_check.LossRecorder()
    logger = logging.getLogger("scfeat.train")
    logger.addHandler(recorder)
    try:
        logger.warning("epoch %d step %d loss %.5f %s", 1, 3, 2.5, "x=1")
        logger.warning("epoch %d done: weights in %s", 1, "somewhere")
    finally:
        logger.removeHandler(recorder)
    assert recorder.losses == [2.5]


@pytest.mark.slow
def test_the_checks_run_on_the_cpu(tmp_path, capsys, monkeypatch):
    args = ["--device", "cpu", "--steps", "2", "--size", "64x96", "--skip", "compile,ddp",
            "--out", str(tmp_path)]
    assert gpu_check.main(args) == 0
    out = capsys.readouterr().out
    assert "4 of 4 checks passed" in out
    for name in ("stage 1, float32", "stage 1, --amp", "stage 2, --amp", "extraction 480×640"):
        assert f"{name} " in out
    # The same run with an impossible cross-device tolerance fails its extraction check: exit 1.
    monkeypatch.setattr(gpu_check, "CROSS_DEVICE_TOLERANCE", -1.0)
    args = ["--device", "cpu", "--steps", "1", "--size", "64x96", "--skip",
            "compile,ddp,amp,stage2", "--out", str(tmp_path / "again")]
    assert gpu_check.main(args) == 1
    assert "1 of 2 checks passed" in capsys.readouterr().out
