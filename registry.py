"""The one explicit map from the names used in YAML configs to classes and functions.

A config names a class (``model: SCFeatModel``, ``losses: [KeypointLoss]``...); this module is
the only place that turns the name into code, and the config loader uses the classes'
``default_conf`` to validate their config sections.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from dataloader.extraction_sets import EXTRACTION_DATASETS
from dataloader.megadepth import MegaDepth_SIFT
from losses.keypoint import KeypointLoss
from losses.line2window import EpipolarLoss_Line2Window, Preprocess_Line2Window
from model.keypoints import DETECTORS
from model.scfeat import (BACKBONES, LOCALHEADERS, MODELS, SCFeatModel, checkpoint_model_config,
                          model_from_run)
from utils.config import Spec, is_none_word, lookup, read_yaml
from utils.errors import SCFeatError

__all__ = ["BACKBONES", "LOCALHEADERS", "MODELS", "DATASETS", "EXTRACTION_DATASETS",
           "PREPROCESSORS", "LOSSES", "DETECTORS", "lookup", "class_section", "model_schema",
           "build_model", "inherit_model_config"]

# The networks', detectors' and extraction datasets' names are declared beside them (model/,
# dataloader/extraction_sets.py); training data and losses here.
DATASETS = {"MegaDepth_SIFT": MegaDepth_SIFT, **EXTRACTION_DATASETS}
PREPROCESSORS = {"Preprocess_Line2Window": Preprocess_Line2Window}
LOSSES = {"EpipolarLoss_Line2Window": EpipolarLoss_Line2Window, "KeypointLoss": KeypointLoss}


def class_section(table: dict[str, Any], key: str):
    """Schema of a ``<key>_config`` section: the ``default_conf`` of the class that the
    config's ``key`` names (an empty schema when ``key`` is null)."""
    def schema_of(root: dict, raw: dict) -> dict:
        name = root.get(key)
        return {} if name is None else lookup(table, name, key).default_conf
    return schema_of


def model_schema(model_config: dict) -> dict:
    """Schema of ``model_config``: SCFeatModel's keys, with ``backbone_config`` and
    ``localheader_config`` taken from the classes the config names."""
    defaults = SCFeatModel.default_conf
    backbone = model_config.get("backbone", defaults["backbone"])
    header = model_config.get("localheader", defaults["localheader"])
    return {
        "backbone": Spec(defaults["backbone"], choices=tuple(BACKBONES)),
        "backbone_config": {**lookup(BACKBONES, backbone, "model_config.backbone").default_conf,
                            "pretrained": Spec(True, types=(bool, str))},
        "localheader": Spec(defaults["localheader"], choices=tuple(LOCALHEADERS)),
        "localheader_config": lookup(LOCALHEADERS, header, "model_config.localheader").default_conf,
        "align_local_grad": defaults["align_local_grad"],
        "local_input_elements": defaults["local_input_elements"],
        "local_with_img": defaults["local_with_img"],
    }


def build_model(name: str, model_config: dict) -> nn.Module:
    """The model named ``name`` (``SCFeatModel``) built from ``model_config``."""
    return lookup(MODELS, name, "model").from_config(model_config)


def inherit_model_config(conf: dict, origin: str) -> None:
    """Complete a raw config's model settings from the run that wrote its checkpoint (in place).

    With ``config.yaml`` beside the ``load_path`` folder (``train.py`` writes it), the original's
    ``model_config.update(<that run's model_config>)``: the run's ``model`` and ``model_config``
    entries win over those given here (nested sections key by key), and each given entry that
    differs is logged as a warning (:func:`model.scfeat.checkpoint_model_config`). Entries
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
