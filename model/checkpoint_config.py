"""Model settings from the run that wrote a checkpoint, in one place: a checkpoint folder's
parent holds that run's ``config.yaml`` (``train.py`` writes it), whose ``model`` and
``model_config`` win over the settings given, as in the original's
``model_config.update(<run's model_config>)``. :func:`inherit_model_config` applies it to a
config file being loaded (``train.py``, ``extract_features.py``); :func:`checkpoint_settings`
to ``SCFeatModel.from_checkpoint``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from utils.config import is_none_word, read_yaml
from utils.errors import SCFeatError

# A model built from a checkpoint never downloads an encoder (see from_checkpoint), so a
# differing `pretrained` changes nothing and is not reported.
_UNREAD_WITH_CHECKPOINT = ("backbone_config.pretrained",)

log = logging.getLogger("scfeat.config")


def checkpoint_model_config(given: dict, run: dict, where: str) -> dict:
    """``given`` model settings updated with ``run``'s (the ``model_config`` of the run that
    wrote the checkpoint), as the original's ``model_config.update(run)``: the run's entries win
    (nested sections key by key, so an entry the run lacks is kept). Every given entry whose
    value differs from the run's gets one warning line naming ``where``, the key and both
    values. Returns the merged settings (``given`` and ``run`` are not changed).
    """
    for key, ours, theirs in _differences(given, run):
        if key not in _UNREAD_WITH_CHECKPOINT:
            log.warning("%s: model_config.%s is %r here but %r in the checkpoint's run; the "
                        "checkpoint's value is used", where, key, ours, theirs)
    return _merged(given, run)


def _differences(given: dict, run: dict, prefix: str = ""):
    """``(dotted key, given value, run value)`` for every leaf of ``given`` that ``run`` also
    holds with another value."""
    for key, value in given.items():
        if key not in run:
            continue
        if isinstance(value, dict) and isinstance(run[key], dict):
            yield from _differences(value, run[key], f"{prefix}{key}.")
        elif value != run[key]:
            yield f"{prefix}{key}", value, run[key]


def _merged(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s entries, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def model_from_run(given: Any, run: Any, where: str) -> Any:
    """The ``model`` name: the run's when it names one (one warning when ``given`` names
    another), else ``given``."""
    if run is None:
        return given
    if not is_none_word(given) and given != run:
        log.warning("%s: model is %r here but %r in the checkpoint's run; the checkpoint's "
                    "value is used", where, given, run)
    return run


def checkpoint_settings(folder: Path, model_config: dict) -> tuple[dict, Any, Path | None]:
    """``(model settings, the run's model name or None, the run's config file or None)`` for
    a checkpoint ``folder``: ``model_config`` updated by the run's (:func:`checkpoint_model_config`)
    when ``<folder>/../config.yaml`` exists, else ``model_config`` itself."""
    config_file = Path(folder).parent / "config.yaml"
    if not config_file.is_file():
        return dict(model_config), None, None
    run_config = read_yaml(config_file)
    merged = checkpoint_model_config(dict(model_config), run_config.get("model_config") or {},
                                     str(config_file))
    return merged, run_config.get("model", "SCFeatModel"), config_file


def inherit_model_config(conf: dict, origin: str) -> None:
    """Complete a raw config's model settings from the run that wrote its checkpoint (in place).

    With ``config.yaml`` beside the ``load_path`` folder (``train.py`` writes it), the original's
    ``model_config.update(<that run's model_config>)``: the run's ``model`` and ``model_config``
    entries win over those given here (nested sections key by key), and each given entry that
    differs is logged as a warning (:func:`checkpoint_model_config`). Entries
    written ``None`` (or the string ``'None'``) or left out are the run's. Without such a file
    the entries must be given: a ``None`` entry is an error naming the file that is missing.
    """
    load_path = conf.get("load_path")
    if not isinstance(load_path, str) or is_none_word(load_path):
        return
    section = conf.get("model_config")
    if is_none_word(section):
        section = {}
    if not isinstance(section, dict):
        return  # validation reports the wrong type
    left_open = [key for key, value in section.items() if is_none_word(value)]
    given = {key: value for key, value in section.items() if not is_none_word(value)}
    run_config = Path(load_path).parent / "config.yaml"
    if run_config.is_file():
        run = read_yaml(run_config)
        where = f"{origin} (load_path's run: {run_config})"
        conf["model_config"] = checkpoint_model_config(given, run.get("model_config") or {}, where)
        conf["model"] = model_from_run(conf.get("model"), run.get("model"), where)
    else:
        if left_open and not Path(load_path).is_dir():
            raise SCFeatError(f"{origin}: key 'load_path': checkpoint folder '{load_path}' does "
                              f"not exist (model_config.{left_open[0]} is None: it comes from "
                              f"that run)")
        if left_open:
            raise SCFeatError(
                f"{origin}: key 'model_config.{left_open[0]}' is None, which means \"take it from "
                f"the checkpoint's run\", but '{run_config}' does not exist; give the model "
                f"settings in model_config or point load_path at a folder written by train.py")
        conf["model_config"] = given
    if is_none_word(conf.get("model")):
        conf.pop("model", None)
