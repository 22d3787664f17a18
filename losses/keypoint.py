"""Stage-2 loss of SCFeat: REINFORCE on the detector with a fundamental-matrix-error reward.

Per image the score map is cut into ``g×g`` cells; each cell proposes one pixel and accepts or
rejects it (``sample_keypoints``). The descriptors at all proposals are matched softly
(``match_log_probabilities``). A pair of proposals is *good* when each lies within
``reward_thr`` pixels of the other's epipolar line (``good_pairs``); as in the original, good
pairs are counted over **all proposals**, accepted or not (with ``rescale_thr`` the threshold
in each image is scaled by its mean epipolar distance over the smaller of the two images'
means: ``threshold_scales``). Reward (``reward: fmat``, the
original's): an image pair with at least 8 good pairs *qualifies*; ``fmat_trials`` random
8-pair sets of its good pairs give 8-point estimates of ``F2`` and the smallest error against
the true ``F2`` is its F-error (``fundamental_error``). If any element qualifies,
``f = tanh(Σ F-errors of the qualifying elements)`` is shared by the whole batch, good pairs
get ``1 − f`` and the others ``−f``, and the keypoint penalty is scaled by ``f``; otherwise
good pairs get ``good_reward`` and the others ``bad_reward``. ``reward: posfeat`` (PoSFeat's)
always uses ``good_reward`` / ``bad_reward`` and an unscaled penalty. Only pairs whose two
keypoints were accepted enter the policy gradient
``reinforce = Σ reward·P·(log P + log p1 + log p2)``; ``loss = −reinforce − kp_penalty``.
No ``B×N×M`` reward tensor is built: the reward is ``base`` on every accepted pair plus
``good_bonus`` on the (sparse) good ones.

Shapes: ``B`` image pairs, ``H×W`` score-map size, ``N``/``M`` cells (= proposals) of image
1/2, ``K`` F-error trials, ``C`` descriptor channels.
The sampling and the reward ingredients live in ``keypoint_sampling`` and ``keypoint_reward``.
"""
from __future__ import annotations

import torch
from torch import nn

from losses.keypoint_reward import EIGHT, fundamental_error, good_pairs, grid_walk_size, threshold_scales
from losses.keypoint_sampling import sample_keypoints
from losses.temperature import temperature_at
from utils.config import Spec, section_config
from utils.geometry import normalize_coords, sample_features

# --------------------------------------------------------------------------- matching

def match_log_probabilities(desc1: torch.Tensor, desc2: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """Dual-softmax log-probabilities ``B×N×M`` of L2-normalised descriptors ``B×N×C, B×M×C``.

    ``log P = log_softmax_rows(−T·cost) + log_softmax_cols(−T·cost)``, ``cost = 1 − d1·d2ᵀ``.
    Computed as ``2·s − lse_rows − lse_cols`` with ``s = T·d1·d2ᵀ`` (softmax is shift-invariant,
    so ``−T·cost = s − T`` gives the same values) to avoid two ``B×N×M`` temporaries.
    """
    logits = (temperature * desc1) @ desc2.transpose(-1, -2)
    lse_rows = torch.logsumexp(logits, dim=-1)  # B×N
    lse_cols = torch.logsumexp(logits, dim=-2)  # B×M
    return 2 * logits - lse_rows[..., :, None] - lse_cols[..., None, :]

# --------------------------------------------------------------------------- loss

REWARDS = ("fmat", "posfeat")
LOSS_DISTANCES = ("cos", "euc")


def away_from_border(keypoints: torch.Tensor, height: int, width: int,
                     margin: int) -> torch.Tensor:
    """``B×N`` booleans: pixel keypoints ``B×N×2`` at least ``margin`` px from every border of
    an ``height×width`` image (``min(x, y, W−1−x, H−1−y) >= margin``)."""
    x, y = keypoints[..., 0], keypoints[..., 1]
    return (torch.minimum(torch.minimum(x, y), torch.minimum(width - 1 - x, height - 1 - y))
            >= margin)


class KeypointLoss(nn.Module):
    """REINFORCE loss of the detector (stage 2), reward from the fundamental-matrix error.

    ``forward(batch, outputs1, outputs2, processed, epoch)`` → ``(loss, components)``; uses
    ``outputs{1,2}['local_point']`` (``B×1×H×W`` logits), ``outputs{1,2}['local_map']``
    (``B×C×H/4×W/4``) and ``batch['F1'], batch['F2']`` (``B×3×3``). ``epoch`` is the
    trainer's 1-based epoch (temperature ``min(temperature_base + epoch, temperature_max)``).
    ``loss = −reinforce − kp_penalty``. Components (scalars, detached), with the original's
    names and signs: ``reinforce``, ``kp_penalty`` (positive), ``scale1``, ``scale2`` (the
    ``rescale_thr`` scales of image 2 and image 1 respectively, as the original names them;
    batch means; 1 without it),
    ``cor_max``, ``cor_mean``, ``cor_minmax``, ``cor_minmean``, ``cor_summin``,
    ``cor_summax`` (statistics of the match probabilities P), ``n_kps`` (accepted keypoints of
    both images, per image pair), ``n_pairs`` (ΣP per image pair), ``temperature``; our
    additions: ``n_good`` (good pairs among accepted pairs, the whole batch), ``good_fraction``
    (``n_good`` ÷ accepted pairs), ``n_good_all`` (good pairs among all proposals, which decide
    the F-error), ``fmat_error`` (``f``, 0 when absent) and ``n_fmat_pairs`` (qualifying image
    pairs with an F-error).

    The F-error trials draw from a CPU ``torch.Generator`` seeded once with ``fmat_seed``;
    ``generator_state()`` / ``load_generator_state()`` let a trainer checkpoint it.
    :meth:`evaluate` gives every intermediate and accepts pinned draws (tests).
    """

    needs_detector = True
    # The components it reports: the original's (its spaced names, e.g. 'cor max', with "_"),
    # then ours.
    components = ("reinforce", "kp_penalty", "scale1", "scale2", "cor_max", "cor_mean",
                  "cor_minmax", "cor_minmean", "cor_summin", "cor_summax", "n_kps", "n_pairs",
                  "temperature", "n_good", "good_fraction", "n_good_all", "fmat_error",
                  "n_fmat_pairs")
    default_conf = {
        "grid_size": Spec(8, minimum=1),
        "loss_distance": Spec("cos", choices=LOSS_DISTANCES),
        "temperature_base": Spec(60, types=(float,)),
        "temperature_max": Spec(60, types=(float,)),
        "reward_config": {"reward_thr": Spec(2.0, above=0, doc="pixels"),
                          "rescale_thr": False},
        "cor_detach": True,
        "good_reward": 1.0,
        "bad_reward": -0.25,
        "kp_penalty": -0.001,
        "match_grad": False,
        # Our additions.
        "reward": Spec("fmat", choices=REWARDS, doc="fmat: the original's F-error reward, "
                                                      "posfeat: good_reward / bad_reward only"),
        "fmat_trials": Spec(100, minimum=1),
        "fmat_seed": 0,
        # px: proposals closer to the image border are never accepted (no reward, no gradient);
        # 0 is the original. Without it the detector learns a border band (docs/training.md).
        "border_margin": Spec(0, minimum=0),
    }

    def __init__(self, conf: dict | None = None):
        super().__init__()
        self.conf = section_config(self.default_conf, conf, "KeypointLoss_config")
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(self.conf["fmat_seed"]))

    # ------------------------------------------------------------------ generator state
    def generator_state(self) -> torch.Tensor:
        """State of the F-error generator (a ``ByteTensor``) for checkpoints."""
        return self.generator.get_state()

    def load_generator_state(self, state: torch.Tensor) -> None:
        """Restore a state returned by :meth:`generator_state`."""
        self.generator.set_state(state)

    # nn.Module hooks: the generator travels with state_dict(), so a resumed run draws the
    # same 8-point sets as an uninterrupted one.
    def get_extra_state(self) -> dict:
        return {"fmat_generator": self.generator_state()}

    def set_extra_state(self, state: dict) -> None:
        self.load_generator_state(state["fmat_generator"])

    # ------------------------------------------------------------------ reward
    def thresholds(self, scales: tuple[torch.Tensor, torch.Tensor] | None
                   ) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """Good-pair thresholds in image 2 and image 1 (pixels): ``reward_thr``, or with
        ``scales`` (``rescale_thr``: :func:`threshold_scales`, ``B`` each) ``reward_thr ×
        scale`` of the image the distance is measured in."""
        threshold = float(self.conf["reward_config"]["reward_thr"])
        if scales is None:
            return threshold, threshold
        scale1, scale2 = scales
        return threshold * scale2, threshold * scale1

    @torch.no_grad()
    def reward_terms(self, keypoints1: torch.Tensor, keypoints2: torch.Tensor,
                     fmat1: torch.Tensor, fmat2: torch.Tensor,
                     grid: tuple[int, int, int] | None = None,
                     scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                     fixed_fmat_error: torch.Tensor | None = None) -> dict:
        """The reward of every pair as ``base`` plus ``good_bonus`` on good pairs.

        Keypoints ``B×N×2, B×M×2`` (all proposals: good pairs and the F-error ignore whether
        a keypoint was accepted, as in the original); ``grid``: see :func:`good_pairs` (used
        only where the walk is cheaper than the dense test); ``scales``: see
        :meth:`thresholds`; ``fixed_fmat_error`` (``B``, tests): replaces the solver's F-error
        of each qualifying element. Returns a dict: ``good_index`` (``G×3``, ``b, i, j`` of
        the good pairs), ``base`` and ``good_bonus`` (``−f`` and ``1`` with an F-error,
        ``bad_reward`` and ``good_reward − bad_reward`` without), ``fmat_error`` (``f``, a 0-d
        tensor, or ``None`` when absent) and ``n_fmat_pairs`` (0-d tensor).
        """
        threshold_in_2, threshold_in_1 = self.thresholds(scales)
        if (grid is not None and not torch.is_tensor(threshold_in_2)
                and 8 * grid_walk_size(threshold_in_2, *grid) >= keypoints2.shape[1]):
            grid = None  # a walked cell costs ~10 dense entries: it pays below 1/8 of the cells
        good_index = good_pairs(keypoints1, keypoints2, fmat1, fmat2, threshold_in_2,
                                grid=grid, threshold_in_1=threshold_in_1)
        batch = keypoints1.shape[0]
        if self.conf["reward"] == "posfeat":
            has_error = torch.zeros(batch, dtype=torch.bool, device=keypoints1.device)
        elif fixed_fmat_error is not None:
            counts = torch.bincount(good_index[:, 0], minlength=batch)
            has_error = counts >= EIGHT
            error = fixed_fmat_error.to(keypoints1.device, torch.float64).reshape(batch)
        else:
            error, has_error = fundamental_error(keypoints1, keypoints2, good_index, fmat2,
                                                 int(self.conf["fmat_trials"]), self.generator)
        terms = {"good_index": good_index, "n_fmat_pairs": has_error.sum()}
        if bool(has_error.any()):
            # one f for the whole batch, from the qualifying elements only
            fmat_error = torch.tanh(error[has_error].sum()).to(keypoints1.dtype)
            terms.update(base=-fmat_error, good_bonus=1.0, fmat_error=fmat_error)
        else:
            good_reward = float(self.conf["good_reward"])
            bad_reward = float(self.conf["bad_reward"])
            terms.update(base=bad_reward, good_bonus=good_reward - bad_reward, fmat_error=None)
        return terms

    @torch.no_grad()
    def reward(self, keypoints1: torch.Tensor, keypoints2: torch.Tensor, fmat1: torch.Tensor,
               fmat2: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
               fixed_fmat_error: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Dense form of :meth:`reward_terms` (for inspection and tests; the loss never builds
        it): rewards ``B×N×M`` of all pairs, the good mask ``B×N×M``, ``f`` (or ``None``) and
        the number of image pairs with an F-error."""
        terms = self.reward_terms(keypoints1, keypoints2, fmat1, fmat2, scales=scales,
                                  fixed_fmat_error=fixed_fmat_error)
        good = torch.zeros(keypoints1.shape[0], keypoints1.shape[1], keypoints2.shape[1],
                           dtype=torch.bool, device=keypoints1.device)
        good[terms["good_index"].unbind(-1)] = True
        reward = terms["base"] + terms["good_bonus"] * good.to(keypoints1.dtype)
        return reward, good, terms["fmat_error"], terms["n_fmat_pairs"]

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict, outputs1: dict, outputs2: dict, processed: dict | None,
                epoch: int) -> tuple[torch.Tensor, dict]:
        result = self.evaluate(batch, outputs1, outputs2, epoch)
        return result["loss"], result["components"]

    def evaluate(self, batch: dict, outputs1: dict, outputs2: dict, epoch: int,
                 draws: dict | None = None) -> dict:
        """The loss with its intermediates.

        ``draws`` pins the random parts (tests): ``proposals1``/``proposals2`` (``B×N``, the
        index inside each cell), ``accept1``/``accept2`` (``B×N``) and ``fmat_error`` (``B``,
        the F-error of each qualifying element instead of the solver's). Returns a dict with
        ``loss``, ``components`` and ``keypoints1``/``keypoints2`` (``B×N×2`` pixels),
        ``logp1``/``logp2``, ``accepted1``/``accepted2`` (``B×N``), ``log_match`` (``B×N×M``,
        log P), ``good_index`` (``G×3``, all proposals), ``fmat_error`` (``f`` or ``None``),
        ``base``, ``good_bonus``, ``temperature``.
        """
        conf, draws = self.conf, draws or {}
        score1, score2 = outputs1["local_point"], outputs2["local_point"]
        keypoints1, logp1, accepted1 = self.propose(score1, draws.get("proposals1"),
                                                    draws.get("accept1"))
        keypoints2, logp2, accepted2 = self.propose(score2, draws.get("proposals2"),
                                                    draws.get("accept2"))
        temperature = temperature_at(epoch, conf["temperature_base"], conf["temperature_max"])
        match = self.match(outputs1, outputs2, keypoints1, keypoints2, accepted1, accepted2,
                           temperature)
        scales = (threshold_scales(keypoints1, keypoints2, batch["F1"], batch["F2"])
                  if conf["reward_config"]["rescale_thr"] else None)
        height2, width2 = score2.shape[-2:]
        grid = (conf["grid_size"], height2 // conf["grid_size"], width2 // conf["grid_size"])
        terms = self.reward_terms(keypoints1, keypoints2, batch["F1"], batch["F2"], grid,
                                  scales, draws.get("fmat_error"))
        logp1_acc = torch.where(accepted1, logp1, torch.zeros_like(logp1))
        logp2_acc = torch.where(accepted2, logp2, torch.zeros_like(logp2))
        # Σ_accepted P·(log P + lp1_i + lp2_j), and the same sum over the good accepted pairs
        accepted_sum = (match["plogp_sum"] + (match["row_mass"] * logp1_acc).sum()
                        + (match["col_mass"] * logp2_acc).sum())
        b, i, j = terms["good_index"].unbind(-1)
        both = accepted1[b, i] & accepted2[b, j]
        b, i, j = b[both], i[both], j[both]
        prob, log_match = match["prob"], match["log_match"]
        good_sum = (prob[b, i, j] * (log_match[b, i, j] + logp1[b, i] + logp2[b, j])).sum()
        # reward = base on accepted pairs, + good_bonus on good ones
        reinforce = terms["base"] * accepted_sum + terms["good_bonus"] * good_sum
        fmat_error = terms["fmat_error"]
        penalty_scale = 1.0 if fmat_error is None else fmat_error
        kp_penalty = conf["kp_penalty"] * penalty_scale * (logp1_acc.sum() + logp2_acc.sum())
        loss = -reinforce - kp_penalty
        components = self._components(prob.detach(), accepted1, accepted2, scales, temperature)
        components.update(self._reward_components(reinforce, kp_penalty, b.numel(), accepted1,
                                                  accepted2, terms))
        return {"loss": loss, "components": components, "keypoints1": keypoints1,
                "keypoints2": keypoints2, "logp1": logp1, "logp2": logp2,
                "accepted1": accepted1, "accepted2": accepted2, "log_match": log_match,
                "good_index": terms["good_index"], "fmat_error": fmat_error,
                "base": terms["base"], "good_bonus": terms["good_bonus"],
                "temperature": temperature}

    def propose(self, score: torch.Tensor, proposals: torch.Tensor | None = None,
                accept: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`sample_keypoints` on a ``B×1×H×W`` score map, proposals nearer the border
        than ``border_margin`` never accepted: ``keypoints B×N×2, logp B×N, accepted B×N``."""
        keypoints, logp, accepted = sample_keypoints(score, self.conf["grid_size"], proposals,
                                                     accept)
        margin = self.conf["border_margin"]
        if margin > 0:
            accepted = accepted & away_from_border(keypoints, *score.shape[-2:], margin)
        return keypoints, logp, accepted

    def match(self, outputs1: dict, outputs2: dict, keypoints1: torch.Tensor,
              keypoints2: torch.Tensor, accepted1: torch.Tensor, accepted2: torch.Tensor,
              temperature: float) -> dict:
        """Soft matches of the proposals' descriptors (sampled from ``local_map``): ``log_match``
        (``B×N×M``), ``prob`` (P, detached with ``cor_detach``), and over the accepted pairs
        ``plogp_sum`` (Σ P·log P), ``row_mass`` (``B×N``) and ``col_mass`` (``B×M``). The
        ``B×N×M`` work is done once, as (matrix × mask vector) products, never broadcast by
        autograd; a gradient flows only with ``match_grad``."""
        conf = self.conf
        normalize = conf["loss_distance"] == "cos"  # euc: raw descriptors, nothing else changes
        with torch.set_grad_enabled(bool(conf["match_grad"]) and torch.is_grad_enabled()):
            descriptors = [sample_features(outputs["local_map"],
                                           normalize_coords(keypoints, *outputs["local_point"].shape[-2:]),
                                           normalize)
                           for outputs, keypoints in ((outputs1, keypoints1), (outputs2, keypoints2))]
            log_match = match_log_probabilities(*descriptors, temperature)  # B×N×M
            prob = log_match.exp()
            if conf["cor_detach"]:
                prob = prob.detach()
            acc1, acc2 = accepted1.to(log_match.dtype), accepted2.to(log_match.dtype)
            plogp_accepted = ((prob * log_match) @ acc2[..., None])[..., 0]  # B×N
            return {"log_match": log_match, "prob": prob,
                    "plogp_sum": (acc1 * plogp_accepted).sum(),
                    "row_mass": (prob @ acc2[..., None])[..., 0],  # B×N: Σ_j acc2_j P_ij
                    "col_mass": (acc1[:, None, :] @ prob)[:, 0]}  # B×M: Σ_i acc1_i P_ij

    @staticmethod
    def _reward_components(reinforce: torch.Tensor, kp_penalty, n_good: int,
                           accepted1: torch.Tensor, accepted2: torch.Tensor, terms: dict) -> dict:
        """Our monitoring components of the reward (no gradient)."""
        device = reinforce.device
        fmat_error = terms["fmat_error"]
        accepted_pairs = (accepted1.sum(1) * accepted2.sum(1)).sum().clamp(min=1).float()
        return {
            "reinforce": reinforce.detach().float(),
            "kp_penalty": torch.as_tensor(kp_penalty, device=device).detach().float(),
            "n_good": torch.tensor(float(n_good), device=device),
            # what the detector learns to raise: good pairs among the accepted pairs
            "good_fraction": n_good / accepted_pairs,
            "n_good_all": torch.tensor(float(terms["good_index"].shape[0]), device=device),
            "fmat_error": (torch.zeros((), device=device) if fmat_error is None
                           else fmat_error.detach().float()),
            "n_fmat_pairs": terms["n_fmat_pairs"].float(),
        }

    @staticmethod
    def _components(prob: torch.Tensor, accepted1: torch.Tensor, accepted2: torch.Tensor,
                    scales: tuple[torch.Tensor, torch.Tensor] | None, temperature: float) -> dict:
        """The original's monitoring components (no gradient) from P (``B×N×M``)."""
        batch_size = prob.shape[0]
        flat = prob.flatten(1)  # B×(N·M)
        sums = torch.cat([prob.sum(-1).flatten(), prob.sum(-2).flatten()])  # row and column sums
        one = torch.ones((), device=prob.device)
        # The original's names: its scale1 is image 2's scale (m2 / min), scale2 image 1's.
        return {
            "scale1": one if scales is None else scales[1].float().mean(),
            "scale2": one if scales is None else scales[0].float().mean(),
            "cor_minmax": flat.max(1).values.min().float(),
            "cor_minmean": flat.mean(1).min().float(),
            "cor_max": flat.max().float(),
            "cor_mean": flat.mean().float(),
            "cor_summin": sums.min().float(),
            "cor_summax": sums.max().float(),
            "n_kps": (accepted1.sum() + accepted2.sum()).float() / batch_size,
            "n_pairs": prob.sum().float() / batch_size,
            "temperature": torch.tensor(temperature, device=prob.device),
        }
