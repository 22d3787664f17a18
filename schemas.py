"""Every script's config schema, and the rules that span keys (one function per script).

The config loader (:mod:`utils.config`) validates a YAML file against a schema once; the
sections named after a class (``data_config_train``, ``<LossName>_config``, ...) take their
schema from that class's ``default_conf`` through the registry. Each ``load_*_config`` returns
a config that is complete and checked: the scripts, the demo and the tests use them alike.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from evaluation.hpatches import default_conf as hpatches_defaults
from evaluation.hpatches import parse_methods
from dataloader.colmap_model import DEFAULT_PAIRS as COLMAP_PAIRS
from dataloader.colmap_model import RULES as PAIR_RULES
from evaluation.pose import ESTIMATORS, LAYOUTS
from evaluation.pose import default_conf as pose_defaults
from model.extractor import DESCRIPTOR_MAPS, DETECTORS, detector_schema, make_detector
from registry import (DATASETS, EXTRACTION_DATASETS, LOSSES, MODELS, PREPROCESSORS,
                      class_section, inherit_model_config, model_schema)
from utils.checkpoint import CHECKPOINT_PARTS, checkpoint_files
from utils.cli import DEVICE_CHOICES
from utils.config import Dynamic, Spec, load_config, lookup
from utils.errors import SCFeatError

FEATURE_FORMATS = ("npz", "h5")
TRAINABLE_MODULES = CHECKPOINT_PARTS  # the parts an optimiser may train

# ---------------------------------------------------------------------------------- training

def val_schema(root: dict, raw: dict) -> dict:
    """``val_config``, the original's layout: ``data_config_val`` (a dataset config of the
    training ``data`` class; validation runs after each epoch when it is given), our
    ``max_pairs`` and the original's visualisation keys, accepted and unused."""
    if not raw:
        return {}
    data_schema = class_section(DATASETS, "data")
    return {
        "data_config_val": Dynamic(lambda root, raw: data_schema(root, raw) if raw else {}, default=None),
        "max_pairs": Spec(200, types=(int, type(None)), minimum=0,
                          doc="pairs per validation, a seeded subset fixed for the run; "
                              "null: every pair; 0: no validation"),
        "detector": Spec(None, types=(str, type(None)), inert=True),
        "detector_config": Spec({}, types=(dict,), inert=True),
        "loss_distance": Spec("cos", choices=("cos", "euc"), inert=True),
        "vis_topk": Spec(50, inert=True),
        "vis_err_thr": Spec(5.0, inert=True),
    }


TRAIN_SCHEMA = {
    "checkpoint_name": Spec(types=(str,)),
    "output_root": "ckpts",
    "epoch": Spec(10, minimum=1),
    "epoch_step": Spec(10000, minimum=1),
    "lr_decay_step": Spec(9, minimum=1),
    "lr_decay_factor": 0.1,
    "log_freq": Spec(1000, minimum=1),
    "save_freq": Spec(100, minimum=1, doc="refresh the current epoch's weight folder every N "
                                          "steps (the original's fixed 100)"),
    "grad_clip": False,
    "clip_norm": 10.0,
    "test_kp": Spec(False, inert=True),
    "no_cuda": Spec([], types=(list,), inert=True),
    "optimal_modules": Spec(["backbone"], types=(list,)),
    "optimal_lrs": Spec([1e-4], types=(list,)),
    "optimizer": Spec("Adam", choices=("Adam", "AdamW", "SGD")),
    "model": Spec("SCFeatModel", choices=tuple(MODELS)),
    "model_config": Dynamic(lambda root, raw: model_schema(raw)),
    "data": Spec("MegaDepth_SIFT", choices=tuple(DATASETS)),
    "data_config_train": Dynamic(class_section(DATASETS, "data")),
    "val_config": Dynamic(val_schema, default=None),
    "preprocess_train": Spec(None, types=(str, type(None))),
    "preprocess_train_config": Dynamic(class_section(PREPROCESSORS, "preprocess_train")),
    "losses": Spec(types=(list,)),
    "losses_weight": Spec(None, types=(list, type(None))),
    "tb_component": Spec([], types=(list,)),
    "load_path": Spec(None, types=(str, type(None))),
    # Our additions (docs/configs.md, "Config keys").
    "seed": 0,
    "device": Spec("auto", choices=DEVICE_CHOICES),
    "deterministic": False,
    "max_nonfinite_steps": Spec(10, minimum=0),
    "max_steps_this_run": Spec(None, types=(int, type(None)), minimum=1),
    "max_unusable_fraction": Spec(0.5, minimum=0, maximum=1),
    "amp": Spec(False, doc="bf16 autocast for the network (CUDA; see utils/acceleration.py)"),
    "compile": Spec(False, doc="torch.compile the network (CUDA; see utils/acceleration.py)"),
}


def loss_sections(conf: dict) -> dict:
    """``<LossName>_config`` keys for the losses the config names."""
    return {f"{name}_config": lookup(LOSSES, name, "losses").default_conf for name in conf["losses"]}


def load_train_config(path: str | Path, overrides: list[str] | tuple = (),
                      inert_keys: list[str] | None = None) -> dict:
    """The training config of ``path`` with ``KEY=VALUE`` overrides, validated (the loss
    sections from ``losses``; with ``load_path``, model settings left open inherited from the
    checkpoint's run) and checked across keys (:func:`check_train_config`). ``inert_keys``
    receives the keys accepted only for compatibility."""
    conf = load_config(path, overrides, TRAIN_SCHEMA, loss_sections, prepare=inherit_model_config,
                       inert_keys=inert_keys)
    check_train_config(conf, str(path))
    return conf


def check_load_path(load_path: str, example: str, fail) -> None:
    """``load_path`` is a checkpoint folder with both parts (``fail(message)`` otherwise)."""
    folder = Path(load_path)
    names = " and ".join(path.name for path in checkpoint_files(folder))
    if not folder.is_dir():
        fail(f"key 'load_path': checkpoint folder '{folder}' does not exist (expected a folder "
             f"with {names}, e.g. {example})")
    for path in checkpoint_files(folder):
        if not path.is_file():
            fail(f"key 'load_path': '{path}' does not exist (expected a checkpoint folder "
                 f"with {names})")


def check_train_config(conf: dict, origin: str) -> None:
    """The training rules that span keys (a per-key schema cannot express them)."""
    def fail(message: str) -> None:
        raise SCFeatError(f"{origin}: {message}")

    if not conf["losses"]:
        fail("key 'losses' must name at least one loss")
    weights = conf["losses_weight"]
    if weights is not None and len(weights) != len(conf["losses"]):
        fail(f"key 'losses_weight' has {len(weights)} entries for {len(conf['losses'])} losses")
    bad = [m for m in conf["optimal_modules"] if m not in TRAINABLE_MODULES]
    if bad or not conf["optimal_modules"]:
        fail(f"key 'optimal_modules' must list modules from {list(TRAINABLE_MODULES)}, got "
             f"{conf['optimal_modules']}")
    if len(conf["optimal_lrs"]) != len(conf["optimal_modules"]):
        fail(f"key 'optimal_lrs' has {len(conf['optimal_lrs'])} entries for "
             f"{len(conf['optimal_modules'])} optimal_modules")
    if conf["load_path"] is not None:
        check_load_path(conf["load_path"], "ckpts/descriptor-100k/010", fail)
    conf["tb_component"] = [component_name(name, conf["losses"], fail)
                            for name in conf["tb_component"]]


def component_name(name: object, losses: list[str], fail) -> str:
    """A ``tb_component`` entry as the losses report it: the original's spaced names (``'cor
    max'``) with ``_`` (``cor_max``); ``fail(message)`` when no loss of ``losses`` reports it,
    with the closest name."""
    reported = list(losses) + [c for loss in losses for c in lookup(LOSSES, loss, "losses").components]
    canonical = "_".join(str(name).split())
    if canonical not in reported:
        close = difflib.get_close_matches(canonical, reported, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        fail(f"key 'tb_component': {name!r} is not reported by the losses {losses}{hint} "
             f"(reported: {', '.join(reported)})")
    return canonical


# -------------------------------------------------------------------------------- extraction

EXTRACT_SCHEMA = {
    "output_root": Spec(types=(str,), doc="outputs go to ckpts/<output_root> (desc/, image/, "
                                          "features.h5); an absolute path stays as it is"),
    "postfix": Spec("scfeat", doc="feature files are desc/<seq>/<k>.ppm.<postfix>"),
    "load_path": Spec(types=(str,), doc="checkpoint folder with backbone.pth, localheader.pth"),
    "loss_distance": Spec("cos", choices=("cos",)),  # the original's key; descriptors are unit norm
    "output_desc": True,
    "output_img": False,
    "model": Spec("SCFeatModel", choices=tuple(MODELS)),
    "model_config": Dynamic(lambda root, raw: model_schema(raw)),
    "data": Spec("HPatch_SIFT", choices=tuple(EXTRACTION_DATASETS)),
    "data_config_extract": Dynamic(class_section(EXTRACTION_DATASETS, "data")),
    "local_thr": Spec(None, types=(float, type(None)), inert=True),
    "use_sift": False,
    "detector": Spec("generate_kpts_single", choices=tuple(DETECTORS)),
    "detector_config": Dynamic(lambda root, raw: detector_schema(root["detector"])),
    # Aachen_Day_Night: the query images' detector settings (absent or empty: detector_config).
    "detector_config_query": Dynamic(
        lambda root, raw: detector_schema(root["detector"]) if raw else {}, default=None),
    "save_npz": Spec(None, types=(bool, type(None)),
                     doc="true: npz files (format npz); false: one features.h5 (format h5)"),
    # Our additions.
    "descriptor_map": Spec("desc_map", choices=DESCRIPTOR_MAPS),
    "format": Spec(None, types=(str, type(None)), choices=FEATURE_FORMATS + (None,),
                   doc="null: npz, or h5 with save_npz: false"),
    "device": Spec("auto", choices=DEVICE_CHOICES),
    "amp": Spec(False, doc="bf16 autocast (CUDA; see utils/acceleration.py)"),
    "compile": Spec(False, doc="torch.compile the network (CUDA; see utils/acceleration.py)"),
}


def load_extract_config(path: str | Path, overrides: list[str] | tuple = (),
                        inert_keys: list[str] | None = None) -> dict:
    """The extraction config of ``path`` with ``KEY=VALUE`` overrides, validated (model
    settings left open are inherited from the checkpoint's run) and checked across keys and
    against the checkpoint files (:func:`check_extract_config`). ``inert_keys`` receives the
    keys accepted only for compatibility."""
    conf = load_config(path, overrides, EXTRACT_SCHEMA, prepare=inherit_model_config,
                       inert_keys=inert_keys)
    check_extract_config(conf, str(path))
    return conf


def check_extract_config(conf: dict, origin: str) -> None:
    """The extraction rules that span keys, and the checkpoint files (before any model is
    built)."""
    def fail(message: str) -> None:
        raise SCFeatError(f"{origin}: {message}")

    if not conf["output_root"].strip():
        fail("key 'output_root' must be a non-empty folder name")
    if not conf["postfix"] or any(c in conf["postfix"] for c in "/\\"):
        fail(f"key 'postfix' must be a non-empty file suffix without '/', got {conf['postfix']!r}")
    check_load_path(conf["load_path"], "ckpts/keypoint-1k/001", fail)
    data = conf["data_config_extract"]
    if data.get("use_sift") and not conf["use_sift"]:
        fail("key 'data_config_extract.use_sift' is true but 'use_sift' is false; set only the "
             "top-level 'use_sift'")
    if conf["use_sift"] and "use_sift" not in EXTRACTION_DATASETS[conf["data"]].default_conf:
        fail(f"key 'use_sift' (SIFT keypoints) is only for data: HPatch_SIFT, got data: "
             f"{conf['data']}")
    make_detector(conf["detector"], conf["detector_config"], f"{origin}: key 'detector_config'")
    if conf["detector_config_query"]:
        if conf["data"] != "Aachen_Day_Night":
            fail(f"key 'detector_config_query' (the query images' detector settings) is only for "
                 f"data: Aachen_Day_Night, got data: {conf['data']}")
        make_detector(conf["detector"], conf["detector_config_query"],
                      f"{origin}: key 'detector_config_query'")
    conf["format"] = feature_format(conf, fail)


def feature_format(conf: dict, fail) -> str:
    """``format``, or the original's ``save_npz`` (true: npz, false: h5) when ``format`` is
    null; npz when neither is given. ``fail(message)`` when the two disagree."""
    implied = None if conf["save_npz"] is None else ("npz" if conf["save_npz"] else "h5")
    if conf["format"] is not None and implied is not None and conf["format"] != implied:
        fail(f"key 'format' is {conf['format']} but 'save_npz: {str(conf['save_npz']).lower()}' "
             f"means {implied}; give one of the two")
    return conf["format"] or implied or "npz"


# -------------------------------------------------------------------------------- evaluation

EVAL_HPATCHES_SCHEMA = {
    **hpatches_defaults,
    "max_keypoints": Spec(None, types=(int, type(None)), minimum=1,
                          doc="every method's keypoint budget; null: each method's default"),
    "compare_caches": Spec(None, types=(list, type(None))),
    "output_plot": Spec(hpatches_defaults["output_plot"], types=(str, type(None))),
    "thresholds": Spec(hpatches_defaults["thresholds"], choices=tuple(range(1, 16))),
}


def load_eval_hpatches_config(path: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """The HPatches evaluation config of ``path`` (``evaluate_hpatches.py``), validated; the
    ``methods`` entries are checked here so that an error names the file."""
    conf = load_config(path, overrides, EVAL_HPATCHES_SCHEMA)
    try:
        parse_methods(conf["methods"])
    except SCFeatError as exc:
        raise SCFeatError(f"{path}: {exc}") from None
    return conf


OPTIONAL_PATH = (str, type(None))
EVAL_POSE_SCHEMA = {
    **pose_defaults,
    "layout": Spec(pose_defaults["layout"], choices=LAYOUTS),
    "resize": Spec(pose_defaults["resize"], types=(int, type(None)),
                   doc="longer image side in pixels; null keeps the size"),
    "max_keypoints": Spec(pose_defaults["max_keypoints"], types=(int, type(None)), minimum=1,
                          doc="every method's keypoint budget; null: each method's default"),
    "ratio": Spec(None, types=(float, type(None)), doc="Lowe's ratio test; null: none"),
    "estimator": Spec(pose_defaults["estimator"], choices=ESTIMATORS),
    "ransac_threshold": Spec(None, types=(float, type(None)),
                             doc="pixels; null: 0.5 for opencv, 1.0 for poselib"),
    "output_json": Spec(pose_defaults["output_json"], types=OPTIONAL_PATH),
    "output_plot": Spec(pose_defaults["output_plot"], types=OPTIONAL_PATH),
    "device": Spec("auto", choices=DEVICE_CHOICES),
    "colmap_pairs": {  # layout colmap; the rules: dataloader/colmap_model.py, docs/data.md
        "rule": Spec(COLMAP_PAIRS["rule"], choices=PAIR_RULES),
        "min_overlap": Spec(COLMAP_PAIRS["min_overlap"], minimum=0, maximum=1,
                            doc="points rule: least shared-point ratio"),
        "max_overlap": Spec(COLMAP_PAIRS["max_overlap"], minimum=0, maximum=1,
                            doc="points rule: largest shared-point ratio"),
        "max_angle": Spec(COLMAP_PAIRS["max_angle"], above=0, maximum=180,
                          doc="cameras rule: degrees between the viewing directions"),
        "min_view_overlap": Spec(COLMAP_PAIRS["min_view_overlap"], minimum=0, maximum=1,
                                 doc="cameras rule: least view overlap"),
        "grid": Spec(COLMAP_PAIRS["grid"], minimum=2, doc="cameras rule: points per side"),
        "depth": Spec(None, types=(float, type(None)),
                      doc="cameras rule: scene depth (model units); null: from the cameras"),
    },
}


def load_eval_pose_config(path: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """The relative-pose evaluation config of ``path`` (``evaluate_pose.py``), validated."""
    return load_config(path, overrides, EVAL_POSE_SCHEMA)
