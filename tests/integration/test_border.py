"""The stage-2 border collapse: trained with the original's reward on small images, the detector
learns a band of high scores along the image border (zero padding lets it single the border
out, and every accepted proposal with good partners is pushed up), and on a larger image most
keypoints land there. ``KeypointLoss_config.border_margin`` (the demo's stage 2 uses 8) keeps
proposals near the border out of the reward."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from losses.keypoint import KeypointLoss, away_from_border
from utils.config import read_yaml

REPO = Path(__file__).resolve().parents[2]
BORDER_PX = 8


def test_no_reward_and_no_gradient_near_the_border():
    torch.manual_seed(0)
    height, width, grid = 32, 48, 8
    score1 = torch.randn(1, 1, height, width).requires_grad_()
    score2 = torch.randn(1, 1, height, width).requires_grad_()
    local = {"local_map": torch.randn(1, 16, height // 4, width // 4)}
    # rectified geometry: the epipolar line of (x, y) is the row y
    fmat = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]])
    batch = {"F1": fmat, "F2": fmat.transpose(1, 2)}
    cells = (height // grid) * (width // grid)
    draws = {"accept1": torch.ones(1, cells, dtype=torch.bool),
             "accept2": torch.ones(1, cells, dtype=torch.bool),
             "proposals1": torch.randint(0, grid * grid, (1, cells)),
             "proposals2": torch.randint(0, grid * grid, (1, cells))}
    band = torch.zeros(height, width, dtype=torch.bool)
    band[:BORDER_PX], band[-BORDER_PX:], band[:, :BORDER_PX], band[:, -BORDER_PX:] = (True,) * 4
    for margin in (0, BORDER_PX):
        score1.grad = score2.grad = None
        loss = KeypointLoss({"border_margin": margin, "reward": "posfeat"})
        result = loss.evaluate(batch, {"local_point": score1, **local},
                               {"local_point": score2, **local}, epoch=0, draws=draws)
        result["loss"].backward()
        near = ~away_from_border(result["keypoints1"], height, width, BORDER_PX)[0]
        assert near.any() and (~near).any()
        assert torch.equal(result["accepted1"][0], ~near if margin else torch.ones_like(near))
        gradient_in_band = score1.grad[0, 0][band].abs().sum()
        assert score1.grad[0, 0][~band].abs().sum() > 0
        assert (gradient_in_band == 0) == (margin == BORDER_PX)


def test_border_margin_must_be_a_count_of_pixels():
    from utils.errors import SCFeatError
    for bad in (-1, 2.5, True):
        with pytest.raises(SCFeatError, match="border_margin"):
            KeypointLoss({"border_margin": bad})


# --------------------------------------------------------------------------------------------
# the collapse itself, on a tiny training set
# --------------------------------------------------------------------------------------------

def border_share(keypoints: np.ndarray, height: int, width: int) -> float:
    x, y = keypoints[:, 0], keypoints[:, 1]
    near = (x < BORDER_PX) | (y < BORDER_PX) | (x > width - 1 - BORDER_PX) \
        | (y > height - 1 - BORDER_PX)
    return float(near.mean())


def train_detector(model, pairs: list[dict], loss_conf: dict, steps: int, lr: float) -> dict:
    """Stage 2 in a few lines: the frozen backbone's maps computed once, the detector trained
    by ``KeypointLoss`` with Adam on random pairs; returns the trained detector's state."""
    import copy

    detector = copy.deepcopy(model.localheader).train()
    loss_fn = KeypointLoss(loss_conf)
    optimizer = torch.optim.Adam(detector.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        maps = [(model.backbone(p["im1"][None]), model.backbone(p["im2"][None])) for p in pairs]
    for _ in range(steps):
        index = int(torch.randint(len(pairs), (1,), generator=generator))
        (maps1, maps2), pair = maps[index], pairs[index]
        outputs = []
        for maps_k, image in ((maps1, pair["im1"]), (maps2, pair["im2"])):
            score = detector(model.detector_input(maps_k), image[None])
            outputs.append({"local_point": score, "local_map": maps_k["local_map"]})
        loss = loss_fn.evaluate({"F1": pair["F1"][None], "F2": pair["F2"][None]},
                                *outputs, epoch=0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return detector.state_dict()


@pytest.mark.slow
def test_demo_stage2_does_not_collapse_onto_the_border(tmp_path):
    """Trained on 64×96 pairs with the demo's stage-2 settings, the detector's keypoints on a
    photograph three times larger stay off the border about as much as the untrained
    detector's; the same training without ``border_margin`` (the original's) collapses."""
    import cv2
    from torch.optim.swa_utils import update_bn

    from dataloader.megadepth import MegaDepth_SIFT
    from registry import build_model
    from tools.synthetic import load_photo, make_megadepth

    torch.manual_seed(0)
    data = tmp_path / "megadepth"
    make_megadepth(data, scenes=2, images=5, pairs=8, size=(64, 96), seed=0)
    dataset = MegaDepth_SIFT({"data_path": str(data), "mode": "val", "workers": 0})
    pairs = [dataset[i] for i in range(len(dataset))]
    model = build_model("SCFeatModel", {"backbone_config": {"pretrained": False}})
    # BatchNorm statistics from the training images (as the demo's untrained network), then eval
    update_bn([torch.stack([p[k] for p in pairs]) for k in ("im1", "im2")], model.backbone)
    model.eval()

    photo = cv2.resize(load_photo("coffee"), (288, 192), interpolation=cv2.INTER_AREA)
    options = read_yaml(REPO / "config" / "demo" / "extract.yaml")["detector_config"]

    def share_with(state: dict | None) -> float:
        if state is not None:
            model.localheader.load_state_dict(state)
        keypoints = model.detect_and_describe(photo, **options)["keypoints"]
        return border_share(keypoints, *photo.shape[:2])

    untrained_state = {k: v.clone() for k, v in model.localheader.state_dict().items()}
    demo = read_yaml(REPO / "config" / "demo" / "train_det.yaml")
    loss_conf = demo["KeypointLoss_config"]
    assert loss_conf.get("border_margin") == BORDER_PX  # the demo's setting
    lr, steps = demo["optimal_lrs"][0], demo["epoch"] * demo["epoch_step"]  # the demo's
    untrained = share_with(None)
    torch.manual_seed(1)
    with_margin = share_with(train_detector(model, pairs, loss_conf, steps, lr))
    torch.manual_seed(1)
    original = share_with(train_detector(model, pairs, {**loss_conf, "border_margin": 0}, steps,
                                         lr))
    model.localheader.load_state_dict(untrained_state)
    area = 1 - (192 - 2 * BORDER_PX) * (288 - 2 * BORDER_PX) / (192 * 288)
    print(f"border share: untrained {untrained:.3f}, demo {with_margin:.3f}, "
          f"original reward {original:.3f} (band area {area:.3f})")
    # measured (seeded, this machine): untrained 0.032, demo 0.000, original reward 0.168;
    # other seeds gave the original reward up to 0.98
    assert original > 3 * untrained             # the collapse, reproduced
    assert with_margin <= untrained + 0.05      # guarded
