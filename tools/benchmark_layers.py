"""Per-layer timing of the five "bilinear upsample → 3×3 convolution" layers of the network:
the direct composition (``F.interpolate`` then ``F.conv2d``, what the reference ops run) against
the low-resolution rewrite (:func:`model.lowres_conv.upsample_conv3x3`, what the network runs
on the CPU by default), without autograd, at the layers' shapes for one ``H×W`` image.

``python -m tools.benchmark_layers [--size 480x640] [--repeat 5] [--threads N] [--backward]``
prints the table (``--backward``: forward and backward, as in training); ``tools/benchmark.py`` includes it in its extraction section. The two forms alternate
within each repeat (the same machine load for both); the table gives medians, GFLOP counted by
``torch.utils.flop_counter`` (what each form executes), and the largest difference between the
two outputs relative to the output's largest value.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from model import fast  # noqa: E402
from model.fast.lowres_conv import upsample_conv3x3, upsample_conv3x3_reference  # noqa: E402


def layer_shapes(height: int, width: int, fusion_out_ch: int = 128, detector_in: int = 192
                 ) -> list[dict]:
    """The five layers for an ``height×width`` image: name, ``Cin``, ``Cout``, low-resolution
    size, output size and ``align_corners``."""
    def at(stride: int) -> tuple[int, int]:
        return height // stride, width // stride
    return [
        {"layer": "upconv3", "cin": 1024, "cout": 512, "low": at(16), "size": at(8), "align_corners": True},
        {"layer": "upconv2", "cin": 512, "cout": 256, "low": at(8), "size": at(4), "align_corners": True},
        {"layer": "side3", "cin": 1024, "cout": fusion_out_ch, "low": at(16), "size": at(4), "align_corners": False},
        {"layer": "side2", "cin": 512, "cout": fusion_out_ch, "low": at(8), "size": at(4), "align_corners": False},
        {"layer": "detector conv2, up(f) part", "cin": detector_in, "cout": 128, "low": at(4),
         "size": (height, width), "align_corners": False},
    ]


def _flops(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return counter.get_total_flops()


def bench_layers(height: int, width: int, repeat: int = 5, device: str = "cpu",
                 backward: bool = False) -> list[dict]:
    """One dict per layer: ``direct_ms`` / ``lowres_ms`` (medians over ``repeat`` runs after a
    warm-up), ``speedup``, ``direct_gflop`` / ``lowres_gflop`` and ``max_rel_diff``. With
    ``backward`` each run is forward and backward (gradients of the input, weight and bias, as
    in training) and the GFLOP count both."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for spec in layer_shapes(height, width):
        x = torch.randn(1, spec["cin"], *spec["low"], generator=generator).to(device)
        weight = (torch.randn(spec["cout"], spec["cin"], 3, 3, generator=generator)
                  / (3 * spec["cin"] ** 0.5)).to(device)
        bias = torch.randn(spec["cout"], generator=generator).to(device)
        if backward:
            for tensor in (x, weight, bias):
                tensor.requires_grad_()
        args = (x, weight, bias, spec["size"], spec["align_corners"])
        direct = _with_backward(lambda: upsample_conv3x3_reference(*args), backward)
        chunk = fast.DEFAULT.lowres_chunk if backward else fast.DEFAULT.lowres_inference_chunk
        lowres = _with_backward(lambda: upsample_conv3x3(*args, chunk), backward)
        times: dict[str, list[float]] = {"direct": [], "lowres": []}
        with torch.inference_mode(not backward):
            expected, got = direct(), lowres()  # warm-up
            difference = float((got - expected).abs().max() / expected.abs().max())
            flops = {"direct": _flops(direct), "lowres": _flops(lowres)}
            del expected, got
            for _ in range(repeat):
                for name, fn in (("direct", direct), ("lowres", lowres)):
                    start = time.perf_counter()
                    fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
        direct_ms = 1000 * statistics.median(times["direct"])
        lowres_ms = 1000 * statistics.median(times["lowres"])
        rows.append({**{k: spec[k] for k in ("layer", "cin", "cout", "align_corners")},
                     "low": list(spec["low"]), "size": list(spec["size"]),
                     "direct_ms": direct_ms, "lowres_ms": lowres_ms,
                     "direct_min_ms": 1000 * min(times["direct"]),
                     "lowres_min_ms": 1000 * min(times["lowres"]),
                     "speedup": direct_ms / lowres_ms,
                     "direct_gflop": flops["direct"] / 1e9, "lowres_gflop": flops["lowres"] / 1e9,
                     "max_rel_diff": difference})
    return rows


def _with_backward(forward, backward: bool):
    """``forward`` itself, or forward then backward of the output's sum (returning the output,
    detached)."""
    if not backward:
        return forward

    def step() -> torch.Tensor:
        out = forward()
        out.sum().backward()
        return out.detach()
    return step


def format_layers(rows: list[dict]) -> str:
    """Rows of :func:`bench_layers` → an aligned text table with a total line."""
    header = f"{'layer':<28} {'Cin→Cout':>10} {'low → out':>17} {'direct ms':>10} {'rewritten ms':>13} " \
             f"{'speed-up':>9} {'GFLOP direct→rewritten':>23} {'max rel diff':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shapes = f"{r['low'][0]}x{r['low'][1]}→{r['size'][0]}x{r['size'][1]}"
        lines.append(f"{r['layer'][:28]:<28} {str(r['cin']) + '→' + str(r['cout']):>10} {shapes:>17} "
                     f"{r['direct_ms']:>10.1f} {r['lowres_ms']:>13.1f} {r['speedup']:>8.2f}× "
                     f"{r['direct_gflop']:>10.1f} → {r['lowres_gflop']:>9.1f} {r['max_rel_diff']:>13.1e}")
    direct = sum(r["direct_ms"] for r in rows)
    lowres = sum(r["lowres_ms"] for r in rows)
    lines.append(f"{'all five':<28} {'':>10} {'':>17} {direct:>10.1f} {lowres:>13.1f} "
                 f"{direct / lowres:>8.2f}× {sum(r['direct_gflop'] for r in rows):>10.1f} → "
                 f"{sum(r['lowres_gflop'] for r in rows):>9.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from utils.cli import network_size
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark_layers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=network_size, default=(480, 640), metavar="HxW")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backward", action="store_true",
                        help="time forward and backward (input, weight and bias gradients)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"upsample → 3×3 conv per layer at {args.size[0]}x{args.size[1]}, "
          f"{'forward and backward' if args.backward else 'no autograd'}, "
          f"{torch.get_num_threads()} threads, medians of {args.repeat}:")
    print(format_layers(bench_layers(*args.size, repeat=args.repeat, backward=args.backward)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
