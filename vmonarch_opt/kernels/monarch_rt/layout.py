"""Tiles, rows and columns of MonarchRT attention on a video token grid (shared by the reference,
the Triton kernels and the ONNX lowering).

The sequence is ``[text_before | video | text_after]`` with ``Nv = T*H*W`` video tokens in
(t, h, w) row-major order. MonarchRT's three parameters ``tiling = (f_tied, h_reduce, w_reduce)``
must divide the grid ``(T, H, W)``. A *tile* holds ``f_tied`` frames x ``H/h_reduce`` rows x
``W/w_reduce`` columns; tiles are numbered in (frame group, h chunk, w chunk) order:
``a = (a_t * h_reduce + a_h) * w_reduce + a_w``. Inside a tile:

* a *row* ``r`` is one frame-row segment: ``r = (frame in group) * (H/h_reduce) + (row in chunk)``,
  ``b1 = f_tied * H/h_reduce`` rows per tile;
* a *column* ``c`` is the position along the segment, ``b2 = W/w_reduce`` columns.

Token (tile a, row r, column c) is grid point
``t = a_t*f_tied + r // (H/h_reduce)``, ``h = a_h*(H/h_reduce) + r % (H/h_reduce)``,
``w = a_w*(W/w_reduce) + c`` and sequence index ``text_before + (t*H + h)*W + w``. The columns of
one row are consecutive tokens, so a row is a contiguous run of ``b2`` rows of q/k/v.

Every row of every tile is one Monarch block of ``b2`` keys ("key row" (g, k): tile g, row k).
Query tiles and key tiles are the same tiles today; the reference and the kernels keep them as
separate index ranges so that the query tiles can become a subset of the key tiles (a KV cache:
queries are the newest frames, keys all frames; block-causal attention: a query tile sees the key
tiles of earlier or equal chunks).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..monarch.layout import check_qkv as _check_qkv
from ..monarch.layout import resolve_scale  # noqa: F401  (re-exported: one scale rule)

__all__ = ["RTLayout", "make_rt_layout", "tiling_problem", "resolve_scale", "check_qkv", "check_steps"]


@dataclass(frozen=True)
class RTLayout:
    grid: Tuple[int, int, int]
    tiling: Tuple[int, int, int]   # (f_tied, h_reduce, w_reduce)
    text_before: int
    text_after: int

    @property
    def hc(self) -> int:
        """Rows of one frame inside a tile (H / h_reduce)."""
        return self.grid[1] // self.tiling[1]

    @property
    def b1(self) -> int:
        """Rows per tile: f_tied frames x H/h_reduce rows."""
        return self.tiling[0] * self.hc

    @property
    def b2(self) -> int:
        """Columns per row (W / w_reduce): the keys of one Monarch block."""
        return self.grid[2] // self.tiling[2]

    @property
    def n_tiles(self) -> int:
        T = self.grid[0]
        f, hr, wr = self.tiling
        return (T // f) * hr * wr

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

    @property
    def exact(self) -> bool:
        """The factorisation is exactly dense attention: one row per tile (every R-step query is
        the query itself) or one column per row (every block is a single key)."""
        return self.b1 == 1 or self.b2 == 1

    def geometry(self) -> tuple:
        """``(H, W, f_tied, H/h_reduce, W/w_reduce, h_reduce, w_reduce)``: what the kernels'
        index helper needs."""
        T, H, W = self.grid
        f, hr, wr = self.tiling
        return (H, W, f, self.hc, self.b2, hr, wr)

    def token_index(self, device=None) -> torch.Tensor:
        """``[n_tiles, b1, b2]``: the sequence index of (tile, row, column) (text offset included)."""
        T, H, W = self.grid
        f, hr, wr = self.tiling
        a = torch.arange(self.n_tiles, device=device)[:, None, None]
        r = torch.arange(self.b1, device=device)[None, :, None]
        c = torch.arange(self.b2, device=device)[None, None, :]
        t = (a // (hr * wr)) * f + r // self.hc
        h = ((a // wr) % hr) * self.hc + r % self.hc
        w = (a % wr) * self.b2 + c
        return self.text_before + (t * H + h) * W + w

    def text_index(self, device=None) -> torch.Tensor:
        """Sequence indices of the text tokens (before, then after the video)."""
        return torch.cat([torch.arange(self.text_before, device=device),
                          torch.arange(self.text_before + self.Nv, self.N, device=device)])


def _triple(name: str, x, what: str) -> Tuple[int, int, int]:
    try:
        if any(isinstance(v, bool) for v in x):
            raise TypeError
        t = tuple(operator.index(v) for v in x)
    except TypeError:
        raise ValueError(f"{name} must be three integers {what}, got {x!r}") from None
    if len(t) != 3:
        raise ValueError(f"{name} must be three integers {what}, got {x!r}")
    if min(t) < 1:
        raise ValueError(f"{name} entries must be >= 1, got {t}")
    return t


def tiling_problem(grid: Sequence[int], tiling: Sequence[int]) -> Optional[str]:
    """What is wrong with ``tiling = (f_tied, h_reduce, w_reduce)`` on ``grid = (T, H, W)`` (each
    must divide its grid dimension), or None."""
    names = ("f_tied", "h_reduce", "w_reduce")
    bad = [f"{n}={p} does not divide {d}={g}" for n, p, d, g in zip(names, tiling, "THW", grid) if g % p]
    if not bad:
        return None
    options = "; ".join(f"{n} in {[p for p in range(1, g + 1) if g % p == 0][:8]}"
                        for n, p, g in zip(names, tiling, grid) if g % p)
    return (f"MonarchRT tiling (f_tied, h_reduce, w_reduce) = {tuple(tiling)} on grid {tuple(grid)}: "
            f"{', '.join(bad)}; use divisors ({options})")


def make_rt_layout(seq: int, grid: Sequence[int], tiling: Sequence[int], text_before: int = 0,
                   text_after: int = 0) -> RTLayout:
    """Validate a MonarchRT tiling against a sequence length; clear ValueErrors on bad input."""
    g = _triple("grid", grid, "(T, H, W)")
    p = _triple("tiling", tiling, "(f_tied, h_reduce, w_reduce)")
    tb, ta = int(text_before), int(text_after)
    if tb < 0 or ta < 0:
        raise ValueError(f"text_before/text_after must be >= 0, got {tb}/{ta}")
    why = tiling_problem(g, p)
    if why is not None:
        raise ValueError(why)
    nv = math.prod(g)
    if nv + tb + ta != seq:
        raise ValueError(f"sequence length {seq} != text_before {tb} + T*H*W {nv} (grid {g}) + "
                         f"text_after {ta}; fix the grid or the text-token counts")
    return RTLayout(g, p, tb, ta)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _check_qkv(q, k, v, "MonarchRT attention")


def check_steps(steps) -> int:
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1 (1 = only the final pass), got {steps!r}")
    return int(steps)
