"""Evaluate features on HPatches-sequences (D2-Net protocol, MMA@1..10):
``python evaluate_hpatches.py --config config/eval_hpatches.yaml [KEY=VALUE ...]``.

Features come from the extraction output (``<features>/<seq>/<k>.ppm.<postfix>`` npz files
with ``keypoints``, ``scores``, ``descriptors``); ``sift`` is a built-in baseline. Results are
cached per method under ``cache_dir`` (keyed by the feature files), printed as a table and
plotted beside the comparison caches (by default the published ones in
``../shared/reference/hpatches_cache``).
"""
from __future__ import annotations

import argparse
import logging
import sys

from evaluation.hpatches import default_conf, parse_methods, run_evaluation
from utils.config import Spec, load_config
from utils.errors import SCFeatError

EVAL_SCHEMA = {
    **default_conf,
    "compare_caches": Spec(None, types=(list, type(None))),
    "output_plot": Spec(default_conf["output_plot"], types=(str, type(None))),
    "thresholds": Spec(default_conf["thresholds"], choices=tuple(range(1, 16))),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/eval_hpatches.yaml",
                        help="YAML file with the keys of evaluation.hpatches.default_conf")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. methods=[sift] thresholds=15")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        conf = load_config(args.config, args.overrides, EVAL_SCHEMA)
        try:
            parse_methods(conf["methods"])  # checked here so the message names the file
        except SCFeatError as exc:
            raise SCFeatError(f"{args.config}: {exc}") from None
        run_evaluation(conf)
    except SCFeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
