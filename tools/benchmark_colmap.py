"""Timing of COLMAP-model conversion on a synthetic model of many images:
``python -m tools.benchmark_colmap [--images 1000] [--points 20000]`` (and ``python -m
tools.benchmark --only colmap``).

The model: ``--images`` cameras on a ring, looking at its centre (800×600 PINHOLE, written as
tiny image files of that size: only their headers are read), ``--points`` 3-D points spread
round the ring; every image observes the points within 15° of its own direction (about
``points/12`` each). Written in both formats into a temporary folder, then timed once each:
reading the model (binary, text), checking its image files, the pairs by each rule (``points``,
``cameras``) and the whole conversion (``tools.colmap_to_megadepth.convert``, binary model,
``points`` rule, with and without the ``MegaDepth_SIFT`` index check), in wall-clock seconds
and in CPU seconds of this process (on a shared machine the wall time also counts the others'
load).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dataloader.colmap_model import check_images, read_model, select_pairs, write_model

WIDTH, HEIGHT, FOCAL = 800, 600, 700.0
VIEW_HALF_ANGLE = 15.0  # degrees of the ring each image observes, either side


def ring_model(folder: Path, images: int, points: int, seed: int = 0) -> dict:
    """Write the synthetic model (text under ``folder/text``, binary under ``folder/binary``)
    and its image files (``folder/images``) → counts."""
    rng = np.random.default_rng(seed)
    angles = np.radians(np.arange(images) * 360.0 / images)
    point_angles = rng.uniform(0, 2 * np.pi, points)
    entries, observations = [], 0
    for k, angle in enumerate(angles):
        centre = 10.0 * np.array([np.cos(angle), 0.02 * np.sin(7 * angle), np.sin(angle)])
        z = -centre / np.linalg.norm(centre)
        x = np.cross([0.0, -1.0, 0.0], z)
        x /= np.linalg.norm(x)
        R = np.stack([x, np.cross(z, x), z])
        difference = np.abs((point_angles - angle + np.pi) % (2 * np.pi) - np.pi)
        ids = np.flatnonzero(difference < np.radians(VIEW_HALF_ANGLE))
        observed = np.c_[rng.uniform(0, WIDTH, len(ids)), rng.uniform(0, HEIGHT, len(ids)), ids]
        observations += len(ids)
        entries.append((f"img_{k:05d}.png", 0, R, -R @ centre, observed))
    camera = [("PINHOLE", WIDTH, HEIGHT, [FOCAL, FOCAL, WIDTH / 2, HEIGHT / 2])]
    write_model(folder / "binary", camera, entries, binary=True)
    write_model(folder / "text", camera, entries, binary=False)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    Image.new("L", (WIDTH, HEIGHT)).save(image_dir / entries[0][0])
    data = (image_dir / entries[0][0]).read_bytes()
    for name, *_ in entries[1:]:
        (image_dir / name).write_bytes(data)
    return {"images": images, "points": points, "observations": observations}


def bench_colmap(images: int = 1000, points: int = 20000
                 ) -> tuple[list[tuple[str, float, float, str]], dict]:
    """``([(measurement, wall seconds, CPU seconds of this process, note)], report)`` for a
    synthetic model of ``images`` images."""
    from tools.colmap_to_megadepth import convert

    rows: list[tuple[str, float, float, str]] = []

    @contextlib.contextmanager
    def timed(name: str, note: str = ""):
        start, cpu = time.perf_counter(), time.process_time()
        result: dict = {}
        yield result
        rows.append((name, time.perf_counter() - start, time.process_time() - cpu,
                     result.get("note", note)))

    with tempfile.TemporaryDirectory(prefix="scfeat-colmap-bench-") as tmp:
        tmp = Path(tmp)
        with timed("write the synthetic model (both formats, images)"):
            counts = ring_model(tmp, images, points)
        with timed("read model, binary") as note:
            model = read_model(tmp / "binary")
            note["note"] = f"{counts['observations']} observations"
        with timed("read model, text"):
            read_model(tmp / "text")
        with timed("check image files (headers)"):
            check_images(model, tmp / "images")
        with timed("pairs, points rule") as note:
            pairs = select_pairs(model, {"rule": "points"})
            note["note"] = f"{len(pairs)} pairs"
        with timed("pairs, cameras rule") as note:
            camera_pairs = select_pairs(model, {"rule": "cameras"})
            note["note"] = f"{len(camera_pairs)} pairs"
        with timed("convert (no index check)"):
            convert(tmp / "binary", tmp / "images", tmp / "out", "ring", check=False)
        with timed("convert + MegaDepth_SIFT index check") as note:
            result = convert(tmp / "binary", tmp / "images", tmp / "out", "ring")
            note["note"] = f"{result['indexed']} of {result['pairs']} pairs indexed"
    report = {**counts, "rows": [{"measurement": n, "seconds": s, "cpu_seconds": c, "note": t}
                                 for n, s, c, t in rows],
              "pairs_points_rule": len(pairs), "pairs_cameras_rule": len(camera_pairs)}
    return rows, report


def format_rows(rows: list[tuple[str, float, float, str]]) -> str:
    width = max(len(name) for name, *_ in rows)
    lines = [f"{'measurement':<{width}}  {'wall':>8}  {'CPU':>8}  notes"]
    lines += [f"{name:<{width}}  {wall:6.2f} s  {cpu:6.2f} s  {note}"
              for name, wall, cpu, note in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark_colmap",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--points", type=int, default=20000)
    args = parser.parse_args(argv)
    rows, report = bench_colmap(args.images, args.points)
    print(f"COLMAP model of {report['images']} images, {report['points']} 3-D points, "
          f"{report['observations']} observations:")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
