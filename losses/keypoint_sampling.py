"""Stage-2 keypoint sampling: one proposal per grid cell of a score map, accepted or rejected
by a Bernoulli draw (the policy that ``KeypointLoss`` trains)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.errors import SCFeatError


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
