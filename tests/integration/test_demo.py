"""``python demo.py`` end to end at a tiny size (2 training steps, 64×96 training images, two
96×128 HPatches sequences), then a second run that reuses every stage, and the option errors."""
from __future__ import annotations

import contextlib
import io
import re
import time
from pathlib import Path

import pytest
import torch

import demo
from utils.checkpoint import is_checkpoint

TINY = ["--steps", "2", "--size", "64x96", "--hpatches-size", "96x128", "--sequences", "2",
        "--device", "cpu"]
METHODS = ("sift", "untrained", "trained")
ROW = re.compile(r"^(\S+)\s+all (\d+)\s+((?:[-\d.]+\s+){10})(\d+)\s+(\d+)\s*$")


def table_rows(text: str) -> dict[str, list[float]]:
    """``method → MMA@1..10`` of the 'all pairs' rows of the printed table."""
    rows = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.group(3).split()]
    return rows


def global_step(run_dir: Path) -> int:
    state = torch.load(run_dir / "training_state.pth", map_location="cpu", weights_only=False,
                       mmap=True)
    return int(state["global_step"])


def outputs_mtimes(out: Path) -> dict[Path, int]:
    """Modification times of every checkpoint, training state and feature file."""
    files = [p for p in (out / "ckpts").rglob("*") if p.is_file() and p.suffix in (".pth", ".scfeat")]
    return {p: p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The first run: ``(out folder, exit code, stdout, seconds)``."""
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = demo.main(TINY + ["--out", str(out)])
    return out, code, stdout.getvalue(), time.perf_counter() - start


def check_table(printed: str) -> dict[str, list[float]]:
    rows = table_rows(printed)
    assert sorted(rows) == sorted(METHODS), printed
    for name, values in rows.items():
        assert len(values) == 10 and all(0.0 <= v <= 1.0 for v in values), (name, values)
        assert values == sorted(values), name  # accuracy cannot drop as the threshold grows
    return rows


@pytest.mark.slow
def test_first_run_trains_extracts_and_evaluates(demo_run):
    out, code, printed, _ = demo_run
    assert code == 0, printed
    check_table(printed)
    assert "summary" in printed and str(out / "mma.png") in printed
    ckpts = out / "ckpts"
    assert global_step(ckpts / "demo-descriptor") == 2       # --steps 2 over the 2 epochs
    assert global_step(ckpts / "demo-keypoint") == 1         # stage 2: steps // 2
    for folder in ("demo-descriptor/002", "demo-keypoint/001", "demo-untrained/000"):
        assert is_checkpoint(ckpts / folder), folder
    assert (ckpts / "demo-untrained" / "config.yaml").is_file()
    # The untrained network: stage 1's random initialisation (same seed), with BatchNorm
    # statistics estimated on the training data instead of the initial mean 0 / variance 1.
    import torch
    from registry import build_model
    from utils.checkpoint import load_state_dict_file
    untrained = load_state_dict_file(ckpts / "demo-untrained" / "000" / "backbone.pth")
    torch.manual_seed(0)
    fresh = build_model("SCFeatModel", {"backbone_config": {"pretrained": False}}).backbone.state_dict()
    assert torch.equal(untrained["firstconv.weight"], fresh["firstconv.weight"])
    assert torch.equal(untrained["layer1.0.conv1.weight"], fresh["layer1.0.conv1.weight"])
    assert not torch.allclose(untrained["firstbn.running_var"], fresh["firstbn.running_var"])
    assert not torch.allclose(untrained["layer3.0.bn1.running_mean"], fresh["layer3.0.bn1.running_mean"])
    images = sorted((out / "data" / "hpatches").glob("*/*.ppm"))
    assert len(images) == 12
    for features in ("demo-hpatches", "demo-hpatches-untrained"):
        for image in images:
            assert (ckpts / features / "desc" / image.parent.name / f"{image.name}.scfeat").is_file()
    caches = sorted((out / "eval" / "cache").glob("*.npy"))
    assert sorted(p.name.split("-")[0] for p in caches) == sorted(METHODS)
    plot = out / "mma.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_second_run_reuses_every_stage(demo_run, capsys):
    out, code, first_printed, first_seconds = demo_run
    assert code == 0
    capsys.readouterr()
    before = outputs_mtimes(out)
    caches = sorted((out / "eval" / "cache").glob("*.npy"))
    start = time.perf_counter()
    assert demo.main(TINY + ["--out", str(out)]) == 0
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out

    assert check_table(printed) == table_rows(first_printed)
    assert "training " not in printed and "extracting " not in printed
    assert printed.count("reusing") == 7  # 2 data sets, 2 runs, the untrained net, 2 feature sets
    assert "summary" in printed and str(out / "mma.png") in printed
    assert global_step(out / "ckpts" / "demo-descriptor") == 2
    assert global_step(out / "ckpts" / "demo-keypoint") == 1
    assert outputs_mtimes(out) == before  # nothing retrained or re-extracted
    assert sorted((out / "eval" / "cache").glob("*.npy")) == caches  # the caches were reused
    assert seconds < first_seconds / 3, (seconds, first_seconds)


@pytest.mark.slow
def test_other_settings_for_the_same_out_are_refused(demo_run, capsys):
    out = demo_run[0]
    capsys.readouterr()
    args = [*TINY, "--out", str(out)]
    args[args.index("--steps") + 1] = "3"
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--steps 2 (now 3)" in err and "--out" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("option, value, message", [
    ("--size", "60x96", "multiples of 16"),
    ("--size", "big", "expected HEIGHTxWIDTH"),
    ("--hpatches-size", "8x8", "expected HEIGHTxWIDTH"),
])
def test_bad_sizes_are_reported(tmp_path, capsys, option, value, message):
    assert demo.main(["--out", str(tmp_path / "out"), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and option in err and message in err
    assert not (tmp_path / "out").exists()


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--out", "--device", "--size", "--hpatches-size", "--sequences"):
        assert option in text
