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

KV cache (``cached_frames = F > 0``): the grid is the *key* grid ``(T_k, H, W)``, cached frames
first, then the new ones; the queries are the last ``T_q = T_k - F`` frames (``Nq = T_q*H*W`` rows
of q, no text tokens). ``f_tied`` must divide F (and so T_q): the query tiles are then exactly the
key tiles ``n_cached_tiles .. n_tiles - 1`` (tile numbering starts with the frame group), and a
query tile's token at key-sequence index ``n`` is row ``n - q_offset`` of q (``q_offset = F*H*W``).
With F = 0 query tiles and key tiles are the same tiles and q, k have the same rows.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..monarch.layout import GridTokens
from ..monarch.layout import check_qkv as _check_qkv
from ..monarch.layout import resolve_scale  # noqa: F401  (re-exported: one scale rule)

__all__ = ["RTLayout", "make_rt_layout", "tiling_problem", "cached_problem", "resolve_scale", "check_qkv",
           "check_q_rows", "check_steps"]


@dataclass(frozen=True)
class RTLayout(GridTokens):
    grid: Tuple[int, int, int]
    tiling: Tuple[int, int, int]   # (f_tied, h_reduce, w_reduce)
    text_before: int
    text_after: int
    cached_frames: int = 0         # KV cache: the first F frames of the (key) grid have no queries

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
    def n_cached_tiles(self) -> int:
        """Key tiles of the cached frames (no query tile): the query tiles come after them."""
        f, hr, wr = self.tiling
        return (self.cached_frames // f) * hr * wr

    @property
    def n_query_tiles(self) -> int:
        return self.n_tiles - self.n_cached_tiles

    @property
    def q_offset(self) -> int:
        """Key-sequence index of q's first row (``cached_frames * H * W``; 0 without a cache)."""
        return self.cached_frames * self.grid[1] * self.grid[2]

    @property
    def Nq(self) -> int:
        """Rows of q: ``N`` without a cache, the new frames' ``T_q*H*W`` tokens with one."""
        return self.N - self.q_offset

    @property
    def query_grid(self) -> Tuple[int, int, int]:
        T, H, W = self.grid
        return (T - self.cached_frames, H, W)

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

    def query_token_index(self, device=None) -> torch.Tensor:
        """``[n_query_tiles, b1, b2]``: the row of q holding (query tile, row, column); query tile
        ``a`` is key tile ``n_cached_tiles + a``. Equals :meth:`token_index` without a cache."""
        return self.token_index(device)[self.n_cached_tiles:] - self.q_offset

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


def _cached_count(cached_frames) -> int:
    if isinstance(cached_frames, bool):
        raise ValueError(f"cached_frames must be an integer >= 0, got {cached_frames!r}")
    try:
        f = operator.index(cached_frames)
    except TypeError:
        raise ValueError(f"cached_frames must be an integer >= 0, got {cached_frames!r}") from None
    if f < 0:
        raise ValueError(f"cached_frames must be an integer >= 0, got {f}")
    return f


def cached_problem(grid: Sequence[int], tiling: Sequence[int], cached_frames: int, text_before: int = 0,
                   text_after: int = 0) -> Optional[str]:
    """What keeps MonarchRT's KV-cache form from running with ``cached_frames`` cached frames of
    the key grid ``grid = (T_k, H, W)`` (besides :func:`tiling_problem`), or None. F = 0 is no cache."""
    F = int(cached_frames)
    if F == 0:
        return None
    T = int(grid[0])
    f = int(tiling[0])
    if F >= T:
        return (f"cached_frames={F} leaves no query frame in the key grid of T_k={T} frames; the key grid "
                f"(T_k, H, W) holds the cached frames followed by the new ones (T_k > cached_frames)")
    if F % f or (T - F) % f:
        ok = [d for d in range(1, min(F, T - F) + 1) if F % d == 0 and (T - F) % d == 0]
        return (f"MonarchRT KV cache: f_tied={f} must divide cached_frames={F} and the T_q={T - F} new frames "
                f"(query tiles are whole tiles of the new frames); use f_tied in {ok[:8]}")
    if int(text_before) or int(text_after):
        return (f"MonarchRT KV cache (cached_frames={F}) takes video tokens only, got text_before="
                f"{int(text_before)}, text_after={int(text_after)}; run the KV-cache attention on the video "
                f"tokens (text_before=text_after=0), or the call without a cache (cached_frames=0)")
    return None


def make_rt_layout(seq: int, grid: Sequence[int], tiling: Sequence[int], text_before: int = 0,
                   text_after: int = 0, cached_frames: int = 0) -> RTLayout:
    """Validate a MonarchRT tiling against a sequence length; clear ValueErrors on bad input.

    ``seq`` is the key sequence length (``text_before + T*H*W + text_after`` of ``grid``); with
    ``cached_frames = F > 0`` the grid is the key grid and q holds its last ``T - F`` frames
    (``RTLayout.Nq`` rows; checked by :func:`check_qkv`)."""
    g = _triple("grid", grid, "(T, H, W)")
    p = _triple("tiling", tiling, "(f_tied, h_reduce, w_reduce)")
    tb, ta = int(text_before), int(text_after)
    if tb < 0 or ta < 0:
        raise ValueError(f"text_before/text_after must be >= 0, got {tb}/{ta}")
    why = tiling_problem(g, p)
    if why is not None:
        raise ValueError(why)
    F = _cached_count(cached_frames)
    why = cached_problem(g, p, F, tb, ta)
    if why is not None:
        raise ValueError(why)
    nv = math.prod(g)
    if nv + tb + ta != seq:
        what = "key sequence length" if F else "sequence length"
        raise ValueError(f"{what} {seq} != text_before {tb} + T*H*W {nv} (grid {g}) + "
                         f"text_after {ta}; fix the grid or the text-token counts")
    return RTLayout(g, p, tb, ta, F)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached_frames: int = 0) -> None:
    """q, k, v ``[batch, heads, seq, head_dim]``: one shape without a cache; with ``cached_frames >
    0`` k and v share a shape and q differs from it in the sequence length only (its rows are
    checked against the layout by :func:`check_q_rows`)."""
    if not cached_frames:
        _check_qkv(q, k, v, "MonarchRT attention")
        return
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim], got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if v.shape != k.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"MonarchRT KV-cache attention: k and v must have one shape and q the same batch, heads "
                         f"and head_dim (expand GQA heads first), got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] < 1 or q.shape[2] < 1:
        raise ValueError(f"empty q/k/v: shape {tuple(q.shape)}")


def check_q_rows(q: torch.Tensor, lay: RTLayout) -> None:
    """q's rows against the layout: ``Nq`` (the new frames' tokens with a KV cache)."""
    if q.shape[2] != lay.Nq:
        raise ValueError(f"MonarchRT KV cache: q has {q.shape[2]} rows but the last {lay.query_grid[0]} frames of "
                         f"the key grid {lay.grid} (cached_frames={lay.cached_frames}) hold {lay.Nq} tokens; q must "
                         f"be exactly the new frames' tokens")


def check_steps(steps) -> int:
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1 (1 = only the final pass), got {steps!r}")
    return int(steps)
