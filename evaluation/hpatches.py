"""HPatches-sequences evaluation with the D2-Net protocol (mean matching accuracy, MMA).

Protocol, so that numbers compare with published ones:

* the 8 high-resolution sequences in `HIGH_RES_SEQUENCES` are excluded (108 remain);
* in each sequence image 1 is matched to images 2..6 by mutual nearest neighbours of the
  descriptors (dot product), or by the method's matcher (``+lightglue``, see
  :mod:`evaluation.methods`);
* a match is correct at threshold t when the image-1 keypoint projected by ``H_1_k`` lands
  within t px (``<=``) of its match; the accuracy is averaged per pair first (a pair without
  matches counts 0), then over pairs.

A result cache has D2-Net's format: ``np.save`` of an object array
``(i_err, v_err, [seq_type, n_feats, n_matches])`` where ``i_err[t]`` / ``v_err[t]`` are the
per-pair accuracies at t = 1..15 summed over illumination / viewpoint pairs, ``seq_type`` the
first letter of each pair's sequence, ``n_feats`` the features of every image and
``n_matches`` the matches of every pair.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from evaluation.matching import Features, mnn_matcher, read_features
from evaluation.matching import require_files as _require_files
from evaluation.methods import SYNTAX, Matcher, Method, make_matcher, method_features, parse_method
from utils.atomic import atomic_open, atomic_target
from utils.cli import progress, resolve_device
from utils.config import Spec, section_config
from utils.files import files_signature
from utils.image import load_image
from utils.errors import SCFeatError

logger = logging.getLogger(__name__)

HIGH_RES_SEQUENCES = ("i_contruction", "i_crownnight", "i_dc", "i_pencils", "i_whitebuilding",
                      "v_artisans", "v_astronautis", "v_talent")
CACHE_THRESHOLDS = np.arange(1, 16)  # D2-Net caches t = 1..15 px
TARGET_IMAGES = range(2, 7)
# Bump when the protocol or the cache content changes, so older caches are never reused.
PROTOCOL_VERSION = "d2net-hpatches-mma-v2"
METHOD_KEYS = {"name", "features", "postfix"}

default_conf = {
    "data_path": "data/hpatches-sequences-release",
    # each a method name (evaluation/methods.py: sift, disk, aliked, xfeat, disk+lightglue, a
    # checkpoint folder, ...), extracted from the images and cached under cache_dir/features, or
    # a {name, features, postfix} dict (features: <features>/<seq>/<k>.ppm.<postfix>)
    "methods": Spec(["sift"], types=(list,), check=lambda entries: methods_problem(entries)),
    # keypoint budget of every method named in 'methods'; None: each method's default
    # (evaluation/methods.py: all for SIFT, 2048 for DISK and ALIKED, 4096 for XFeat)
    "max_keypoints": Spec(None, types=(int, type(None)), minimum=1,
                          doc="every method's keypoint budget; null: each method's default"),
    # result caches (.npy) to plot beside; None: none here (evaluate_hpatches.py reads None as
    # the published ones in ../shared/reference/hpatches_cache when that folder exists)
    "compare_caches": Spec(None, types=(list, type(None))),
    "cache_dir": "outputs/hpatches_cache",
    "output_plot": Spec("outputs/hpatches_mma.png", types=(str, type(None))),
    "thresholds": Spec(10, choices=tuple(range(1, 16))),  # largest t reported and plotted
    "exclude_high_res": True,
}

Cache = tuple[dict, dict, list]
# (seq, k) → Features, or (keypoints N×2, descriptors N×D)
FeatureReader = Callable[[str, int], Features | tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class FeatureFolder:
    """Features written by the extraction: ``<features>/<seq>/<k>.ppm.<postfix>``, matched by
    mutual nearest neighbours."""
    name: str
    features: Path
    postfix: str

    @property
    def label(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------
# dataset layout
# ---------------------------------------------------------------------------------------------

def list_sequences(data_path: str | Path, exclude_high_res: bool = True) -> list[str]:
    """Sorted ``i_*`` / ``v_*`` sequence folders of ``data_path``."""
    root = Path(data_path)
    if not root.is_dir():
        raise SCFeatError(f"HPatches data_path {root} is not a folder "
                          f"(expected <data_path>/<i_|v_sequence>/1.ppm ... H_1_6)")
    sequences = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and re.match(r"^[iv]_", p.name))
    if exclude_high_res:
        sequences = [s for s in sequences if s not in HIGH_RES_SEQUENCES]
    if not sequences:
        raise SCFeatError(f"no HPatches sequences (folders named i_* or v_*) under {root}")
    return sequences


def homography_path(data_path: Path, seq: str, k: int) -> Path:
    return data_path / seq / f"H_1_{k}"


def image_path(data_path: Path, seq: str, k: int) -> Path:
    return data_path / seq / f"{k}.ppm"


def feature_path(features_root: Path, seq: str, k: int, postfix: str) -> Path:
    return features_root / seq / f"{k}.ppm.{postfix}"


def read_homography(path: Path) -> np.ndarray:
    """A ``3×3`` homography from a whitespace-separated text file."""
    try:
        homography = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as error:
        raise SCFeatError(f"cannot read homography {path}: {error}") from error
    if homography.shape != (3, 3):
        raise SCFeatError(f"homography {path} must hold a 3×3 matrix, got shape "
                          f"{homography.shape}")
    return homography


# ---------------------------------------------------------------------------------------------
# matching and accuracy
# ---------------------------------------------------------------------------------------------

def projection_errors(keypoints1: np.ndarray, keypoints2: np.ndarray, matches: np.ndarray,
                      homography: np.ndarray) -> np.ndarray:
    """Distances ``K`` between ``H·keypoints1[m0]`` and ``keypoints2[m1]`` for matches ``K×2``."""
    points1 = keypoints1[matches[:, 0]]
    projected = np.concatenate([points1, np.ones((len(points1), 1))], axis=1) @ homography.T
    projected = projected[:, :2] / projected[:, 2:]
    return np.linalg.norm(keypoints2[matches[:, 1]] - projected, axis=1)


def pair_accuracies(errors: np.ndarray, thresholds: np.ndarray = CACHE_THRESHOLDS) -> np.ndarray:
    """Fraction of matches with error ``<= t`` for each t; all 0 for a pair without matches."""
    if len(errors) == 0:
        return np.zeros(len(thresholds))
    return (errors[None, :] <= thresholds[:, None]).mean(axis=1)


def evaluate_sequences(data_path: Path, sequences: list[str], read_features: FeatureReader,
                       device: torch.device | str = "cpu", match: Matcher | None = None) -> Cache:
    """Run the protocol; ``read_features(seq, k)`` gives image k's :class:`Features` (or
    ``(keypoints N×2, descriptors N×D)``), ``match(features1, features_k) → K×2`` the matches
    (default: mutual nearest neighbours on ``device``).

    Returns the cache tuple ``(i_err, v_err, [seq_type, n_feats, n_matches])``.
    """
    _require_files([homography_path(data_path, s, k) for s in sequences for k in TARGET_IMAGES],
                   "homography")
    if match is None:
        match = mnn_matcher(device)
    i_err = {np.int64(t): np.float64(0) for t in CACHE_THRESHOLDS}
    v_err = {np.int64(t): np.float64(0) for t in CACHE_THRESHOLDS}
    seq_type, n_feats, n_matches = [], [], []
    for seq in progress(sequences, "HPatches"):
        first = Features(*read_features(seq, 1))
        n_feats.append(len(first.keypoints))
        for k in TARGET_IMAGES:
            other = Features(*read_features(seq, k))
            n_feats.append(len(other.keypoints))
            if min(len(first.keypoints), len(other.keypoints)) and \
                    first.descriptors.shape[1] != other.descriptors.shape[1]:
                raise SCFeatError(f"sequence {seq}: descriptors of image 1 and {k} differ in size "
                                  f"({first.descriptors.shape[1]} vs {other.descriptors.shape[1]})")
            matches = match(first, other)
            homography = read_homography(homography_path(data_path, seq, k))
            errors = projection_errors(first.keypoints, other.keypoints, matches, homography)
            accuracies = pair_accuracies(errors)
            target = i_err if seq[0] == "i" else v_err
            for t, accuracy in zip(CACHE_THRESHOLDS, accuracies):
                target[np.int64(t)] += accuracy
            seq_type.append(seq[0])
            n_matches.append(len(matches))
    return i_err, v_err, [np.array(seq_type), np.array(n_feats), np.array(n_matches)]


# ---------------------------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------------------------

def save_cache(path: Path, cache: Cache) -> None:
    """Write a cache atomically (temp file + rename), D2-Net's object-array layout."""
    array = np.empty(3, dtype=object)
    array[0], array[1], array[2] = cache[0], cache[1], list(cache[2])
    with atomic_open(path) as handle:
        np.save(handle, array, allow_pickle=True)


def load_cache(path: str | Path) -> Cache:
    """Read and check a D2-Net-format cache."""
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"HPatches cache {path} does not exist")
    try:
        array = np.load(path, allow_pickle=True)
        i_err, v_err, (seq_type, n_feats, n_matches) = array
    except Exception as error:
        raise SCFeatError(f"{path} is not an HPatches cache (expected np.save of "
                          f"(i_err, v_err, [seq_type, n_feats, n_matches])): {error}") from error
    if not isinstance(i_err, dict) or not isinstance(v_err, dict) \
            or any(int(t) not in {int(k) for k in d} for d in (i_err, v_err)
                   for t in CACHE_THRESHOLDS):
        raise SCFeatError(f"HPatches cache {path}: i_err and v_err must be dicts with thresholds "
                          f"{CACHE_THRESHOLDS[0]}..{CACHE_THRESHOLDS[-1]}")
    return i_err, v_err, [np.asarray(seq_type), np.asarray(n_feats), np.asarray(n_matches)]


def summarize(cache: Cache, max_threshold: int = 10) -> dict:
    """MMA at t = 1..max_threshold (overall, illumination, viewpoint), mean features/matches."""
    i_err, v_err, (seq_type, n_feats, n_matches) = cache
    errors_i = {int(t): float(v) for t, v in i_err.items()}
    errors_v = {int(t): float(v) for t, v in v_err.items()}
    n_i = int(np.sum(seq_type == "i"))
    n_v = int(np.sum(seq_type == "v"))
    ts = range(1, max_threshold + 1)

    def ratio(total: float, count: int) -> float:
        return total / count if count else float("nan")

    return {
        "thresholds": np.array(ts),
        "mma": np.array([ratio(errors_i[t] + errors_v[t], n_i + n_v) for t in ts]),
        "mma_i": np.array([ratio(errors_i[t], n_i) for t in ts]),
        "mma_v": np.array([ratio(errors_v[t], n_v) for t in ts]),
        "pairs_i": n_i,
        "pairs_v": n_v,
        "mean_features": float(np.mean(n_feats)) if len(n_feats) else 0.0,
        "mean_matches": float(np.mean(n_matches)) if len(n_matches) else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------

def methods_problem(entries: object) -> str | None:
    """What is wrong with a ``methods`` list (:func:`parse_hpatches_methods`), or ``None``."""
    try:
        parse_hpatches_methods(entries)
    except SCFeatError as exc:
        return re.sub(r"^config key '([^']*)'", r"\1", str(exc))
    return None


def parse_hpatches_methods(entries: list) -> list[Method | FeatureFolder]:
    """Config ``methods`` → :class:`evaluation.methods.Method` s (names) and
    :class:`FeatureFolder` s (``{name, features, postfix}``), with distinct names."""
    if not isinstance(entries, list) or not entries:
        raise SCFeatError(f"config key 'methods': expected a non-empty list of methods ({SYNTAX}) "
                          f"or {{name, features, postfix}} entries")
    methods = []
    for index, entry in enumerate(entries):
        where = f"config key 'methods[{index}]'"
        if isinstance(entry, str):
            methods.append(parse_method(entry, where))
            continue
        if not isinstance(entry, dict) or set(entry) != METHOD_KEYS \
                or not all(isinstance(entry[key], str) and entry[key] for key in METHOD_KEYS):
            raise SCFeatError(f"{where}: expected a method ({SYNTAX}) or a mapping with exactly "
                              f"the non-empty strings {sorted(METHOD_KEYS)}, got {entry!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", entry["name"]):
            raise SCFeatError(f"{where}.name: {entry['name']!r} may only hold letters, digits, "
                              f"'.', '_' and '-' (it names the cache file)")
        methods.append(FeatureFolder(entry["name"], Path(entry["features"]), entry["postfix"]))
    names = [m.label for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SCFeatError(f"config key 'methods': names must be unique, repeated: {duplicates}")
    return methods


def method_feature_files(method: Method, data_path: Path, sequences: list[str],
                         cache_dir: str | Path, max_keypoints: int | None = None,
                         device: torch.device | str = "cpu") -> dict[tuple[str, int], Path]:
    """The feature files of ``method`` for images 1..6 of every sequence, extracted once into
    ``<cache_dir>/features/<features label>-<hash>/<seq>/<k>.npz`` (keyed by what makes the
    features, the image files and the keypoint budget)."""
    images = {(s, k): image_path(data_path, s, k) for s in sequences for k in range(1, 7)}
    _require_files(list(images.values()), "image")
    loaders = {f"{s}/{k}": (lambda path=path: (load_image(path), {}))
               for (s, k), path in images.items()}
    files = method_features(method, loaders, list(images.values()), Path(cache_dir) / "features",
                            "hpatches", max_keypoints, device)
    return {(s, k): files[f"{s}/{k}"] for s, k in images}


def evaluate_method(method: Method | FeatureFolder, data_path: str | Path, sequences: list[str],
                    cache_dir: str | Path, device: torch.device | str = "cpu",
                    max_keypoints: int | None = None) -> tuple[Cache, Path]:
    """The cache of one method, reused when its signature matches, else computed and saved.

    A :class:`Method` is extracted from the images first (:func:`method_feature_files`, with
    the budget ``max_keypoints`` or the method's default). Returns ``(cache, cache_path)``.
    Nothing is written unless the whole evaluation succeeds.
    """
    data_path = Path(data_path)
    if isinstance(method, FeatureFolder):
        if not method.features.is_dir():
            raise SCFeatError(f"features folder {method.features} of method '{method.name}' "
                              f"does not exist (run the extraction first, or fix config key "
                              f"'methods')")
        files = {(s, k): feature_path(method.features, s, k, method.postfix)
                 for s in sequences for k in range(1, 7)}
        _require_files(list(files.values()),
                       f"feature ('{method.name}', <seq>/<k>.ppm.<{method.postfix}>)")
        matcher = "mnn"
    else:
        files = method_feature_files(method, data_path, sequences, cache_dir, max_keypoints,
                                     device)
        matcher = method.matcher

    def read(seq: str, k: int) -> Features:
        return read_features(files[(seq, k)])

    homographies = [homography_path(data_path, s, k) for s in sequences for k in TARGET_IMAGES]
    _require_files(homographies, "homography")
    signature = files_signature(list(files.values()) + homographies,
                                f"{PROTOCOL_VERSION}\nmatcher {matcher}")
    cache_path = Path(cache_dir) / f"{method.label}-{signature[:16]}.npy"
    if cache_path.is_file():
        logger.info("%s: reusing %s", method.label, cache_path)
        return load_cache(cache_path), cache_path
    logger.info("%s: evaluating %d sequences", method.label, len(sequences))
    match = None if isinstance(method, FeatureFolder) else make_matcher(method, device)
    cache = evaluate_sequences(data_path, sequences, read, device, match)
    save_cache(cache_path, cache)
    return cache, cache_path


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def format_table(results: dict[str, dict], max_threshold: int = 10) -> str:
    """Text table: per method, MMA@1..max for all / illumination / viewpoint pairs."""
    width = max([len("method")] + [len(name) for name in results])
    header = (f"{'method':<{width}}  {'pairs':<9}"
              + "".join(f"{'@' + str(t):>7}" for t in range(1, max_threshold + 1))
              + f"{'feats':>9}{'matches':>9}")
    lines = [header, "-" * len(header)]
    for name, summary in results.items():
        rows = [("all", summary["mma"], summary["pairs_i"] + summary["pairs_v"]),
                ("illum", summary["mma_i"], summary["pairs_i"]),
                ("view", summary["mma_v"], summary["pairs_v"])]
        for row, (split, values, pairs) in enumerate(rows):
            label = name if row == 0 else ""
            tail = (f"{summary['mean_features']:>9.0f}{summary['mean_matches']:>9.0f}"
                    if row == 0 else "")
            lines.append(f"{label:<{width}}  {split + ' ' + str(pairs):<9}"
                         + "".join(f"{v:>7.3f}" for v in values) + tail)
    return "\n".join(lines)


def plot_mma(results: dict[str, dict], path: str | Path, max_threshold: int = 10) -> None:
    """MMA curves (overall / illumination / viewpoint) of every method, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, axes = plt.subplots(1, 3, figsize=(15, 5))
    for axis, (key, title) in zip(axes, [("mma", "Overall"), ("mma_i", "Illumination"),
                                         ("mma_v", "Viewpoint")]):
        for name, summary in results.items():
            axis.plot(summary["thresholds"], summary[key], linewidth=2, label=name)
        axis.set_title(title)
        axis.set_xlim(1, max_threshold)
        axis.set_ylim(0, 1)
        axis.set_xlabel("threshold [px]")
        axis.grid()
    axes[0].set_ylabel("MMA")
    axes[0].legend()
    figure.tight_layout()
    try:
        with atomic_target(path) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(figure)


def run_evaluation(conf: dict, print_fn: Callable[[str], None] = print) -> dict[str, dict]:
    """Evaluate the configured methods, add the comparison caches, print a table, plot.

    ``conf`` holds the keys of `default_conf`. Returns ``{label: summary}``.
    """
    conf = section_config(default_conf, conf, "evaluate_hpatches config")
    max_threshold = conf["thresholds"]
    if not isinstance(max_threshold, int) or not 1 <= max_threshold <= CACHE_THRESHOLDS[-1]:
        raise SCFeatError(f"config key 'thresholds': expected an integer in 1.."
                          f"{CACHE_THRESHOLDS[-1]}, got {max_threshold!r}")
    methods = parse_hpatches_methods(conf["methods"])
    compare = conf["compare_caches"]
    compare_paths = [] if compare is None else compare
    if not isinstance(compare_paths, list) or not all(isinstance(p, (str, Path))
                                                      for p in compare_paths):
        raise SCFeatError("config key 'compare_caches': expected a list of .npy paths or null")
    compare_caches = {Path(p).stem: load_cache(p) for p in compare_paths}  # fail before work

    sequences = list_sequences(conf["data_path"], conf["exclude_high_res"])
    n_illum = sum(s.startswith("i_") for s in sequences)
    print_fn(f"HPatches: {len(sequences)} sequences ({n_illum} illumination, "
             f"{len(sequences) - n_illum} viewpoint) in {conf['data_path']}")
    device = resolve_device("auto")
    results = {}
    for method in methods:
        cache, cache_path = evaluate_method(method, conf["data_path"], sequences,
                                            conf["cache_dir"], device, conf["max_keypoints"])
        print_fn(f"{method.label}: cache {cache_path}")
        results[method.label] = summarize(cache, max_threshold)
    for name, cache in compare_caches.items():
        label = name if name not in results else f"{name} (cache)"
        results[label] = summarize(cache, max_threshold)
    print_fn(format_table(results, max_threshold))
    if conf["output_plot"]:
        plot_mma(results, conf["output_plot"], max_threshold)
        print_fn(f"plot: {conf['output_plot']}")
    return results
