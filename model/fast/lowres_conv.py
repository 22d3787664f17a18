"""A 3×3 convolution of a bilinearly upsampled map, computed at the low resolution, exactly.

Five layers of the network convolve a bilinearly upsampled map (``upconv3``, ``upconv2``,
``side2``, ``side3`` and the detector's ``conv2`` on ``up(f)``). With ``U_H``, ``U_W`` the
interpolation matrices of the two axes (``up(x) = U_H · x · U_Wᵀ`` per channel; their rows sum to
one) and ``W_t`` the ``Cout×Cin`` weight of tap ``t = (dy, dx)``, the zero-padded convolution is

    conv(up(x)) = Σ_t S_dy U_H (W_t · x) U_Wᵀ S_dxᵀ + bias,

``S_d`` shifting by ``d − 1`` rows with zero fill. So the channels are mixed first, by one GEMM
at the low resolution (``9·Cout`` output channels, 4× or 16× fewer pixels than the direct
convolution), and what remains is a separable linear map of ``Cout``-channel maps: along the
width ``Σ_dx (W_t·x) · (S_dx U_W)ᵀ`` and along the height ``Σ_dy (S_dy U_H) · (…)``.

:func:`upsample_conv3x3` applies the separable part as matrix products with the shifted
interpolation matrices ``M[d] = (S_d U)ᵀ`` (:func:`shifted_interpolation_matrices`; taken from
``F.interpolate`` itself, so any size and either ``align_corners``, the edge clamp and the zero
padding included). These matrices are banded — for ``align_corners=False`` and an integer factor
``s`` (the polyphase structure) output ``s·k + r`` reads only low-resolution ``k−1, k, k+1`` —
so large outputs are computed in blocks, each from the few low-resolution rows and columns it
reads (:func:`band_chunks`). Every step is a GEMM or a copy: exact up to floating-point
reassociation, and differentiable by autograd (input, weight and bias gradients for free).

docs/performance.md has the measurements and the forms that were not kept.

:func:`upsample_conv3x3_reference` is the direct ``F.interpolate → F.conv2d`` composition.

Everything here is a pure function of tensors; which layer uses which form is decided by
:class:`model.fast.FastOps` (:meth:`~model.fast.FastOps.lowres_conv_path`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import model.fast.workspace as workspace


# ----------------------------------------------------------------------------- matrices

@functools.lru_cache(maxsize=256)
def interpolation_matrix(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """``n_out×n_in`` matrix ``U`` of 1-D bilinear (linear) interpolation from ``n_in`` to
    ``n_out`` samples, exactly the weights ``F.interpolate(mode="bilinear", size=…)`` uses
    (obtained by interpolating the identity in ``dtype``)."""
    # Normal tensors even when first asked for under inference_mode: the cache serves training.
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, dtype=dtype, device=device).view(1, n_in, 1, n_in)
        rows = F.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=align_corners)
        return rows.view(n_in, n_out).t().contiguous()


@functools.lru_cache(maxsize=256)
def shifted_interpolation_matrices(n_in: int, n_out: int, align_corners: bool,
                                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``3×n_in×n_out`` tensor ``M`` with ``M[d, j, J] = U[J + d − 1, j]`` (zero where
    ``J + d − 1`` is outside ``[0, n_out)``): interpolation followed by the 3-tap shift ``d`` of
    a zero-padded convolution, as a right factor (``row · M[d]``)."""
    u_t = interpolation_matrix(n_in, n_out, align_corners, dtype, device).t()  # n_in×n_out
    with torch.inference_mode(False), torch.no_grad():
        m = u_t.new_zeros(3, n_in, n_out)
        m[1] = u_t
        m[0, :, 1:] = u_t[:, :-1]  # output J reads up[J − 1]
        m[2, :, :-1] = u_t[:, 1:]  # output J reads up[J + 1]
        return m


@functools.lru_cache(maxsize=256)
def band_chunks(n_in: int, n_out: int, align_corners: bool, chunk: int
                ) -> tuple[tuple[int, int, int, int], ...]:
    """Output chunks ``(a, b, lo, hi)`` of at most ``chunk`` samples along one axis, each with
    the range ``[lo, hi)`` of low-resolution samples its shifted interpolation reads (the
    nonzero rows of ``M[:, :, a:b]``, :func:`shifted_interpolation_matrices`)."""
    m = shifted_interpolation_matrices(n_in, n_out, align_corners, torch.float64,
                                       torch.device("cpu"))
    reads = (m != 0).any(dim=0)  # n_in×n_out
    chunks = []
    for a in range(0, n_out, chunk):
        b = min(a + chunk, n_out)
        rows = torch.nonzero(reads[:, a:b].any(dim=1)).flatten()
        chunks.append((a, b, int(rows[0]), int(rows[-1]) + 1))
    return tuple(chunks)


# ----------------------------------------------------------------------------- the operators

def upsample_conv3x3_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """The direct composition: ``conv2d(interpolate(x, size, bilinear), weight, bias, pad 1)``.

    ``x`` ``B×Cin×h×w``, ``weight`` ``Cout×Cin×3×3`` → ``B×Cout×H×W`` (``size = (H, W)``)."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    return F.conv2d(x, weight, bias, padding=1)


def mix_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The nine taps' channel mixes at the low resolution, one GEMM:
    ``x`` ``B×Cin×h×w`` → ``B×3×Cout×3×h×w`` indexed ``[b, dx, c, dy, i, j]`` =
    ``Σ_ci weight[c, ci, dy, dx] · x[b, ci, i, j]``, plus ``bias[c]`` on the centre tap
    (``dy = dx = 1``, which no zero padding touches; the interpolation's rows sum to one, so it
    reaches every output once)."""
    batch, cin, h, w = x.shape
    cout = weight.shape[0]
    mix = weight.permute(3, 0, 2, 1).reshape(9 * cout, cin)  # rows ordered (dx, c, dy)
    y = torch.matmul(mix, x.reshape(batch, cin, h * w)).view(batch, 3, cout, 3, h, w)
    if bias is not None:
        if _needs_grad(y, bias):
            tap = bias.new_zeros(3, 1, 3)
            tap[1, 0, 1] = 1.0
            y = y + (tap * bias.view(1, cout, 1)).view(3, cout, 3, 1, 1)
        else:
            y[:, 1, :, 1] += bias.view(1, cout, 1, 1)
    return y


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     size: tuple[int, int], align_corners: bool,
                     chunk: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`upsample_conv3x3_reference` with the channels mixed at the low resolution and the
    interpolation-and-shift done by matrix products: ``B×Cin×h×w → B×Cout×H×W``.

    ``out[b, c] = Σ_dy M_H[dy]ᵀ · (Σ_dx Y[b, dx, c, dy] · M_W[dx])`` with ``Y`` =
    :func:`mix_channels` (bias on its centre tap) and ``M`` =
    :func:`shifted_interpolation_matrices`. The matrices are banded: with ``chunk = (ch, cw)``
    the output is computed in ``ch×cw`` blocks, each from the few low-resolution rows and
    columns it reads (:func:`band_chunks`), so the work after the GEMM
    (``2·9·Cout·Cin·h·w``) is about ``2·Cout·W·(3h·3(cw/s + 2) + H·3(ch/s + 2))``
    (``s`` the factor); ``None`` is one block (dense matrices).

    Without autograd each block is copied into a preallocated output; with it the blocks are
    concatenated (every step is a matrix product or a copy, so autograd gives the input,
    weight and bias gradients).
    """
    batch, _, h, w = x.shape
    height, width = size
    cout = weight.shape[0]
    ch, cw = chunk or (height, width)
    grad = _needs_grad(x, weight, bias)
    y = mix_channels(x, weight, bias)  # [b, dx, c, dy, i, j]
    m_w = shifted_interpolation_matrices(w, width, align_corners, x.dtype, x.device)  # 3×w×W
    m_h = shifted_interpolation_matrices(h, height, align_corners, x.dtype, x.device)  # 3×h×H
    m_h = m_h.permute(2, 1, 0)  # H×h×3: [I, i, dy]
    rows = band_chunks(h, height, align_corners, ch)
    out = None if grad else x.new_empty(batch, cout, height, width)
    columns = []
    for a, b, lo, hi in band_chunks(w, width, align_corners, cw):
        # Width: rows (b, c, i, dy), columns (dx, j) → T[b·c, (i, dy), J] for J in [a, b).
        k = hi - lo
        piece = y[..., lo:hi].permute(0, 2, 4, 3, 1, 5).reshape(batch, cout * h * 3, 3 * k)
        t = torch.matmul(piece, m_w[:, lo:hi, a:b].reshape(3 * k, b - a))
        t = t.view(batch * cout, h * 3, b - a)
        blocks = []
        for ra, rb, rlo, rhi in rows:
            # Height: out[b, c, I, J] = Σ_(i, dy) M_H[I, i, dy] · T[b, c, (i, dy), J].
            mat = m_h[ra:rb, rlo:rhi].reshape(rb - ra, 3 * (rhi - rlo))
            mat = mat.expand(batch * cout, *mat.shape)
            block = torch.bmm(mat, t[:, 3 * rlo:3 * rhi])
            if grad:
                blocks.append(block)
            else:  # (bmm's out= into the strided block would run one GEMM per channel)
                out.view(batch * cout, height, width)[:, ra:rb, a:b].copy_(block)
        if grad:
            columns.append(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0])
    if grad:
        out = torch.cat(columns, dim=2) if len(columns) > 1 else columns[0]
        out = out.view(batch, cout, height, width)
    return out


def upsample_conv3x3_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          align_corners: bool, chunk: tuple[int, int] | None = None
                          ) -> torch.Tensor:
    """``out = conv3x3(interpolate(x, out's size))`` (no bias; written over ``out``) for a
    channels-last ``out`` ``B×Cout×H×W``, without autograd: :func:`upsample_conv3x3` with every map channels-last, so the products go
    straight into ``out``'s blocks.

    The nine taps' mix is one GEMM on ``x`` as ``(b, i, j) × Cin`` with the columns ordered
    ``(dx, dy, c)``: for a fixed ``dy``, the rows ``(j, dx)`` of one low-resolution row are
    then equally spaced (``3·Cout``), so the width product of a block of ``chunk[1]`` output
    columns is one batched GEMM over ``(b, i)``, ``(S_dx U_W)`` block ``ᵀ · Y``, into
    ``T[b, i, dy, J, c]`` (the whole width); the height product of a block of ``chunk[0]``
    output rows is then one GEMM, ``Σ_dy (S_dy U_H)`` block ``· T``, straight into ``out``'s
    rows. The mix and ``T`` are written into reused memory (:mod:`model.fast.workspace`).
    """
    batch, _, h, w = x.shape
    _, cout, height, width = out.shape
    ch, cw = chunk or (height, width)
    nhwc = out.permute(0, 2, 3, 1)  # B×H×W×Cout view
    if not nhwc.is_contiguous():
        raise ValueError("upsample_conv3x3_into: out must be channels-last")
    mix = weight.permute(1, 3, 2, 0).reshape(weight.shape[1], 9 * cout)  # Cin × (dx, dy, c)
    y = torch.matmul(x.permute(0, 2, 3, 1).reshape(batch * h * w, -1), mix,
                     out=workspace.buffer("a", (batch * h * w, 9 * cout), x))  # (b, i, j) × 9C
    m_w = shifted_interpolation_matrices(w, width, align_corners, x.dtype, x.device)  # 3×w×W
    m_h = shifted_interpolation_matrices(h, height, align_corners, x.dtype, x.device)  # 3×h×H
    t = workspace.buffer("b", (batch, h, 3, width, cout), x)  # T[b, i, dy, J, c]
    for a, b, lo, hi in band_chunks(w, width, align_corners, cw):
        k = hi - lo
        # (j, dx) × J: row 3·j + dx of the block's width matrix
        mat_w = m_w[:, lo:hi, a:b].permute(1, 0, 2).reshape(3 * k, b - a).t().contiguous()
        # one product per dy, broadcast over (b, i), stacked, then copied into T (with T's
        # strided block as the products' out=, they stall with two threads)
        block = torch.stack([torch.matmul(mat_w, y.as_strided(
            (batch * h, 3 * k, cout), (w * 9 * cout, 3 * cout, 1),
            y.storage_offset() + lo * 9 * cout + dy * cout)) for dy in range(3)], dim=1)
        t[..., a:b, :].copy_(block.view(batch, h, 3, b - a, cout))
    for ra, rb, rlo, rhi in band_chunks(h, height, align_corners, ch):
        mat_h = m_h[:, rlo:rhi, ra:rb].permute(2, 1, 0).reshape(rb - ra, 3 * (rhi - rlo))
        for n in range(batch):
            rows = nhwc[n, ra:rb].view(rb - ra, width * cout)
            torch.mm(mat_h, t[n, rlo:rhi].view(3 * (rhi - rlo), width * cout), out=rows)
    return out
