"""Matching accuracy on real photographs that training never uses, at their own
resolution: ``python -m tools.real_photos [--methods M ...] [--checkpoints LABEL=DIR ...]
[--max-keypoints N] [--out DIR]``.

From each held-out photograph of scikit-image's wheel (``HELD_OUT_PHOTOS``: none of them is a
training photograph, ``tools.synthetic``'s ``MEGADEPTH_PHOTOS``) it writes an illumination and
a viewpoint sequence in the HPatches layout with ``tools.synthetic.make_hpatches_sequence``, at a
size chosen so that the photograph is not rescaled (the sequence generator covers 1.4× the
output size, so the output is about 1/1.4 of the photograph; sizes are multiples of 16, so the
extraction crops nothing). ``--methods`` (default ``sift disk aliked xfeat``) are any methods of
``evaluation/methods.py`` extracted from the images (each with its own keypoint budget unless
``--max-keypoints``); the ``--checkpoints`` are extracted by the demo's extraction
(``tools.demo_stages.extract``: ``config/demo/extract.yaml``). The evaluation is
``evaluation.hpatches`` (D2-Net protocol, MMA@1..10), then per photograph (MMA@3 and keypoints per image: a method that
finds a handful of keypoints on a low-texture photograph still gets a high MMA from them); the
last table gives each method's keypoints per image and their share within ``BORDER_PX`` px of
the image border (a collapsed detector puts most there).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from utils.errors import SCFeatError
from utils.image import load_image

BORDER_PX = 8
PHOTO_THRESHOLD = 3  # px, the per-photograph table's MMA
# name → (file in skimage/data, centre crop H×W or None, sequence size H×W (multiples of 16))
HELD_OUT_PHOTOS = {
    "motorcycle_right": ("motorcycle_right.png", None, (352, 528)),  # 500×741 photograph
    "cell": ("cell.png", None, (464, 384)),                          # 660×550 microscopy, grey
    "retina": ("retina.jpg", (720, 720), (512, 512)),                # 1411×1411 fundus photo
    # the demo's photographs (demo.py): textured, and small enough for a CPU
    "camera": ("camera.png", (320, 448), (224, 320)),                # 512×512, grey
    "coins": ("coins.png", None, (208, 272)),                        # 303×384, grey
    "motorcycle_centre": ("motorcycle_right.png", (320, 448), (224, 320)),
}
DEFAULT_PHOTOS = ("motorcycle_right", "cell", "retina")  # python -m tools.real_photos


def load_held_out(name: str) -> np.ndarray:
    """One of ``HELD_OUT_PHOTOS`` → ``H×W×3`` uint8 RGB (centre-cropped when so listed)."""
    from tools.synthetic import MEGADEPTH_PHOTOS, PHOTO_FILES

    file, crop, _ = HELD_OUT_PHOTOS[name]
    assert file not in {PHOTO_FILES[p] for p in MEGADEPTH_PHOTOS}
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SCFeatError("tools.real_photos needs scikit-image (pip install scikit-image)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / file
    image = load_image(path)
    if crop is not None:
        top, left = (image.shape[0] - crop[0]) // 2, (image.shape[1] - crop[1]) // 2
        image = np.ascontiguousarray(image[top:top + crop[0], left:left + crop[1]])
    return image


def make_sequences(out: Path, photos: Sequence[str], seed: int) -> Path:
    """``<out>`` with ``i_<photo>`` and ``v_<photo>`` sequences (made once; atomic)."""
    from tools.synthetic import atomic_directory, make_hpatches_sequence

    if out.is_dir() and any(out.iterdir()):
        return out
    with atomic_directory(out, overwrite=False) as tmp:
        for index, name in enumerate(photos):
            photo = load_held_out(name)
            size = HELD_OUT_PHOTOS[name][2]
            for viewpoint in (False, True):
                rng = np.random.default_rng([seed, index, int(viewpoint)])
                make_hpatches_sequence(tmp / f"{'v' if viewpoint else 'i'}_{name}", rng, photo,
                                       viewpoint, size)
    return out


def border_share(keypoints_of: Callable[[Path], np.ndarray], sequences: Path) -> tuple[float, float]:
    """Mean keypoints per image and the share of them within ``BORDER_PX`` px of the border,
    over every image of ``sequences``; ``keypoints_of(image file) → N×2``."""
    counts, near = [], []
    for image_file in sorted(sequences.glob("*/*.ppm")):
        height, width = load_image(image_file, grey=True).shape
        keypoints = keypoints_of(image_file)
        x, y = keypoints[:, 0], keypoints[:, 1]
        close = (x < BORDER_PX) | (y < BORDER_PX) | (x > width - 1 - BORDER_PX) \
            | (y > height - 1 - BORDER_PX)
        counts.append(len(keypoints))
        near.append(int(close.sum()))
    return float(np.mean(counts)), float(np.sum(near) / max(np.sum(counts), 1))


def parse_checkpoints(entries: Sequence[str]) -> dict[str, Path]:
    from evaluation.methods import EXTRACTORS

    checkpoints = {}
    for entry in entries:
        label, sep, folder = entry.partition("=")
        if not sep or not label.isidentifier() or label in EXTRACTORS:
            raise SCFeatError(f"--checkpoints {entry!r}: expected LABEL=DIR with a label of "
                              f"letters, digits and '_' (not a method name such as 'sift'), e.g. "
                              f"trained=ckpts/run/001")
        path = Path(folder)
        if not ((path / "backbone.pth").is_file() and (path / "localheader.pth").is_file()):
            raise SCFeatError(f"--checkpoints {entry!r}: {path} is not a checkpoint folder "
                              f"(expected backbone.pth and localheader.pth)")
        checkpoints[label] = path
    return checkpoints


def evaluate_photos(methods: Sequence[str], checkpoints: dict[str, Path], out: Path,
                    photos: Sequence[str], seed: int, device: str,
                    max_keypoints: int | None = None) -> dict[str, dict]:
    """Make the sequences, evaluate every method and checkpoint (printing the MMA table), then
    print each method's MMA@3 and keypoints per image on each photograph, and its keypoints
    per image and their share near the border. Returns ``{label: summary}``."""
    from evaluation.hpatches import (evaluate_method, list_sequences, method_feature_files,
                                     parse_hpatches_methods, run_evaluation, summarize)
    from evaluation.matching import read_feature_file
    from tools import demo_stages

    unknown = [p for p in photos if p not in HELD_OUT_PHOTOS]
    if unknown or not photos:
        raise SCFeatError(f"--photos: unknown {unknown}; expected some of {list(HELD_OUT_PHOTOS)}")
    parsed = parse_hpatches_methods(list(methods)) if methods else []  # checked before any work
    sequences = make_sequences(out / f"sequences-s{seed}-{'-'.join(photos)}", photos, seed)
    result = demo_stages.DemoResult()
    features = {label: demo_stages.extract(label, folder, f"photos-{label}", out, sequences,
                                           device, result)
                for label, folder in checkpoints.items()}
    entries = list(methods) + [{"name": label, "features": str(path), "postfix": "scfeat"}
                               for label, path in features.items()]
    cache_dir = out / "eval" / "cache"
    summaries = run_evaluation({"data_path": str(sequences), "methods": entries,
                                "compare_caches": [], "cache_dir": str(cache_dir),
                                "output_plot": str(out / "mma.png"), "thresholds": 10,
                                "exclude_high_res": True, "max_keypoints": max_keypoints})
    evaluated = parse_hpatches_methods(entries)
    width = max(len("method"), *(len(method.label) for method in evaluated))
    print(f"\nper photograph (illumination and viewpoint sequence): MMA@{PHOTO_THRESHOLD}px, "
          f"keypoints per image")
    print(f"{'method':<{width}}" + "".join(f"{photo:>22}" for photo in photos))
    for method in evaluated:
        cells = []
        for photo in photos:
            cache, _ = evaluate_method(method, sequences, [f"i_{photo}", f"v_{photo}"], cache_dir,
                                       device, max_keypoints)
            summary = summarize(cache, PHOTO_THRESHOLD)
            cells.append(f"{summary['mma'][-1]:>14.3f}{summary['mean_features']:>8.0f}")
        print(f"{method.label:<{width}}" + "".join(cells))
    readers = {}
    names = list_sequences(sequences)
    for method in parsed:
        files = method_feature_files(method, sequences, names, cache_dir, max_keypoints, device)
        readers[method.label] = lambda image, files=files: read_feature_file(
            files[(image.parent.name, int(image.stem))])[0]
    for label, path in features.items():
        readers[label] = lambda image, path=path: read_feature_file(
            path / image.parent.name / f"{image.name}.scfeat")[0]
    print(f"\n{'method':<{width}}{'kpts/image':>11}{'within ' + str(BORDER_PX) + ' px of border':>26}")
    for label, keypoints_of in readers.items():
        count, share = border_share(keypoints_of, sequences)
        print(f"{label:<{width}}{count:>11.0f}{share:>26.3f}")
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.real_photos",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="*", default=["sift", "disk", "aliked", "xfeat"],
                        metavar="METHOD", help="methods of evaluation/methods.py (default: sift "
                                               "disk aliked xfeat)")
    parser.add_argument("--checkpoints", nargs="*", default=[], metavar="LABEL=DIR",
                        help="checkpoints, extracted with config/demo/extract.yaml")
    parser.add_argument("--max-keypoints", type=int, default=None,
                        help="keypoint budget of every --methods entry (default: each method's)")
    parser.add_argument("--out", type=Path, default=Path("real_photos_output"))
    parser.add_argument("--photos", default=",".join(DEFAULT_PHOTOS),
                        help=f"comma-separated, from {', '.join(HELD_OUT_PHOTOS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        if not args.methods and not args.checkpoints:
            raise SCFeatError("nothing to evaluate: give --methods and/or --checkpoints")
        if args.max_keypoints is not None and args.max_keypoints < 1:
            raise SCFeatError(f"--max-keypoints must be at least 1, got {args.max_keypoints}")
        evaluate_photos(args.methods, parse_checkpoints(args.checkpoints), args.out,
                        [p for p in args.photos.split(",") if p], args.seed, args.device,
                        args.max_keypoints)
    except SCFeatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
