"""The benchmark's measuring helpers (tools/benchmark.py) give the right numbers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.detnet import DetNet
from tools.benchmark import (PeakMemory, count_flops, efficiency, format_table, gemm_summary,
                             row, summarize, variant_difference)
from tools import benchmark
from utils.keypoints import sample_descriptors


def test_flop_count_of_convolutions_and_matmul_is_the_hand_count():
    x = torch.randn(2, 3, 10, 12)
    weight = torch.randn(8, 3, 3, 3)
    flops, out = count_flops(F.conv2d, x, weight, None, 1, 1)
    assert out.shape == (2, 8, 10, 12)
    assert flops == 2 * (3 * 3 * 3) * 8 * (2 * 10 * 12)  # a multiply-add counts 2
    flops, out = count_flops(F.conv2d, x, weight, None, 2, 1)  # stride 2: 5×6 outputs
    assert flops == 2 * 27 * 8 * (2 * 5 * 6)
    flops, _ = count_flops(torch.matmul, torch.randn(7, 5), torch.randn(5, 4))
    assert flops == 2 * 7 * 5 * 4


def test_detector_flops_are_its_convolutions():
    """The detector's inference path (conv3 as a matrix product) counts as its four convs with
    the reference ops; with the low-resolution rewrite, conv2's up(f) part counts as what
    model.lowres_conv runs (its GEMM and banded interpolation products), far less."""
    from model import blocks
    from model.lowres_conv import upsample_conv3x3_into

    h, w = 16, 24  # feature map; the image is 4× larger
    header = DetNet({"in_channels": 192}).eval()
    features, image = torch.rand(1, 192, h, w), torch.randn(1, 3, 4 * h, 4 * w)
    with torch.inference_mode(), blocks.reference_ops():
        flops, score = count_flops(header, features, image)
    full = 16 * h * w
    f_part = 2 * 192 * 9 * 128 * full
    expected = 2 * (192 * 9 * 192 * h * w + 3 * 9 * 64 * full + 64 * 9 * 128 * full + 128 * full)
    assert score.shape == (1, 1, 4 * h, 4 * w)
    assert flops == expected + f_part
    with torch.inference_mode():
        flops_lowres, _ = count_flops(header, features, image)
        out = torch.zeros(1, 128, 4 * h, 4 * w).contiguous(memory_format=torch.channels_last)
        lowres, _ = count_flops(upsample_conv3x3_into, out, torch.rand(1, 192, h, w),
                                torch.randn(128, 192, 3, 3), False,
                                blocks.LOWRES_CHANNELS_LAST_CHUNK)
    assert lowres >= 2 * 9 * 128 * 192 * h * w  # the GEMM at the low resolution is counted
    assert flops_lowres == expected + lowres
    assert lowres < f_part / 3


def test_efficiency_and_summaries():
    assert efficiency(gflop=10.0, seconds=0.5, gemm_gflops=40.0) == pytest.approx(0.5)
    stats = summarize([0.004, 0.001, 0.003, 0.002])
    assert stats == {"median_ms": pytest.approx(2.5), "min_ms": pytest.approx(1.0),
                     "max_ms": pytest.approx(4.0), "n": 4}
    with pytest.raises(ValueError):
        summarize([])
    # 1024³: 2.147 GFLOP; 2048³: 17.18 GFLOP. The reference is the size with the best median.
    gemm = gemm_summary({1024: [2 * 1024 ** 3 / 20e9] * 3,
                         2048: [2 * 2048 ** 3 / 30e9, 2 * 2048 ** 3 / 25e9, 2 * 2048 ** 3 / 40e9]})
    assert gemm["reference_size"] == 2048
    assert gemm["median_gflops"] == pytest.approx(30.0)
    assert gemm["best_gflops"] == pytest.approx(40.0)
    assert gemm["sizes"]["1024"]["median_gflops"] == pytest.approx(20.0)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_is_reset_per_block():
    with PeakMemory(torch.device("cpu")) as big:
        block = torch.ones(256 * 1024 * 1024 // 4)  # 256 MiB, every page touched
        del block
    if big.kind != "peak RSS":
        pytest.skip("the kernel does not let this process reset its peak RSS")
    with PeakMemory(torch.device("cpu")) as small:
        torch.ones(1024)
    assert big.mib - small.mib > 200
    assert big.increase_mib > 200 and small.increase_mib < 50


def test_variant_difference_flags_changes():
    torch.manual_seed(0)
    outputs = {"local_point": torch.rand(1, 1, 32, 48) + 0.5, "desc_map": torch.randn(1, 8, 8, 12)}
    keypoints = torch.tensor([[5.0, 7.0], [20.0, 11.0]])
    descriptors = sample_descriptors(outputs["desc_map"], keypoints, (32, 48))
    reference = {"outputs": outputs, "keypoints": keypoints, "descriptors": descriptors}
    same = variant_difference(reference, {k: v.clone() for k, v in outputs.items()}, (32, 48), 1e-3)
    assert same["score_max_abs"] == 0 and same["descriptor_max_abs"] == 0 and same["within_tolerance"]
    changed = {"local_point": outputs["local_point"] * 1.01, "desc_map": outputs["desc_map"]}
    diff = variant_difference(reference, changed, (32, 48), 1e-3)
    assert diff["score_max_rel"] == pytest.approx(0.01, rel=1e-3)
    assert not diff["within_tolerance"]


def test_table_rows_are_aligned():
    rows = [row("extraction", "forward", {"median_ms": 1234.5, "min_ms": 1200.0}, rate="0.81 img/s",
                share=0.97, memory={"peak_mib": 812.0, "increase_mib": 300.0}, note="x"),
            row("data", "MegaDepth_SIFT, 4 workers", None, rate="12.5 pairs/s")]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    # the "median ms" column ends at the same place on every line
    end = lines[0].index("median ms") + len("median ms")
    assert lines[2][:end].endswith("1234.5")
    assert lines[3][end - 1] == " "


def test_fused_encoder_counts_the_same_flops(monkeypatch):
    """BatchNorm folding and the fused convolutions change no FLOP: the counter (which learns
    the oneDNN fused op from model/blocks.py) gives the reference ops' count."""
    from model import blocks
    from model.f2r import ResUNet_F2R

    backbone = ResUNet_F2R({"pretrained": False}).eval()
    image = torch.randn(1, 3, 64, 64)
    counts = []
    for fused in (False, True):
        monkeypatch.setattr(blocks, "FUSED_CPU_INFERENCE", fused)
        with torch.inference_mode():
            backbone(image)  # the Winograd filter transforms are computed once, then cached
            counts.append(count_flops(backbone, image)[0])
    assert counts[0] == counts[1] > 0


@pytest.mark.slow
@pytest.mark.parametrize("with_image", [True, False])
def test_fused_cpu_inference_path_equals_reference_ops(monkeypatch, with_image):
    """The path the benchmark times (eval, no autograd, CPU) gives the reference ops' outputs
    on a batch of two, with and without the detector's image branch."""
    from model import blocks
    from registry import build_model

    torch.manual_seed(0)
    model = build_model("SCFeatModel", {"backbone_config": {"pretrained": False},
                                        "local_with_img": with_image}).eval()
    for module in model.modules():  # BatchNorm statistics that folding must get right
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    images = torch.randn(2, 3, 64, 96)
    outputs = []
    for fused in (False, True):
        monkeypatch.setattr(blocks, "FUSED_CPU_INFERENCE", fused)
        with torch.no_grad():
            outputs.append(model.extract(images))
    reference, fused = outputs
    for name, value in reference.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(fused[name], value, rtol=0, atol=1e-5 * scale, msg=name)


def test_profile_lists_the_costliest_operators_first():
    model = benchmark.build_network(torch.device("cpu")).eval()
    ops = benchmark.profile_forward(model, torch.randn(1, 3, 32, 48), top=5)
    assert len(ops) == 5
    shares = [o["share"] for o in ops]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert any("conv" in o["op"] or "mkldnn" in o["op"] for o in ops)
    assert all(o["calls"] >= 1 and o["self_ms"] > 0 for o in ops)
    table = benchmark.format_profile(ops).splitlines()
    assert len(table) == 6 and table[1].startswith(ops[0]["op"][:20])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--profile", "-1"])


@pytest.mark.slow
def test_training_benchmark_times_the_trainers_own_step(tmp_path, monkeypatch):
    """The training rows come from ``training.step.TrainStep`` (the object the trainer runs):
    its parts are timed inside it and add up to no more than the step."""
    import training.step

    calls = []
    original = training.step.TrainStep.__call__
    monkeypatch.setattr(training.step.TrainStep, "__call__",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    assert benchmark.main(["--only", "train", "--train-size", "64x96", "--size", "64x96",
                           "--train-repeat", "1", "--threads", "1", "--json", str(out)]) == 0
    # --threads is for this run only: a later in-process run must not inherit it
    assert torch.get_num_threads() == threads
    assert len(calls) == 4  # warm-up and one timed step per stage
    report = json.loads(out.read_text())
    for stage, loss in (("stage1", "loss: EpipolarLoss_Line2Window"), ("stage2", "loss: KeypointLoss")):
        timings = report[stage]["timings"]
        parts = ["forward (2 batches)", loss, "optimiser step", "backward (+ zero_grad, clipping)"]
        assert all(timings[p]["median_ms"] >= 0 for p in parts)
        assert sum(timings[p]["median_ms"] for p in parts) <= timings["step"]["median_ms"] * 1.001
    assert "reward (in loss)" in report["stage2"]["timings"]


def test_layer_table_compares_direct_and_rewritten():
    from tools.benchmark_layers import bench_layers, format_layers
    rows = bench_layers(32, 48, repeat=1)
    assert [r["layer"] for r in rows][:4] == ["upconv3", "upconv2", "side3", "side2"]
    for r in rows:
        assert 0 < r["lowres_gflop"] < r["direct_gflop"]
        assert r["max_rel_diff"] < 1e-5
        assert r["direct_ms"] > 0 and r["lowres_ms"] > 0
    assert rows[-1]["size"] == [32, 48] and rows[-1]["low"] == [8, 12]
    assert len(format_layers(rows).splitlines()) == 2 + len(rows) + 1
    trained = bench_layers(32, 48, repeat=1, backward=True)  # forward and backward
    for r, f in zip(trained, rows):
        assert r["direct_gflop"] > 2 * f["direct_gflop"] and r["lowres_gflop"] > f["lowres_gflop"]
        assert r["lowres_gflop"] < r["direct_gflop"] and r["max_rel_diff"] < 1e-5


def test_extraction_times_reference_ops_and_ours_side_by_side(tmp_path):
    """One run, the same weights and image: both variants and DISK timed, their executed
    GFLOP, the speed-up rows, the outputs equal within the stated tolerance, the per-layer
    profile of both (its GFLOP adding up to the count of the whole forward) and the
    upsample→conv table."""
    pytest.importorskip("kornia")
    out = tmp_path / "bench.json"
    assert benchmark.main(["--only", "extraction", "--size", "32x48", "--repeat", "1",
                           "--json", str(out)]) == 0
    report = json.loads(out.read_text())["extraction"]
    variants = report["variants"]
    assert list(variants) == ["reference ops", "fp32 eager", benchmark.DISK]
    assert variants["fp32 eager"]["gflop"] < variants["reference ops"]["gflop"]
    assert variants["reference ops"]["difference"]["within_tolerance"]
    assert "difference" not in variants[benchmark.DISK] and variants[benchmark.DISK]["gflop"] > 0
    assert "depth weights, 2048 keypoints" in variants[benchmark.DISK]["note"]
    assert report["speedup"]["forward"]["median"] > 0
    assert report["speedup"]["gflop"] == pytest.approx(variants["fp32 eager"]["gflop"])
    assert report["versus_disk"]["gflop_reference"] == variants[benchmark.DISK]["gflop"]
    for name in ("fp32 eager", "reference ops"):
        layers = report["layer_profile"][name]
        assert sum(r["gflop"] for r in layers) == pytest.approx(variants[name]["gflop"])
        assert [r["ms"] for r in layers] == sorted((r["ms"] for r in layers), reverse=True)
    names = {r["layer"] for r in report["layer_profile"]["fp32 eager"]}
    assert {"backbone.stem", "backbone.layer3", "backbone.iconv3", "localheader.conv1",
            "localheader.conv2", "localheader.conv2_up", "localheader.conv3"} <= names
    assert len(report["layers"]) == 5
    from model import blocks
    assert blocks.LOWRES_CONV and blocks.FUSED_CPU_INFERENCE == blocks._FUSED_AVAILABLE


def test_disk_without_its_weights_is_not_timed_with_the_reason(monkeypatch):
    pytest.importorskip("kornia")
    from model import peers
    from utils.errors import SCFeatError

    def missing(name):
        raise SCFeatError(f"the weights of {name} are missing")
    monkeypatch.setattr(peers, "weight_file", missing)
    variant, why = benchmark.disk_variant(np.zeros((32, 48, 3), np.uint8), torch.device("cpu"))
    assert variant is None and why == "not timed: the weights of disk are missing"


def test_layer_profile_attributes_time_and_flops_to_layers():
    from tools.profile_layers import format_layer_profile, profile_layers
    model = benchmark.build_network(torch.device("cpu")).eval()
    image = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        rows = profile_layers(lambda: model.extract(image), model, repeat=2)
        total, _ = count_flops(model.extract, image)
    by_name = {r["layer"]: r for r in rows}
    assert sum(r["gflop"] for r in rows) == pytest.approx(total / 1e9)
    assert by_name["backbone.stem"]["gflop"] == pytest.approx(2 * 3 * 49 * 64 * 16 * 24 / 1e9)
    assert by_name["localheader.peakiness"]["gflop"] == 0 and by_name["localheader.peakiness"]["ms"] > 0
    assert all(r["ms"] >= 0 and r["min_ms"] <= r["ms"] for r in rows)
    table = format_layer_profile(rows, gemm_gflops=100.0).splitlines()
    assert len(table) == len(rows) + 4 and table[-1].startswith("total")


@pytest.mark.slow
def test_methods_are_timed_side_by_side_with_their_ratio_to_scfeat(tmp_path, capsys):
    from tools import benchmark_methods
    out = tmp_path / "methods.json"
    assert benchmark_methods.main(["--size", "64x96", "--repeat", "2", "--max-keypoints", "200",
                                   "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[3:-1]] == list(benchmark_methods.METHODS)
    report = json.loads(out.read_text())
    assert report["size"] == [64, 96] and report["image"] == benchmark_methods.PHOTO
    methods = report["methods"]
    assert methods["scfeat"]["ratio"] == 1.0
    for name, entry in methods.items():
        assert 0 < entry["min_ms"] <= entry["median_ms"] and entry["budget"] == 200
        assert entry["ratio"] == pytest.approx(entry["median_ms"] / methods["scfeat"]["median_ms"])
        assert 0 < entry["keypoints"] <= 200, name
    # the benchmark's own table, through --only methods
    assert benchmark.main(["--only", "methods", "--size", "64x96", "--repeat", "1"]) == 0
    table = capsys.readouterr().out
    assert all(f"{name} extract()" in table for name in benchmark_methods.METHODS)
    assert "1.00× SCFeat's time" in table


@pytest.mark.slow
def test_colmap_benchmark_times_every_step_and_indexes_every_pair(capsys):
    from tools.benchmark_colmap import bench_colmap, format_rows
    rows, report = bench_colmap(images=36, points=720)
    names = [name for name, *_ in rows]
    assert names[1:3] == ["read model, binary", "read model, text"]
    assert all(wall >= 0 and cpu >= 0 for _, wall, cpu, _ in rows)
    # Each image sees ±15° of the ring: 10° apart, images up to 2 steps apart share points.
    assert report["observations"] == pytest.approx(720 * 36 * 30 / 360, rel=0.25)
    assert rows[-1][3] == f"{report['pairs_points_rule']} of {report['pairs_points_rule']} " \
                          f"pairs indexed"
    assert report["pairs_cameras_rule"] > 0
    assert format_rows(rows).count("\n") == len(rows)
