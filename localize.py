"""Visual localisation with pycolmap and the Aachen protocol's measures:
``python localize.py --images DIR [DIR ...] --poses FILE [FILE ...] --features METHOD --out DIR``.

Per scene (an image folder and its cameras in the ``img_cam.txt`` layout, e.g.
``python -m tools.synthetic megadepth1500``'s ``images/<scene>`` and ``poses/<scene>.txt``): the
reference images are triangulated with their known poses, every ``--query-every``-th image (or
``--queries``) is localised from 2D–3D matches, and the percentage of queries within (0.25 m,
2°), (0.5 m, 5°) and (5 m, 10°) is printed over all scenes. The per-query records go to
``<out>/<method>.json``. For the real Aachen Day-Night run, export the features to hloc's h5
(``extract_features.py --format h5``). See :mod:`evaluation.localization`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.localization import AACHEN_THRESHOLDS, localize_scene, summarize
from evaluation.methods import parse_method
from evaluation.reconstruction import add_feature_arguments, colmap_cli
from utils.cli import resolve_device
from utils.atomic import write_json
from utils.errors import SCFeatError


def format_summary(label: str, summary: dict) -> str:
    recalls = " / ".join(f"{100 * v:.1f}" for v in summary["recall"].values())
    thresholds = " / ".join(f"({m} m, {d}°)" for m, d in AACHEN_THRESHOLDS)
    return (f"{label}: {summary['queries']} queries, {summary['mean_matches_2d3d']:.0f} 2D-3D "
            f"matches on average, median errors {summary['centre_error_median']:.4f} m / "
            f"{summary['rotation_error_median']:.3f}°\n"
            f"localised within {thresholds} {label}: {recalls} %")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, nargs="+", help="image folder of each scene")
    parser.add_argument("--poses", required=True, nargs="+",
                        help="known cameras of each scene (img_cam.txt layout), same order")
    parser.add_argument("--queries", nargs="*", default=None,
                        help="query image names (default: every --query-every-th image)")
    parser.add_argument("--query-every", type=int, default=4)
    add_feature_arguments(parser)
    return parser.parse_args(argv)


def localize(args) -> int:
    if len(args.images) != len(args.poses):
        raise SCFeatError(f"--images and --poses: expected one poses file per image folder, "
                          f"got {len(args.images)} folders and {len(args.poses)} files")
    method = parse_method(args.features, "--features")
    device = resolve_device(args.device, "--device")
    records = []
    for images, poses in zip(args.images, args.poses):
        records += localize_scene(images, poses, method, args.out, args.queries,
                                  args.query_every, args.max_keypoints, args.ratio, device,
                                  args.seed)
    label = method.label
    summary = summarize(records)
    write_json(Path(args.out) / f"{label}.json", {"summary": summary, "queries": records})
    print(format_summary(label, summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return colmap_cli(lambda: localize(args))


if __name__ == "__main__":
    sys.exit(main())
