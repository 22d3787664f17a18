"""The one explicit map from the names used in YAML configs to classes and functions.

A config names a class (``model: SCFeatModel``, ``losses: [KeypointLoss]``...); this module is
the only place that turns the name into code, and the config loader uses the classes'
``default_conf`` to validate their config sections.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from dataloader.extraction_sets import EXTRACTION_DATASETS
from dataloader.megadepth import MegaDepth_SIFT
from losses.keypoint import KeypointLoss
from losses.line2window import EpipolarLoss_Line2Window, Preprocess_Line2Window
from model.keypoints import DETECTORS
from model.scfeat import BACKBONES, LOCALHEADERS, MODELS
from utils.config import lookup

__all__ = ["BACKBONES", "LOCALHEADERS", "MODELS", "DATASETS", "EXTRACTION_DATASETS",
           "PREPROCESSORS", "LOSSES", "DETECTORS", "lookup", "class_section",
           "build_model"]

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


def build_model(name: str, model_config: dict) -> nn.Module:
    """The model named ``name`` (``SCFeatModel``) built from ``model_config``."""
    return lookup(MODELS, name, "model").from_config(model_config)
