"""Extract SCFeat features on HPatches-sequences:
``python extract_features.py --config FILE [--format npz|h5] [--amp] [--compile] [KEY=VALUE ...]``.

Writes ``<output_root>/desc/<seq>/<k>.ppm.<postfix>`` npz files (``keypoints``
N×2 x, y in the uncropped image's pixels, ``scores`` N, ``descriptors`` N×D unit norm; what
``evaluate_hpatches.py`` reads), or with ``format: h5`` one ``features.h5`` in hloc's layout;
with ``output_img`` also score maps and keypoint drawings under ``image/<seq>/``.
The work is done by :mod:`extraction`; for your own images use
``SCFeatModel.from_checkpoint(folder).detect_and_describe(image)``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from extraction import (FEATURE_FORMATS, check_config, load_extract_config, output_dir,
                        run_extraction)
from utils import acceleration
from utils.config import report_inert_keys
from utils.errors import SCFeatError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML extraction config, e.g. "
                                                        "config/extract_hpatches.yaml")
    parser.add_argument("--format", choices=FEATURE_FORMATS, default=None,
                        help="feature file format (overrides the config's 'format')")
    acceleration.add_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, values parsed as YAML")
    return parser.parse_args(argv)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True,
                        handlers=[logging.StreamHandler(sys.stderr)])


def log_to_file(conf: dict) -> None:
    """Also log to ``<output_root>/extract.log``."""
    folder = output_dir(conf)
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "extract.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    overrides = list(args.overrides) + ([f"format={args.format}"] if args.format else []) \
        + acceleration.flag_overrides(args)
    try:
        inert: list[str] = []
        conf = load_extract_config(args.config, overrides, inert)
        check_config(conf, args.config)
        report_inert_keys(args.config, inert)
        log_to_file(conf)
        run_extraction(conf)
    except SCFeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the files written so far are complete; an h5 file is only written "
              "at the end", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
