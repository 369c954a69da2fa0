"""Block layout of Monarch attention over a video token grid (shared by the reference and the kernel).

The sequence is ``[text_before | video | text_after]`` with ``Nv = T*H*W`` video tokens ordered
(t, h, w) row-major. A Monarch *block* is a ``bt x bh x bw`` tile of the (T, H, W) grid; tiles
are laid out over the grid in (t, h, w) order, so block ``m`` is the tile at
``(mt, mh, mw)`` with ``m = (mt*nH + mh)*nW + mw`` and ``nT, nH, nW = ceil(T/bt), ...``.
Inside a tile, index ``j = (jt*bh + jh)*bw + jw``. Tiles at the far edges of the grid may be
partial when the grid does not divide by the block: their missing positions are *padding*
(never attended to as keys, dropped as queries).

Common layouts:

* frame blocks (VMonarch): ``block = (1, H, W)``: R = attention inside each frame, L = mixing
  of frames at the same spatial position;
* frame groups: ``block = (g, H, W)``;
* spatial tiles inside frames (MonarchRT-style): ``block = (1, th, tw)``;
* plain 1D blocks of size B (MonarchAttention): ``grid = (1, 1, Nv), block = (1, 1, B)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

__all__ = ["MonarchLayout", "make_layout", "resolve_scale"]


def _triple(name: str, x) -> Tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in x)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of three ints (T, H, W), got {x!r}") from None
    if len(t) != 3:
        raise ValueError(f"{name} must have three entries (T, H, W), got {x!r}")
    if min(t) < 1:
        raise ValueError(f"{name} entries must be >= 1, got {t}")
    return t


class GridTokens:
    """Token counts of a layout with ``grid = (T, H, W)`` video tokens between ``text_before`` and
    ``text_after`` text tokens (Monarch's and MonarchRT's layouts)."""

    @property
    def Nv(self) -> int:
        T, H, W = self.grid
        return T * H * W

    @property
    def N(self) -> int:
        return self.text_before + self.Nv + self.text_after

    @property
    def n_text(self) -> int:
        return self.text_before + self.text_after


@dataclass(frozen=True)
class MonarchLayout(GridTokens):
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    text_before: int
    text_after: int

    @property
    def nblocks(self) -> Tuple[int, int, int]:
        return tuple(-(-g // b) for g, b in zip(self.grid, self.block))

    @property
    def M(self) -> int:
        """Number of blocks."""
        nT, nH, nW = self.nblocks
        return nT * nH * nW

    @property
    def B(self) -> int:
        """Block size (positions per block, padding included)."""
        bt, bh, bw = self.block
        return bt * bh * bw

    @property
    def contiguous(self) -> bool:
        """True when block m is the run of video tokens [m*B, (m+1)*B) (only the last one partial).

        Holds for frame blocks / frame groups (bh=H, bw=W), row bands of a single frame and
        1D blocks over a 1D grid; the kernels then skip the (t, h, w) index arithmetic.
        """
        T, H, W = self.grid
        bt, bh, bw = self.block
        if bw != W:
            return T == 1 and H == 1
        if bh != H:
            return T == 1
        return True

    def token_index(self, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(idx, valid)``, both ``[M, B]``: the sequence index of block m's position j (text
        offset included; 0 where padding) and whether that position exists."""
        T, H, W = self.grid
        bt, bh, bw = self.block
        nT, nH, nW = self.nblocks
        m = torch.arange(self.M, device=device)[:, None]
        j = torch.arange(self.B, device=device)[None, :]
        t = (m // (nH * nW)) * bt + j // (bh * bw)
        h = ((m // nW) % nH) * bh + (j // bw) % bh
        w = (m % nW) * bw + j % bw
        valid = (t < T) & (h < H) & (w < W)
        idx = self.text_before + (t * H + h) * W + w
        return torch.where(valid, idx, torch.zeros_like(idx)), valid

    def text_index(self, device=None) -> torch.Tensor:
        """Sequence indices of the text tokens (before, then after the video)."""
        return torch.cat([torch.arange(self.text_before, device=device),
                          torch.arange(self.text_before + self.Nv, self.N, device=device)])


def make_layout(seq: int, grid: Sequence[int], block: Sequence[int], text_before: int = 0,
                text_after: int = 0) -> MonarchLayout:
    """Validate a Monarch layout against a sequence length; clear ValueErrors on bad input."""
    g = _triple("grid", grid)
    b = _triple("block", block)
    tb, ta = int(text_before), int(text_after)
    if tb < 0 or ta < 0:
        raise ValueError(f"text_before/text_after must be >= 0, got {tb}/{ta}")
    for name, gi, bi in zip("THW", g, b):
        if bi > gi:
            raise ValueError(f"block {b} is larger than grid {g} along {name} ({bi} > {gi}); "
                             f"use a block size <= the grid size on every axis")
    nv = g[0] * g[1] * g[2]
    if nv + tb + ta != seq:
        raise ValueError(f"sequence length {seq} != text_before {tb} + T*H*W {nv} (grid {g}) + "
                         f"text_after {ta}; fix the grid or the text-token counts")
    return MonarchLayout(g, b, tb, ta)


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a positive finite float (or None for 1/sqrt(head_dim)), got {scale!r}")
    return s


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str = "Monarch attention") -> None:
    """q, k, v: one float shape ``[batch, heads, seq, head_dim]`` (``what`` names the method)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads, seq, head_dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{what} is self-attention: q, k, v must have the same shape "
                         f"[batch, heads, seq, head_dim] (expand GQA heads first), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] < 1 or q.shape[2] < 1:
        raise ValueError(f"empty q/k/v: shape {tuple(q.shape)}")


def check_steps(steps) -> int:
    s = int(steps)
    if s < 1:
        raise ValueError(f"steps must be >= 1 (1 = only the final pass), got {steps!r}")
    return s
