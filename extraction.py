"""The extraction run behind ``extract_features.py`` (:func:`run_extraction`) and its writers
(npz, hloc's h5, score-map and keypoint images; every file: temp file + rename).

The images come from the dataset that ``data`` names (HPatches, Aachen Day-Night, the ETH
local-feature benchmark, InLoc: :mod:`dataloader.image_folders`), each with its feature key:
the files are ``desc/<key>.<postfix>`` (npz) or the groups ``<key>`` of one ``features.h5``.
Features come from :func:`model.features.select_features`, as for the per-image API; Aachen's
query images use ``detector_config_query`` when it is given. The loaders crop at the right and
bottom to a multiple of 16, so crop pixels are file pixels; InLoc's ``scale`` resizes first and
the keypoints are mapped back, so every file holds keypoints in the image file's pixels.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataloader.extraction_sets import EXTRACTION_DATASETS
from dataloader.image_folders import ImageFolder
from model.features import is_textureless, select_features, to_numpy
from model.keypoints import Detector, make_detector
from model.scfeat import SCFeatModel
from utils.acceleration import accelerated
from utils.atomic import atomic_open, atomic_target
from utils.cli import resolve_device
from utils.config import lookup
from utils.errors import SCFeatError
from utils.image import NETWORK_STRIDE

log = logging.getLogger("scfeat.extract")

H5_FILE = "features.h5"

OUTPUT_PARENT = Path("ckpts")  # the original writes to ./ckpts/<output_root>


def output_dir(conf: dict) -> Path:
    """``ckpts/<output_root>`` (relative to the working folder, as the original; an absolute
    ``output_root`` stays as it is), the folder that receives ``desc/``, ``image/`` or
    ``features.h5``."""
    return OUTPUT_PARENT / conf["output_root"]


def load_model(conf: dict, device: torch.device) -> torch.nn.Module:
    """The checkpoint of ``load_path`` with the config's model settings (those it leaves
    open come from the checkpoint run's ``config.yaml``: :func:`model.checkpoint_config.inherit_model_config`)."""
    return SCFeatModel.from_checkpoint(conf["load_path"], device, model_config=conf["model_config"])


# ---------------------------------------------------------------------------------------------
# writers (every file: temp file + rename)
# ---------------------------------------------------------------------------------------------

def feature_file(out_dir: Path, key: str, postfix: str) -> Path:
    """``<out_dir>/desc/<key>.<postfix>`` (for HPatches ``desc/<seq>/<k>.ppm.<postfix>``, what
    evaluation/hpatches.py reads)."""
    return out_dir / "desc" / f"{key}.{postfix}"


def write_npz(path: Path, features: dict[str, np.ndarray]) -> None:
    """``keypoints``, ``scores``, ``descriptors`` to ``path`` exactly (no ``.npz`` appended)."""
    with atomic_open(path) as handle:
        np.savez(handle, keypoints=features["keypoints"], scores=features["scores"],
                 descriptors=features["descriptors"])


@contextlib.contextmanager
def atomic_h5(path: Path) -> Iterator:
    """An open ``h5py.File`` on a temp file, renamed to ``path`` when the block succeeds."""
    import h5py

    with atomic_target(path) as tmp, h5py.File(tmp, "w") as handle:
        yield handle


def add_h5_features(handle, name: str, features: dict[str, np.ndarray],
                    image_wh: tuple[int, int]) -> None:
    """Group ``name`` (the image's key) in hloc's layout: ``keypoints`` N×2, ``scores`` N,
    ``descriptors`` D×N (hloc stores them transposed), ``image_size`` [W, H]."""
    group = handle.create_group(name)
    group.create_dataset("keypoints", data=features["keypoints"])
    group.create_dataset("scores", data=features["scores"])
    group.create_dataset("descriptors", data=np.ascontiguousarray(features["descriptors"].T))
    group.create_dataset("image_size", data=np.array(image_wh, dtype=np.int64))


def write_png(path: Path, image_bgr: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image_bgr)
    if not ok:
        raise SCFeatError(f"cannot encode {path} as PNG")
    with atomic_open(path) as handle:
        handle.write(data.tobytes())


def score_map_image(score_map: np.ndarray) -> np.ndarray:
    """``H×W`` scores → ``H×W×3`` BGR, colour-mapped (jet) from 0 to the map's maximum."""
    scaled = score_map / max(float(score_map.max()), 1e-12)
    return cv2.applyColorMap(np.clip(scaled * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)


def keypoints_image(image_rgb: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The image (BGR) with the keypoints drawn as small green circles."""
    canvas = np.ascontiguousarray(image_rgb[..., ::-1])
    for x, y in np.rint(keypoints).astype(int):
        cv2.circle(canvas, (int(x), int(y)), 2, (0, 255, 0), 1, lineType=cv2.LINE_AA)
    return canvas


def write_images(out_dir: Path, key: str, image_rgb: np.ndarray, score_map: np.ndarray,
                 keypoints: np.ndarray) -> None:
    """``image/<folder>/<stem>_score.png`` and ``image/<folder>/<stem>_kpts.png`` for the key
    ``<folder>/<stem>.<ext>`` (the network's image and its keypoints)."""
    stem = out_dir / "image" / Path(key).with_suffix("")
    write_png(stem.with_name(f"{stem.name}_score.png"), score_map_image(score_map))
    write_png(stem.with_name(f"{stem.name}_kpts.png"), keypoints_image(image_rgb, keypoints))


def to_file_pixels(keypoints: np.ndarray, resized: tuple[float, float]) -> np.ndarray:
    """Keypoints ``N×2`` of an image resized by ``resized`` (``x, y`` factors) → the file's
    pixels (centres at integers: ``x = (x' + 0.5) / s - 0.5``)."""
    if tuple(resized) == (1.0, 1.0):
        return keypoints
    factors = np.asarray(resized, np.float32)
    return ((keypoints + 0.5) / factors - 0.5).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

class IndexedDataset(Dataset):
    """``(index, item)``, so an unreadable item (``None``) can still be named."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict | None]:
        return index, self.dataset[index]


def make_dataset(conf: dict) -> ImageFolder:
    """The images of ``data`` (raises when ``data_path`` holds none); SIFT per ``use_sift``
    (HPatches)."""
    dataset_class = lookup(EXTRACTION_DATASETS, conf["data"], "data")
    data = dict(conf["data_config_extract"])
    if "use_sift" in dataset_class.default_conf:
        data["use_sift"] = conf["use_sift"]
    return dataset_class(data)


def make_loader(dataset: Dataset, conf: dict, device: torch.device) -> DataLoader:
    """Lists of ``(index, item)``; images differ in size, so each is run on its own and
    ``batch_size`` only sets how many are loaded at a time."""
    data = conf["data_config_extract"]
    return DataLoader(IndexedDataset(dataset), batch_size=data["batch_size"], shuffle=False,
                      num_workers=data["workers"], collate_fn=list,
                      pin_memory=device.type == "cuda")


def extract_item(extract: Callable, item: dict, detector: Detector, conf: dict,
                 device: torch.device) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of one loader item (numpy) and its score map ``H×W`` (numpy); ``extract`` is
    ``model.extract``, possibly under bf16 autocast or compiled (:func:`accelerated`)."""
    image = item["image"][None].to(device, non_blocking=True)
    outputs = extract(image)
    sift = item["sift_kpts"] if conf["use_sift"] else None
    features = select_features(outputs, tuple(image.shape[-2:]), detector, conf["descriptor_map"],
                               sift, textureless=is_textureless(item["image"]))
    score_map = outputs["local_point"][0, 0].float().cpu().numpy() if conf["output_img"] else None
    return to_numpy(features), score_map


def remove_stale(out_dir: Path, key: str, conf: dict) -> None:
    """Delete an older feature file of an image that could not be read this time, so the
    evaluation never reads features of a previous run."""
    if conf["output_desc"] and conf["format"] == "npz":
        stale = feature_file(out_dir, key, conf["postfix"])
        if stale.is_file():
            stale.unlink()
            log.warning("removed %s, left by an earlier run", stale)


def run_extraction(conf: dict) -> dict:
    """Extract features for every image of the (validated) config's dataset.

    Returns the summary ``{images, mean_ms, skipped (paths), output (folder), features (the h5
    file or the desc folder; None without output_desc, or with save_npz: false and no format)}``.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    device = resolve_device(conf["device"])
    dataset = make_dataset(conf)
    model = load_model(conf, device)
    extract = accelerated(model.extract, device, conf["amp"], conf["compile"])
    detector = make_detector(conf["detector"], conf["detector_config"])
    detectors = {False: detector, True: make_detector(conf["detector"], conf["detector_config_query"])
                 if conf["detector_config_query"] else detector}  # by item["query"]
    out_dir = output_dir(conf)
    log.info("extracting %d images of %s on %s into %s", len(dataset),
             conf["data_config_extract"]["data_path"], device, out_dir)
    if conf["output_desc"] and conf["format"] is None:
        log.warning("save_npz: false without 'format': no feature files are written (the "
                    "original's meaning; 'format: h5' writes one %s)", H5_FILE)
    write_h5 = conf["output_desc"] and conf["format"] == "h5"
    times, skipped = [], []
    with contextlib.ExitStack() as stack:
        h5 = stack.enter_context(atomic_h5(out_dir / H5_FILE)) if write_h5 else None
        stack.enter_context(logging_redirect_tqdm())
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(tqdm(total=len(dataset), desc="extract", disable=None,
                                       dynamic_ncols=True))
        for batch in make_loader(dataset, conf, device):
            for index, item in batch:
                bar.update(1)
                if item is None:
                    skipped.append(dataset.paths[index])
                    remove_stale(out_dir, dataset.key(dataset.paths[index]), conf)
                    continue
                times.append(save_item(extract, item, detectors[item["query"]], conf, device,
                                       out_dir, h5))
        if not times:
            raise SCFeatError(f"none of the {len(dataset)} images under "
                              f"{conf['data_config_extract']['data_path']} could be read")
    return summarize(conf, out_dir, times, skipped)


def save_item(extract: Callable, item: dict, detector: Detector, conf: dict,
              device: torch.device, out_dir: Path, h5) -> float:
    """Extract one image and write its outputs; returns the extraction time in ms."""
    start = time.perf_counter()
    features, score_map = extract_item(extract, item, detector, conf, device)
    elapsed_ms = (time.perf_counter() - start) * 1000.0  # network + selection; to_numpy synced
    key = item["key"]
    height, width = (int(v) for v in item["orig_size"])
    in_file = {**features, "keypoints": to_file_pixels(features["keypoints"], item["resized"])}
    if conf["output_desc"] and h5 is not None:
        add_h5_features(h5, key, in_file, (width, height))
    elif conf["output_desc"] and conf["format"] == "npz":
        write_npz(feature_file(out_dir, key, conf["postfix"]), in_file)
    if conf["output_img"]:
        write_images(out_dir, key, item["image_rgb"].numpy(), score_map, features["keypoints"])
    log.info("%s: %d keypoints, %.1f ms", key, len(features["keypoints"]), elapsed_ms)
    return elapsed_ms


def summarize(conf: dict, out_dir: Path, times: list[float], skipped: list[Path]) -> dict:
    """Log and return the run's summary."""
    features = None
    if conf["output_desc"] and conf["format"] is not None:
        features = out_dir / (H5_FILE if conf["format"] == "h5" else "desc")
    summary = {"images": len(times), "mean_ms": float(np.mean(times)) if times else 0.0,
               "skipped": skipped, "output": out_dir, "features": features}
    log.info("done: %d images, %.1f ms/image on average; features in %s", summary["images"],
             summary["mean_ms"], features if features is not None else "(none written)")
    if skipped:
        log.warning("skipped %d image(s) that could not be read (or are smaller than %d px): %s",
                    len(skipped), NETWORK_STRIDE, ", ".join(str(p) for p in skipped))
    return summary
