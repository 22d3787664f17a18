"""3-D reconstruction with pycolmap and the ETH benchmark's measures:
``python reconstruct.py --images DIR --features METHOD --out DIR [--gt img_cam.txt|MODEL_DIR]``.

``METHOD`` is any method of ``evaluation/methods.py`` (``sift``, ``disk``, ``aliked``,
``xfeat``, ``disk+lightglue``, ..., or an SCFeat checkpoint folder). Extracts features (cached
under ``<out>/features``), matches every pair with the method's matcher, imports them into a COLMAP database, runs COLMAP's geometric verification and
incremental mapping, and prints registered images, 3-D points, observations, mean track length
and mean reprojection error; with ``--gt`` (``img_cam.txt`` layout, e.g. the ``poses/<scene>.txt``
of ``python -m tools.synthetic megadepth1500``, or a COLMAP model folder) also the rotation and
camera-centre errors after a similarity alignment and their mAA over IMC 2022's thresholds. The measures go to ``<out>/<method>.json`` too. See
:mod:`evaluation.reconstruction`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.methods import parse_method
from evaluation.reconstruction import add_feature_arguments, colmap_cli, run_reconstruction
from utils.cli import resolve_device
from utils.atomic import write_json

MEASURES = [("registered", "registered images", "{:d}"), ("points3D", "3-D points", "{:d}"),
            ("observations", "observations", "{:d}"),
            ("mean_track_length", "mean track length", "{:.2f}"),
            ("mean_reprojection_error", "mean reprojection error [px]", "{:.3f}"),
            ("mean_matches", "mean matches per pair", "{:.0f}"),
            ("rotation_error_median", "rotation error, median [°]", "{:.3f}"),
            ("rotation_error_max", "rotation error, max [°]", "{:.3f}"),
            ("centre_error_median", "centre error, median [GT units]", "{:.4f}"),
            ("centre_error_max", "centre error, max [GT units]", "{:.4f}"),
            ("maa", "mAA (IMC thresholds)", "{:.3f}")]


def format_measures(statistics: dict) -> str:
    lines = [f"{statistics['method']}: {statistics['registered']} of {statistics['images']} "
             f"images registered"]
    for key, label, fmt in MEASURES:
        if key in statistics:
            lines.append(f"  {label:<34}{fmt.format(statistics[key])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of the scene's images")
    parser.add_argument("--gt", default=None,
                        help="ground-truth cameras: an img_cam.txt file or a COLMAP model folder")
    add_feature_arguments(parser)
    return parser.parse_args(argv)


def reconstruct(args) -> int:
    statistics = run_reconstruction(args.images, parse_method(args.features, "--features"),
                                    args.out, args.gt,
                                    args.max_keypoints, args.ratio,
                                    resolve_device(args.device, "--device"), args.seed)
    write_json(Path(args.out) / f"{statistics['method']}.json", statistics)
    print(format_measures(statistics))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return colmap_cli(lambda: reconstruct(args))


if __name__ == "__main__":
    sys.exit(main())
