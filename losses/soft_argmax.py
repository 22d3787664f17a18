"""Soft-argmax over candidate points and the spread that weights the stage-1 loss.

``B`` batch, ``N`` queries, ``M`` candidates; normalised coordinates (``utils/geometry.py``).
"""
from __future__ import annotations

import torch


def soft_spread(prob: torch.Tensor, coords: torch.Tensor, mean: torch.Tensor, floor: float
                ) -> torch.Tensor:
    """Spread of a soft-argmax: ``Σ_xy sqrt(max(Var, floor))`` → ``B×N`` (no gradient).

    prob ``B×N×M`` (rows sum to 1), coords ``B×N×M×2`` or ``B×M×2`` (shared by all rows),
    mean ``B×N×2`` (``Σ prob·coords``). The variance is the centred second moment
    ``Σ p·(c − μ)²``; the original writes it ``E[c²] − E[c]²``, which in float32 cancels for
    peaked distributions (docs/differences.md).
    """
    with torch.no_grad():
        if coords.dim() == prob.dim():  # candidates shared by all rows: B×M×2
            coords = coords.unsqueeze(1)
        centred = coords - mean.unsqueeze(2)  # B×N×M×2
        var = (prob.unsqueeze(-1) * centred.square()).sum(2)
        return var.clamp(min=floor).sqrt().sum(-1)


def soft_correspondence(logits: torch.Tensor, coords2_n: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax over the other image's queries.

    logits ``B×N×M`` (``T·d1·d2ᵀ``), coords2_n ``B×M×2`` (normalised) → expected location
    ``B×N×2`` (normalised, differentiable) and its spread ``B×N`` (``soft_spread`` with the
    original's floor 1e-6 on the variance).
    """
    prob = torch.softmax(logits, dim=-1)
    mean = prob @ coords2_n
    return mean, soft_spread(prob, coords2_n, mean, 1e-6)
