"""MonarchRT attention forward in Triton (``steps = 1``).

Computes ``reference.monarch_rt_reference`` at one step (read its docstring for the function and
``layout.py`` for tiles, rows and columns). The R-step result differs per query tile, so its
scratch is ``[query tiles, key rows, b2, D]`` per head: ``Nv x D`` per query tile. The query tiles
are processed in chunks that keep each scratch tensor no larger than q (at least one tile per
chunk), two launches per chunk:

* ``_rt_r_kernel`` (R pass): one program = query tile a, key row (g, k) and a tile of ``BLOCK_J``
  columns j. Its queries are the tile's own tokens ``q[a, k, j]`` (one row segment, contiguous
  in the sequence), its keys the ``b2`` columns of key row (g, k) (contiguous too): a flash pass
  with base-2 logits, running max ``m`` and sum ``l``, accumulating ``R K`` and ``R V`` with
  tensor-core dots. The entropy term needs no per-logit work: ``sum R log2 R = s' q . (R K) - m -
  log2 l`` (``s'`` the base-2 logit scale). Writes ``AK = R K``, ``CL`` (log2 units) and
  ``Y = R V`` column-major: ``[chunk tiles, b2(j), key rows (g, k), D]``, so that the L pass
  reads contiguous runs. The programs of key tile 0 also run their queries against the exact
  text keys (joint attention) and store each query's normalised text output ``TX`` and
  log2-sum-exp ``TL``.
* ``_rt_l_kernel`` (L pass): one program = query tile a, column j and up to ``BLOCK_I`` rows i:
  a small flash attention whose "keys" are the key rows (logit ``s' q . AK - CL``, value ``Y``)
  plus the text part as one more term of the same softmax; writes the output rows in the caller's
  token order.

KV cache (``cached_frames = F > 0``): ``grid`` is the key grid and q (and the output) hold its
last ``T - F`` frames. The query tiles are the key tiles from ``n_cached_tiles`` on; the kernels
take global tile numbers (``a0`` counts from the first key tile) and address q / out rows as the
key-sequence index minus ``QOFF = F*H*W``, while the key rows span the whole key grid. The chunks
run over the query tiles only (no work on the cached frames' tiles), and the R pass of a chunk is
(query tiles x every key tile) as without a cache.

Text query rows are exact dense attention over all keys (torch SDPA on CUDA in fp16/bf16, our
flash kernel elsewhere, as for VMoBA). Inputs in the caller's ``[batch, heads, N, head_dim]``
layout (unit last stride); fp16/bf16 use tensor-core dots with fp32 accumulation, fp32 IEEE dots.
Under ``TRITON_INTERPRET=1`` small fixed tiles are used.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.kernel import _flash_into, sdpa_text_rows, text_rows_sdpa_into
from ..out_layout import empty_attention_out
from ..tuning import interpreting, tuning_cache, tuning_enabled
from .layout import check_q_rows, check_qkv, check_steps, make_rt_layout, resolve_scale

__all__ = ["monarch_rt_triton", "monarch_rt_r_pass_triton"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps 0 * (-inf) NaNs out of the sums
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- index helpers
@triton.jit
def _row_start(a, r, Hg, Wg, f, hc, wc, nH, nW, tb):
    """Sequence index of column 0 of row r of tile a (broadcasting); the row's columns follow it."""
    at = a // (nH * nW)
    ah = (a // nW) % nH
    aw = a % nW
    t = at * f + r // hc
    h = ah * hc + r % hc
    return tb + (t * Hg + h) * Wg + aw * wc


@triton.jit
def _text_tok(t, tb, Nv):
    """Sequence row of the t-th text token (text before the video, then after it)."""
    return tl.where(t < tb, t, t + Nv)


@triton.jit
def _online(z, val, acc, m_i, l_i, DOT_PREC: tl.constexpr):
    """One tile of an online softmax over base-2 logits ``z`` with values ``val``."""
    m_new = tl.maximum(m_i, tl.max(z, 1))
    p = tl.math.exp2(z - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(val.dtype), val, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


# ----------------------------------------------------------------------------- R pass
@triton.jit
def _rt_r_kernel(Q, K, V, AK, CL, Y, TX, TL, LSE,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                 H, a0, NA, AG, B1, B2, n_jt, Nv, tb, QOFF, NT, Hg, Wg, f, hc, wc, nH, nW, D, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
                 EVEN_L: tl.constexpr, TEXT: tl.constexpr, DOT_PREC: tl.constexpr, STORE_LSE: tl.constexpr):
    pid = tl.program_id(0)
    al = tl.program_id(1)            # query tile, counted inside the chunk
    pbh = tl.program_id(2)
    jt = pid % n_jt
    rest = pid // n_jt
    kr = rest % B1                   # the key row's row inside its tile (= the query row used)
    g = rest // B1                   # key tile
    a = a0 + al                      # query tile (its number among the key tiles)
    b = pbh // H
    h = pbh % H
    offs_j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < B2
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    qrow = _row_start(a, kr, Hg, Wg, f, hc, wc, nH, nW, tb) - QOFF + offs_j     # a row of q
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow[:, None] * sqn + offs_d[None, :],
                mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    kbase = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vbase = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    krow0 = _row_start(g, kr, Hg, Wg, f, hc, wc, nH, nW, tb)
    kb = kbase + krow0.to(tl.int64) * skn
    vb = vbase + krow0.to(tl.int64) * svn
    m_i = tl.zeros([BLOCK_J], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_J], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    for l0 in range(0, B2, BLOCK_L):
        cols = l0 + offs_l
        c_ok = cols < B2
        k = tl.load(kb + cols[:, None] * skn + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(vb + cols[:, None] * svn + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale     # base-2 logits
        if not EVEN_L:
            y = tl.where(c_ok[None, :], y, _NEG)
        m_new = tl.maximum(m_i, tl.max(y, 1))
        p = tl.math.exp2(y - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        pc = p.to(k.dtype)
        acc_k = tl.dot(pc, k, acc_k * alpha[:, None], input_precision=DOT_PREC)
        acc_v = tl.dot(pc, v, acc_v * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    inv_l = 1.0 / l_i
    ak = acc_k * inv_l[:, None]
    # scratch [bh, NA, B2(j), AG*B1 (g, k), D]: per-head base in int64, in-head offsets int32
    GK = AG * B1
    srow = (al * B2 + offs_j) * GK + g * B1 + kr
    s_off = pbh.to(tl.int64) * NA * B2 * GK
    st = j_ok[:, None] & d_ok[None, :]
    tl.store(AK + (s_off + srow[:, None]) * D + offs_d[None, :], ak.to(AK.dtype.element_ty), mask=st)
    tl.store(Y + (s_off + srow[:, None]) * D + offs_d[None, :], (acc_v * inv_l[:, None]).to(Y.dtype.element_ty),
             mask=st)
    # sum_l R log2 R = sum_l R y_l - m - log2 l, and sum_l R y_l = s' q . (R K)
    tl.store(CL + s_off + srow, qk_scale * tl.sum(q.to(tl.float32) * ak, 1) - m_i - tl.math.log2(l_i), mask=j_ok)
    if STORE_LSE:  # the backward recomputes R from its log2-sum-exp
        tl.store(LSE + s_off + srow, m_i + tl.math.log2(l_i), mask=j_ok)
    if TEXT:
        if g == 0:  # each query (a, kr, j) once: its exact text keys, folded into the L softmax
            m_t = tl.zeros([BLOCK_J], dtype=tl.float32) + _NEG
            l_t = tl.zeros([BLOCK_J], dtype=tl.float32)
            acc_t = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
            for t0 in range(0, NT, BLOCK_L):
                offs_t = t0 + offs_l
                t_ok = offs_t < NT
                trow = _text_tok(offs_t, tb, Nv)
                kt = tl.load(kbase + trow[:, None] * skn + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                             other=0.0)
                vt = tl.load(vbase + trow[:, None] * svn + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                             other=0.0)
                z = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
                z = tl.where(t_ok[None, :], z, _NEG)
                acc_t, m_t, l_t = _online(z, vt, acc_t, m_t, l_t, DOT_PREC)
            trow_s = pbh.to(tl.int64) * NA * B2 * B1 + (al * B2 + offs_j) * B1 + kr   # [bh, NA, B2, B1]
            tl.store(TX + trow_s[:, None] * D + offs_d[None, :], (acc_t / l_t[:, None]).to(TX.dtype.element_ty),
                     mask=st)
            tl.store(TL + trow_s, m_t + tl.math.log2(l_t), mask=j_ok)


# ----------------------------------------------------------------------------- L pass
@triton.jit
def _rt_l_kernel(Q, O, AK, CL, Y, TX, TL,
                 sqb, sqh, sqn, sob, soh, son,
                 H, a0, NA, AG, B1, B2, n_it, Hg, Wg, f, hc, wc, nH, nW, tb, QOFF, NT, D, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    al = tl.program_id(1)
    pbh = tl.program_id(2)
    it = pid % n_it
    j = pid // n_it                  # column
    a = a0 + al
    b = pbh // H
    h = pbh % H
    offs_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < B1
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    qrow = _row_start(a, offs_i, Hg, Wg, f, hc, wc, nH, nW, tb) - QOFF + j
    ld = i_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow[:, None] * sqn + offs_d[None, :],
                mask=ld, other=0.0).to(AK.dtype.element_ty)
    GK = AG * B1
    base = pbh.to(tl.int64) * NA * B2 + al * B2 + j          # (head, tile, column)
    AK = AK + base * GK * D
    Y = Y + base * GK * D
    CL = CL + base * GK
    m_i = tl.zeros([BLOCK_I], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_I], dtype=tl.float32)
    acc = tl.zeros([BLOCK_I, HEAD_DIM], dtype=tl.float32)
    for g0 in range(0, GK, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_ok = offs_g < GK
        ak = tl.load(AK + offs_g[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(Y + offs_g[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        cl = tl.load(CL + offs_g, mask=g_ok, other=0.0)
        z = tl.dot(q, tl.trans(ak), input_precision=DOT_PREC) * qk_scale - cl[None, :]
        z = tl.where(g_ok[None, :], z, _NEG)
        acc, m_i, l_i = _online(z, y, acc, m_i, l_i, DOT_PREC)
    if NT > 0:  # the text keys: one more term of the same softmax, from the R pass's per-row stats
        trow = base * B1 + offs_i
        tx = tl.load(TX + trow[:, None] * D + offs_d[None, :], mask=ld, other=0.0)
        tls = tl.load(TL + trow, mask=i_ok, other=0.0)
        m_new = tl.maximum(m_i, tls)
        alpha = tl.math.exp2(m_i - m_new)
        pt = tl.math.exp2(tls - m_new)
        l_i = l_i * alpha + pt
        acc = acc * alpha[:, None] + pt[:, None] * tx.to(tl.float32)
    out = acc / l_i[:, None]
    tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + qrow[:, None] * son + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=ld)


# ----------------------------------------------------------------------------- launch
_CONFIG = tuning_cache("monarch_rt")

# R pass (BLOCK_J, BLOCK_L, num_warps, num_stages)
_R_CANDIDATES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2),
                 (32, 32, 4, 2), (16, 64, 4, 2)]
_DEFAULT_R = (64, 64, 4, 2)
_DEFAULT_R_WIDE = (32, 32, 4, 2)   # head_dim > 128
# each scratch tensor (AK, Y) holds at most this many times q's elements (at least one query tile)
_SCRATCH_RATIO = 1.0


def _head_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _prec(q) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def tiles_per_chunk(lay, n_tiles_q: int, ratio: float = _SCRATCH_RATIO) -> int:
    """Query tiles per chunk: the R-step scratch of a query tile is ``Nv x D`` per head (every key
    tile), so a chunk of ``n`` tiles holds ``n * Nv / Nq`` times q's elements; at least one tile."""
    return max(1, min(n_tiles_q, int(ratio * lay.Nq) // lay.Nv))


class _Scratch:
    """The R pass's outputs for one chunk of query tiles (reused across chunks)."""

    def __init__(self, q, lay, na: int, lse: bool):
        bh, D = q.shape[0] * q.shape[1], q.shape[-1]
        gk = lay.n_tiles * lay.b1
        dev = q.device
        self.na = na
        self.ak = torch.empty(bh, na, lay.b2, gk, D, dtype=q.dtype, device=dev)
        self.y = torch.empty_like(self.ak)
        self.cl = torch.empty(bh, na, lay.b2, gk, dtype=torch.float32, device=dev)
        self.lse = torch.empty_like(self.cl) if lse else None
        nt = lay.n_text
        self.tx = torch.empty(bh, na, lay.b2, lay.b1, D, dtype=q.dtype, device=dev) if nt else None
        self.tl = torch.empty(bh, na, lay.b2, lay.b1, dtype=torch.float32, device=dev) if nt else None


def launch_r(cfg, q, k, v, lay, sc: _Scratch, a0: int, na: int, scale: float) -> None:
    """The R pass of query tiles ``[a0, a0 + na)`` (numbered among the key tiles: ``a0 >=
    lay.n_cached_tiles``) against every key tile, into ``sc``."""
    BJ, BL, warps, stages = cfg
    b, h, N, D = q.shape
    HD = _head_pad(D)
    n_jt = triton.cdiv(lay.b2, BJ)
    ag = lay.n_tiles
    grid = (n_jt * lay.b1 * ag, na, b * h)
    text = sc.tx is not None
    _rt_r_kernel[grid](q, k, v, sc.ak, sc.cl, sc.y, sc.tx if text else sc.ak, sc.tl if text else sc.cl,
                       sc.lse if sc.lse is not None else sc.cl,
                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                       v.stride(0), v.stride(1), v.stride(2),
                       h, a0, sc.na, ag, lay.b1, lay.b2, n_jt, lay.Nv, lay.text_before, lay.q_offset, lay.n_text,
                       *_geom(lay), D, scale * _LOG2E,
                       HEAD_DIM=HD, BLOCK_J=BJ, BLOCK_L=BL, EVEN_L=(lay.b2 % BL == 0), TEXT=text,
                       DOT_PREC=_prec(q), STORE_LSE=sc.lse is not None, num_warps=warps, num_stages=stages)


def _geom(lay):
    H, W, f, hc, wc, hr, wr = lay.geometry()
    return (H, W, f, hc, wc, hr, wr)


def pick_r_config(q, k, v, lay, sc: _Scratch, scale: float):
    """(BLOCK_J, BLOCK_L, num_warps, num_stages) of the R pass: forced, fixed (interpreter, fp32,
    ``tuning.untuned()``), or the fastest candidate on this shape (cached per shape key)."""
    if _CONFIG.forced is not None:  # tuning.force_config("monarch_rt", (BLOCK_J, BLOCK_L, warps, stages))
        return _CONFIG.forced
    if interpreting() or not q.is_cuda:
        return (16, 16, 4, 1)
    D = q.shape[-1]
    if q.dtype == torch.float32:
        return (32, 32, 4, 2)
    key = (q.device.index, q.dtype, D, triton.next_power_of_2(lay.b2), sc.tx is not None, sc.lse is not None,
           q.shape[0] * q.shape[1] * lay.n_tiles * lay.b1 >= 4096)
    hit = _CONFIG.get(key)
    if hit is not None:
        return hit
    if not tuning_enabled():
        return _DEFAULT_R if D <= 128 else _DEFAULT_R_WIDE
    cands = _R_CANDIDATES if D <= 128 else [(32, 32, 4, 2), (16, 32, 4, 2)]
    n_bench = min(sc.na, lay.n_query_tiles)
    best, best_t = None, float("inf")
    for cfg in cands:
        try:
            t = triton.testing.do_bench(lambda: launch_r(cfg, q, k, v, lay, sc, lay.n_cached_tiles, n_bench, scale),
                                        warmup=3, rep=15, return_mode="median")
        except Exception as e:  # a config that does not compile / fit shared memory is skipped
            if os.environ.get("VMONARCH_TUNE_VERBOSE") == "1":
                print(f"monarch_rt R pass {key} {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("monarch_rt_triton: no R-pass launch configuration compiled on this device; "
                           "set VMONARCH_FORCE_REFERENCE=1 to use the reference")
    _CONFIG.put(key, best)
    return best


def l_config(q, lay):
    """(BLOCK_I, BLOCK_G, num_warps) of the L pass and the L-step backward."""
    if interpreting() or not q.is_cuda:
        return 16, 16, 4
    bi = min(64, max(16, triton.next_power_of_2(lay.b1)))
    bg = 64 if q.shape[-1] <= 128 else 32
    return bi, bg, 4


def prepare(q, k, v, grid, tiling, text_before, text_after, steps, scale, who: str, cached_frames: int = 0):
    """Checked inputs (unit last stride), layout, steps and scale of a kernel call."""
    check_qkv(q, k, v, cached_frames)
    lay = make_rt_layout(k.shape[2], grid, tiling, text_before, text_after, cached_frames)
    check_q_rows(q, lay)
    steps = check_steps(steps)
    s = resolve_scale(scale, q.shape[-1])
    if steps != 1:
        raise ValueError(f"{who}: steps={steps} is not covered by the Triton kernels (steps=1 only); "
                         f"use monarch_rt_reference (the op does so by itself)")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{who}: q/k/v must share one dtype of float16, bfloat16, float32; got "
                         f"{q.dtype}/{k.dtype}/{v.dtype} (cast them, or use the reference)")
    if q.shape[-1] > 256:
        raise ValueError(f"{who}: head_dim {q.shape[-1]} > 256 is unsupported; use the reference "
                         f"(VMONARCH_FORCE_REFERENCE=1)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if max(q.stride(2), k.stride(2), v.stride(2)) * k.shape[2] >= 2 ** 31:
        raise ValueError(f"{who}: sequence {k.shape[2]} x row stride {max(q.stride(2), k.stride(2), v.stride(2))} "
                         f"does not fit int32 offsets; make q/k/v contiguous in [batch, heads, seq, head_dim]")
    return q, k, v, lay, s


def check_scratch(lay, na: int, D: int, who: str) -> None:
    if na * lay.Nv * D >= 2 ** 31:
        raise ValueError(f"{who}: {na} query tiles x {lay.Nv} video tokens x head_dim {D} does not fit int32 "
                         f"offsets in one head's scratch; pass chunk_tiles=1")


def monarch_rt_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, tiling, text_before: int = 0,
                      text_after: int = 0, steps: int = 1, scale: Optional[float] = None,
                      chunk_tiles: Optional[int] = None, cached_frames: int = 0) -> torch.Tensor:
    """MonarchRT attention with the Triton kernels (``steps = 1``); same contract as
    ``monarch_rt_reference`` (``cached_frames``: KV cache, q = the key grid's last frames).
    ``chunk_tiles`` overrides the number of query tiles per chunk (tests)."""
    who = "monarch_rt_triton"
    q, k, v, lay, s = prepare(q, k, v, grid, tiling, text_before, text_after, steps, scale, who, cached_frames)
    b, h, N, D = q.shape
    A, A0 = lay.n_tiles, lay.n_cached_tiles
    na = chunk_tiles or tiles_per_chunk(lay, A - A0)
    check_scratch(lay, na, D, who)
    out = empty_attention_out(q)  # q's layout, like torch's SDPA (out_layout.py)
    sc = _Scratch(q, lay, na, lse=False)
    cfg = pick_r_config(q, k, v, lay, sc, s)
    BI, BG, lw = l_config(q, lay)
    n_it = triton.cdiv(lay.b1, BI)
    HD = _head_pad(D)
    text = lay.n_text > 0
    for a0 in range(A0, A, na):     # query tiles only (numbered among the key tiles)
        n = min(na, A - a0)
        launch_r(cfg, q, k, v, lay, sc, a0, n, s)
        _rt_l_kernel[(lay.b2 * n_it, n, b * h)](
            q, out, sc.ak, sc.cl, sc.y, sc.tx if text else sc.ak, sc.tl if text else sc.cl,
            q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            h, a0, na, A, lay.b1, lay.b2, n_it, *_geom(lay), lay.text_before, lay.q_offset, lay.n_text, D,
            s * _LOG2E,
            HEAD_DIM=HD, BLOCK_I=BI, BLOCK_G=BG, DOT_PREC=_prec(q), num_warps=lw, num_stages=1)
    if text:
        text_query_rows(q, k, v, out, lay, s)
    return out


def text_query_rows(q, k, v, out, lay, scale: float) -> None:
    """Exact dense attention of the text query rows over all keys, written into ``out``."""
    tb, nv = lay.text_before, lay.Nv
    if sdpa_text_rows(q):
        text_rows_sdpa_into(q, k, v, out, tb, nv, scale)
        return
    if tb:
        _flash_into(q[:, :, :tb], k, v, out[:, :, :tb], scale)
    if lay.text_after:
        _flash_into(q[:, :, tb + nv:], k, v, out[:, :, tb + nv:], scale)


def monarch_rt_r_pass_triton(q, k, v, *, grid, tiling, text_before=0, text_after=0, scale=None, cached_frames=0):
    """The R pass alone over every query tile (tests / diagnostics): ``(ak, cl, y)`` in the
    reference's shapes ``[b*h, Aq, Ag, b1, b2, D]`` / ``[b*h, Aq, Ag, b1, b2]``, with ``ak = s R K``
    and ``cl = sum R log R`` (natural log), as ``monarch_rt_reference_details`` returns them."""
    q, k, v, lay, s = prepare(q, k, v, grid, tiling, text_before, text_after, 1, scale, "monarch_rt_r_pass_triton",
                              cached_frames)
    A, Aq, b1, b2 = lay.n_tiles, lay.n_query_tiles, lay.b1, lay.b2
    sc = _Scratch(q, lay, Aq, lse=False)
    launch_r(pick_r_config(q, k, v, lay, sc, s), q, k, v, lay, sc, lay.n_cached_tiles, Aq, s)
    bh = q.shape[0] * q.shape[1]

    def tiles(x):  # [bh, Aq, b2(j), (g, k), ...] -> [bh, Aq, g, k, j, ...]
        x = x.reshape(bh, Aq, b2, A, b1, *x.shape[4:])
        return x.permute(0, 1, 3, 4, 2, *range(5, x.dim()))

    return s * tiles(sc.ak).float(), tiles(sc.cl) * _LN2, tiles(sc.y)
