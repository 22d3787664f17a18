"""MegaDepth image pairs in the CAPS layout, with fundamental matrices from camera poses.

On disk::

    <data_path>/<scene>/<folder whose name contains "dense">/aligned/
        images/<name>
        img_cam.txt   # name w h fx fy cx cy r11..r33 t1 t2 t3   ([R|t] world→camera; '#' comments)
        pairs.txt     # name1 name2

The loader never trains on garbage and never stops on one bad pair:

* A line that cannot be *parsed* (wrong token count, a non-number) and a pair naming an image
  absent from ``img_cam.txt`` are an ``SCFeatError`` naming ``file:line``. Everything else is
  checked once, when the index is built, and what fails is dropped with one log line per cause
  (count and examples; ``dataset.dropped_at_index`` counts the pairs): images whose line is
  parseable but unusable (image size, non-finite or singular intrinsics, a non-rotation, a
  non-finite translation, a name listed twice) take their pairs with them; self pairs, repeated
  pairs (either order), the rotation threshold (train mode), degenerate fundamental matrices,
  pairs whose epipolar lines miss the other image, and the per-folder cap drop pairs. An
  aligned folder lacking ``img_cam.txt``, ``pairs.txt`` or ``images/`` is skipped with a
  warning; an empty ``pairs.txt`` contributes nothing (warning). Only when nothing usable is
  left is it an error.
* At load time, a pair whose image is missing, unreadable, truncated or undecodable gives
  ``{"skipped": "<cause>: <detail>"}`` from ``__getitem__``;
  ``collate_skip_none`` drops such items and lists their cause strings under the batch's
  ``skipped`` key (the only key when no item was usable), so that the trainer can count causes
  across DataLoader workers (:func:`dataloader.collate.summarize_skips`). The file records and
  cause names are in :mod:`dataloader.megadepth_layout`, the pair checks in
  :mod:`dataloader.pair_geometry`, the query points in :mod:`dataloader.query_points`.
* Images are read with their pixels as stored (an EXIF orientation tag is ignored: the
  intrinsics of ``img_cam.txt`` describe the stored pixels). An image whose size on disk is not the one ``img_cam.txt`` gives is
  used with its intrinsics scaled by the size ratio (:func:`dataloader.pair_geometry.camera_at_size`;
  F follows); its item carries a note ``(folder, warning)`` that the collate function lists
  under the batch's ``notes`` key, and the trainer logs one warning per folder.
"""
from __future__ import annotations

import collections
import io
import logging
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import ColorJitter

from dataloader.collate import NOTE_KEY, collate_skip_none
from dataloader.megadepth_layout import (DEGENERATE_F, DUPLICATE_PAIR, EPIPOLAR_MISS,
                                         EXAMPLES_PER_CAUSE, MISSING_IMAGE, SELF_PAIR,
                                         TRUNCATED_IMAGE, UNDECODABLE_IMAGE,
                                         UNREADABLE_IMAGE, CameraRecord, PairLine, PairRecord,
                                         find_aligned_folders, missing_part, read_img_cam,
                                         read_pairs)
from dataloader.pair_geometry import (MAX_FUNDAMENTAL_ENTRY, camera_at_size,
                                      epipolar_lines_miss, pair_fundamentals,
                                      rotation_angles_deg, size_note)
from dataloader.query_points import QUERY_POINT_MODES, query_points
from utils.config import Spec, section_config
from utils.errors import SCFeatError
from utils.image import NETWORK_STRIDE, decode_image, normalize_imagenet, to_float_tensor

log = logging.getLogger("scfeat.data")

MODES = ("train", "val", "test")
def _jpeg_complete(data: bytes) -> bool:
    """Whether JPEG ``data`` is whole: it ends with the end-of-image marker (trailing padding
    allowed) or, when something follows it, PIL decodes it without running out of data. Some
    OpenCV builds decode a truncated JPEG with only a warning, filling the rest with grey."""
    if data.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):
        return True
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # noqa: BLE001 - PIL raises many types on bad data; all mean "not whole"
        return False
    return True


# ----------------------------------------------------------------------------- dataset

def resize_problem(resize: list | None) -> str | None:
    """What is wrong with a ``resize`` value (``None`` or ``[H, W]``, positive multiples of 16)."""
    if resize is None or (len(resize) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % NETWORK_STRIDE == 0
            for v in resize)):
        return None
    return "must be null or [H, W] with positive multiples of 16"


class MegaDepth_SIFT(Dataset):
    """Image pairs of MegaDepth (CAPS layout) with ground-truth epipolar geometry.

    Item: ``im1, im2`` (3×H×W float32, ImageNet-normalised; colour-jittered in train mode),
    ``F1, F2`` (3×3 float32), ``intrinsic1/2`` (3×3 float32), ``pose1/2`` (4×4 float32,
    world→camera), ``name1/2`` (str, path relative to ``data_path``) and, when
    ``query_points`` is set, ``coord1/2`` (num_pts×2 float32 pixel ``x, y``). A pair that
    cannot be loaded gives ``{"skipped": "<cause>: <detail>"}`` instead (see the module
    docstring); ``skipped`` (a Counter, per process) and ``dropped_at_index`` (a Counter of
    pairs per index-time cause) count the causes.
    """

    collate_fn = staticmethod(collate_skip_none)  # drops unusable items, lists their causes
    default_conf = {
        "data_path": "data/megadepth/train",
        "mode": Spec("train", choices=MODES),
        "num_pts": Spec(2000, minimum=1),
        "query_points": Spec(None, types=(str, type(None)), choices=QUERY_POINT_MODES),
        "random_percent": Spec(0.5, minimum=0, maximum=1),
        "rot_thr": Spec(80, types=(float,), doc="degrees; train mode only"),
        "max_pairs_per_scene": Spec(5000, minimum=1, doc="per dense folder, seeded subsample"),
        "resize": Spec(None, types=(list, type(None)), check=resize_problem,
                       doc="null (size on disk) or [H, W], multiples of 16"),
        "seed": 0,
        "batch_size": Spec(2, minimum=1),
        "workers": Spec(4, minimum=0),
        "shuffle": True,
        # The original's key: it prunes its loader's unused SIFT query points. Nothing reads it
        # here: query points are computed only when query_points asks for them.
        "prune_kp": Spec(False, inert=True),
    }

    def __init__(self, conf: dict) -> None:
        self.conf = section_config(self.default_conf, conf, "data")
        self.data_path = Path(self.conf["data_path"])
        self.train = self.conf["mode"] == "train"
        self.resize = tuple(self.conf["resize"]) if self.conf["resize"] is not None else None
        self.jitter = ColorJitter(brightness=1, contrast=1, saturation=1, hue=0.4)
        self.skipped: collections.Counter = collections.Counter()  # per process (worker copy)
        self.dropped_at_index: collections.Counter = collections.Counter()
        self._logged_reasons: set[str] = set()
        self.pairs = self._build_index()

    # ------------------------------------------------------------------ index

    def _build_index(self) -> list[PairRecord]:
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
        filters = (f"rotation > {self.conf['rot_thr']} deg",
                   f"over max_pairs_per_scene={self.conf['max_pairs_per_scene']}")
        for cause, (pairs, images, examples) in self._drops.items():
            level = logging.INFO if cause in filters else logging.WARNING
            what = f"{pairs} pair(s) dropped while indexing"
            if images:
                what += f" ({images} image(s) unusable)"
            log.log(level, "%s: %s; e.g. %s", cause, what, "; ".join(examples) or "-")

    def _final_camera(self, camera: CameraRecord) -> CameraRecord:
        """The camera of the image as it will be returned (intrinsics scaled when resizing)."""
        if self.resize is None:
            return camera
        height, width = self.resize
        return camera_at_size(camera, width, height)

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
        final = {name: self._final_camera(cam) for name, cam in cameras.items()}
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
            drop(angles > self.conf["rot_thr"], f"rotation > {self.conf['rot_thr']} deg")
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
        cap = self.conf["max_pairs_per_scene"]
        if len(indices) > cap:
            # Seeded by the folder's name, so a folder's subsample does not depend on the others.
            rng = np.random.default_rng([self.conf["seed"], zlib.crc32(rel_folder.encode())])
            self._note(f"over max_pairs_per_scene={cap}", pairs=len(indices) - cap,
                       example=f"{pairs_file} ({len(indices)} usable)")
            indices = np.sort(rng.choice(indices, size=cap, replace=False))
        return [PairRecord(folder, rel_folder, candidates[i].name1, candidates[i].name2,
                           cameras[candidates[i].name1], cameras[candidates[i].name2])
                for i in indices]

    # ------------------------------------------------------------------ items

    def __len__(self) -> int:
        return len(self.pairs)

    def _skip(self, cause: str, detail: str) -> dict:
        """Count a pair that cannot be used and log the first occurrence of each cause (per
        process) → ``{"skipped": "<cause>: <detail>"}``."""
        self.skipped[cause] += 1
        if cause not in self._logged_reasons:
            self._logged_reasons.add(cause)
            log.warning("pair skipped (%s): %s; further pairs skipped for this cause are only "
                        "counted", cause, detail)
        return {"skipped": f"{cause}: {detail}"}

    def _read(self, record: PairRecord, name: str) -> np.ndarray | tuple[str, str]:
        """The image as stored → ``H×W×3`` uint8 RGB, or ``(cause, detail)``."""
        path = record.folder / "images" / name
        listed = f"listed in {record.folder / 'pairs.txt'}"
        if not path.is_file():
            return MISSING_IMAGE, f"{path} ({listed})"
        try:
            data = path.read_bytes()
        except OSError as error:
            return UNREADABLE_IMAGE, f"{path} ({error})"
        if data[:2] == b"\xff\xd8" and not _jpeg_complete(data):
            return TRUNCATED_IMAGE, f"{path} (JPEG data ends before its end-of-image marker; " \
                                    f"{len(data)} bytes)"
        image = decode_image(data)
        if image is None:
            return UNDECODABLE_IMAGE, f"{path} ({len(data)} bytes that OpenCV cannot decode)"
        return image

    def _resized(self, image: np.ndarray) -> np.ndarray:
        """The image at ``resize`` (unchanged without it)."""
        if self.resize is None or image.shape[:2] == self.resize:
            return image
        height, width = self.resize
        shrink = height < image.shape[0] and width < image.shape[1]
        return cv2.resize(image, (width, height),
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        if self.train:
            # On a PIL image, as the original: three times faster than on a tensor.
            image = np.array(self.jitter(Image.fromarray(image)))
        return normalize_imagenet(to_float_tensor(image))

    def __getitem__(self, index: int) -> dict:
        record = self.pairs[index]
        images, on_disk, note = [], [], None
        for name, camera in ((record.name1, record.camera1), (record.name2, record.camera2)):
            image = self._read(record, name)
            if isinstance(image, tuple):
                return self._skip(*image)
            height, width = image.shape[:2]
            on_disk.append(camera_at_size(camera, width, height))
            if note is None and (width, height) != (camera.width, camera.height):
                note = (record.rel_folder, size_note(record.folder / "images", name, camera,
                                                     width, height))
            images.append(self._resized(image))
        cam1, cam2 = self._final_camera(on_disk[0]), self._final_camera(on_disk[1])
        fmat1, fmat2 = pair_fundamentals(cam1.K[None], cam2.K[None], cam1.pose[None], cam2.pose[None])
        item = {
            "im1": self._image_tensor(images[0]),
            "im2": self._image_tensor(images[1]),
            "F1": fmat1[0].float(),
            "F2": fmat2[0].float(),
            "intrinsic1": torch.from_numpy(cam1.K).float(),
            "intrinsic2": torch.from_numpy(cam2.K).float(),
            "pose1": torch.from_numpy(cam1.pose).float(),
            "pose2": torch.from_numpy(cam2.pose).float(),
            "name1": f"{record.rel_folder}/images/{record.name1}",
            "name2": f"{record.rel_folder}/images/{record.name2}",
        }
        if note is not None:
            item[NOTE_KEY] = note
        mode = self.conf["query_points"]
        if mode is not None:
            count, percent = self.conf["num_pts"], self.conf["random_percent"]
            item["coord1"] = query_points(images[0], mode, count, percent)
            item["coord2"] = query_points(images[1], mode, count, percent)
        return item
