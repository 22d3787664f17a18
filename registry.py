"""The one explicit map from the names used in YAML configs to classes and functions.

A config names a class (``model: SCFeatModel``, ``losses: [KeypointLoss]``...); this module is
the only place that turns the name into code, and the config loader uses the classes'
``default_conf`` to validate their config sections.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch.nn as nn

from dataloader.hpatches import HPatch_SIFT
from dataloader.megadepth import MegaDepth_SIFT
from losses.keypoint import KeypointLoss
from losses.line2window import EpipolarLoss_Line2Window, Preprocess_Line2Window
from model.detnet import DetNet
from model.f2r import ResUNet_F2R
from model.scfeat import SCFeatModel
from utils.config import Spec, is_none_word, read_yaml
from utils.errors import SCFeatError
from utils.keypoints import generate_kpts_single

BACKBONES = {"ResUNet_F2R": ResUNet_F2R}
LOCALHEADERS = {"DetNet": DetNet}
MODELS = {"SCFeatModel": SCFeatModel}
DATASETS = {"MegaDepth_SIFT": MegaDepth_SIFT, "HPatch_SIFT": HPatch_SIFT}
PREPROCESSORS = {"Preprocess_Line2Window": Preprocess_Line2Window}
LOSSES = {"EpipolarLoss_Line2Window": EpipolarLoss_Line2Window, "KeypointLoss": KeypointLoss}
DETECTORS = {"generate_kpts_single": generate_kpts_single}


def lookup(table: dict[str, Any], name: Any, key: str) -> Any:
    """``table[name]``, or an error naming the config ``key`` and the valid names."""
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise SCFeatError(f"{key}: unknown name '{name}'{hint} (expected one of {sorted(table)})")


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
    """The model named ``name`` (``SCFeatModel``) with its backbone and detection network."""
    lookup(MODELS, name, "model")
    conf = {**SCFeatModel.default_conf, **model_config}
    backbone = lookup(BACKBONES, conf["backbone"], "model_config.backbone")(conf["backbone_config"])
    header_cls = lookup(LOCALHEADERS, conf["localheader"], "model_config.localheader")
    channels = {"local_map": backbone.conf["fusion_out_ch"], "desc_map": backbone.conf["fusion_out_ch"],
                "local_map_first": 64}
    expected = sum(channels.get(e, 0) for e in conf["local_input_elements"])
    in_channels = {**header_cls.default_conf, **conf["localheader_config"]}["in_channels"]
    if expected != in_channels:
        raise SCFeatError(f"model_config.localheader_config.in_channels: {in_channels} does not match "
                          f"local_input_elements {conf['local_input_elements']} ({expected} channels)")
    header = header_cls(conf["localheader_config"], with_image=conf["local_with_img"])
    return SCFeatModel(backbone, header, conf)


def _merged(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s entries, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def inherit_model_config(conf: dict, origin: str) -> None:
    """Complete a raw config's model settings from the run that wrote its checkpoint (in place).

    As in the original's stage-2 and extraction files, ``model_config`` entries that are absent,
    ``None`` or the string ``'None'`` are taken from ``config.yaml`` beside the ``load_path``
    folder (``train.py`` writes it); entries given explicitly win (nested mappings key by key,
    so ``model_config.backbone_config.pretrained=false`` keeps the run's encoder). Without such a file the
    entries must be given: a ``None`` entry is an error naming the file that is missing.
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
        conf["model_config"] = _merged(run.get("model_config") or {}, given)
        if is_none_word(conf.get("model")) and run.get("model") is not None:
            conf["model"] = run["model"]
        return
    if left_open and not Path(load_path).is_dir():
        raise SCFeatError(f"{origin}: key 'load_path': checkpoint folder '{load_path}' does not "
                          f"exist (model_config.{left_open[0]} is None: it comes from that run)")
    if left_open:
        raise SCFeatError(
            f"{origin}: key 'model_config.{left_open[0]}' is None, which means \"take it from the "
            f"checkpoint's run\", but '{run_config}' does not exist; give the model settings in "
            f"model_config or point load_path at a folder written by train.py")
    conf["model_config"] = given
    if is_none_word(conf.get("model")):
        conf.pop("model", None)
