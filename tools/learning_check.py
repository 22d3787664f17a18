"""Learning checks: does training learn on this machine?

``python -m tools.learning_check stage2 [--steps N] [--seed S] [--size HxW] ...``: the detector
(stage 2) trained by ``KeypointLoss`` on oracle descriptors against zero-reward and
shuffled-reward controls (:mod:`tools.learning_stage2`).

``python -m tools.learning_check stage1 ...``: the descriptor learning curve
(:mod:`tools.learning_stage1`).
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from utils.cli import run_cli
from utils.errors import SCFeatError

COMMANDS = {"stage1": "tools.learning_stage1", "stage2": "tools.learning_stage2"}
USAGE = "usage: python -m tools.learning_check {stage1,stage2} [options]  (--help after a command)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SCFeatError(f"learning_check: unknown command {command!r}, expected one of "
                          f"{sorted(COMMANDS)}")
    # imported lazily: each check is its own module, and one may be absent or slow to import
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(run_cli(main))
