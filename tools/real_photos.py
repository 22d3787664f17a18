"""Matching accuracy on real photographs that the synthetic data never uses, at their own
resolution: ``python -m tools.real_photos --checkpoints LABEL=DIR [LABEL=DIR ...] [--out DIR]``.

From each held-out photograph of scikit-image's wheel (``HELD_OUT_PHOTOS``: none of them is in
``tools.synthetic``'s ``MEGADEPTH_PHOTOS`` or ``HPATCHES_PHOTOS``) it writes an illumination and
a viewpoint sequence in the HPatches layout with ``tools.synthetic.make_hpatches_sequence``, at a
size chosen so that the photograph is not rescaled (the sequence generator covers 1.4× the
output size, so the output is about 1/1.4 of the photograph; sizes are multiples of 16, so the
extraction crops nothing). The networks' features come from the demo's extraction
(``tools.demo_stages.extract``: ``config/demo/extract.yaml``), the evaluation is ``evaluation.hpatches``
(D2-Net protocol, MMA@1..10) with OpenCV SIFT beside; the table also gives each method's share of
keypoints within ``BORDER_PX`` px of the image border (a collapsed detector puts most there).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.errors import SCFeatError
from utils.image import load_image

BORDER_PX = 8
# name → (file in skimage/data, centre crop H×W or None, sequence size H×W (multiples of 16))
HELD_OUT_PHOTOS = {
    "motorcycle_right": ("motorcycle_right.png", None, (352, 528)),  # 500×741 photograph
    "cell": ("cell.png", None, (464, 384)),                          # 660×550 microscopy, grey
    "retina": ("retina.jpg", (720, 720), (512, 512)),                # 1411×1411 fundus photo
}


def load_held_out(name: str) -> np.ndarray:
    """One of ``HELD_OUT_PHOTOS`` → ``H×W×3`` uint8 RGB (centre-cropped when so listed)."""
    from tools.synthetic import HPATCHES_PHOTOS, MEGADEPTH_PHOTOS, PHOTO_FILES

    file, crop, _ = HELD_OUT_PHOTOS[name]
    assert file not in {PHOTO_FILES[p] for p in MEGADEPTH_PHOTOS + HPATCHES_PHOTOS}
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


def border_share(features: Path, sequences: Path, postfix: str = "scfeat") -> tuple[float, float]:
    """Mean keypoints per image and the share of them within ``BORDER_PX`` px of the border,
    over every image of ``sequences`` (features: ``<features>/<seq>/<k>.ppm.<postfix>``;
    ``None`` for SIFT, computed from the images)."""
    from evaluation.matching import read_feature_file, sift_features

    counts, near = [], []
    for image_file in sorted(sequences.glob("*/*.ppm")):
        height, width = load_image(image_file, grey=True).shape
        if features is None:
            keypoints, _ = sift_features(image_file)
        else:
            keypoints, _ = read_feature_file(
                features / image_file.parent.name / f"{image_file.name}.{postfix}")
        x, y = keypoints[:, 0], keypoints[:, 1]
        close = (x < BORDER_PX) | (y < BORDER_PX) | (x > width - 1 - BORDER_PX) \
            | (y > height - 1 - BORDER_PX)
        counts.append(len(keypoints))
        near.append(int(close.sum()))
    return float(np.mean(counts)), float(np.sum(near) / max(np.sum(counts), 1))


def parse_checkpoints(entries: Sequence[str]) -> dict[str, Path]:
    checkpoints = {}
    for entry in entries:
        label, sep, folder = entry.partition("=")
        if not sep or not label.isidentifier() or label == "sift":
            raise SCFeatError(f"--checkpoints {entry!r}: expected LABEL=DIR with a label of "
                              f"letters, digits and '_' (not 'sift'), e.g. trained=ckpts/run/001")
        path = Path(folder)
        if not ((path / "backbone.pth").is_file() and (path / "localheader.pth").is_file()):
            raise SCFeatError(f"--checkpoints {entry!r}: {path} is not a checkpoint folder "
                              f"(expected backbone.pth and localheader.pth)")
        checkpoints[label] = path
    return checkpoints


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.real_photos",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="LABEL=DIR")
    parser.add_argument("--out", type=Path, default=Path("real_photos_output"))
    parser.add_argument("--photos", default=",".join(HELD_OUT_PHOTOS),
                        help=f"comma-separated, from {', '.join(HELD_OUT_PHOTOS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    from tools import demo_stages
    from evaluation.hpatches import run_evaluation

    try:
        checkpoints = parse_checkpoints(args.checkpoints)
        photos = [p for p in args.photos.split(",") if p]
        unknown = [p for p in photos if p not in HELD_OUT_PHOTOS]
        if unknown or not photos:
            raise SCFeatError(f"--photos: unknown {unknown}; expected some of "
                              f"{list(HELD_OUT_PHOTOS)}")
        sequences = make_sequences(args.out / f"sequences-s{args.seed}-{'-'.join(photos)}",
                                   photos, args.seed)
        result = demo_stages.DemoResult()
        features = {label: demo_stages.extract(label, folder, f"photos-{label}", args.out, sequences,
                                        args.device, result)
                    for label, folder in checkpoints.items()}
        methods = ["sift"] + [{"name": label, "features": str(path), "postfix": "scfeat"}
                              for label, path in features.items()]
        run_evaluation({"data_path": str(sequences), "methods": methods, "compare_caches": [],
                        "cache_dir": str(args.out / "eval" / "cache"),
                        "output_plot": str(args.out / "mma.png"), "thresholds": 10,
                        "exclude_high_res": True})
    except SCFeatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\n{'method':<12}{'kpts/image':>11}{'within ' + str(BORDER_PX) + ' px of border':>26}")
    for label, path in [("sift", None), *features.items()]:
        count, share = border_share(path, sequences)
        print(f"{label:<12}{count:>11.0f}{share:>26.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
