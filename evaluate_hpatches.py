"""Evaluate features on HPatches-sequences (D2-Net protocol, MMA@1..10):
``python evaluate_hpatches.py --config config/eval_hpatches.yaml [KEY=VALUE ...]``.

Features come from the extraction output (``<features>/<seq>/<k>.ppm.<postfix>`` npz files
with ``keypoints``, ``scores``, ``descriptors``); ``sift`` is a built-in baseline. Results are
cached per method under ``cache_dir`` (keyed by the feature files), printed as a table and
plotted beside the comparison caches (by default the published ones in
``../shared/reference/hpatches_cache``).
"""
from __future__ import annotations

import sys

from evaluation.hpatches import run_evaluation
from schemas import load_eval_hpatches_config
from utils.cli import config_parser, run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__, "config/eval_hpatches.yaml", "methods=[sift] thresholds=15")
    args = parser.parse_args(argv)
    setup_logging()
    return run_cli(lambda: run_evaluation(load_eval_hpatches_config(args.config, args.overrides))
                   and 0)


if __name__ == "__main__":
    sys.exit(main())
