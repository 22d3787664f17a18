"""Images for feature extraction, one per item, in the layouts of the benchmarks.

:class:`ImageFolder` reads an image (pixels as stored), resizes it by ``scale`` when the layout
has that key, and crops it at the right and bottom to a multiple of 16 (the network's stride),
so crop pixels are file pixels. Each layout lists its images and names each one's feature
*key*: extraction writes ``desc/<key>.<postfix>`` (npz) or the h5 group ``<key>``.

| ``data`` | layout under ``data_path`` | key | queries |
| --- | --- | --- | --- |
| ``HPatch_SIFT`` | ``<seq>/<k>.ppm`` (:mod:`dataloader.hpatches`) | ``<seq>/<k>.ppm`` | none |
| ``Aachen_Day_Night`` | ``{db,sequences,query}/**`` (v1.1; ``data_path`` is ``images_upright``) | the path below ``images_upright`` (``db/1000.jpg``, hloc's names) | the images under ``query/`` |
| ``ETH_LFB`` | ``<scene>/images/*`` (ETH local-feature benchmark); with ``subfolder``: ``<subfolder>/images/*`` | ``<scene>/images/<name>``; with ``subfolder``: ``<subfolder>/<name>`` | none |
| ``InLoc`` | ``database/**`` and ``query/**`` (hloc's InLoc layout) | the path below ``data_path`` | none |

Image files: ``.jpg``, ``.jpeg``, ``.png``, ``.ppm`` in any letter case, sorted by path.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dataloader.collate import collate_skip_none
from utils.config import Spec, section_config
from utils.errors import SCFeatError
from utils.image import IMAGE_SUFFIXES, NETWORK_STRIDE, load_image, to_tensor_normalized

logger = logging.getLogger(__name__)



def folder_conf(data_path: str, **extra) -> dict:
    """The ``default_conf`` of an image layout: ``data_path``, ``batch_size`` (images are run
    one at a time; this sets how many are loaded at once), ``workers`` and ``extra`` keys."""
    return {"data_path": data_path, "batch_size": Spec(1, minimum=1),
            "workers": Spec(4, minimum=0), **extra}


def image_files(folder: Path) -> list[Path]:
    """The image files below ``folder`` (any depth), sorted by path."""
    return sorted(path for path in folder.rglob("*")
                  if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


class ImageFolder(Dataset):
    """The images of one layout (subclasses: :meth:`list_images`, :meth:`key`, optionally
    :meth:`is_query`); items are dicts (see :meth:`__getitem__`), ``None`` if unreadable."""

    collate_fn = staticmethod(collate_skip_none)  # drops unusable items (None), lists them
    default_conf = folder_conf("data")
    title = "image"  # the layout's name in messages
    layout = "<data_path>/**/<image>"

    def __init__(self, conf: dict):
        self.conf = section_config(self.default_conf, conf, "data_config_extract")
        self.root = Path(self.conf["data_path"])
        if not self.root.is_dir():
            raise SCFeatError(f"{self.title} data_path {self.root} is not a folder "
                              f"(expected {self.layout})")
        self.paths = self.list_images()
        if not self.paths:
            raise SCFeatError(f"no {self.title} images under {self.root}: expected {self.layout}")

    def list_images(self) -> list[Path]:
        """The layout's image files under :attr:`root`, in extraction order."""
        raise NotImplementedError

    def key(self, path: Path) -> str:
        """The image's feature key: extraction writes ``desc/<key>.<postfix>``."""
        raise NotImplementedError

    def is_query(self, path: Path) -> bool:
        """Whether the image is a query (extraction then uses ``detector_config_query``)."""
        return False

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict | None:
        """One image: ``image`` (3×H'×W' normalised), ``image_rgb`` (H'×W'×3 uint8),
        ``orig_size`` (long tensor ``[H, W]`` of the file), ``resized`` (the network image's
        size ÷ the file's, ``(x, y)``; ``(1.0, 1.0)`` without ``scale``), ``key``, ``query``,
        ``path``. H', W': the (resized) size rounded down to a multiple of 16."""
        path = self.paths[index]
        try:
            rgb = load_image(path)
        except SCFeatError as error:  # one bad file must not stop a whole extraction
            logger.warning("%s: skipping %s (%s)", self.title, path, error)
            return None
        height, width = rgb.shape[:2]
        scale = self.conf.get("scale", 1.0)
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else
                             cv2.INTER_LINEAR)
        crop_h = rgb.shape[0] // NETWORK_STRIDE * NETWORK_STRIDE
        crop_w = rgb.shape[1] // NETWORK_STRIDE * NETWORK_STRIDE
        if crop_h == 0 or crop_w == 0:
            size = f"{rgb.shape[0]}×{rgb.shape[1]}" + (f" at scale {scale:g}" if scale != 1 else "")
            logger.warning("%s: image %s (%s) is smaller than %d px; skipping it", self.title,
                           path, size, NETWORK_STRIDE)
            return None
        image_rgb = np.ascontiguousarray(rgb[:crop_h, :crop_w])
        return {
            "image": to_tensor_normalized(image_rgb),
            "image_rgb": torch.from_numpy(image_rgb),
            "orig_size": torch.tensor([height, width]),
            "resized": (rgb.shape[1] / width, rgb.shape[0] / height),
            "key": self.key(path),
            "query": self.is_query(path),
            "path": str(path),
        }


class Aachen_Day_Night(ImageFolder):
    """Aachen Day-Night v1.1: the database, sequence and query images; queries may have their
    own detector settings (``detector_config_query``).

    ``data_path`` is the ``images_upright`` folder itself (the original's level: it holds
    ``db/``, ``sequences/``, ``query/``); a folder above it, holding ``images_upright/`` or
    ``images/images_upright/``, is accepted too, with one log line naming the folder read. A
    ``data_path`` that matches two of these levels is refused, naming both."""

    default_conf = folder_conf("data/aachen_v1.1/images/images_upright")
    title = "Aachen Day-Night"
    layout = ("<data_path>/{db,sequences,query}/.../<image>.jpg (data_path: images_upright; or "
              "the folder holding images_upright/ or images/images_upright/)")
    parts = ("db", "sequences", "query")

    def upright_dir(self) -> Path:
        """The ``images_upright`` folder that ``data_path`` names (see the class doc)."""
        above = [self.root / "images_upright", self.root / "images" / "images_upright"]
        found = [folder for folder in above if folder.is_dir()]
        if any((self.root / part).is_dir() for part in self.parts):
            found.insert(0, self.root)
        if not found:
            raise SCFeatError(f"{self.root}: no {', '.join(self.parts)} folder here, nor "
                              f"{above[0]} or {above[1]} (Aachen Day-Night layout: {self.layout})")
        if len(found) > 1:
            raise SCFeatError(f"{self.root}: ambiguous Aachen Day-Night data_path: both {found[0]} "
                              f"and {found[1]} may be images_upright; set data_path to the one "
                              f"to read")
        if found[0] != self.root:
            logger.info("%s: data_path %s is above images_upright; reading %s", self.title,
                        self.root, found[0])
        return found[0]

    def list_images(self) -> list[Path]:
        self.images_dir = self.upright_dir()
        return image_files(self.images_dir)

    def key(self, path: Path) -> str:
        return path.relative_to(self.images_dir).as_posix()

    def is_query(self, path: Path) -> bool:
        return self.key(path).split("/", 1)[0] == "query"


def subfolder_problem(value: str | None) -> str | None:
    """What is wrong with an ETH ``subfolder`` (a scene folder's name below ``data_path``)."""
    if value is None:
        return None
    parts = Path(value).parts
    if not value.strip("/") or Path(value).is_absolute() or ".." in parts:
        return "must be a scene folder below data_path (e.g. Fountain), or null for every scene"
    return None


class ETH_LFB(ImageFolder):
    """The scenes of the ETH local-feature benchmark (3D reconstruction): every scene
    ``<data_path>/<scene>/images/`` (keys ``<scene>/images/<image>``), or with ``subfolder``
    (the original's key) that one scene's ``<data_path>/<subfolder>/images/`` (keys
    ``<subfolder>/<image>``, the original's)."""

    default_conf = folder_conf("data/eth", subfolder=Spec(
        None, types=(str, type(None)), check=subfolder_problem,
        doc="one scene, <data_path>/<subfolder>/images; null: every scene"))
    title = "ETH local-feature benchmark"
    layout = "<data_path>/<scene>/images/<image>"

    def list_images(self) -> list[Path]:
        subfolder = self.conf["subfolder"]
        if subfolder is not None:
            folder = self.root / subfolder / "images"
            if not folder.is_dir():
                raise SCFeatError(f"{folder}: folder not found (subfolder {subfolder!r}: the "
                                  f"scene's images in <data_path>/<subfolder>/images/<image>)")
            self.images_dir = folder
            return image_files(folder)
        paths = []
        for scene in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if (scene / "images").is_dir():
                paths += image_files(scene / "images")
            else:
                logger.warning("%s: no images folder; scene skipped", scene)
        return paths

    def key(self, path: Path) -> str:
        subfolder = self.conf["subfolder"]
        if subfolder is not None:
            return f"{subfolder.strip('/')}/{path.relative_to(self.images_dir).as_posix()}"
        return path.relative_to(self.root).as_posix()


class InLoc(ImageFolder):
    """InLoc's database cutouts and iPhone queries, resized by ``scale`` before the network
    (keypoints are written in the file's pixels)."""

    default_conf = folder_conf("data/inloc", scale=Spec(
        1.0, above=0, maximum=4, doc="resize factor before the network; keypoints are mapped "
                                     "back to the file's pixels"))
    title = "InLoc"
    layout = "<data_path>/database/cutouts/.../<image>.jpg and <data_path>/query/iphone7/<image>.JPG"

    def list_images(self) -> list[Path]:
        folders = [self.root / "database", self.root / "query"]
        if not any(folder.is_dir() for folder in folders):
            raise SCFeatError(f"{self.root}: neither {folders[0]} nor {folders[1]} exists "
                              f"(InLoc layout: {self.layout})")
        return [path for folder in folders if folder.is_dir() for path in image_files(folder)]

    def key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()
