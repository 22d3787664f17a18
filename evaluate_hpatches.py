"""Evaluate features on HPatches-sequences (D2-Net protocol, MMA@1..10):
``python evaluate_hpatches.py --config config/eval_hpatches.yaml [KEY=VALUE ...]``.

Features come from the extraction output (``<features>/<seq>/<k>.ppm.<postfix>`` npz files
with ``keypoints``, ``scores``, ``descriptors``); ``sift`` is a built-in baseline. Results are
cached per method under ``cache_dir`` (keyed by the feature files), printed as a table and
plotted beside the comparison caches (by default the published ones in
``../shared/reference/hpatches_cache``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from evaluation.hpatches import run_evaluation
from schemas import load_eval_hpatches_config
from utils.cli import config_parser, run_cli, setup_logging


# The published caches (D2-Net's and the paper's), compared when compare_caches is null.
REFERENCE_DIR = Path(os.environ.get("SCFEAT_REFERENCE",
                                    Path(__file__).resolve().parent.parent / "shared" / "reference"))


def default_compare_caches() -> list[Path]:
    """The published caches in ``../shared/reference/hpatches_cache`` (empty when absent)."""
    folder = REFERENCE_DIR / "hpatches_cache"
    return sorted(folder.glob("*.npy")) if folder.is_dir() else []


def with_default_caches(conf: dict) -> dict:
    """``conf`` with ``compare_caches`` null read as :func:`default_compare_caches`."""
    if conf.get("compare_caches") is None:
        conf = {**conf, "compare_caches": [str(p) for p in default_compare_caches()]}
    return conf


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__, "config/eval_hpatches.yaml", "methods=[sift] thresholds=15")
    args = parser.parse_args(argv)
    setup_logging()
    return run_cli(lambda: run_evaluation(with_default_caches(
        load_eval_hpatches_config(args.config, args.overrides))) and 0)


if __name__ == "__main__":
    sys.exit(main())
