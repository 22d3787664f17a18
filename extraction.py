"""The HPatches extraction run behind ``extract_features.py`` (:func:`run_extraction`) and its
writers (npz, hloc's h5, score-map and keypoint images; every file: temp file + rename).

Features come from :func:`model.extractor.select_features`, as for the per-image API. The
HPatches loader crops at the right and bottom to a multiple of 16, so crop pixels are original
pixels and the files hold keypoints in the uncropped image's frame.
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

from dataloader.hpatches import HPatch_SIFT
from model.extractor import (PAD_MULTIPLE, Detector, is_textureless, make_detector,
                             select_features, to_numpy)
from model.scfeat import SCFeatModel
from utils.acceleration import accelerated
from utils.atomic import atomic_open, atomic_target
from utils.cli import resolve_device
from utils.errors import SCFeatError

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
    open come from the checkpoint run's ``config.yaml``: :func:`registry.inherit_model_config`)."""
    return SCFeatModel.from_checkpoint(conf["load_path"], device, model_config=conf["model_config"])


# ---------------------------------------------------------------------------------------------
# writers (every file: temp file + rename)
# ---------------------------------------------------------------------------------------------

def feature_file(out_dir: Path, seq: str, name: str, postfix: str) -> Path:
    """``<out_dir>/desc/<seq>/<name>.<postfix>`` (what evaluation/hpatches.py reads)."""
    return out_dir / "desc" / seq / f"{name}.{postfix}"


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
    """Group ``name`` (``<seq>/<k>.ppm``) in hloc's layout: ``keypoints`` N×2, ``scores`` N,
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


def write_images(out_dir: Path, seq: str, name: str, image_rgb: np.ndarray,
                 score_map: np.ndarray, keypoints: np.ndarray) -> None:
    """``image/<seq>/<stem>_score.png`` and ``image/<seq>/<stem>_kpts.png``."""
    stem = Path(name).stem
    write_png(out_dir / "image" / seq / f"{stem}_score.png", score_map_image(score_map))
    write_png(out_dir / "image" / seq / f"{stem}_kpts.png", keypoints_image(image_rgb, keypoints))


# ---------------------------------------------------------------------------------------------
# the HPatches run
# ---------------------------------------------------------------------------------------------

class IndexedDataset(Dataset):
    """``(index, item)``, so an unreadable item (``None``) can still be named."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict | None]:
        return index, self.dataset[index]


def make_dataset(conf: dict) -> HPatch_SIFT:
    """The HPatches images (raises when ``data_path`` holds none); SIFT per ``use_sift``."""
    return HPatch_SIFT({**conf["data_config_extract"], "use_sift": conf["use_sift"]})


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


def remove_stale(out_dir: Path, path: Path, conf: dict) -> None:
    """Delete an older feature file of an image that could not be read this time, so the
    evaluation never reads features of a previous run."""
    if conf["output_desc"] and conf["format"] == "npz":
        stale = feature_file(out_dir, path.parent.name, path.name, conf["postfix"])
        if stale.is_file():
            stale.unlink()
            log.warning("removed %s, left by an earlier run", stale)


def run_extraction(conf: dict) -> dict:
    """Extract features for every HPatches image of the (validated) config.

    Returns the summary ``{images, mean_ms, skipped (paths), output (folder), features (the h5
    file or the desc folder, None without output_desc)}``.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    device = resolve_device(conf["device"])
    dataset = make_dataset(conf)
    model = load_model(conf, device)
    extract = accelerated(model.extract, device, conf["amp"], conf["compile"])
    detector = make_detector(conf["detector"], conf["detector_config"])
    out_dir = output_dir(conf)
    log.info("extracting %d images of %s on %s into %s", len(dataset),
             conf["data_config_extract"]["data_path"], device, out_dir)
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
                    remove_stale(out_dir, dataset.paths[index], conf)
                    continue
                times.append(save_item(extract, item, detector, conf, device, out_dir, h5))
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
    seq, name = item["seq"], item["name"]
    height, width = (int(v) for v in item["orig_size"])
    if conf["output_desc"] and h5 is not None:
        add_h5_features(h5, f"{seq}/{name}", features, (width, height))
    elif conf["output_desc"]:
        write_npz(feature_file(out_dir, seq, name, conf["postfix"]), features)
    if conf["output_img"]:
        write_images(out_dir, seq, name, item["image_rgb"].numpy(), score_map,
                     features["keypoints"])
    log.info("%s/%s: %d keypoints, %.1f ms", seq, name, len(features["keypoints"]), elapsed_ms)
    return elapsed_ms


def summarize(conf: dict, out_dir: Path, times: list[float], skipped: list[Path]) -> dict:
    """Log and return the run's summary."""
    features = None
    if conf["output_desc"]:
        features = out_dir / (H5_FILE if conf["format"] == "h5" else "desc")
    summary = {"images": len(times), "mean_ms": float(np.mean(times)) if times else 0.0,
               "skipped": skipped, "output": out_dir, "features": features}
    log.info("done: %d images, %.1f ms/image on average; features in %s", summary["images"],
             summary["mean_ms"], features if features is not None else "(output_desc: false)")
    if skipped:
        log.warning("skipped %d image(s) that could not be read (or are smaller than %d px): %s",
                    len(skipped), PAD_MULTIPLE, ", ".join(str(p) for p in skipped))
    return summary
