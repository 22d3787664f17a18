"""3-D reconstruction with pycolmap and the ETH benchmark's measures:
``python reconstruct.py [--config config/reconstruct.yaml] images=DIR features=METHOD out=DIR
[gt=img_cam.txt|MODEL_DIR] [KEY=VALUE ...]`` (the flags ``--images``, ``--features``, ``--out``,
``--gt``, ``--max-keypoints``, ``--ratio``, ``--device``, ``--seed`` are aliases of those keys).

``METHOD`` is any method of ``evaluation/methods.py`` (``sift``, ``disk``, ``aliked``,
``xfeat``, ``disk+lightglue``, ..., or an SCFeat checkpoint folder). Extracts features (cached
under ``<out>/features``), matches every pair with the method's matcher, imports them into a COLMAP database, runs COLMAP's geometric verification and
incremental mapping, and prints registered images, 3-D points, observations, mean track length
and mean reprojection error; with ``gt`` (``img_cam.txt`` layout, e.g. the ``poses/<scene>.txt``
of ``python -m tools.synthetic megadepth1500``, or a COLMAP model folder) also the rotation and
camera-centre errors after a similarity alignment and their mAA over IMC 2022's thresholds. The
measures go to ``<out>/<method>.json`` too. See
:mod:`evaluation.reconstruction`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from evaluation.methods import parse_method
from evaluation.reconstruction import FEATURE_FLAGS, colmap_cli, run_reconstruction
from schemas import load_reconstruct_config
from utils.atomic import write_json
from utils.cli import config_parser, flags_as_overrides, resolve_device

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "config" / "reconstruct.yaml")
FLAGS = {"--images": ("images", "str"), "--gt": ("gt", "str"), **FEATURE_FLAGS}

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


def reconstruct(conf: dict) -> int:
    statistics = run_reconstruction(conf["images"], parse_method(conf["features"], "features"),
                                    conf["out"], conf["gt"], conf["max_keypoints"], conf["ratio"],
                                    resolve_device(conf["device"]), conf["seed"])
    write_json(Path(conf["out"]) / f"{statistics['method']}.json", statistics)
    print(format_measures(statistics))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = flags_as_overrides(sys.argv[1:] if argv is None else list(argv), FLAGS)
    args = config_parser(__doc__, DEFAULT_CONFIG, "images=DIR features=sift out=DIR").parse_args(argv)
    return colmap_cli(lambda: reconstruct(load_reconstruct_config(args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
