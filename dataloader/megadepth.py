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
  cause names are in :mod:`dataloader.megadepth_layout`, the index (building and drop
  accounting) in :mod:`dataloader.megadepth_index`, the pair checks in
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
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import ColorJitter

from dataloader.collate import NOTE_KEY, collate_skip_none
from dataloader.megadepth_index import PairIndex, final_camera
from dataloader.megadepth_layout import (MISSING_IMAGE, TRUNCATED_IMAGE, UNDECODABLE_IMAGE,
                                         UNREADABLE_IMAGE, CameraRecord, PairRecord)
from dataloader.pair_geometry import camera_at_size, pair_fundamentals, size_note
from dataloader.query_points import QUERY_POINT_MODES, query_points
from utils.config import Spec, section_config
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
        self._logged_reasons: set[str] = set()
        index = PairIndex(self.data_path, self.train, self.resize, self.conf["rot_thr"],
                          self.conf["max_pairs_per_scene"], self.conf["seed"])
        self.pairs = index.pairs
        self.dropped_at_index = index.dropped_at_index

    def _final_camera(self, camera: CameraRecord) -> CameraRecord:
        """The camera of the image as it will be returned (:func:`final_camera`)."""
        return final_camera(camera, self.resize)


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
            # On a PIL image, as the original.
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
