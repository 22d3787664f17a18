"""A COLMAP model → the CAPS MegaDepth layout that ``train.py`` reads:
``python -m tools.colmap_to_megadepth --model DIR --images DIR --out DIR [--scene NAME] [pair options]``.

Writes ``<out>/<scene>/dense0/aligned/{img_cam.txt, pairs.txt, images/}`` (the images linked,
or copied with ``--copy``); ``--out`` is then a ``data_path`` of ``MegaDepth_SIFT``, and several
models converted into one ``--out`` are its scenes. The model is read, its images checked
(every image the model names must be in ``--images`` at its camera's size) and its pairs
chosen by :mod:`dataloader.colmap_model` (the rules and their thresholds are stated there and
in docs/data.md); ``img_cam.txt`` holds the intrinsics with pixel centres at integers
(COLMAP's ``cx, cy`` minus 0.5). Cameras with distortion are refused unless ``--undistort``
(``pycolmap.undistort_images`` into ``<out>/<scene>/undistorted``, whose pinhole model and
images are then converted). Afterwards ``MegaDepth_SIFT`` indexes the written folder in train
mode (``--rot-thr``) and the tool reports how many of the pairs it keeps (``--no-check`` skips
that).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from dataloader.colmap_model import (DEFAULT_PAIRS, RULES, check_images, read_model,
                                     select_pairs)
from dataloader.megadepth_layout import write_img_cam, write_pairs
from utils.cli import run_cli, setup_logging
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.data")

DENSE_FOLDER = "dense0"


def default_scene_name(model_dir: Path) -> str:
    """The scene's name from the model's path: the first folder up from it whose name is not
    a model folder's (``sparse*``, ``dense*``, a number, ``undistorted``)."""
    for part in [model_dir.resolve(), *model_dir.resolve().parents]:
        name = part.name
        if name and not (name.startswith(("sparse", "dense")) or name.isdigit()
                         or name == "undistorted"):
            return name
    return "scene"


def link_images(names: list[str], images_dir: Path, target: Path, copy: bool) -> None:
    """``target/<name>`` for every name: a symbolic link to ``images_dir/<name>`` (absolute) or
    a copy; an existing entry is replaced unless it already is that link."""
    for name in names:
        source, destination = (images_dir / name).resolve(), target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.is_symlink() and not copy and Path(os.readlink(destination)) == source:
            continue
        if destination.is_symlink() or destination.exists():
            destination.unlink()
        if copy:
            shutil.copy2(source, destination)
        else:
            destination.symlink_to(source)


def undistort(model_dir: Path, images_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """``pycolmap.undistort_images`` of the model into ``out_dir`` → (model, images) folders."""
    try:
        import pycolmap
    except ImportError:
        raise SCFeatError("--undistort needs pycolmap (pip install pycolmap)") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    pycolmap.undistort_images(out_dir, model_dir, images_dir)
    return out_dir / "sparse", out_dir / "images"


def convert(model_dir: str | Path, images_dir: str | Path, out: str | Path,
            scene: str | None = None, pair_options: dict | None = None, copy: bool = False,
            undistorted: bool = False, check: bool = True, rot_thr: float = 80.0) -> dict:
    """Write one model as a scene of the CAPS layout under ``out`` → ``{scene, folder, images,
    pairs, rule, description, indexed}`` (``indexed``: the pairs ``MegaDepth_SIFT`` keeps in
    train mode, ``None`` without ``check``)."""
    model_dir, images_dir, out = Path(model_dir), Path(images_dir), Path(out)
    scene = scene or default_scene_name(model_dir)
    if not scene or "/" in scene or scene.startswith("."):
        raise SCFeatError(f"--scene {scene!r}: expected a folder name")
    if undistorted:
        model_dir, images_dir = undistort(model_dir, images_dir, out / scene / "undistorted")
    model = read_model(model_dir)
    check_images(model, images_dir)
    pairs = select_pairs(model, pair_options)
    folder = out / scene / DENSE_FOLDER / "aligned"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    link_images(model.names, images_dir, folder / "images", copy)
    write_img_cam(folder / "img_cam.txt", model.names, model.cameras,
                  (f"from the COLMAP model {model_dir.resolve()} ({model.format}); cx, cy with "
                   f"pixel centres at integers (COLMAP's minus 0.5)",
                   f"pairs ({pairs.rule} rule): {pairs.description}"))
    write_pairs(folder / "pairs.txt", [(model.names[i], model.names[j])
                                       for i, j in zip(pairs.i, pairs.j)])
    log.info("%s: %d pairs of %d images (%s rule: %s)", folder, len(pairs), len(model.names),
             pairs.rule, pairs.description)
    result = {"scene": scene, "folder": str(folder), "images": len(model.names),
              "pairs": len(pairs), "rule": pairs.rule, "description": pairs.description,
              "indexed": None}
    if check:
        from dataloader.megadepth import MegaDepth_SIFT

        dataset = MegaDepth_SIFT({"data_path": str(out), "mode": "train", "rot_thr": rot_thr,
                                  "max_pairs_per_scene": max(len(pairs), 1)})
        rel = folder.relative_to(out).as_posix()
        result["indexed"] = sum(record.rel_folder == rel for record in dataset.pairs)
        if result["indexed"] < len(pairs):
            log.warning("%s: MegaDepth_SIFT (train mode, rot_thr %s) keeps %d of the %d pairs "
                        "(dropped, over every scene of %s: %s)", folder, rot_thr,
                        result["indexed"], len(pairs), out, dict(dataset.dropped_at_index))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.colmap_to_megadepth",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="COLMAP model folder (.bin or .txt)")
    parser.add_argument("--images", required=True, help="folder of the model's images")
    parser.add_argument("--out", required=True, help="data_path of the CAPS layout")
    parser.add_argument("--scene", default=None,
                        help="scene folder name (default: from the model's path)")
    parser.add_argument("--rule", default=DEFAULT_PAIRS["rule"], choices=RULES,
                        help="pair rule: points (shared 3-D points), cameras (view overlap), "
                             "auto (points when the model has them; default)")
    parser.add_argument("--min-overlap", type=float, default=DEFAULT_PAIRS["min_overlap"],
                        help="points rule: least shared-point ratio (default %(default)s)")
    parser.add_argument("--max-overlap", type=float, default=DEFAULT_PAIRS["max_overlap"],
                        help="points rule: largest shared-point ratio (default %(default)s)")
    parser.add_argument("--max-angle", type=float, default=DEFAULT_PAIRS["max_angle"],
                        help="cameras rule: largest viewing-direction angle, degrees "
                             "(default %(default)s)")
    parser.add_argument("--min-view-overlap", type=float,
                        default=DEFAULT_PAIRS["min_view_overlap"],
                        help="cameras rule: least view overlap (default %(default)s)")
    parser.add_argument("--grid", type=int, default=DEFAULT_PAIRS["grid"],
                        help="cameras rule: grid of image points per side (default %(default)s)")
    parser.add_argument("--depth", type=float, default=None,
                        help="cameras rule: scene depth in model units (default: from the "
                             "cameras)")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking")
    parser.add_argument("--undistort", action="store_true",
                        help="undistort a model with distorted cameras first (pycolmap)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not index the written folder with MegaDepth_SIFT")
    parser.add_argument("--rot-thr", type=float, default=80.0,
                        help="rot_thr of the check's train-mode index (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()

    def work() -> int:
        start = time.perf_counter()
        options = {"rule": args.rule, "min_overlap": args.min_overlap,
                   "max_overlap": args.max_overlap, "max_angle": args.max_angle,
                   "min_view_overlap": args.min_view_overlap, "grid": args.grid,
                   "depth": args.depth}
        result = convert(args.model, args.images, args.out, args.scene, options, args.copy,
                         args.undistort, not args.no_check, args.rot_thr)
        indexed = "" if result["indexed"] is None else \
            f"; MegaDepth_SIFT indexes {result['indexed']} of them"
        print(f"{result['folder']}: {result['images']} images, {result['pairs']} pairs "
              f"({result['rule']} rule: {result['description']}){indexed}; "
              f"{time.perf_counter() - start:.2f} s")
        return 0
    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
