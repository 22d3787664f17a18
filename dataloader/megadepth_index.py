"""The index of MegaDepth pairs (CAPS layout): every listed pair checked once, the unusable
ones dropped with one log line per cause (:mod:`dataloader.megadepth` has the layout and the
rules; the file records and cause names are in :mod:`dataloader.megadepth_layout`, the pair
checks in :mod:`dataloader.pair_geometry`)."""
from __future__ import annotations

import collections
import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from dataloader.megadepth_layout import (DEGENERATE_F, DUPLICATE_PAIR, EPIPOLAR_MISS,
                                         EXAMPLES_PER_CAUSE, SELF_PAIR, CameraRecord, PairLine,
                                         PairRecord, find_aligned_folders, missing_part,
                                         read_img_cam, read_pairs)
from dataloader.pair_geometry import (MAX_FUNDAMENTAL_ENTRY, camera_at_size,
                                      epipolar_lines_miss, pair_fundamentals,
                                      rotation_angles_deg)
from utils.errors import SCFeatError

log = logging.getLogger("scfeat.data")


def final_camera(camera: CameraRecord, resize: tuple[int, int] | None) -> CameraRecord:
    """The camera of the image as a dataset returns it (intrinsics scaled to ``resize``)."""
    if resize is None:
        return camera
    height, width = resize
    return camera_at_size(camera, width, height)


class PairIndex:
    """The usable pairs under ``data_path`` (:attr:`pairs`, :class:`PairRecord` s) and the
    pairs dropped per cause (:attr:`dropped_at_index`). ``train``: the rotation threshold
    ``rot_thr`` (degrees) applies; ``resize``: the ``[H, W]`` the images will have (the checks
    see the cameras at that size); at most ``max_pairs_per_scene`` pairs per dense folder, a
    subsample seeded by ``seed`` and the folder's name."""

    def __init__(self, data_path: Path, train: bool, resize: tuple[int, int] | None,
                 rot_thr: float, max_pairs_per_scene: int, seed: int) -> None:
        self.data_path = Path(data_path)
        self.train, self.resize, self.rot_thr = train, resize, rot_thr
        self.max_pairs_per_scene, self.seed = max_pairs_per_scene, seed
        self.dropped_at_index: collections.Counter = collections.Counter()
        self.pairs = self._build()

    def _build(self) -> list[PairRecord]:
        folders = find_aligned_folders(self.data_path)
        usable_folders, problems = [], []
        for folder in folders:
            problem = missing_part(folder)
            if problem is None:
                usable_folders.append(folder)
            else:
                problems.append(problem)
        if not usable_folders:
            raise SCFeatError(problems[0] if len(problems) == 1 else
                              f"{self.data_path}: none of the {len(problems)} aligned folders is "
                              f"usable; first: {problems[0]}")
        for problem in problems:
            log.warning("%s; folder skipped", problem)
        # cause → [pairs dropped, images rejected, example places]
        self._drops: dict[str, list] = {}
        records: list[PairRecord] = []
        listed = 0
        for folder in usable_folders:
            cameras, rejected = read_img_cam(folder / "img_cam.txt")
            pairs = read_pairs(folder / "pairs.txt")
            for name, (cause, where) in rejected.items():
                self._note(cause, images=1, example=f"{where} ({name})")
            if not pairs:
                log.warning("%s: no pairs listed; the folder contributes nothing",
                            folder / "pairs.txt")
            listed += len(pairs)
            records.extend(self._usable_pairs(folder, cameras, rejected, pairs))
        self._log_drops()
        if listed == 0:
            raise SCFeatError(f"{self.data_path}: no pairs listed in any of the {len(usable_folders)} "
                              f"pairs.txt files (expected lines 'name1 name2' in "
                              f"<scene>/<dense*>/aligned/pairs.txt)")
        if self.dropped_at_index:
            log.info("%s: %d of %d listed pairs dropped while indexing: %s", self.data_path,
                     listed - len(records), listed, dict(self.dropped_at_index))
        if not records:
            raise SCFeatError(f"{self.data_path}: no usable pairs ({listed} listed; dropped: "
                              f"{dict(self.dropped_at_index) or 'none'})")
        return records

    def _note(self, cause: str, pairs: int = 0, images: int = 0, example: str | None = None) -> None:
        """Count an index-time drop of ``pairs`` pairs (and ``images`` images) for ``cause``."""
        entry = self._drops.setdefault(cause, [0, 0, []])
        entry[0] += pairs
        entry[1] += images
        if example is not None and len(entry[2]) < EXAMPLES_PER_CAUSE:
            entry[2].append(example)
        if pairs:
            self.dropped_at_index[cause] += pairs

    def _log_drops(self) -> None:
        """One line per index-time cause: pairs dropped, images rejected, a few places."""
        filters = (f"rotation > {self.rot_thr} deg",
                   f"over max_pairs_per_scene={self.max_pairs_per_scene}")
        for cause, (pairs, images, examples) in self._drops.items():
            level = logging.INFO if cause in filters else logging.WARNING
            what = f"{pairs} pair(s) dropped while indexing"
            if images:
                what += f" ({images} image(s) unusable)"
            log.log(level, "%s: %s; e.g. %s", cause, what, "; ".join(examples) or "-")

    def _usable_pairs(self, folder: Path, cameras: dict[str, CameraRecord],
                      rejected: dict[str, tuple[str, str]], pairs: list[PairLine]) -> list[PairRecord]:
        """Filter one folder's pairs (listing faults, rejected images, rotation in train mode,
        degenerate F, epipolar lines missing the other image) and cap their number."""
        pairs_file = folder / "pairs.txt"
        seen: set[frozenset[str]] = set()
        candidates: list[PairLine] = []
        for pair in pairs:
            where = f"{pairs_file}:{pair.line}"
            for name in (pair.name1, pair.name2):
                if name not in cameras and name not in rejected:
                    raise SCFeatError(f"{where}: image {name!r} is not listed in "
                                      f"{folder / 'img_cam.txt'}")
            key = frozenset((pair.name1, pair.name2))
            cause = None
            if pair.name1 == pair.name2:
                cause = SELF_PAIR
            elif key in seen:
                cause = DUPLICATE_PAIR
            else:
                seen.add(key)
                cause = next((rejected[n][0] for n in (pair.name1, pair.name2) if n in rejected),
                             None)
            if cause is None:
                candidates.append(pair)
            else:
                self._note(cause, pairs=1,
                           example=where if cause in (SELF_PAIR, DUPLICATE_PAIR) else None)
        if not candidates:
            return []
        final = {name: final_camera(cam, self.resize) for name, cam in cameras.items()}
        cams1 = [final[p.name1] for p in candidates]
        cams2 = [final[p.name2] for p in candidates]
        poses1 = np.stack([c.pose for c in cams1])
        poses2 = np.stack([c.pose for c in cams2])
        keep = np.ones(len(candidates), dtype=bool)

        def drop(mask: np.ndarray, cause: str) -> None:
            newly = mask & keep
            if not newly.any():
                return
            for i in np.flatnonzero(newly)[:EXAMPLES_PER_CAUSE]:
                self._note(cause, example=f"{pairs_file}:{candidates[i].line}")
            self._note(cause, pairs=int(newly.sum()))
            keep[newly] = False

        if self.train:
            angles = rotation_angles_deg(poses2[:, :3, :3] @ poses1[:, :3, :3].transpose(0, 2, 1))
            drop(angles > self.rot_thr, f"rotation > {self.rot_thr} deg")
        fmat1, fmat2 = pair_fundamentals(np.stack([c.K for c in cams1]), np.stack([c.K for c in cams2]),
                                         poses1, poses2)
        degenerate = ~(torch.isfinite(fmat1).all((1, 2)) & torch.isfinite(fmat2).all((1, 2))
                       & (fmat1.abs().amax((1, 2)) < MAX_FUNDAMENTAL_ENTRY)
                       & (fmat2.abs().amax((1, 2)) < MAX_FUNDAMENTAL_ENTRY)).numpy()
        drop(degenerate, DEGENERATE_F)
        sizes1 = np.array([[c.width, c.height] for c in cams1], dtype=np.float64)
        sizes2 = np.array([[c.width, c.height] for c in cams2], dtype=np.float64)
        with np.errstate(all="ignore"):
            miss = epipolar_lines_miss(np.nan_to_num(fmat1.numpy()), np.nan_to_num(fmat2.numpy()),
                                       sizes1, sizes2)
        drop(miss, EPIPOLAR_MISS)
        indices = np.flatnonzero(keep)
        rel_folder = folder.relative_to(self.data_path).as_posix()
        cap = self.max_pairs_per_scene
        if len(indices) > cap:
            # Seeded by the folder's name, so a folder's subsample does not depend on the others.
            rng = np.random.default_rng([self.seed, zlib.crc32(rel_folder.encode())])
            self._note(f"over max_pairs_per_scene={cap}", pairs=len(indices) - cap,
                       example=f"{pairs_file} ({len(indices)} usable)")
            indices = np.sort(rng.choice(indices, size=cap, replace=False))
        return [PairRecord(folder, rel_folder, candidates[i].name1, candidates[i].name2,
                           cameras[candidates[i].name1], cameras[candidates[i].name2])
                for i in indices]
