"""Monarch attention with the sequence split across ranks (ring context parallelism), pure PyTorch.

The same function as ``reference.py`` at one step (``steps=1``, no text tokens), computed from
contiguous runs of the video sequence, one per rank, when every run is made of whole Monarch
blocks (a *contiguous* layout — frame blocks ``(bt, H, W)``, row bands of one frame, 1D blocks —
with every run but the last a multiple of the block size ``B``):

1. **R-step, local.** Block ``m`` is the run of tokens ``[m·B, (m+1)·B)``, so each rank holds whole
   blocks and computes their R-step factors from its own q/k/v: ``A_L[m, j] = s·Σ_l R k``,
   ``cL[m, j] = Σ_l R log R`` and ``Y[m, j] = Σ_l R v`` (``[M_r, B, D]``, ``[M_r, B]``,
   ``[M_r, B, D]`` per head).
2. **Gather.** The ranks all-gather the factors: ``M·B·(2D + 1)`` numbers per head, about two
   ``[N, D]`` tensors — what ring attention moves for K and V.
3. **L-step, local.** Each rank's queries ``(i, j)`` take the softmax over *all* blocks ``m`` of
   ``q[i, j]·A_L[m, j] − cL[m, j]`` and mix ``Y[m, j]``: exactly the reference's L-step, restricted
   to this rank's query blocks.

More steps would need the L weights of every rank's queries in each R-step (one more gather per
step) and text tokens need the text keys in every row: both are refused by :func:`ring_unsupported`
(the caller then runs exact dense ring attention).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .layout import make_layout
from .reference import _CHUNK_ELEMS, _compute_dtype, _r_step

__all__ = ["ring_unsupported", "monarch_ring_factors", "monarch_ring_rows", "monarch_ring_attention"]


def ring_unsupported(grid, block, text_before: int, text_after: int, steps: int, sizes) -> Optional[str]:
    """Why Monarch with these arguments cannot run on the sequence split in runs of ``sizes``
    tokens (rank order), or None."""
    if text_before or text_after:
        return "Monarch with text tokens in the sequence needs the text keys in every row (no ring form)"
    if int(steps) != 1:
        return f"Monarch with steps={steps} alternates R and L steps over all blocks (ring form only for steps=1)"
    lay = make_layout(sum(sizes), grid, block)
    if not lay.contiguous:
        return (f"Monarch blocks {tuple(block)} of grid {tuple(grid)} are not runs of the sequence (the ring form "
                f"needs whole frames (bt, H, W), row bands of one frame or 1D blocks)")
    B = lay.B
    bad = [r for r, s in enumerate(sizes[:-1]) if s % B]
    if bad:
        return (f"the ranks' runs of {list(sizes)} tokens do not hold whole Monarch blocks of {B} tokens (block "
                f"{tuple(block)}): choose a frame count per rank that is a multiple of the block's frames")
    return None


def _blocks(x: torch.Tensor, B: int) -> torch.Tensor:
    """``[c, n, D]`` → ``[c, ceil(n / B), B, D]``, zero-padded at the end."""
    c, n, D = x.shape
    M = -(-n // B)
    if M * B != n:
        x = torch.cat([x, x.new_zeros(c, M * B - n, D)], dim=1)
    return x.reshape(c, M, B, D)


def _chunk(c_total: int, per: int) -> int:
    return max(1, min(c_total, _CHUNK_ELEMS // max(per, 1)))


def monarch_ring_factors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_tokens: int,
                         scale: float) -> torch.Tensor:
    """R-step factors of this rank's blocks: ``[b*h, M_r, B, 2D + 1]`` packed as
    ``(A_L | Y | cL)`` in float32 (float64 for float64 inputs). q, k, v: ``[b, h, n_r, D]``, the
    rank's run of whole blocks (the last rank's may end in a partial block)."""
    b, h, n, D = q.shape
    B = int(block_tokens)
    cdt = _compute_dtype(q.dtype)
    qb, kb, vb = (_blocks(x.reshape(b * h, n, D).to(cdt), B) for x in (q, k, v))
    M = qb.shape[1]
    valid = (torch.arange(M * B, device=q.device) < n).reshape(M, B)
    out = []
    step = _chunk(b * h, 3 * M * B * B)
    for c0 in range(0, b * h, step):
        sl = slice(c0, min(b * h, c0 + step))
        a_l, c_l, y = _r_step(qb[sl], kb[sl], vb[sl], valid, scale, True)
        out.append(torch.cat([a_l, y, c_l[..., None]], dim=-1))
    return torch.cat(out)


def monarch_ring_rows(q: torch.Tensor, factors: torch.Tensor, *, block_tokens: int) -> torch.Tensor:
    """L-step of this rank's queries ``q [b, h, n_r, D]`` over the factors of *all* blocks
    (``[b*h, M, B, 2D + 1]``, every rank's in sequence order): the Monarch output rows
    ``[b, h, n_r, D]`` in ``q.dtype``."""
    b, h, n, D = q.shape
    B = int(block_tokens)
    cdt = factors.dtype
    qb = _blocks(q.reshape(b * h, n, D).to(cdt), B)
    Ml, M = qb.shape[1], factors.shape[1]
    out = torch.empty(b * h, Ml * B, D, dtype=cdt, device=q.device)
    step = _chunk(b * h, 3 * B * Ml * M + M * B * D)
    for c0 in range(0, b * h, step):
        sl = slice(c0, min(b * h, c0 + step))
        f = factors[sl]
        a_l, y, c_l = f[..., :D], f[..., D:2 * D], f[..., 2 * D]
        z = torch.einsum("cijd,cmjd->cjim", qb[sl], a_l) - c_l.transpose(1, 2)[:, :, None, :]  # [c, B, Ml, M]
        p = torch.softmax(z, dim=-1)
        out[sl] = torch.einsum("cjim,cmjd->cijd", p, y).reshape(-1, Ml * B, D)
    return out[:, :n].reshape(b, h, n, D).to(q.dtype)


def monarch_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, block, scale: float,
                           sizes, gather: Callable) -> torch.Tensor:
    """This rank's Monarch output rows. ``sizes``: tokens per rank (rank order; this rank's q/k/v
    hold its run); ``gather(t, dim, sizes)``: every rank's ``t`` concatenated along ``dim`` (rank
    ``r``'s holding ``sizes[r]`` there). Check :func:`ring_unsupported` first."""
    B = make_layout(sum(sizes), grid, block).B
    local = monarch_ring_factors(q, k, v, block_tokens=B, scale=scale)
    every = gather(local, 1, tuple(-(-s // B) for s in sizes))
    return monarch_ring_rows(q, every, block_tokens=B)
