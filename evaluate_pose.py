"""Relative pose on MegaDepth-1500 (LoFTR / glue-factory protocols, AUC@5/10/20°):
``python evaluate_pose.py --config config/eval_megadepth1500.yaml [KEY=VALUE ...]``.

Methods are ``sift`` (OpenCV SIFT, built in) or checkpoint folders; features are extracted on
the resized images and cached per method under ``cache_dir``, results too (keyed by the
feature files and the settings). Prints a table per method, then ``AUC@5/10/20 <method>:
a / b / c`` (percent) per method, the last method's line last; writes ``output_json`` and a
plot of the cumulative error curves (``output_plot``). See :mod:`evaluation.pose`.
"""
from __future__ import annotations

import sys

from evaluation.pose import run_pose_evaluation
from schemas import load_eval_pose_config
from utils.cli import config_parser, run_cli, setup_logging
from utils.errors import SCFeatError


def evaluate(config: str, overrides: list[str]) -> int:
    conf = load_eval_pose_config(config, overrides)
    try:
        run_pose_evaluation(conf)
    except SCFeatError as exc:
        if "config key" in str(exc):  # name the file the key came from
            raise SCFeatError(f"{config}: {exc}") from None
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__, "config/eval_megadepth1500.yaml",
                           "estimator=poselib methods=[sift]")
    args = parser.parse_args(argv)
    setup_logging()
    return run_cli(lambda: evaluate(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
