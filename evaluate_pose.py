"""Relative pose on MegaDepth-1500 (LoFTR / glue-factory protocols, AUC@5/10/20°):
``python evaluate_pose.py --config config/eval_megadepth1500.yaml [KEY=VALUE ...]``.

Methods are ``sift`` (OpenCV SIFT, built in) or checkpoint folders; features are extracted on
the resized images and cached per method under ``cache_dir``, results too (keyed by the
feature files and the settings). Prints a table per method, then ``AUC@5/10/20 <method>:
a / b / c`` (percent) per method, the last method's line last; writes ``output_json`` and a
plot of the cumulative error curves (``output_plot``). See :mod:`evaluation.pose`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from evaluation.pose import ESTIMATORS, LAYOUTS, default_conf, run_pose_evaluation
from utils.config import Spec, load_config
from utils.errors import SCFeatError

OPTIONAL_PATH = (str, type(None))
EVAL_SCHEMA = {
    **default_conf,
    "layout": Spec(default_conf["layout"], choices=LAYOUTS),
    "resize": Spec(default_conf["resize"], types=(int, type(None)),
                   doc="longer image side in pixels; null keeps the size"),
    "max_keypoints": Spec(default_conf["max_keypoints"], types=(int,)),
    "ratio": Spec(None, types=(float, type(None)), doc="Lowe's ratio test; null: none"),
    "estimator": Spec(default_conf["estimator"], choices=ESTIMATORS),
    "ransac_threshold": Spec(None, types=(float, type(None)),
                             doc="pixels; null: 0.5 for opencv, 1.0 for poselib"),
    "output_json": Spec(default_conf["output_json"], types=OPTIONAL_PATH),
    "output_plot": Spec(default_conf["output_plot"], types=OPTIONAL_PATH),
    "device": Spec("auto", choices=("auto", "cpu", "cuda")),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/eval_megadepth1500.yaml",
                        help="YAML file with the keys of evaluation.pose.default_conf")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. estimator=poselib methods=[sift]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        conf = load_config(args.config, args.overrides, EVAL_SCHEMA)
        try:
            run_pose_evaluation(conf)
        except SCFeatError as exc:
            if "config key" in str(exc):  # name the file the key came from
                raise SCFeatError(f"{args.config}: {exc}") from None
            raise
    except SCFeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
