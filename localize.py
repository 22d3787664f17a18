"""Visual localisation with pycolmap and the Aachen protocol's measures:
``python localize.py [--config config/localize.yaml] images=[DIR, ...] poses=[FILE, ...]
features=METHOD out=DIR [KEY=VALUE ...]`` (the flags ``--images``, ``--poses``, ``--queries``,
``--query-every``, ``--features``, ``--out``, ``--max-keypoints``, ``--ratio``, ``--device``,
``--seed`` are aliases of those keys).

Per scene (an image folder and its cameras in the ``img_cam.txt`` layout, e.g.
``python -m tools.synthetic megadepth1500``'s ``images/<scene>`` and ``poses/<scene>.txt``): the
reference images are triangulated with their known poses, every ``query_every``-th image (or
``queries``) is localised from 2D–3D matches, and the percentage of queries within (0.25 m,
2°), (0.5 m, 5°) and (5 m, 10°) is printed over all scenes. The per-query records go to
``<out>/<method>.json``. For the real Aachen Day-Night run, export the features to hloc's h5
(``extract_features.py --format h5``). See :mod:`evaluation.localization`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from evaluation.localization import AACHEN_THRESHOLDS, localize_scene, summarize
from evaluation.methods import parse_method
from evaluation.reconstruction import FEATURE_FLAGS, colmap_cli
from schemas import load_localize_config
from utils.atomic import write_json
from utils.cli import config_parser, flags_as_overrides, resolve_device

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "config" / "localize.yaml")
FLAGS = {"--images": ("images", "list"), "--poses": ("poses", "list"),
         "--queries": ("queries", "list"), "--query-every": ("query_every", "yaml"),
         **FEATURE_FLAGS}


def format_summary(label: str, summary: dict) -> str:
    recalls = " / ".join(f"{100 * v:.1f}" for v in summary["recall"].values())
    thresholds = " / ".join(f"({m} m, {d}°)" for m, d in AACHEN_THRESHOLDS)
    return (f"{label}: {summary['queries']} queries, {summary['mean_matches_2d3d']:.0f} 2D-3D "
            f"matches on average, median errors {summary['centre_error_median']:.4f} m / "
            f"{summary['rotation_error_median']:.3f}°\n"
            f"localised within {thresholds} {label}: {recalls} %")


def localize(conf: dict) -> int:
    method = parse_method(conf["features"], "features")
    device = resolve_device(conf["device"])
    records = []
    for images, poses in zip(conf["images"], conf["poses"]):
        records += localize_scene(images, poses, method, conf["out"], conf["queries"],
                                  conf["query_every"], conf["max_keypoints"], conf["ratio"],
                                  device, conf["seed"])
    label = method.label
    summary = summarize(records)
    write_json(Path(conf["out"]) / f"{label}.json", {"summary": summary, "queries": records})
    print(format_summary(label, summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = flags_as_overrides(sys.argv[1:] if argv is None else list(argv), FLAGS)
    parser = config_parser(__doc__, DEFAULT_CONFIG, "images=[DIR] poses=[FILE] features=sift out=DIR")
    args = parser.parse_args(argv)
    return colmap_cli(lambda: localize(load_localize_config(args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
