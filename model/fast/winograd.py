"""3×3 convolutions (stride 1, zero padding 1) by Winograd's minimal filtering F(m×m, 3×3).

The output is cut into ``m×m`` tiles; each tile reads an ``α×α`` patch (``α = m + 2``) of the
zero-padded input. With the transform matrices ``Bᵀ`` (``α×α``), ``G`` (``α×3``) and ``Aᵀ``
(``m×α``) of Lavin & Gray (2016), one tile of one output channel is

    Y = Aᵀ [ Σ_ci (G g_ci Gᵀ) ⊙ (Bᵀ d_ci B) ] A,

so the sum over input channels becomes ``α²`` independent matrix products
``M_ξ = U_ξ · V_ξᵀ`` (``U_ξ`` ``Cout×Cin``, the transformed filters; ``V_ξ`` ``tiles×Cin``,
the transformed patches): ``α²/m²`` multiply-adds per output and input channel instead of 9,
2.25× fewer for F(2×2, 3×3) and 4× fewer for F(4×4, 3×3).

The input is copied once into a zero-padded channels-last buffer (several inputs are written
side by side, which is their concatenation over channels); the patches are gathered from it
(a copy of ``α²/m²`` times the input whose innermost run is a pixel's channels), and ``Bᵀ·B``
is applied as two products with the ``α×α`` matrix ``Bᵀ``, one per axis. After the ``α²``
products, ``Aᵀ·A`` is applied the same way and the tiles are copied into the output, with the
bias added in that copy. Every step is a matrix product or a copy, so the result equals the
direct convolution up to floating-point reassociation. It is an inference operator (the
intermediates live in reused memory, :mod:`model.fast.workspace`): under autograd the transforms'
backward would cost more than the products save.

Accuracy (tests/unit/test_winograd.py, against float64): F(2) within a few units of the
direct convolution's own float32 rounding; F(4) about ten times that (its transforms have
coefficients up to 8 and 1/24), about 1e-5 of the output's largest value; float64 to 1e-13.

:func:`conv3x3` is the operator; :func:`transform_filter` computes ``U`` and
:func:`cached_filter` keeps it per weight for inference. Which layers use it is decided by
:meth:`model.fast.FastOps.winograd_tile_for`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

import model.fast.workspace as workspace
from model.fast.derived import CACHE

# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016): F(2, 3) with the
# points 0, ±1, ∞; F(4, 3) with 0, ±1, ±2, ∞.
_MATRICES = {
    2: {
        "BT": [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        "G": [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        "AT": [[1, 1, 1, 0], [0, 1, -1, -1]],
    },
    4: {
        "BT": [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        "G": [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        "AT": [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]],
    },
}
TILES = tuple(_MATRICES)


@functools.lru_cache(maxsize=32)
def transform_matrices(m: int, dtype: torch.dtype, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Bᵀ, G, Aᵀ)`` of F(m×m, 3×3): ``α×α``, ``α×3`` and ``m×α``."""
    if m not in _MATRICES:
        raise ValueError(f"Winograd F({m}x{m}, 3x3): the tile size must be one of {TILES}")
    with torch.inference_mode(False), torch.no_grad():
        return tuple(torch.tensor(_MATRICES[m][k], dtype=dtype, device=device)
                     for k in ("BT", "G", "AT"))


def transform_filter(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``U = G g Gᵀ`` of every filter: ``Cout×Cin×3×3`` → ``α²×Cout×Cin``, computed in
    float64 and rounded to ``weight``'s dtype."""
    cout, cin = weight.shape[:2]
    _, g, _ = transform_matrices(m, torch.float64, weight.device)
    u = torch.matmul(torch.matmul(g, weight.double()), g.t())  # Cout×Cin×α×α
    alpha = g.shape[0]
    # ξ = b·α + a: the column index first, as :func:`conv3x3` orders the products
    return u.permute(3, 2, 0, 1).reshape(alpha * alpha, cout, cin).to(weight.dtype).contiguous()


def cached_filter(weight: torch.Tensor, m: int) -> torch.Tensor:
    """:func:`transform_filter` of an inference weight, computed once and reused until the
    weight changes (:data:`model.fast.derived.CACHE`)."""
    return CACHE.get([weight], ("winograd", m), lambda: transform_filter(weight.detach(), m))


def conv3x3(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor | None,
            bias: torch.Tensor | None = None, m: int = 4, u: torch.Tensor | None = None
            ) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(m×m, 3×3).

    ``x``: a ``B×Cin×H×W`` map (any strides), or several ``B×Ci×H×W`` maps taken as their
    concatenation over channels (``torch.cat(x, 1)``, never formed); ``weight``
    ``Cout×Cin×3×3``; ``u``: its transformed filters (:func:`transform_filter`), computed from
    ``weight`` when ``None`` → ``B×Cout×H×W`` (contiguous). Inference only: a tensor that
    autograd would record raises ``ValueError``.
    """
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (*parts, weight, u, bias)):
        raise ValueError("winograd.conv3x3 is an inference operator: call it under "
                         "torch.no_grad() (model.fast uses the direct convolution where "
                         "autograd records the layer)")
    batch, _, height, width = parts[0].shape
    like = parts[0]
    cin = sum(p.shape[1] for p in parts)
    if u is None:
        u = transform_filter(weight, m)
    cout = u.shape[1]
    bt, _, at = transform_matrices(m, like.dtype, like.device)
    alpha = m + 2
    ty, tx = -(-height // m), -(-width // m)

    def scratch(slot: str, *shape: int) -> torch.Tensor:
        return workspace.buffer(slot, shape, like)

    # Zero-padded channels-last input: padding 1 on the top and left, to whole tiles below.
    shape = (batch, ty * m + 2, tx * m + 2, cin)
    padded = _zero_border(scratch("input", *shape), height, width)
    start = 0
    for p in parts:
        padded[:, 1:height + 1, 1:width + 1, start:start + p.shape[1]].copy_(p.permute(0, 2, 3, 1))
        start += p.shape[1]
    # Bᵀ along the rows, on the rows themselves: t[n, ty, k, x, ci] = Σ_a Bᵀ[k, a]·padded[n, m·ty + a, x, ci]
    rows = (padded[n].unfold(0, alpha, m).permute(0, 3, 1, 2).reshape(ty, alpha, -1)
            for n in range(batch))
    t = scratch("a", batch, ty, alpha, shape[2] * cin)
    for n, r in enumerate(rows):
        torch.matmul(bt, r, out=t[n])
    # Bᵀ along the columns, on the gathered patches: v[(l, k), (n, ty, tx), ci]
    gathered = t.view(batch, ty, alpha, shape[2], cin).unfold(3, alpha, m)
    gathered = gathered.permute(5, 2, 0, 1, 3, 4)  # b×k×B×ty×tx×Cin
    d = scratch("b", *gathered.shape).copy_(gathered).view(alpha, -1)
    v = torch.matmul(bt, d, out=scratch("a", alpha, d.shape[1])).view(alpha * alpha, -1, cin)
    prod = torch.matmul(u, v.transpose(1, 2), out=scratch("b", alpha * alpha, cout, v.shape[1]))
    # Aᵀ along the columns (l), then the rows (k): y[j, i, (co, n, ty, tx)]
    y = torch.matmul(at, prod.view(alpha, -1), out=scratch("a", m, alpha * prod[0].numel()))
    y = torch.matmul(at, y.view(m, alpha, -1), out=scratch("b", m, m, prod[0].numel()))
    y = y.view(m, m, cout, batch, ty, tx).permute(3, 2, 4, 1, 5, 0)  # B×Cout×ty×i×tx×j
    whole = (ty * m, tx * m) == (height, width)
    out = like.new_empty(batch, cout, ty * m, tx * m)
    tiles = out.view(batch, cout, ty, m, tx, m)
    if bias is not None and whole:
        torch.add(y, bias.view(1, -1, 1, 1, 1, 1), out=tiles)
    else:
        tiles.copy_(y)
    if not whole:
        out = out[:, :, :height, :width].contiguous()
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
    return out


def _zero_border(padded: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero what of ``B×Hp×Wp×C`` lies outside rows ``1…height`` and columns ``1…width``."""
    padded[:, 0].zero_()
    padded[:, height + 1:].zero_()
    padded[:, 1:height + 1, 0].zero_()
    padded[:, 1:height + 1, width + 1:].zero_()
    return padded
