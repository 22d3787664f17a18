"""Stage-2 loss of SCFeat: REINFORCE on the detector with a fundamental-matrix-error reward.

Per image the score map is cut into ``g×g`` cells; each cell proposes one pixel and accepts or
rejects it (``sample_keypoints``). The descriptors at all proposals are matched softly
(``match_log_probabilities``). A pair of proposals is *good* when each lies within
``reward_thr`` pixels of the other's epipolar line (``good_pairs``); as in the original, good
pairs are counted over **all proposals**, accepted or not. Reward (``reward: fmat``, the
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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import SCFeatError
from utils.geometry import (eight_point_design_matrix, eight_point_fundamental, epipolar_lines,
                            normalize_coords, normalize_points_hartley, sample_features,
                            to_homogeneous)

EIGHT = 8  # correspondences per 8-point solve


# --------------------------------------------------------------------------- sampling

def sample_keypoints(score_map: torch.Tensor, grid_size: int,
                     proposal: torch.Tensor | None = None, accepted: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One proposal per ``g×g`` cell of ``B×1×H×W`` logits, accepted by a Bernoulli draw.

    The proposal is drawn from ``Categorical(logits = the g² scores of the cell)`` and accepted
    with ``Bernoulli(logits = its score)``; ``logp = log p(proposal) + log p(accept outcome)``.
    Cells are row-major; a border narrower than ``g`` (``H`` or ``W`` not divisible) is not
    sampled. The draws use the global torch RNG unless pinned: ``proposal`` (``B×N`` long, the
    index ``k`` row-major inside the cell) and ``accepted`` (``B×N``, bool or 0/1) replace them.
    Returns keypoints ``B×N×2`` (pixel ``x, y``, float), ``logp B×N`` (differentiable w.r.t.
    ``score_map``) and ``accepted B×N`` (bool), ``N = (H // g)·(W // g)``.
    """
    batch, _, height, width = score_map.shape
    rows, cols = height // grid_size, width // grid_size
    if rows == 0 or cols == 0:
        raise SCFeatError(f"grid_size: expected at most the score map size {height}x{width}, "
                          f"got {grid_size}")
    cells = score_map[:, 0, :rows * grid_size, :cols * grid_size]
    cells = cells.reshape(batch, rows, grid_size, cols, grid_size).permute(0, 1, 3, 2, 4)
    cells = cells.reshape(batch, rows * cols, grid_size * grid_size)  # B×N×g²

    if proposal is None:
        with torch.no_grad():
            flat_probs = torch.softmax(cells.detach(), dim=-1).reshape(-1, grid_size ** 2)
            proposal = torch.multinomial(flat_probs, 1).reshape(batch, rows * cols)  # B×N
    proposal = proposal.reshape(batch, rows * cols).to(score_map.device, torch.long)
    log_proposal = torch.log_softmax(cells, dim=-1).gather(-1, proposal[..., None])[..., 0]
    proposal_score = cells.gather(-1, proposal[..., None])[..., 0]  # B×N
    if accepted is None:
        with torch.no_grad():
            accepted = torch.rand_like(proposal_score) < torch.sigmoid(proposal_score)
    accepted = accepted.reshape(batch, rows * cols).to(score_map.device).bool()
    # log σ(s) when accepted, log σ(−s) = log(1 − σ(s)) when rejected
    log_accept = F.logsigmoid(torch.where(accepted, proposal_score, -proposal_score))
    logp = log_proposal + log_accept

    cell_y, cell_x = torch.meshgrid(torch.arange(rows, device=score_map.device),
                                    torch.arange(cols, device=score_map.device), indexing="ij")
    x = cell_x.reshape(1, -1) * grid_size + proposal % grid_size
    y = cell_y.reshape(1, -1) * grid_size + torch.div(proposal, grid_size, rounding_mode="floor")
    keypoints = torch.stack([x, y], dim=-1).to(score_map.dtype)
    return keypoints, logp, accepted


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


# --------------------------------------------------------------------------- reward

_FAR = 1e30  # the offset of a line that no pixel is near (rejected keypoints)
_GRID_MARGIN = 1e-2  # pixels added to the walked band, against rounding at its edges


def _scaled_lines(fmat: torch.Tensor, points: torch.Tensor, threshold: float | torch.Tensor,
                  accepted: torch.Tensor | None) -> torch.Tensor:
    """Lines ``F·x̃`` (``B×N×3``) scaled so that ``|l·x̃'| < 1`` ⇔ distance < ``threshold``.

    ``threshold``: pixels, a number or one per batch element (``B``). A degenerate line
    (``l[:2] = 0``) keeps ``point_line_distance``'s clamp; lines of rejected points become
    ``(0, 0, 1e30)``, which no point is near.
    """
    lines = epipolar_lines(fmat, points)
    if torch.is_tensor(threshold):
        threshold = threshold.to(lines)[:, None, None]
    lines = lines / (threshold * lines[..., :2].norm(dim=-1, keepdim=True).clamp(min=1e-8))
    if accepted is not None:
        far = lines.new_tensor([0.0, 0.0, _FAR])
        lines = torch.where(accepted[..., None], lines, far)
    return lines


def grid_walk_size(threshold: float, grid_size: int, rows: int, cols: int) -> int:
    """Cells :func:`grid_candidates` examines per line: ``max(rows, cols)·R``."""
    return max(rows, cols) * _grid_reach(threshold, grid_size)


def _grid_reach(threshold: float, grid_size: int) -> int:
    """Cell rows (or columns) one step of the walk may touch: the band spans at most
    ``(g − 1)·1 + 2·(√2·threshold + margin)`` across a step of width ``g − 1``."""
    return int((grid_size - 1 + 2 * (2 ** 0.5 * threshold + _GRID_MARGIN)) // grid_size) + 2


def grid_candidates(lines: torch.Tensor, threshold: float, grid_size: int, rows: int,
                    cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells that may hold a point near each scaled line → ``(line, cell)``, two ``C`` longs.

    ``lines B×N×3`` are scaled as by :func:`_scaled_lines` for ``threshold`` (a point is near
    when ``|l·x̃| < 1``); the points are one per ``grid_size`` cell of a ``rows×cols`` grid
    (cells row-major), anywhere inside their cell. ``line`` indexes the flattened ``B·N``
    lines, ``cell`` the cells of that line's image pair. A line closer to horizontal is walked
    column by column: over a column's ``x`` range the band ``|l·x̃| < 1`` spans a bounded ``y``
    interval covering at most ``R`` cell rows; a steeper one is walked row by row. This touches
    ``B·N·max(rows, cols)·R`` cells instead of ``B·N·rows·cols``; the caller tests the
    candidates exactly. Lines that are not finite, of rejected points, or so short that
    ``_scaled_lines`` clamped their norm (points within about ``1e-8 / ‖F‖`` of the epipole,
    whose band would be wider than ``threshold``) give no candidates.
    """
    a, b, c = lines.unbind(-1)  # B×N
    x_major = a.abs() <= b.abs()  # |slope| ≤ 1: walk along x
    along = torch.where(x_major, a, b)[..., None]  # coefficient of the walked coordinate
    across = torch.where(x_major, b, a)[..., None]
    n_steps = torch.where(x_major, cols, rows)[..., None]  # B×N×1
    n_across = torch.where(x_major, rows, cols)[..., None]
    half_width = 1.0 / across.abs()  # ≤ √2·threshold for an unclamped line
    usable = ((half_width <= 2 ** 0.5 * threshold * (1 + 1e-4))
              & torch.isfinite(lines).all(-1, keepdim=True))
    half_width = half_width + _GRID_MARGIN
    reach = _grid_reach(threshold, grid_size)
    n_walk = max(rows, cols)

    step = torch.arange(n_walk, device=lines.device, dtype=lines.dtype)  # D
    start, stop = step * grid_size, step * grid_size + (grid_size - 1)  # walked-coordinate range
    at_start = -(along * start + c[..., None]) / across  # B×N×D: the other coordinate
    at_stop = -(along * stop + c[..., None]) / across
    first = torch.floor((torch.minimum(at_start, at_stop) - half_width) / grid_size)
    last = torch.floor((torch.maximum(at_start, at_stop) + half_width) / grid_size)
    # cell k of a step lies in [first + k, last] ∩ [0, n_across), the step in [0, n_steps)
    first_valid = torch.clamp(first, min=0)
    last_valid = torch.minimum(last, (n_across - 1).to(last.dtype))
    last_valid = torch.where(usable & (step < n_steps), last_valid, first_valid - 1)
    offset = torch.arange(reach, device=lines.device, dtype=lines.dtype)  # R
    valid = (first_valid[..., None] + offset) <= last_valid[..., None]  # B×N×D×R
    flat = torch.nonzero(valid.reshape(-1))[:, 0]  # C, into B·N·D·R
    line = torch.div(flat, n_walk * reach, rounding_mode="floor")
    step_of = torch.div(flat, reach, rounding_mode="floor")  # into B·N·D
    walked = step_of % n_walk
    crossed = first_valid.reshape(-1)[step_of].long() + flat % reach
    cell = torch.where(x_major.reshape(-1)[line], crossed * cols + walked, walked * cols + crossed)
    return line, cell


def good_pairs(keypoints1: torch.Tensor, keypoints2: torch.Tensor, fmat1: torch.Tensor,
               fmat2: torch.Tensor, threshold: float | torch.Tensor,
               accepted1: torch.Tensor | None = None, accepted2: torch.Tensor | None = None,
               grid: tuple[int, int, int] | None = None,
               threshold_in_1: float | torch.Tensor | None = None) -> torch.Tensor:
    """Index list ``G×3`` (``b, i, j``, sorted) of the pairs consistent with the geometry.

    ``(i, j)`` is good when ``x2_j`` is closer than ``threshold`` pixels to the line ``F1·x̃1_i``
    and ``x1_i`` closer than ``threshold_in_1`` (default: ``threshold``) to ``F2·x̃2_j`` (and
    both are accepted, when the ``B×N`` / ``B×M`` masks are given). Thresholds are numbers or
    one per batch element (``B``; then only the dense test runs). Without ``grid`` the first
    test runs densely on
    ``B×N×M``; with ``grid = (grid_size, rows, cols)`` — ``keypoints2`` one per cell of that
    grid, as :func:`sample_keypoints` gives them — only the cells along each line are tested
    (:func:`grid_candidates`). The second test runs on the pairs passing the first. Both ways
    give the same pairs (up to rounding at the threshold) in the same order.
    """
    n_1 = keypoints1.shape[1]
    n_2 = keypoints2.shape[1]
    threshold_in_1 = threshold if threshold_in_1 is None else threshold_in_1
    if torch.is_tensor(threshold) or torch.is_tensor(threshold_in_1):
        grid = None  # the walk's reach is computed for one threshold
    lines_in_2 = _scaled_lines(fmat1, keypoints1, threshold, accepted1)  # B×N×3
    lines_in_1 = _scaled_lines(fmat2, keypoints2, threshold_in_1, accepted2)  # B×M×3
    # flat per-coordinate columns: 1-D gathers are much cheaper than row gathers on a CPU
    a2, b2, c2 = lines_in_2.reshape(-1, 3).T.contiguous()
    a1, b1, c1 = lines_in_1.reshape(-1, 3).T.contiguous()
    x1, y1 = keypoints1.reshape(-1, 2).T.contiguous()
    x2, y2 = keypoints2.reshape(-1, 2).T.contiguous()
    if grid is None:
        near = torch.bmm(lines_in_2, to_homogeneous(keypoints2).transpose(1, 2)).abs_() < 1
        flat = torch.nonzero(near.reshape(-1))[:, 0]  # into B·N·M, sorted
        point1 = torch.div(flat, n_2, rounding_mode="floor")  # into B·N
        point2 = torch.div(point1, n_1, rounding_mode="floor") * n_2 + flat % n_2  # into B·M
    else:
        point1, cell = grid_candidates(lines_in_2, threshold, *grid)
        point2 = torch.div(point1, n_1, rounding_mode="floor") * n_2 + cell
        near = (a2[point1] * x2[point2] + b2[point1] * y2[point2] + c2[point1]).abs() < 1
        point1, point2 = point1[near], point2[near]
    near = (a1[point2] * x1[point1] + b1[point2] * y1[point1] + c1[point2]).abs() < 1
    point1, point2 = point1[near], point2[near]
    pair_b = torch.div(point1, n_1, rounding_mode="floor")
    pairs = torch.stack([pair_b, point1 - pair_b * n_1, point2 - pair_b * n_2], dim=-1)
    if grid is not None:
        # the dense path's (b, i, j) order, so that the F-error draws agree
        pairs = pairs[torch.argsort(point1 * n_2 + pairs[:, 2])]
    return pairs


def good_pair_mask(keypoints1: torch.Tensor, keypoints2: torch.Tensor, fmat1: torch.Tensor,
                   fmat2: torch.Tensor, threshold: float, accepted1: torch.Tensor | None = None,
                   accepted2: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`good_pairs` as a dense ``B×N×M`` bool mask."""
    index = good_pairs(keypoints1, keypoints2, fmat1, fmat2, threshold, accepted1, accepted2)
    mask = torch.zeros(keypoints1.shape[0], keypoints1.shape[1], keypoints2.shape[1],
                       dtype=torch.bool, device=keypoints1.device)
    mask[index.unbind(-1)] = True
    return mask


def draw_index_sets(counts: torch.Tensor, n_trials: int, set_size: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """For each ``counts[b]``, ``n_trials`` uniform random ``set_size``-subsets of
    ``0 .. counts[b]−1`` → ``B×K×set_size`` (long, on the CPU).

    Floyd's algorithm, vectorised over ``B×K`` (a loop over the ``set_size`` positions only):
    the indices within a set are distinct, the sets of different trials independent. (The
    original re-seeds numpy on every call so that all trials use the same 8 points; we
    deliberately draw a different set in each trial.) Rows with ``counts[b] < set_size`` are
    drawn as if ``counts[b] = set_size`` and must be ignored by the caller. The random numbers
    come from ``generator`` (a CPU generator) or the global CPU RNG.
    """
    counts = counts.to("cpu", torch.long).clamp(min=set_size)
    uniform = torch.rand(counts.shape[0], n_trials, set_size, generator=generator,
                         dtype=torch.float64)
    chosen = torch.empty(counts.shape[0], n_trials, set_size, dtype=torch.long)
    for k in range(set_size):
        upper = (counts - set_size + k)[:, None]  # B×1, inclusive bound of this step
        candidate = torch.minimum((uniform[..., k] * (upper + 1)).long(), upper)
        taken = (chosen[..., :k] == candidate[..., None]).any(-1)
        chosen[..., k] = torch.where(taken, upper.expand_as(candidate), candidate)
    return chosen


def fundamental_trial_errors(points1: torch.Tensor, points2: torch.Tensor,
                             fmat2: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 errors ``B×K`` of 8-point estimates from ``B×K×8×2`` sets against ``F2 B×3×3``.

    Each estimate (``x̃1ᵀ·F·x̃2 = 0``, i.e. of ``F2``) is divided by its ``[2, 2]`` entry and
    compared with ``F2`` by ``smooth_l1_loss`` (β = 1, mean over the 9 entries). Solved in
    float64. Trials whose design matrix has rank < 8 (degenerate sets), whose ``[2, 2]`` entry
    vanishes, or whose error is not finite get ``+inf``. (Our 8-point is Hartley-normalised,
    the original's is not: a deliberate difference.)
    """
    x1, x2 = points1.double(), points2.double()
    estimate = eight_point_fundamental(x1, x2)  # B×K×3×3
    # rank of the (normalised) design matrix: a unique null vector needs 8 independent rows
    sing = torch.linalg.svdvals(eight_point_design_matrix(normalize_points_hartley(x1)[0],
                                                          normalize_points_hartley(x2)[0]))
    full_rank = sing[..., -1] > 1e-9 * sing[..., 0]
    corner = estimate[..., 2, 2]
    usable = full_rank & (corner.abs() > 1e-12 * estimate.flatten(-2).norm(dim=-1))
    safe_corner = torch.where(usable, corner, torch.ones_like(corner))
    estimate = estimate / safe_corner[..., None, None]
    target = fmat2.double()[:, None].expand_as(estimate)
    error = F.smooth_l1_loss(estimate, target, reduction="none").flatten(-2).mean(-1)
    usable = usable & torch.isfinite(error)
    return torch.where(usable, error, torch.full_like(error, float("inf")))


def fundamental_error(keypoints1: torch.Tensor, keypoints2: torch.Tensor,
                      good_index: torch.Tensor, fmat2: torch.Tensor, n_trials: int,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-``n_trials`` F-error per image pair from random 8-sets of good pairs.

    keypoints ``B×N×2``, ``B×M×2``; ``good_index G×3`` (``b, i, j``, sorted by ``b`` as
    :func:`good_pairs` / ``torch.nonzero`` give it); ``fmat2 B×3×3``. Returns ``error B``
    (float64, 0 where undefined) and ``has_error B`` (bool): the pair has ≥ 8 good pairs and
    at least one usable trial.
    """
    batch = keypoints1.shape[0]
    counts = torch.bincount(good_index[:, 0], minlength=batch)  # B
    enough = counts >= EIGHT
    zeros = torch.zeros(batch, dtype=torch.float64, device=keypoints1.device)
    if not bool(enough.any()):
        return zeros, torch.zeros_like(enough)
    ranks = draw_index_sets(counts, n_trials, EIGHT, generator).to(good_index.device)  # B×K×8
    offsets = torch.cumsum(counts, 0) - counts
    rows = (offsets[:, None, None] + ranks).clamp(max=good_index.shape[0] - 1)
    pairs = good_index[rows]  # B×K×8×3; rows of pairs without 8 good pairs are ignored below
    batch_index = torch.arange(batch, device=keypoints1.device)[:, None, None]
    errors = fundamental_trial_errors(keypoints1[batch_index, pairs[..., 1]],
                                      keypoints2[batch_index, pairs[..., 2]], fmat2)  # B×K
    best = errors.min(dim=-1).values
    has_error = enough & torch.isfinite(best)
    return torch.where(has_error, best, zeros), has_error


# --------------------------------------------------------------------------- loss

REWARDS = ("fmat", "posfeat")
LOSS_DISTANCES = ("cos", "euc")


def image_scales(batch: dict, batch_size: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale1, scale2`` (``B`` each): network input size ÷ original image size per image.

    Read from ``batch['scale1']`` / ``batch['scale2']`` (a number or ``B`` values) when the
    data provides them; our MegaDepth loader does not, so they are 1 (the original reports 1
    too in every reference case).
    """
    scales = []
    for key in ("scale1", "scale2"):
        value = batch.get(key, 1.0)
        value = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
        scales.append(value.expand(batch_size) if value.numel() == 1 else value)
    return scales[0], scales[1]


class KeypointLoss(nn.Module):
    """REINFORCE loss of the detector (stage 2), reward from the fundamental-matrix error.

    ``forward(batch, outputs1, outputs2, processed, epoch)`` → ``(loss, components)``; uses
    ``outputs{1,2}['local_point']`` (``B×1×H×W`` logits), ``outputs{1,2}['local_map']``
    (``B×C×H/4×W/4``), ``batch['F1'], batch['F2']`` (``B×3×3``) and, with
    ``reward_config.rescale_thr``, ``batch['scale1'/'scale2']`` when present. ``epoch`` is the
    trainer's 1-based epoch (temperature ``min(temperature_base + epoch, temperature_max)``).
    ``loss = −reinforce − kp_penalty``. Components (scalars, detached), with the original's
    names and signs: ``reinforce``, ``kp_penalty`` (positive), ``scale1``, ``scale2``,
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
    default_conf = {
        "grid_size": 8,
        "loss_distance": "cos",
        "temperature_base": 60,
        "temperature_max": 60,
        "reward_config": {"reward_thr": 2.0, "rescale_thr": False},
        "cor_detach": True,
        "good_reward": 1.0,
        "bad_reward": -0.25,
        "kp_penalty": -0.001,
        "match_grad": False,
        # Our additions.
        "reward": "fmat",
        "fmat_trials": 100,
        "fmat_seed": 0,
    }

    def __init__(self, conf: dict | None = None):
        super().__init__()
        conf = dict(conf or {})
        reward_conf = dict(conf.get("reward_config") or {})
        unknown = sorted(set(reward_conf) - set(self.default_conf["reward_config"]))
        if unknown:
            raise SCFeatError(f"reward_config: unknown key(s) {unknown}, expected only "
                              f"{sorted(self.default_conf['reward_config'])}")
        conf["reward_config"] = {**self.default_conf["reward_config"], **reward_conf}
        self.conf = {**self.default_conf, **conf}
        self._check_conf()
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(self.conf["fmat_seed"]))

    def _check_conf(self) -> None:
        conf = self.conf
        if conf["loss_distance"] not in LOSS_DISTANCES:
            raise SCFeatError(f"loss_distance: expected one of {list(LOSS_DISTANCES)}, got "
                              f"{conf['loss_distance']!r}")
        if conf["reward"] not in REWARDS:
            raise SCFeatError(f"reward: expected one of {list(REWARDS)} (fmat: the original's "
                              f"F-error reward, posfeat: good_reward / bad_reward only), got "
                              f"{conf['reward']!r}")
        if not isinstance(conf["reward_config"]["rescale_thr"], bool):
            raise SCFeatError(f"reward_config.rescale_thr: expected true or false, got "
                              f"{conf['reward_config']['rescale_thr']!r}")
        if not float(conf["reward_config"]["reward_thr"]) > 0:
            raise SCFeatError(f"reward_config.reward_thr: expected a positive number of "
                              f"pixels, got {conf['reward_config']['reward_thr']!r}")
        for key in ("grid_size", "fmat_trials"):
            if isinstance(conf[key], bool) or not isinstance(conf[key], int) or conf[key] < 1:
                raise SCFeatError(f"{key}: expected a positive integer, got {conf[key]!r}")

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
        """Good-pair thresholds in image 2 and image 1 (pixels of the network input).

        ``reward_thr``, or with ``rescale_thr`` ``reward_thr × scale`` of the image the
        distance is measured in (our reading of the original's option: the threshold is meant
        in original-image pixels).
        """
        threshold = float(self.conf["reward_config"]["reward_thr"])
        if not self.conf["reward_config"]["rescale_thr"] or scales is None:
            return threshold, threshold
        scale1, scale2 = scales
        if bool((scale1 == 1).all()) and bool((scale2 == 1).all()):
            return threshold, threshold
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
        height1, width1 = score1.shape[-2:]
        height2, width2 = score2.shape[-2:]
        keypoints1, logp1, accepted1 = sample_keypoints(
            score1, conf["grid_size"], draws.get("proposals1"), draws.get("accept1"))
        keypoints2, logp2, accepted2 = sample_keypoints(
            score2, conf["grid_size"], draws.get("proposals2"), draws.get("accept2"))

        temperature = float(min(conf["temperature_base"] + epoch, conf["temperature_max"]))
        normalize = conf["loss_distance"] == "cos"  # euc: raw descriptors, nothing else changes
        with torch.set_grad_enabled(bool(conf["match_grad"]) and torch.is_grad_enabled()):
            desc1 = sample_features(outputs1["local_map"],
                                    normalize_coords(keypoints1, height1, width1), normalize)
            desc2 = sample_features(outputs2["local_map"],
                                    normalize_coords(keypoints2, height2, width2), normalize)
            log_match = match_log_probabilities(desc1, desc2, temperature)  # B×N×M
            match_prob = log_match.exp()
            if conf["cor_detach"]:
                match_prob = match_prob.detach()
            acc1, acc2 = accepted1.to(log_match.dtype), accepted2.to(log_match.dtype)
            # Σ over accepted pairs of P·log P and the row/column masses of P: B×N×M work is
            # done once here, as (matrix × mask vector) products, never broadcast by autograd.
            plogp_accepted = ((match_prob * log_match) @ acc2[..., None])[..., 0]  # B×N
            plogp_sum = (acc1 * plogp_accepted).sum()
            row_mass = (match_prob @ acc2[..., None])[..., 0]  # B×N: Σ_j acc2_j P_ij
            col_mass = (acc1[:, None, :] @ match_prob)[:, 0]  # B×M: Σ_i acc1_i P_ij

        batch_size = score1.shape[0]
        scales = image_scales(batch, batch_size, score1.device)
        grid = (conf["grid_size"], height2 // conf["grid_size"], width2 // conf["grid_size"])
        terms = self.reward_terms(keypoints1, keypoints2, batch["F1"], batch["F2"], grid,
                                  scales, draws.get("fmat_error"))
        logp1_acc = torch.where(accepted1, logp1, torch.zeros_like(logp1))
        logp2_acc = torch.where(accepted2, logp2, torch.zeros_like(logp2))
        # Σ_accepted P·(log P + lp1_i + lp2_j), and the same sum over the good accepted pairs
        accepted_sum = plogp_sum + (row_mass * logp1_acc).sum() + (col_mass * logp2_acc).sum()
        good_index = terms["good_index"]
        b, i, j = good_index.unbind(-1)
        both = accepted1[b, i] & accepted2[b, j]
        b, i, j = b[both], i[both], j[both]
        good_sum = (match_prob[b, i, j] * (log_match[b, i, j] + logp1[b, i] + logp2[b, j])).sum()
        # reward = base on accepted pairs, + good_bonus on good ones
        reinforce = terms["base"] * accepted_sum + terms["good_bonus"] * good_sum
        fmat_error = terms["fmat_error"]
        penalty_scale = 1.0 if fmat_error is None else fmat_error
        kp_penalty = conf["kp_penalty"] * penalty_scale * (logp1_acc.sum() + logp2_acc.sum())
        loss = -reinforce - kp_penalty

        components = self._components(log_match.detach(), accepted1, accepted2, scales,
                                      temperature)
        accepted_pairs = (accepted1.sum(1) * accepted2.sum(1)).sum().clamp(min=1).float()
        device = loss.device
        components.update({
            "reinforce": reinforce.detach().float(),
            "kp_penalty": torch.as_tensor(kp_penalty, device=device).detach().float(),
            "n_good": torch.tensor(float(b.numel()), device=device),
            # what the detector learns to raise: good pairs among the accepted pairs
            "good_fraction": b.numel() / accepted_pairs,
            "n_good_all": torch.tensor(float(good_index.shape[0]), device=device),
            "fmat_error": (torch.zeros((), device=device) if fmat_error is None
                           else fmat_error.detach().float()),
            "n_fmat_pairs": terms["n_fmat_pairs"].float(),
        })
        return {"loss": loss, "components": components, "keypoints1": keypoints1,
                "keypoints2": keypoints2, "logp1": logp1, "logp2": logp2,
                "accepted1": accepted1, "accepted2": accepted2, "log_match": log_match,
                "good_index": good_index, "fmat_error": fmat_error, "base": terms["base"],
                "good_bonus": terms["good_bonus"], "temperature": temperature}

    @staticmethod
    def _components(log_match: torch.Tensor, accepted1: torch.Tensor, accepted2: torch.Tensor,
                    scales: tuple[torch.Tensor, torch.Tensor], temperature: float) -> dict:
        """The original's monitoring components (no gradient) from ``log P`` (``B×N×M``)."""
        prob = log_match.exp().float()
        batch_size = prob.shape[0]
        flat = prob.flatten(1)  # B×(N·M)
        sums = torch.cat([prob.sum(-1).flatten(), prob.sum(-2).flatten()])  # row and column sums
        return {
            "scale1": scales[0].float().mean(),
            "scale2": scales[1].float().mean(),
            "cor_minmax": flat.max(1).values.min(),
            "cor_minmean": flat.mean(1).min(),
            "cor_max": flat.max(),
            "cor_mean": flat.mean(),
            "cor_summin": sums.min(),
            "cor_summax": sums.max(),
            "n_kps": (accepted1.sum() + accepted2.sum()).float() / batch_size,
            "n_pairs": prob.sum() / batch_size,
            "temperature": torch.tensor(temperature, device=prob.device),
        }
