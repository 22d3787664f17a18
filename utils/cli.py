"""What every command-line script shares: logging set-up, device choice, size parsing, the
``--config FILE KEY=VALUE...`` arguments, the exit codes of a user error and the progress bars
of the evaluations' loops.

Scripts stay thin: ``parser = config_parser(...)``; ``return run_cli(lambda: work(args))``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from utils.errors import SCFeatError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def setup_logging(log_file: str | Path | None = None, quiet: bool = False) -> None:
    """INFO (WARNING with ``quiet``: the non-zero ranks of a torchrun job) to stderr, and to
    ``log_file`` when given. Replaces any earlier set-up (its file handler is closed)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=LOG_FORMAT,
                        force=True, handlers=handlers)


def add_log_file(log_file: str | Path) -> None:
    """Also log to ``log_file`` (in :data:`LOG_FORMAT`), keeping the present handlers."""
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


def progress(items: Iterable, desc: str) -> Iterable:
    """``items`` with a progress bar on a terminal (cleared when done; none when not a tty)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, disable=None)


def resolve_device(choice: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """``auto`` (or ``None``) → CUDA when available, else CPU; ``cuda`` must be available
    (the error names the config key, or the flag when ``key`` starts with ``--``)."""
    if isinstance(choice, torch.device):
        return choice
    choice = "auto" if choice is None else str(choice)
    if choice.startswith("cuda") and not torch.cuda.is_available():
        flag = key.startswith("--")
        where, use = (key, f"{key} auto or {key} cpu") if flag else \
            (f"key '{key}'", f"{key}=auto or {key}=cpu")
        raise SCFeatError(f"{where}: cuda was asked for but CUDA is not available (use {use})")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def parse_size(text: str, multiple: int = 1, name: str = "--size") -> tuple[int, int]:
    """``'480x640'`` → ``(480, 640)`` (height, width), each between 32 and 4096 and a
    multiple of ``multiple`` (16 where the text goes straight to the network)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SCFeatError(f"{name} {text!r}: expected HEIGHTxWIDTH, e.g. 480x640")
    height, width = (int(p) for p in parts)
    if min(height, width) < 32 or max(height, width) > 4096:
        raise SCFeatError(f"{name} {text!r}: height and width must be between 32 and 4096")
    if height % multiple or width % multiple:
        raise SCFeatError(f"{name} {text!r}: height and width must be multiples of {multiple}")
    return height, width


def network_size(text: str) -> tuple[int, int]:
    """:func:`parse_size` for sizes fed to the network (multiples of 16); as ``argparse``
    ``type=`` its :class:`SCFeatError` reaches the script's error handler unchanged."""
    return parse_size(text, multiple=16)


def config_parser(doc: str | None, default_config: str | None = None, example: str = ""
                  ) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` (required without a default) and ``KEY=VALUE``
    overrides; the description is the first line of ``doc``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=default_config is None, default=default_config,
                        help="YAML config file" + (f" (default {default_config})"
                                                   if default_config else ""))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, values parsed as YAML"
                             + (f", e.g. {example}" if example else ""))
    return parser


def flags_as_overrides(argv: list[str], flags: dict[str, tuple[str, str]]) -> list[str]:
    """``argv`` with each ``--flag VALUE`` (or ``--flag=VALUE``) of ``flags`` written as the
    ``KEY=VALUE`` override it stands for: a script's older flags, kept as aliases of its config
    keys. ``flags``: flag → ``(key, kind)``, ``kind`` ``"str"`` (one value, a string),
    ``"list"`` (the values up to the next ``--`` option, a list of strings) or ``"yaml"`` (one
    value, parsed as YAML like any override)."""
    out, i = [], 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        i += 1
        if name not in flags:
            out.append(argv[i - 1])
            continue
        key, kind = flags[name]
        if eq:
            values = [inline]
        elif kind == "list":
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            if i >= len(argv):
                raise SCFeatError(f"{name}: expected a value")
            values = [argv[i]]
            i += 1
        value = (json.dumps(values) if kind == "list" else
                 json.dumps(values[0]) if kind == "str" else values[0])
        out.append(f"{key}={value}")
    return out


def run_cli(work: Callable[[], int | None], interrupted: str | None = None) -> int:
    """Run ``work``: its return code (0 for ``None``); a user error (:class:`SCFeatError`)
    prints ``error: <message>`` and returns 2 with no traceback; Ctrl-C prints
    ``interrupted: <interrupted>`` and returns 130 when ``interrupted`` is given."""
    try:
        return int(work() or 0)
    except SCFeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
