"""Does stage 2 learn? REINFORCE on the real ``DetNet`` with oracle descriptors.

The real :class:`~losses.keypoint.KeypointLoss` trains the real :class:`~model.detnet.DetNet`
on synthetic scenes whose descriptors are oracles (:mod:`tools.oracle`): informative (a fixed
embedding of the 3-D point) on three planes, uninformative (random per view) on the two planes
textured with the brick wall and the coffee cup (about half of the pixels). The detector keeps its usual input: the maps ``cat(local_map, local_map_first)`` of a
frozen, randomly initialised backbone whose BatchNorm statistics are estimated on the
experiment's images, plus the image; only the loss sees the oracle maps (as ``local_map``).

Measured every ``eval_every`` steps with the same keypoint draws for every run (a fixed RNG
seed): ``match_precision`` (of the mutual-nearest-neighbour matches of the oracle descriptors
between the accepted keypoints of the two images, the fraction within ``reward_thr`` of the
epipolar lines both ways), ``informative`` (the fraction of accepted keypoints in the
informative part) and the mean acceptance probability ``σ(score)`` over informative and
uninformative pixels, on ten pairs of the training scenes and, for DetNet, on pairs of a
held-out scene. Controls: ``zero`` (reward replaced by 0, only the penalty acts) and
``shuffled`` (the good pairs moved to as many random proposal pairs, so the rewards are
permuted among the pairs). ``free_map_update_balance`` measures why Adam on free per-pixel
maps moves the wrong way.
"""
from __future__ import annotations

import argparse
import inspect
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from utils.cli import network_size
from utils.image import normalize_imagenet, to_float_tensor
from losses.keypoint import KeypointLoss
from losses.keypoint_sampling import sample_keypoints
from model import fast
from model.detnet import DetNet
from model.f2r import ResUNet_F2R
from tools.oracle import FourierEmbedding, length_scale_for, make_scene_pairs
from utils.errors import SCFeatError
from utils.geometry import epipolar_lines, normalize_coords, point_line_distance, sample_features

CONTROLS = ("none", "zero", "shuffled")
EVAL_SEED = 12345  # the same keypoint draws for every run and every evaluation
EVAL_TRAIN_PAIRS = 10  # training-scene pairs measured


# --------------------------------------------------------------------------- controls

class ControlledKeypointLoss(KeypointLoss):
    """``KeypointLoss`` whose reward can be replaced, for the controls of the experiment.

    ``control='zero'``: every reward is 0 (the penalty still acts, scaled as usual);
    ``'shuffled'``: the good pairs are replaced by as many random accepted pairs of the same
    image pair, so the rewards are permuted among the accepted pairs; ``'none'``: the loss as
    is. Hooks :meth:`KeypointLoss.reward_terms` (whose ``base`` / ``good_bonus`` /
    ``good_index`` describe the reward), and nothing else.
    """

    def __init__(self, conf: dict | None = None, control: str = "none", seed: int = 0):
        super().__init__(conf)
        if control not in CONTROLS:
            raise SCFeatError(f"control: expected one of {CONTROLS}, got {control!r}")
        self.control = control
        self.shuffle_generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def reward_terms(self, *args, **kwargs) -> dict:
        terms = super().reward_terms(*args, **kwargs)
        if self.control == "zero":
            terms = {**terms, "base": 0.0, "good_bonus": 0.0}
        elif self.control == "shuffled":
            bound = inspect.signature(super().reward_terms).bind(*args, **kwargs).arguments
            terms = {**terms, "good_index": self._shuffled(terms["good_index"], bound)}
        return terms

    def _shuffled(self, good_index: torch.Tensor, arguments: dict) -> torch.Tensor:
        """As many random accepted pairs per image pair as ``good_index`` holds (``G×3``)."""
        accepted1 = arguments.get("accepted1")
        accepted2 = arguments.get("accepted2")
        if accepted1 is None:
            accepted1 = torch.ones(arguments["keypoints1"].shape[:2], dtype=torch.bool)
            accepted2 = torch.ones(arguments["keypoints2"].shape[:2], dtype=torch.bool)
        rows = []
        for b in range(accepted1.shape[0]):
            count = int((good_index[:, 0] == b).sum())
            idx1 = torch.nonzero(accepted1[b].cpu())[:, 0]
            idx2 = torch.nonzero(accepted2[b].cpu())[:, 0]
            total = idx1.numel() * idx2.numel()
            if count == 0 or total == 0:
                continue
            flat = torch.randperm(total, generator=self.shuffle_generator)[:count]
            pick = torch.stack([torch.full_like(flat, b), idx1[flat // idx2.numel()],
                                idx2[flat % idx2.numel()]], -1)
            rows.append(pick[torch.argsort(pick[:, 1] * accepted2.shape[1] + pick[:, 2])])
        if not rows:
            return good_index[:0]
        return torch.cat(rows).to(good_index.device)


# --------------------------------------------------------------------------- data

@dataclass
class Experiment:
    """Views and pairs of the experiment. ``images`` ``V×3×H×W`` (ImageNet-normalised),
    ``features`` ``V×192×H/4×W/4`` (frozen backbone), ``descriptors`` ``V×C×H/4×W/4``
    (oracle), ``informative`` ``V×H×W`` bool; pairs ``(v1, v2)`` with ``F1``, ``F2``."""
    images: torch.Tensor
    features: torch.Tensor
    descriptors: torch.Tensor
    informative: torch.Tensor
    train_pairs: list
    eval_pairs: list
    fmats: dict = field(default_factory=dict)

    def measured_train_pairs(self) -> list:
        """``EVAL_TRAIN_PAIRS`` training pairs spread over the training scenes."""
        stride = max(1, len(self.train_pairs) // EVAL_TRAIN_PAIRS)
        return self.train_pairs[::stride][:EVAL_TRAIN_PAIRS]


def build_experiment(size: tuple[int, int], seed: int, train_scenes: int = 2,
                     images_per_scene: int = 6, max_eval_pairs: int = 10) -> Experiment:
    """Render ``train_scenes`` training scenes and one held-out scene (at most
    ``max_eval_pairs`` of its pairs are measured), compute the oracle maps and the frozen
    backbone's detector inputs."""
    embedding = FourierEmbedding(128, length_scale_for(size[1]), seed)
    scene_pairs = make_scene_pairs(train_scenes + 1, images_per_scene, size, seed, embedding)
    views, index, train_pairs, eval_pairs, fmats = [], {}, [], [], {}
    for pair in scene_pairs:
        ids = []
        for view in (pair["view1"], pair["view2"]):
            if id(view) not in index:
                index[id(view)] = len(views)
                views.append(view)
            ids.append(index[id(view)])
        fmats[tuple(ids)] = (pair["F1"], pair["F2"])
        held_out = ids[0] >= train_scenes * images_per_scene
        (eval_pairs if held_out else train_pairs).append(tuple(ids))
    if not train_pairs or not eval_pairs:
        raise SCFeatError("learning_check stage2: the scenes gave no training or no held-out "
                          "pair; try another --seed")
    eval_pairs = eval_pairs[:max_eval_pairs]
    images = torch.stack([normalize_imagenet(to_float_tensor(v.image)) for v in views])
    features = frozen_backbone_features(images, seed)
    return Experiment(images, features, torch.stack([v.descriptors for v in views]),
                      torch.from_numpy(np.stack([v.informative for v in views])),
                      train_pairs, eval_pairs, fmats)


@torch.no_grad()
def frozen_backbone_features(images: torch.Tensor, seed: int, batch: int = 4) -> torch.Tensor:
    """``cat(local_map, local_map_first)`` (``V×192×H/4×W/4``) of a random ResUNet_F2R whose
    BatchNorm statistics are the average over ``images`` (a fresh network's mean 0 / var 1
    would not normalise in eval mode)."""
    torch.manual_seed(seed)
    backbone = fast.attach(ResUNet_F2R({"pretrained": False}), fast.DEFAULT)
    for module in backbone.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    backbone.train()
    for start in range(0, len(images), batch):
        backbone(images[start:start + batch])
    backbone.eval()
    maps = [backbone(images[s:s + batch]) for s in range(0, len(images), batch)]
    return torch.cat([torch.cat([m["local_map"], m["local_map_first"]], 1) for m in maps])


# --------------------------------------------------------------------------- detectors

class FreeScores(torch.nn.Module):
    """Free per-pixel logits, one ``1×H×W`` map per view: the parameterisation that can express
    any score map, the upper reference for what the reward can teach."""

    def __init__(self, n_views: int, height: int, width: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(n_views, 1, height, width))

    def forward(self, views: torch.Tensor, experiment: Experiment) -> torch.Tensor:
        return self.logits[views]


class DetNetScores(torch.nn.Module):
    """The real ``DetNet`` on the frozen backbone's maps and the image.

    ``affine=True`` (an experiment, not the original): the logits are ``a·score + b`` with
    learnable scalars ``a`` (from 1) and ``b`` (from 0), so they can leave the range that
    DetNet's ``softplus(IN(·))·peakiness`` output allows (``≥ 0``, with a contrast capped by
    the instance norm).
    """

    def __init__(self, in_channels: int, affine: bool = False):
        super().__init__()
        self.detnet = fast.attach(DetNet({"in_channels": in_channels}, with_image=True),
                                  fast.DEFAULT)
        self.affine = affine
        if affine:
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.offset = torch.nn.Parameter(torch.zeros(()))

    def forward(self, views: torch.Tensor, experiment: Experiment) -> torch.Tensor:
        score = self.detnet(experiment.features[views], experiment.images[views])
        return self.scale * score + self.offset if self.affine else score


# --------------------------------------------------------------------------- measures

@torch.no_grad()
def evaluate(detector: torch.nn.Module, experiment: Experiment, grid_size: int,
             threshold: float, pairs: list | None = None, draws: int = 4) -> dict:
    """``match_precision`` and ``informative`` fraction on ``pairs`` (default: the held-out
    pairs; pooled over pairs and ``draws`` keypoint draws), ``n_matches`` and ``n_kps`` per
    image pair, and the mean acceptance probability ``σ(score)`` over the informative
    (``accept_inf``) and the uninformative (``accept_uninf``) pixels."""
    detector.eval()
    pairs = experiment.eval_pairs if pairs is None else pairs
    matches = good = kps = informative = 0
    accept = {True: [], False: []}
    with torch.random.fork_rng():
        torch.manual_seed(EVAL_SEED)
        for v1, v2 in pairs:
            fmat1, fmat2 = experiment.fmats[(v1, v2)]
            scores = detector(torch.tensor([v1, v2]), experiment)
            height, width = scores.shape[-2:]
            mask = experiment.informative[[v1, v2]]
            prob = torch.sigmoid(scores[:, 0])
            for part in (True, False):
                accept[part].append(prob[mask == part])
            for _ in range(draws):
                keypoints, _, accepted = sample_keypoints(scores, grid_size)
                kp1, kp2 = keypoints[0][accepted[0]], keypoints[1][accepted[1]]
                for view, kp in ((v1, kp1), (v2, kp2)):
                    kps += len(kp)
                    informative += int(experiment.informative[view][kp[:, 1].long(),
                                                                     kp[:, 0].long()].sum())
                if len(kp1) == 0 or len(kp2) == 0:
                    continue
                d1 = sample_features(experiment.descriptors[v1:v1 + 1],
                                     normalize_coords(kp1[None], height, width))[0]
                d2 = sample_features(experiment.descriptors[v2:v2 + 1],
                                     normalize_coords(kp2[None], height, width))[0]
                sim = d1 @ d2.T
                nn12, nn21 = sim.argmax(1), sim.argmax(0)
                mutual = nn21[nn12] == torch.arange(len(kp1))
                i, j = torch.nonzero(mutual)[:, 0], nn12[mutual]
                dist2 = point_line_distance(epipolar_lines(fmat1[None], kp1[i][None]), kp2[j][None])
                dist1 = point_line_distance(epipolar_lines(fmat2[None], kp2[j][None]), kp1[i][None])
                matches += len(i)
                good += int(((dist1 < threshold) & (dist2 < threshold)).sum())
    detector.train()
    n = len(pairs) * draws
    return {"match_precision": good / max(matches, 1), "informative": informative / max(kps, 1),
            "n_matches": matches / n, "n_kps": kps / n,
            "accept_inf": float(torch.cat(accept[True]).mean()),
            "accept_uninf": float(torch.cat(accept[False]).mean())}


# --------------------------------------------------------------------------- training

@dataclass
class RunConfig:
    """One training run."""
    steps: int = 150
    seed: int = 0
    detector: str = "detnet"  # detnet | detnet-affine | free
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    batch_size: int = 2
    control: str = "none"
    eval_every: int = 25
    loss_conf: dict = field(default_factory=dict)


def loss_conf_for(reward: str, overrides: dict | None = None) -> dict:
    """``KeypointLoss`` config for ``reward`` (``fmat`` | ``posfeat``). ``reward`` is passed
    through as the loss's ``reward`` key; ``fmat`` is also accepted by a loss that predates
    the key (it is that loss's only behaviour)."""
    conf = dict(overrides or {})
    if "reward" in KeypointLoss.default_conf:
        conf["reward"] = reward
    elif reward != "fmat":
        raise SCFeatError(f"--reward {reward}: this KeypointLoss has no 'reward' option "
                          f"(only the F-error reward)")
    return conf


def train_run(experiment: Experiment, config: RunConfig, log=None) -> dict:
    """Train one detector; returns ``{'curve': [(step, measures...)], 'train': [...]}``.

    ``log(text)`` receives one line per evaluation.
    """
    torch.manual_seed(config.seed)
    height, width = experiment.images.shape[-2:]
    if config.detector in ("detnet", "detnet-affine"):
        detector = DetNetScores(experiment.features.shape[1], config.detector == "detnet-affine")
    elif config.detector == "free":
        detector = FreeScores(len(experiment.images), height, width)
    else:
        raise SCFeatError(f"detector: expected detnet, detnet-affine or free, got "
                          f"{config.detector!r}")
    loss_fn = ControlledKeypointLoss(config.loss_conf, config.control, config.seed)
    params = list(detector.parameters())
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr)
    else:
        raise SCFeatError(f"optimizer: expected adam or sgd, got {config.optimizer!r}")
    grid_size = int(loss_fn.conf["grid_size"])
    threshold = float(loss_fn.conf["reward_config"]["reward_thr"])
    rng = np.random.default_rng(config.seed)
    curve, history = [], []

    def measure(step: int) -> None:
        # training scenes (pairs it may have trained on) and, for DetNet, the held-out scene
        # (free maps exist only for the training views)
        result = {"step": step, **evaluate(detector, experiment, grid_size, threshold,
                                           experiment.measured_train_pairs())}
        if config.detector != "free":
            held_out = evaluate(detector, experiment, grid_size, threshold)
            result.update({f"heldout_{k}": v for k, v in held_out.items()})
        curve.append(result)
        if log:
            recent = history[-config.eval_every:] or [{}]
            extra = " ".join(f"{k} {np.mean([h[k] for h in recent]):.3g}"
                             for k in ("fmat_error", "good_fraction") if k in recent[0])
            text = (f"  step {step:4d}  match_precision {result['match_precision']:.3f}  "
                    f"informative {result['informative']:.3f}  accept inf/uninf "
                    f"{result['accept_inf']:.3f}/{result['accept_uninf']:.3f}  matches/pair "
                    f"{result['n_matches']:.1f}")
            if "heldout_match_precision" in result:
                text += (f"  | held-out scene: match_precision "
                         f"{result['heldout_match_precision']:.3f} informative "
                         f"{result['heldout_informative']:.3f}")
            log(text + f"  | train batches: {extra}")

    measure(0)
    for step in range(1, config.steps + 1):
        chosen = rng.choice(len(experiment.train_pairs), size=config.batch_size, replace=False)
        pairs = [experiment.train_pairs[k] for k in chosen]
        v1 = torch.tensor([p[0] for p in pairs])
        v2 = torch.tensor([p[1] for p in pairs])
        batch = {"F1": torch.stack([experiment.fmats[p][0] for p in pairs]),
                 "F2": torch.stack([experiment.fmats[p][1] for p in pairs])}
        out1 = {"local_point": detector(v1, experiment), "local_map": experiment.descriptors[v1]}
        out2 = {"local_point": detector(v2, experiment), "local_map": experiment.descriptors[v2]}
        loss, components = loss_fn(batch, out1, out2, None, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({k: float(v) for k, v in components.items()})
        if step % config.eval_every == 0 or step == config.steps:
            measure(step)
    return {"curve": curve, "train": history, "detector": detector}


# --------------------------------------------------------------------------- Adam on free maps

def free_map_update_balance(experiment: Experiment, optimizer: str, lr: float, steps: int,
                            seed: int = 0, loss_conf: dict | None = None) -> dict:
    """How one optimiser step moves free per-pixel logits, cell by cell (``g×g`` cells).

    For every cell of the batch's views that receives a gradient (a proposal there was
    accepted and paired): the change of the cell's mean logit against the sign the gradient
    asks for (``−mean(grad)``, the only part of the REINFORCE gradient that does not cancel
    inside the cell's softmax), and the size of the change at the 63 other pixels relative to
    the change at the proposal (the pixel with the largest gradient). Returns
    ``cells`` (touched cells), ``agree`` (fraction whose mean moves the way the gradient asks),
    ``mean_up`` (mean cell-mean change in cells whose gradient asks up), ``others_ratio``
    (median |Δ other| / |Δ proposal|).
    """
    torch.manual_seed(seed)
    height, width = experiment.images.shape[-2:]
    detector = FreeScores(len(experiment.images), height, width)
    loss_fn = ControlledKeypointLoss(loss_conf or {}, "none", seed)
    g = int(loss_fn.conf["grid_size"])
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(detector.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    agree = cells = 0
    ups, ratios = [], []
    rows, cols = height // g, width // g

    def by_cell(x: torch.Tensor) -> torch.Tensor:  # V×1×H×W → V×rows·cols×g²
        x = x[:, 0, :rows * g, :cols * g].reshape(-1, rows, g, cols, g).permute(0, 1, 3, 2, 4)
        return x.reshape(x.shape[0], rows * cols, g * g)

    for _ in range(steps):
        chosen = rng.choice(len(experiment.train_pairs), size=2, replace=False)
        pairs = [experiment.train_pairs[k] for k in chosen]
        v1 = torch.tensor([p[0] for p in pairs])
        v2 = torch.tensor([p[1] for p in pairs])
        batch = {"F1": torch.stack([experiment.fmats[p][0] for p in pairs]),
                 "F2": torch.stack([experiment.fmats[p][1] for p in pairs])}
        loss, _ = loss_fn(batch, {"local_point": detector(v1, experiment),
                                  "local_map": experiment.descriptors[v1]},
                          {"local_point": detector(v2, experiment),
                           "local_map": experiment.descriptors[v2]}, None, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = detector.logits.detach().clone()
        opt.step()
        views = torch.unique(torch.cat([v1, v2]))
        grad = by_cell(detector.logits.grad[views])
        delta = by_cell((detector.logits.detach() - before)[views])
        touched = grad.abs().amax(-1) > 0
        wanted = -grad.mean(-1)[touched]
        moved = delta.mean(-1)[touched]
        cells += int(touched.sum())
        agree += int((torch.sign(moved) == torch.sign(wanted)).sum())
        ups.append(moved[wanted > 0])
        prop = grad.abs().argmax(-1, keepdim=True)
        d_prop = delta.gather(-1, prop)[..., 0][touched].abs()
        others = (delta.abs().sum(-1)[touched] - d_prop) / (g * g - 1)
        ratios.append(others / d_prop.clamp(min=1e-12))
    return {"cells": cells, "agree": agree / max(cells, 1),
            "mean_up": float(torch.cat(ups).mean()) if ups else 0.0,
            "others_ratio": float(torch.cat(ratios).median()) if ratios else 0.0}


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.learning_check stage2",
        description="Train the detector (DetNet) with KeypointLoss on oracle descriptors and "
                    "compare its match precision with a zero-reward and a shuffled-reward "
                    "control.")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=network_size, default=(64, 96), help="HxW (default 64x96)")
    parser.add_argument("--reward", choices=("fmat", "posfeat"), default="fmat")
    parser.add_argument("--detector", choices=("detnet", "detnet-affine", "free"),
                        default="detnet", help="detnet: the real DetNet (default); "
                        "detnet-affine: its score scaled and shifted by two learnable scalars; "
                        "free: free per-pixel logits")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=None,
                        help="default: 1e-3 for adam (the original's), 1.0 for sgd")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--controls", default="zero,shuffled",
                        help="comma-separated controls to run besides the trained run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise SCFeatError(f"--steps: expected a positive number, got {args.steps}")
    controls = [c for c in args.controls.split(",") if c]
    for control in controls:
        if control not in CONTROLS[1:]:
            raise SCFeatError(f"--controls: unknown control {control!r}, expected "
                              f"{list(CONTROLS[1:])}")
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 1.0)
    start, cpu_start = time.time(), time.process_time()
    experiment = build_experiment(args.size, args.seed)
    print(f"stage2: {len(experiment.train_pairs)} training pairs, {len(experiment.eval_pairs)} "
          f"held-out pairs at {args.size[0]}x{args.size[1]}, informative part "
          f"{float(experiment.informative.float().mean()):.2f} of the pixels "
          f"({time.time() - start:.0f} s)", flush=True)
    finals = {}
    for control in ["none"] + controls:
        name = "trained" if control == "none" else f"{control}-reward control"
        print(f"{name} ({args.detector}, {args.optimizer} lr {lr:g}, reward {args.reward}):",
              flush=True)
        config = RunConfig(steps=args.steps, seed=args.seed, detector=args.detector,
                           optimizer=args.optimizer, lr=lr, control=control,
                           eval_every=args.eval_every, loss_conf=loss_conf_for(args.reward))
        result = train_run(experiment, config, log=lambda text: print(text, flush=True))
        finals[control] = result["curve"]
    trained = finals["none"]
    parts = [f"stage2 match_precision: start {trained[0]['match_precision']:.3f} "
             f"end {trained[-1]['match_precision']:.3f}"]
    for control in controls:
        parts.append(f"{control}-reward control {finals[control][-1]['match_precision']:.3f}"
                     if control == "zero" else
                     f"{control} control {finals[control][-1]['match_precision']:.3f}")
    print(" | ".join(parts))
    print(f"({time.time() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU, "
          f"{torch.get_num_threads()} threads)")
    return 0
