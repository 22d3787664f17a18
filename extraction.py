"""Feature extraction: the Python API for any image (:func:`detect_and_describe`) and the
HPatches extraction run behind ``extract_features.py`` (:func:`run_extraction`).

Both paths share :func:`select_features`: keypoints from the detector score map
(``local_point``) or given (SIFT), descriptors bilinearly sampled from ``desc_map`` (the fused map
before normalisation, as the original) or ``local_map`` and L2-normalised, scores from the map.

Coordinates are pixels ``x, y`` of the image as given (pixel centres at integers):

* the HPatches loader crops at the right and bottom to a multiple of 16, so crop pixels are
  original pixels and the files hold keypoints in the uncropped image's frame;
* :func:`detect_and_describe` pads at the right and bottom instead (every pixel is kept) and
  crops the score map back to the input size before selection, so no keypoint comes from the
  padding and keypoints are in the input image's pixels.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataloader.hpatches import HPatch_SIFT
from dataloader.transforms import to_tensor_normalized
from registry import (DATASETS, DETECTORS, MODELS, class_section, inherit_model_config, lookup,
                      model_schema)
from utils.acceleration import accelerated
from utils.atomic import atomic_open, atomic_target
from utils.config import Dynamic, Spec, load_config, validate
from utils.errors import SCFeatError
from utils.keypoints import NMS_MODES, THRESHOLD_MODES, sample_descriptors

log = logging.getLogger("scfeat.extract")

PAD_MULTIPLE = 16  # the network's stride
MIN_IMAGE_SIZE = 16  # smaller images would be mostly padding
DESCRIPTOR_MAPS = ("desc_map", "local_map")
FEATURE_FORMATS = ("npz", "h5")
CHECKPOINT_FILES = ("backbone.pth", "localheader.pth")
H5_FILE = "features.h5"

Features = dict[str, torch.Tensor]
Detector = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Detector options whose default (None, or a free string) cannot state the type or choices.
DETECTOR_SPECS = {
    # The original reads a falsy thr (false, 0, null) as "no threshold".
    "thr": Spec(None, types=(float, bool, type(None))),
    "use_nms": Spec(True, types=(bool, str), choices=NMS_MODES),
    "thr_mod": Spec("abs", choices=THRESHOLD_MODES),
}


# ---------------------------------------------------------------------------------------------
# keypoints and descriptors from the network outputs (both paths)
# ---------------------------------------------------------------------------------------------

def detector_schema(name: str) -> dict:
    """Schema of the options of the detector ``name`` (its ``default_conf``, typed)."""
    defaults = lookup(DETECTORS, name, "detector").default_conf
    return {key: DETECTOR_SPECS.get(key, value) for key, value in defaults.items()}


def make_detector(name: str, options: dict, origin: str = "detector_config") -> Detector:
    """The detector ``name`` with ``options`` (validated; defaults filled in) bound: a function
    ``score_map 1×1×H×W → (keypoints N×2, scores N)``."""
    options = validate(options, detector_schema(name), origin)
    detector = functools.partial(DETECTORS[name], **options)
    try:
        detector(torch.zeros(3, 3))  # the detector's own value checks, before any work
    except SCFeatError as error:
        raise SCFeatError(f"{origin}: {error}") from None
    return detector


def is_textureless(image: torch.Tensor) -> bool:
    """True when every channel of a ``C×H×W`` (or ``1×C×H×W``) image is constant.

    Such an image has nothing to detect: the score map's only structure comes from the
    convolutions' zero padding at the image border, and keypoints there would be noise.
    """
    flat = image.reshape(image.shape[-3], -1)
    return bool((flat.amax(1) == flat.amin(1)).all())


def select_features(outputs: dict[str, torch.Tensor], valid_hw: tuple[int, int], detector: Detector,
                    descriptor_map: str = "desc_map", keypoints: torch.Tensor | None = None,
                    textureless: bool = False) -> Features:
    """Keypoints, scores and descriptors of one image from the network ``outputs`` (batch 1).

    ``valid_hw``: the image's size inside the (possibly padded) network input; the score map is
    cropped to it first, so the padding yields no keypoint. ``keypoints`` (``N×2`` pixels) replace
    the detector's, each with score 1 (the original's ``use_sift``). ``textureless`` (see
    :func:`is_textureless`): no keypoints at all. Returns ``keypoints`` ``N×2``, ``scores``
    ``N``, ``descriptors`` ``N×D`` (unit norm), float32 on the outputs' device.
    """
    height, width = valid_hw
    score_map = outputs["local_point"][:, :, :height, :width]
    if textureless:
        keypoints = score_map.new_zeros(0, 2)
    if keypoints is None:
        keypoints, scores = detector(score_map)
    else:
        keypoints = keypoints.to(score_map.device, torch.float32).reshape(-1, 2)
        scores = keypoints.new_ones(len(keypoints))
    input_hw = tuple(outputs["local_point"].shape[-2:])
    descriptors = sample_descriptors(outputs[descriptor_map], keypoints, input_hw)
    return {"keypoints": keypoints.float(), "scores": scores.float(),
            "descriptors": descriptors.float()}


def to_numpy(features: Features) -> dict[str, np.ndarray]:
    """Tensors → contiguous float32 numpy arrays on the CPU."""
    return {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32)
            for k, v in features.items()}


# ---------------------------------------------------------------------------------------------
# Python API: any image
# ---------------------------------------------------------------------------------------------

def check_image(image: object) -> None:
    """Raise a clear error unless ``image`` is an ``H×W×3`` uint8 RGB numpy array with
    ``H, W >= MIN_IMAGE_SIZE``.

    Only uint8 is accepted: a float image could hold 0..1 or 0..255, and guessing wrong would
    silently give poor features.
    """
    where = "detect_and_describe: image"
    if isinstance(image, torch.Tensor):
        raise SCFeatError(f"{where} must be a numpy array H×W×3 uint8 RGB, got a torch tensor "
                          f"(use tensor.cpu().numpy())")
    if not isinstance(image, np.ndarray):
        raise SCFeatError(f"{where} must be a numpy array H×W×3 uint8 RGB, got "
                          f"{type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = (" (grey image: np.stack([image] * 3, axis=-1))" if image.ndim == 2 else
                " (RGBA: image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else "")
        raise SCFeatError(f"{where} must have shape H×W×3 (RGB), got {image.shape}{hint}")
    if image.dtype != np.uint8:
        hint = (" (a float image in [0, 1]: (image * 255).round().astype(np.uint8))"
                if np.issubdtype(image.dtype, np.floating) else "")
        raise SCFeatError(f"{where} must be uint8 (0..255), got {image.dtype}{hint}")
    if min(image.shape[:2]) < MIN_IMAGE_SIZE:
        raise SCFeatError(f"{where} is {image.shape[0]}×{image.shape[1]}; the network needs at "
                          f"least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} pixels")


def pad_to_multiple(image: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """``H×W×3`` → ``H'×W'×3`` with H', W' the next multiples of ``multiple``, padded at the
    right and bottom by replicating the last row and column.

    Replicate rather than zero: black padding would put a strong artificial edge along the
    image border, and since the detector normalises its maps over the whole image (peakiness,
    instance norm), that edge would change the scores inside the image too.
    """
    height, width = image.shape[:2]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return image
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def detect_and_describe(model: torch.nn.Module, image: np.ndarray,
                        detector: str = "generate_kpts_single", descriptor_map: str = "desc_map",
                        **detector_config) -> dict[str, np.ndarray]:
    """Features of one ``H×W×3`` uint8 RGB image of any size (at least 16×16).

    The image is padded at the right/bottom to a multiple of 16 (:func:`pad_to_multiple`),
    ImageNet-normalised and run through ``model`` (in eval mode, on its device); keypoints are
    selected by ``detector`` with ``detector_config`` (its ``default_conf`` otherwise, e.g.
    ``num_pts=8192, thr=None`` for ``generate_kpts_single``) on the score map cropped to the
    image. Returns numpy float32 ``keypoints`` ``N×2`` (``x, y`` in the input's pixels),
    ``scores`` ``N`` and ``descriptors`` ``N×D`` (unit norm), best score first; ``N = 0`` for
    an image without texture (:func:`is_textureless`).
    """
    check_image(image)
    if descriptor_map not in DESCRIPTOR_MAPS:
        raise SCFeatError(f"detect_and_describe: descriptor_map must be one of "
                          f"{list(DESCRIPTOR_MAPS)}, got {descriptor_map!r}")
    select = make_detector(detector, detector_config, origin="detect_and_describe")
    tensor = to_tensor_normalized(pad_to_multiple(image))[None].to(model_device(model))
    was_training = model.training
    model.eval()  # BatchNorm must use its running statistics
    try:
        with torch.inference_mode():
            outputs = model.extract(tensor)
            features = select_features(outputs, image.shape[:2], select, descriptor_map,
                                       textureless=is_textureless(tensor))
            return to_numpy(features)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

EXTRACT_SCHEMA = {
    "output_root": Spec(types=(str,), doc="the output folder (desc/, image/, features.h5)"),
    "postfix": Spec("scfeat", doc="feature files are desc/<seq>/<k>.ppm.<postfix>"),
    "load_path": Spec(types=(str,), doc="checkpoint folder with backbone.pth, localheader.pth"),
    "loss_distance": Spec("cos", choices=("cos",)),  # the original's key; descriptors are unit norm
    "output_desc": True,
    "output_img": False,
    "model": Spec("SCFeatModel", choices=tuple(MODELS)),
    "model_config": Dynamic(lambda root, raw: model_schema(raw)),
    "data": Spec("HPatch_SIFT", choices=("HPatch_SIFT",)),
    "data_config_extract": Dynamic(class_section(DATASETS, "data")),
    "local_thr": Spec(None, types=(float, type(None)), inert=True),
    "use_sift": False,
    "detector": Spec("generate_kpts_single", choices=tuple(DETECTORS)),
    "detector_config": Dynamic(lambda root, raw: detector_schema(root["detector"])),
    # Our additions.
    "descriptor_map": Spec("desc_map", choices=DESCRIPTOR_MAPS),
    "format": Spec("npz", choices=FEATURE_FORMATS),
    "device": Spec("auto", choices=("auto", "cpu", "cuda")),
    "amp": Spec(False, doc="bf16 autocast (CUDA; see utils/acceleration.py)"),
    "compile": Spec(False, doc="torch.compile the network (CUDA; see utils/acceleration.py)"),
}


def load_extract_config(path: str | Path, overrides: list[str] | tuple = (),
                        inert_keys: list[str] | None = None) -> dict:
    """The extraction config of ``path`` with ``KEY=VALUE`` overrides, validated; model
    settings left open are inherited from the checkpoint's run. ``inert_keys`` receives the
    keys accepted only for compatibility."""
    return load_config(path, overrides, EXTRACT_SCHEMA, prepare=inherit_model_config,
                       inert_keys=inert_keys)


def check_config(conf: dict, origin: str) -> None:
    """Cross-key rules and the checkpoint files, checked before any model is built."""
    def fail(message: str) -> None:
        raise SCFeatError(f"{origin}: {message}")

    if not conf["output_root"].strip():
        fail("key 'output_root' must be a non-empty folder name")
    if not conf["postfix"] or any(c in conf["postfix"] for c in "/\\"):
        fail(f"key 'postfix' must be a non-empty file suffix without '/', got {conf['postfix']!r}")
    folder = Path(conf["load_path"])
    if not folder.is_dir():
        fail(f"key 'load_path': checkpoint folder '{folder}' does not exist (expected a folder "
             f"with {' and '.join(CHECKPOINT_FILES)}, e.g. ckpts/keypoint-1k/001)")
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            fail(f"key 'load_path': '{folder / name}' does not exist (expected a checkpoint "
                 f"folder with {' and '.join(CHECKPOINT_FILES)})")
    data = conf["data_config_extract"]
    if data["batch_size"] < 1 or data["workers"] < 0:
        fail(f"key 'data_config_extract': expected batch_size >= 1 and workers >= 0, got "
             f"batch_size={data['batch_size']}, workers={data['workers']}")
    if data["use_sift"] and not conf["use_sift"]:
        fail("key 'data_config_extract.use_sift' is true but 'use_sift' is false; set only the "
             "top-level 'use_sift'")
    make_detector(conf["detector"], conf["detector_config"], f"{origin}: key 'detector_config'")


def resolve_device(choice: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` must be available."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise SCFeatError("key 'device': cuda was asked for but CUDA is not available "
                          "(use device=auto or device=cpu)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def output_dir(conf: dict) -> Path:
    """``output_root``, the folder that receives ``desc/``, ``image/`` or ``features.h5``."""
    return Path(conf["output_root"])


def load_model(conf: dict, device: torch.device) -> torch.nn.Module:
    """The checkpoint of ``load_path`` with the config's model settings (those it leaves
    open come from the checkpoint run's ``config.yaml``: :func:`registry.inherit_model_config`)."""
    from model.scfeat import SCFeatModel

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
