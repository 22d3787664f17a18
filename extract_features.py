"""Extract SCFeat features on HPatches, Aachen Day-Night, ETH (local-feature benchmark) or InLoc.

``data`` names the dataset (configs ``config/extract_{hpatches,aachen,eth,inloc}.yaml``):
``python extract_features.py --config FILE [--format npz|h5] [--amp] [--compile] [KEY=VALUE ...]``.

Writes ``ckpts/<output_root>/desc/<key>.<postfix>`` npz files, the key being the image's path
in its layout (HPatches ``<seq>/<k>.ppm``, what ``evaluate_hpatches.py`` reads; see
:mod:`dataloader.image_folders`), with ``keypoints`` N×2 x, y in the image file's pixels,
``scores`` N, ``descriptors`` N×D unit norm; or with ``format: h5`` one ``features.h5`` in
hloc's layout, a group per key (the original's ``save_npz: false`` alone writes no feature
files); with ``output_img`` also score maps and keypoint drawings under ``image/``.
The work is done by :mod:`extraction`; for your own images use
``SCFeatModel.from_checkpoint(folder).detect_and_describe(image)``.
"""
from __future__ import annotations

import sys

from extraction import output_dir, run_extraction
from model.fast import use_reference_ops
from schemas import FEATURE_FORMATS, load_extract_config
from utils import acceleration
from utils.cli import add_log_file, config_parser, run_cli, setup_logging
from utils.config import report_inert_keys


def parse_args(argv: list[str] | None = None):
    parser = config_parser(__doc__)
    parser.add_argument("--format", choices=FEATURE_FORMATS, default=None,
                        help="feature file format (overrides the config's 'format' and "
                             "'save_npz')")
    acceleration.add_arguments(parser)
    return parser.parse_args(argv)


def config_overrides(args) -> list[str]:
    """The ``KEY=VALUE`` overrides, then those of the flags (``--format`` replaces both
    ``format`` and the config's ``save_npz``)."""
    formats = [f"format={args.format}", "save_npz=null"] if args.format else []
    return list(args.overrides) + formats + acceleration.flag_overrides(args)


def extract(args) -> int:
    use_reference_ops(args.reference_ops)
    inert: list[str] = []
    conf = load_extract_config(args.config, config_overrides(args), inert)
    report_inert_keys(args.config, inert)
    add_log_file(output_dir(conf) / "extract.log")
    run_extraction(conf)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_cli(lambda: extract(args), interrupted="the files written so far are complete; an "
                                                      "h5 file is only written at the end")


if __name__ == "__main__":
    sys.exit(main())
