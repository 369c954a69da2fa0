"""Pure-PyTorch reference of MonarchRT attention: a Monarch factorisation per query tile.

The CPU path of ``vmonarch::monarch_rt_attention``, the backward where the kernels do not cover a
call, and the oracle of the kernel tests. Written for clarity; ``kernel.py`` / ``backward.py``
compute the same function in Triton (``steps = 1``).

Tiles, rows and columns are those of ``layout.py``: tile a, row r (b1 per tile), column c (b2 per
row); every row of every tile is a block of b2 keys ("key row" (g, k)). s = softmax scale. For the
video query (a, i, j) the attention over video key (g, k, l) is ``L[(a,i,j) -> (g,k)] *
R[(a,g,k,j) -> l]``: choose a key row, then a key inside it.

* R-step (per query tile: this is what MonarchRT adds to Monarch's shared R): for query tile a,
  key row (g, k) and column j, ``R = softmax_l(s * qbar[a,g,k,j] . K[g,k,l])`` with, at step 1,
  ``qbar[a,g,k,j] = q[a,k,j]``: the query tile's own token at row k, column j (the same for every
  key tile g). It gives ``AK = s * sum_l R K`` (scaled here), ``CL = sum_l R log R`` (the
  entropy term, as ``sum_l R x_l - logsumexp_l x_l``) and, in the final pass, ``Y = sum_l R V``.
* L-step for query (a, i, j): one softmax over every key row (g, k), logit
  ``q[a,i,j] . AK[a,g,k,j] - CL[a,g,k,j]``, and the exact text keys (logit ``s q . k_t``, value
  ``v_t``) in the same softmax (joint attention); output ``sum L Y + sum_t L_t v_t``.
* ``steps > 1``: between passes the R-step query becomes the L-weighted mean of the query tile's
  queries in column j, ``qbar[a,g,k,j] = sum_i L[(a,i,j) -> (g,k)] q[a,i,j] / c``, with
  ``c = sum_i L`` guarded by ``max(c, CBAR_EPS)`` (MonarchAttention's alternating updates; the
  same guard as Monarch's ``PLAIN_CBAR_EPS``). Reference only: the kernels run ``steps = 1``.

Text query rows attend densely to all N keys. The factorisation is exactly dense attention when a
tile has one row (b1 = 1: the R-step query is the query itself, and the L-step logit of a row is
then its exact log-sum-exp) or a row has one column (b2 = 1: every block is one key).

Query tiles and key tiles are separate index ranges in :func:`rt_tile_attention` (``qt`` and
``kt`` may hold different tiles). KV cache (``cached_frames = F > 0``, MonarchRT's streaming form):
``grid`` is the key grid, q holds its last ``T - F`` frames and k/v all of them; the query tiles
are the new frames' tiles, the key tiles every tile, and the R-step query of key row (g, k) is the
query tile's own token at row k as above. No text tokens then. Block-causal attention is this form
per chunk: chunk c's queries against the keys of chunks <= c, with ``F = c * chunk``.

Cost per video query at one step: ``(key tiles * b2 + key rows) * D`` multiply-adds per matmul
(scores, R K, R V over the key tiles' b2 columns; L logits and L Y over the key rows):
:func:`monarch_rt_flops` counts every matmul, 2 FLOPs per multiply-add.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import RTLayout, check_q_rows, check_qkv, check_steps, make_rt_layout, resolve_scale

__all__ = ["monarch_rt_reference", "monarch_rt_flops", "rt_tile_attention", "monarch_rt_reference_details",
           "CBAR_EPS"]

CBAR_EPS = 1e-30          # steps > 1: qbar = abar / max(c, CBAR_EPS)
_CHUNK_ELEMS = 1 << 26    # bound on the largest temporary (elements) per chunk of heads x query tiles


def monarch_rt_flops(batch: int, heads: int, seq: int, head_dim: int, *, grid, tiling, text_before: int = 0,
                     text_after: int = 0, steps: int = 1, cached_frames: int = 0) -> int:
    """Matmul FLOPs of MonarchRT attention (2 per multiply-add), as the reference computes them.

    ``seq`` is the key sequence length (q's too without a KV cache); with ``cached_frames`` only
    the new frames' tiles are query tiles. With Aq query tiles, Ag key tiles, b1 rows, b2
    columns, D = head_dim, per head:
    R-step ``Aq*Ag*b1*b2*b2*D`` multiply-adds each for the scores and ``R K`` (+ ``R V`` in the
    final pass); L-step ``Aq*b2*b1*(Ag*b1)*D`` each for the logits and ``L Y`` (or, between
    steps, the L-weighted query sum). Text: video queries x text keys (logits each pass, + ``L V``
    at the end), text queries x all keys densely.
    """
    lay = make_rt_layout(seq, grid, tiling, text_before, text_after, cached_frames)
    st = check_steps(steps)
    Aq, Ag, b1, b2, D, nt = lay.n_query_tiles, lay.n_tiles, lay.b1, lay.b2, int(head_dim), lay.n_text
    r_mm = Aq * Ag * b1 * b2 * b2 * D        # one R-step matmul (query tiles x key tiles)
    l_mm = Aq * b2 * b1 * (Ag * b1) * D      # one L-step matmul
    t_mm = lay.Nv * nt * D                   # video queries x text keys (no text with a cache)
    per_head = (st - 1) * (2 * r_mm + 2 * l_mm + t_mm) + (3 * r_mm + 2 * l_mm + 2 * t_mm)
    per_head = 2 * per_head + 4 * nt * lay.N * D
    return int(batch) * int(heads) * per_head


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def rt_tile_attention(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, kx: Optional[torch.Tensor],
                      vx: Optional[torch.Tensor], scale: float, steps: int = 1,
                      want: Optional[dict] = None) -> torch.Tensor:
    """MonarchRT output of the video query rows, tile by tile.

    ``qt``: ``[c, Aq, b1, b2, D]`` the query tiles; ``kt``, ``vt``: ``[c, Ag, b1, b2, D]`` the key
    tiles (the row k of query tile a is matched with the row k of every key tile); ``kx``, ``vx``:
    ``[c, nt, D]`` the text keys/values or None. Returns ``[c, Aq, b1, b2, D]``. ``want``: filled
    with the final pass's factors (``ak`` [c, Aq, Ag, b1, b2, D] = s R K, ``cl`` [c, Aq, Ag, b1, b2],
    ``y``, ``lse_l`` [c, Aq, b2(j), b1(i)]).
    """
    c, Aq, b1, b2, D = qt.shape
    Ag = kt.shape[1]
    gk = Ag * b1
    qbar = None                           # step 1: the query tile's own token, shared by every key tile
    for step in range(steps):
        final = step == steps - 1
        if qbar is None:
            s_r = scale * torch.einsum("cakjd,cgkld->cagkjl", qt, kt)            # [c, a, g, k, j, l]
        else:
            s_r = scale * torch.einsum("cagkjd,cgkld->cagkjl", qbar, kt)
        lse_r = torch.logsumexp(s_r, dim=-1)
        r = torch.exp(s_r - lse_r[..., None])
        ak = scale * torch.einsum("cagkjl,cgkld->cagkjd", r, kt)                 # [c, a, g, k, j, D]
        cl = (r * s_r).sum(-1) - lse_r                                           # sum_l R log R
        # L-step logits z[c, a, j, i, (g, k)]
        z = torch.einsum("caijd,cagkjd->cajigk", qt, ak).reshape(c, Aq, b2, b1, gk)
        z = z - cl.permute(0, 1, 4, 2, 3).reshape(c, Aq, b2, 1, gk)
        zt = scale * torch.einsum("caijd,ctd->cajit", qt, kx) if kx is not None else None
        lse_l = torch.logsumexp(torch.cat([z, zt], -1) if zt is not None else z, dim=-1)   # [c, a, j, i]
        w = torch.exp(z - lse_l[..., None])                                      # L over the key rows
        if final:
            y = torch.einsum("cagkjl,cgkld->cagkjd", r, vt)
            yj = y.permute(0, 1, 4, 2, 3, 5).reshape(c, Aq, b2, gk, D)           # [c, a, j, (g, k), D]
            out = torch.einsum("cajin,cajnd->caijd", w, yj)
            if zt is not None:
                out = out + torch.einsum("cajit,ctd->caijd", torch.exp(zt - lse_l[..., None]), vx)
            if want is not None:
                want.update(ak=ak, cl=cl, y=y, lse_l=lse_l, lse_r=lse_r)
            return out
        cbar = w.sum(3)                                                          # [c, a, j, (g, k)]
        abar = torch.einsum("cajin,caijd->cajnd", w, qt)
        qbar = abar / cbar.clamp_min(CBAR_EPS)[..., None]
        qbar = qbar.reshape(c, Aq, b2, Ag, b1, D).permute(0, 1, 3, 4, 2, 5)      # [c, a, g, k, j, D]
    raise AssertionError("unreachable")


def _text_rows(q, k, v, text_idx, scale):
    """Dense softmax attention of the text query rows over all keys. q, k, v: [c, N, D]."""
    p = torch.softmax(scale * q[:, text_idx] @ k.transpose(-1, -2), dim=-1)
    return p @ v


def _run(q, k, v, lay: RTLayout, steps: int, scale: float, want: Optional[dict] = None) -> torch.Tensor:
    b, h, Nq, D = q.shape
    N = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    bh = b * h
    qf = q.reshape(bh, Nq, D).to(cdt)
    kf, vf = (x.reshape(bh, N, D).to(cdt) for x in (k, v))
    idx = lay.token_index(q.device)                                              # [A, b1, b2] rows of k
    q_idx = lay.query_token_index(q.device)                                      # [Aq, b1, b2] rows of q
    t_idx = lay.text_index(q.device)
    A, Aq, b1, b2, nt = lay.n_tiles, lay.n_query_tiles, lay.b1, lay.b2, lay.n_text
    out = torch.empty(bh, Nq, D, dtype=cdt, device=q.device)
    kt_all, vt_all = kf[:, idx], vf[:, idx]                                      # [bh, A, b1, b2, D] key tiles
    # per head and query tile: R-step scores/probabilities, AK, Y, L logits and weights
    per_tile = A * b1 * b2 * (2 * b2 + 3 * D) + 2 * b2 * b1 * (A * b1 + nt)
    heads = bh if want is not None else max(1, min(bh, _CHUNK_ELEMS // per_tile))
    for c0 in range(0, bh, heads):
        hs = slice(c0, min(bh, c0 + heads))
        kx = kf[hs][:, t_idx] if nt else None
        vx = vf[hs][:, t_idx] if nt else None
        n_heads = hs.stop - hs.start
        tiles = Aq if want is not None else max(1, min(Aq, _CHUNK_ELEMS // (per_tile * n_heads)))
        for a0 in range(0, Aq, tiles):
            qs = slice(a0, min(Aq, a0 + tiles))                                  # query tiles of this chunk
            qt = qf[hs][:, q_idx[qs]]
            o = rt_tile_attention(qt, kt_all[hs], vt_all[hs], kx, vx, scale, steps, want)
            out[hs, q_idx[qs].reshape(-1)] = o.reshape(n_heads, -1, D)
        if nt:
            out[hs, t_idx] = _text_rows(qf[hs], kf[hs], vf[hs], t_idx, scale)
    return out.reshape(b, h, Nq, D)


def _layout(q, k, v, grid, tiling, text_before, text_after, cached_frames) -> RTLayout:
    check_qkv(q, k, v, cached_frames)
    lay = make_rt_layout(k.shape[2], grid, tiling, text_before, text_after, cached_frames)
    check_q_rows(q, lay)
    return lay


def monarch_rt_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, tiling,
                         text_before: int = 0, text_after: int = 0, steps: int = 1,
                         scale: Optional[float] = None, cached_frames: int = 0) -> torch.Tensor:
    """MonarchRT attention, pure PyTorch. q, k, v: ``[batch, heads, N, head_dim]``, any float dtype.

    ``N = text_before + T*H*W + text_after`` with ``grid = (T, H, W)``; ``tiling = (f_tied,
    h_reduce, w_reduce)`` must divide the grid (ValueError otherwise). KV cache:
    ``cached_frames = F > 0``: ``grid`` is the key grid (k, v: ``T*H*W`` rows), q holds its last
    ``T - F`` frames (``(T - F)*H*W`` rows); f_tied must divide F; no text tokens. Computes in
    float32 (float64 for float64 inputs) and returns ``q.dtype``. See the module docstring.
    """
    lay = _layout(q, k, v, grid, tiling, text_before, text_after, cached_frames)
    st = check_steps(steps)
    sc = resolve_scale(scale, q.shape[-1])
    return _run(q, k, v, lay, st, sc).to(q.dtype)


def monarch_rt_reference_details(q, k, v, *, grid, tiling, text_before=0, text_after=0, steps=1, scale=None,
                                 cached_frames=0):
    """Output plus the final pass's factors, for tests and diagnostics (small inputs only): the
    dict of :func:`rt_tile_attention`'s ``want`` plus ``out``, ``layout``, ``idx`` (key tiles'
    rows of k), ``q_idx`` (query tiles' rows of q), ``scale``."""
    lay = _layout(q, k, v, grid, tiling, text_before, text_after, cached_frames)
    sc = resolve_scale(scale, q.shape[-1])
    want: dict = {}
    out = _run(q, k, v, lay, check_steps(steps), sc, want)
    want.update(out=out.to(q.dtype), layout=lay, idx=lay.token_index(q.device),
                q_idx=lay.query_token_index(q.device), scale=sc)
    return want
