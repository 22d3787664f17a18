"""Train SCFeat: ``python train.py --config FILE [--resume] [--amp] [--compile] [KEY=VALUE ...]``.

Stage 1 (``config/train_desc.yaml``) trains the backbone with the line-to-window epipolar loss;
stage 2 (``config/train_det.yaml``) trains the detector by REINFORCE with a frozen backbone.
The trainer (:mod:`training`) knows nothing of specific losses: it builds the model, the data,
the optional preprocess step and the losses named in the config, and runs

    outputs1, outputs2 = model(im1), model(im2)      # two separate batches (BatchNorm)
    processed = preprocess(batch, outputs1, outputs2, epoch)
    loss = Σ weight·loss_fn(batch, outputs1, outputs2, processed, epoch)

Multi-GPU: ``torchrun --nproc_per_node K train.py --config ...`` (NCCL on GPUs, gloo on CPU).
"""
from __future__ import annotations

import os
import sys

import torch.distributed as dist

from model.fast import use_reference_ops
from schemas import load_train_config
from training.loop import run_training
from utils import acceleration
from utils.cli import config_parser, run_cli, setup_logging
from utils.config import report_inert_keys


def parse_args(argv: list[str] | None = None):
    parser = config_parser(__doc__)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in <output_root>/<checkpoint_name> from its "
                             "training state")
    acceleration.add_arguments(parser)
    return parser.parse_args(argv)


def train(args) -> int:
    use_reference_ops(args.reference_ops)
    overrides = list(args.overrides) + acceleration.flag_overrides(args)
    inert: list[str] = []
    conf = load_train_config(args.config, overrides, inert)
    report_inert_keys(args.config, inert)
    trainer = run_training(conf, args.config, args.resume)
    if trainer.stop_requested:
        print(f"stopped at step {trainer.progress.global_step}: training state saved in "
              f"{trainer.state_path}; continue with --resume", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(quiet=int(os.environ.get("RANK", 0)) != 0)
    try:
        return run_cli(lambda: train(args), interrupted="the last saved training state (if any) "
                                                        "is intact; continue with --resume")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
