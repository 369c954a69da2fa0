"""Dense flash-attention backward in Triton (the gradients of ``kernel.py``'s forward).

``flash_attention_backward_triton(q, k, v, out, grad_out, *, scale=None, lse=None)`` returns
``(dq, dk, dv)`` of ``out = softmax(scale * q k^T) v`` for q [B, H, Nq, D], k/v [B, H, Nk, D]
(fp16/bf16 with fp32 accumulation, fp32 with IEEE fp32 dots).

With ``P = softmax(S)``, ``S = scale * q k^T`` and ``dO`` the output gradient:
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` with the row constant
``delta_i = sum_j P_ij dP_ij = dO_i . O_i``, ``dQ = scale * dS K`` and ``dK = scale * dS^T Q``.
P is never stored: both passes recompute it tile by tile from q, k and the row logsumexp
``lse`` (``P = 2^(S log2(e) - lse log2(e))``). Two kernels, no atomics:

* ``_bwd_dq`` (query-major, one program per query tile): if the caller has no ``lse`` (the op's
  forward returns only the output), a first loop over the key tiles recomputes it with the online
  max/sum of the forward, QK^T only (half a forward's FLOPs); then ``delta`` from dO and O; both
  are stored per row (float32, base 2) for the second kernel; a second loop accumulates dQ.
* ``_bwd_dkdv`` (key-major, one program per key tile): loops over all query tiles, reads their
  ``lse``/``delta`` and accumulates dK and dV in registers; each key row is written once.

Both kernels take a sub-range: ``_bwd_dq`` a range of query rows (all keys), ``_bwd_dkdv`` a
range of key rows (all queries). VMoBA's backward (``kernels/vmoba/backward.py``) uses them for
its dense text rows and text keys, with the row statistics of the whole sequence in one buffer.
Per row memory: ``lse`` and ``delta`` (8 bytes a row); nothing of size Nq x Nk.

The CUDA launch configuration is picked per (device, dtype, head_dim, size bucket) by timing a
few candidates (``tuning_cache("flash_bwd_dq")``/``("flash_bwd_dkdv")``), or one fixed config
per head_dim inside ``tuning.untuned()``; the interpreter uses small fixed tiles.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..out_layout import empty_attention_out
from ..tuning import interpreting, tuning_cache, tuning_enabled
from .kernel import _LOG2E, _NEG, _bucket, _head_pad
from .reference import check_attention_inputs

__all__ = ["flash_attention_backward_triton", "bwd_dq_rows", "bwd_dkdv_keys", "bwd_config"]


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _lse_tile(q, k, m_i, l_i, qk_scale, col_ok, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online max / sum of one key tile (base-2 logits), as the forward's softmax."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        s = tl.where(col_ok[None, :], s, _NEG)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
    return m_new, l_i


@triton.jit
def _dq_tile(q, do, k, v, dq, lse2, delta, qk_scale, col_ok, MASKED: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """dQ (unscaled: sum of dS K) of one key tile, P recomputed from the row lse (base 2)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(col_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)


@triton.jit
def _dkdv_tile(k, v, q, do, dk, dv, lse2, delta, qk_scale, row_ok, DOT_PREC: tl.constexpr):
    """dK (unscaled) and dV of a key tile from one query tile, computed transposed
    (keys x queries) so that no [M, N] tile is transposed; rows outside ``row_ok`` add nothing."""
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    pt = tl.math.exp2(st - lse2[None, :])
    pt = tl.where(row_ok[None, :], pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


# ----------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["H", "Nq", "Nk", "D", "row0", "nrows"])
def _bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA,
            sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sdb, sdh, sdm,
            sgb, sgh, sgm,
            H, Nq, Nk, D, row0, nrows, qk_scale, sm_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAVE_LSE: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    loc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = loc < nrows
    rows = (row0 + loc).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    rmask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=rmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdm + offs_d[None, :], mask=rmask,
                 other=0.0)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :], mask=rmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    st = bh.to(tl.int64) * Nq + rows
    kb = K + b * skb + h * skh
    vb = V + b * svb + h * svh
    n_full = (Nk // BLOCK_N) * BLOCK_N
    all_ok = offs_n < BLOCK_N
    if HAVE_LSE:
        lse2 = tl.load(LSE + st, mask=row_ok, other=0.0)
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, n_full, BLOCK_N):
            cols = (start_n + offs_n).to(tl.int64)
            if EVEN_D:
                k = tl.load(kb + cols[:, None] * skn + offs_d[None, :])
            else:
                k = tl.load(kb + cols[:, None] * skn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            m_i, l_i = _lse_tile(q, k, m_i, l_i, qk_scale, all_ok, False, DOT_PREC)
        if n_full < Nk:
            col_ok = n_full + offs_n < Nk
            cols = (n_full + offs_n).to(tl.int64)
            k = tl.load(kb + cols[:, None] * skn + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            m_i, l_i = _lse_tile(q, k, m_i, l_i, qk_scale, col_ok, True, DOT_PREC)
        lse2 = m_i + tl.math.log2(l_i)
        tl.store(LSE + st, lse2, mask=row_ok)
    tl.store(DELTA + st, delta, mask=row_ok)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        cols = (start_n + offs_n).to(tl.int64)
        if EVEN_D:
            k = tl.load(kb + cols[:, None] * skn + offs_d[None, :])
            v = tl.load(vb + cols[:, None] * svn + offs_d[None, :])
        else:
            k = tl.load(kb + cols[:, None] * skn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(vb + cols[:, None] * svn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        dq = _dq_tile(q, do, k, v, dq, lse2, delta, qk_scale, all_ok, False, DOT_PREC)
    if n_full < Nk:
        col_ok = n_full + offs_n < Nk
        cols = (n_full + offs_n).to(tl.int64)
        kvm = col_ok[:, None] & d_ok[None, :]
        k = tl.load(kb + cols[:, None] * skn + offs_d[None, :], mask=kvm, other=0.0)
        v = tl.load(vb + cols[:, None] * svn + offs_d[None, :], mask=kvm, other=0.0)
        dq = _dq_tile(q, do, k, v, dq, lse2, delta, qk_scale, col_ok, True, DOT_PREC)
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask)


@triton.jit(do_not_specialize=["H", "Nq", "Nk", "D", "key0", "nkeys"])
def _bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
              skgb, skgh, skgn, svgb, svgh, svgn,
              H, Nq, Nk, D, key0, nkeys, qk_scale, sm_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    loc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = loc < nkeys
    cols = (key0 + loc).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    cmask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=cmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=cmask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qb = Q + b * sqb + h * sqh
    dob = DO + b * sdb + h * sdh
    st = LSE + bh.to(tl.int64) * Nq
    dt = DELTA + bh.to(tl.int64) * Nq
    for start_m in range(0, Nq, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Nq
        r64 = rows.to(tl.int64)
        rmask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(qb + r64[:, None] * sqm + offs_d[None, :], mask=rmask, other=0.0)
        do = tl.load(dob + r64[:, None] * sdm + offs_d[None, :], mask=rmask, other=0.0)
        lse2 = tl.load(st + r64, mask=row_ok, other=0.0)
        delta = tl.load(dt + r64, mask=row_ok, other=0.0)
        dk, dv = _dkdv_tile(k, v, q, do, dk, dv, lse2, delta, qk_scale, row_ok, DOT_PREC)
    tl.store(DK + b * skgb + h * skgh + cols[:, None] * skgn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=cmask)
    tl.store(DV + b * svgb + h * svgh + cols[:, None] * svgn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- launch
# (BLOCK_M, BLOCK_N, num_warps, num_stages). dQ: many query rows, few key columns per tile (the
# dQ accumulator is [BLOCK_M, D]); dK/dV: the two [BLOCK_N, D] fp32 accumulators live in registers
# for the whole query loop, so wide heads take fewer key rows per program.
_DQ_CANDIDATES = {
    64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 2)],
    128: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    256: [(64, 32, 8, 2), (64, 32, 4, 1), (32, 32, 4, 2)],
}
_DKDV_CANDIDATES = {
    64: [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2)],
    128: [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3)],
    256: [(32, 64, 8, 2), (32, 32, 4, 1), (16, 64, 4, 1)],
}
_FP32 = {"dq": [(64, 32, 4, 2), (32, 32, 4, 2)], "dkdv": [(32, 64, 4, 2), (32, 32, 4, 2)]}
_INTERP = {"dq": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1)}
_TUNED = {"dq": tuning_cache("flash_bwd_dq"), "dkdv": tuning_cache("flash_bwd_dkdv")}


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _candidates(kind: str, q: torch.Tensor) -> list:
    if q.dtype == torch.float32:
        return _FP32[kind]
    HD = _head_pad(q.shape[-1])
    table = _DQ_CANDIDATES if kind == "dq" else _DKDV_CANDIDATES
    return table[64 if HD <= 64 else 128 if HD <= 128 else 256]


def bwd_config(kind: str, q: torch.Tensor, key: tuple, launch) -> tuple:
    """Launch config of backward kernel ``kind`` ("dq" or "dkdv") for ``q``'s device, dtype and
    head_dim: forced, interpreter, cached, untuned default, or timed now with ``launch(cfg)``
    (the kernels only write their outputs, so timing runs may repeat them)."""
    cache = _TUNED[kind]
    if cache.forced is not None:  # tuning.force_config("flash_bwd_dq" / "flash_bwd_dkdv", ...)
        return cache.forced
    if interpreting() or not q.is_cuda:
        return _INTERP[kind]
    cands = _candidates(kind, q)
    full_key = (q.device.index, q.dtype, q.shape[-1]) + tuple(key)
    hit = cache.get(full_key)
    if hit is not None:
        return hit
    if not tuning_enabled():
        return cands[0]
    best, best_t = None, float("inf")
    for cfg in cands:
        try:
            t = triton.testing.do_bench(lambda: launch(cfg), warmup=3, rep=15, return_mode="median")
        except Exception:  # a config that does not compile / fit is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("flash backward: no launch configuration compiled on this device; set "
                           "VMONARCH_FORCE_REFERENCE=1 to use the reference backward")
    cache.put(full_key, best)
    return best


def _launch_dq(cfg, q, k, v, o, do, dq, lse2, delta, row0: int, nrows: int, scale: float,
               have_lse: bool) -> None:
    BM, BN, warps, stages = cfg
    B, H, Nq, D = q.shape
    HD = _head_pad(D)
    grid = (triton.cdiv(nrows, BM), B * H)
    _bwd_dq[grid](q, k, v, o, do, dq, lse2, delta,
                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                  do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
                  H, Nq, k.shape[2], D, row0, nrows, scale * _LOG2E, scale,
                  HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, HAVE_LSE=have_lse, EVEN_D=(HD == D),
                  DOT_PREC=_prec(q.dtype), num_warps=warps, num_stages=stages)


def _launch_dkdv(cfg, q, k, v, do, dk, dv, lse2, delta, key0: int, nkeys: int, scale: float) -> None:
    BM, BN, warps, stages = cfg
    B, H, Nq, D = q.shape
    HD = _head_pad(D)
    grid = (triton.cdiv(nkeys, BN), B * H)
    _bwd_dkdv[grid](q, k, v, do, dk, dv, lse2, delta,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                    dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                    H, Nq, k.shape[2], D, key0, nkeys, scale * _LOG2E, scale,
                    HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, DOT_PREC=_prec(q.dtype),
                    num_warps=warps, num_stages=stages)


def bwd_dq_rows(q, k, v, o, do, dq, lse2, delta, row0: int, nrows: int, scale: float,
                have_lse: bool = False) -> None:
    """dQ of query rows ``[row0, row0 + nrows)`` over all keys, written into ``dq``; their base-2
    row logsumexp (recomputed unless ``have_lse``) and ``delta`` go to ``lse2``/``delta``
    (float32 ``[B*H, Nq]``, indexed by row)."""
    if nrows <= 0:
        return
    key = ("dq", have_lse, _bucket(nrows), _bucket(k.shape[2]), q.shape[0] * q.shape[1] >= 8)
    cfg = bwd_config("dq", q, key, lambda c: _launch_dq(c, q, k, v, o, do, dq, lse2, delta, row0,
                                                        nrows, scale, have_lse))
    _launch_dq(cfg, q, k, v, o, do, dq, lse2, delta, row0, nrows, scale, have_lse)


def bwd_dkdv_keys(q, k, v, do, dk, dv, lse2, delta, key0: int, nkeys: int, scale: float) -> None:
    """dK and dV of key rows ``[key0, key0 + nkeys)`` from all query rows (whose ``lse2`` and
    ``delta`` must be filled), written into ``dk``/``dv``."""
    if nkeys <= 0:
        return
    key = ("dkdv", _bucket(q.shape[2]), _bucket(nkeys), q.shape[0] * q.shape[1] >= 8)
    cfg = bwd_config("dkdv", q, key, lambda c: _launch_dkdv(c, q, k, v, do, dk, dv, lse2, delta,
                                                            key0, nkeys, scale))
    _launch_dkdv(cfg, q, k, v, do, dk, dv, lse2, delta, key0, nkeys, scale)


def unit_last(*ts):
    """The tensors with a unit last stride (copied only where they have not)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def flash_attention_backward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    out: torch.Tensor, grad_out: torch.Tensor, *,
                                    scale: Optional[float] = None,
                                    lse: Optional[torch.Tensor] = None):
    """``(dq, dk, dv)`` of dense attention, given its output ``out`` and the output gradient.

    ``lse``: the forward's natural-log row logsumexp (float32 ``[B, H, Nq]``, e.g. from
    ``flash_attention_triton(..., return_stats=True)``); without it the dQ pass recomputes it.
    Gradients come back in the layout of their input (``empty_attention_out``) and dtype."""
    s = check_attention_inputs(q, k, v, scale, "flash_attention_backward_triton")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention_backward_triton: dtype {q.dtype} unsupported; use "
                         f"float16, bfloat16 or float32")
    if q.shape[-1] > 256:
        raise ValueError(f"flash_attention_backward_triton: head_dim {q.shape[-1]} > 256 is "
                         f"unsupported")
    for name, t in (("out", out), ("grad_out", grad_out)):
        if tuple(t.shape) != tuple(q.shape[:3]) + (v.shape[-1],):
            raise ValueError(f"flash_attention_backward_triton: {name} has shape {tuple(t.shape)}, "
                             f"expected {tuple(q.shape[:3]) + (v.shape[-1],)} (the forward's output)")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq, dk, dv = empty_attention_out(q), empty_attention_out(k), empty_attention_out(v)
    if Nq == 0:
        return dq, dk.zero_(), dv.zero_()
    q, k, v, out, grad_out = unit_last(q, k, v, out.to(q.dtype), grad_out.to(q.dtype))
    delta = torch.empty(B * H, Nq, dtype=torch.float32, device=q.device)
    if lse is not None:
        if tuple(lse.shape) != (B, H, Nq):
            raise ValueError(f"flash_attention_backward_triton: lse has shape {tuple(lse.shape)}, "
                             f"expected {(B, H, Nq)}")
        lse2 = (lse.to(torch.float32) * _LOG2E).reshape(B * H, Nq).contiguous()
    else:
        lse2 = torch.empty(B * H, Nq, dtype=torch.float32, device=q.device)
    bwd_dq_rows(q, k, v, out, grad_out, dq, lse2, delta, 0, Nq, s, have_lse=lse is not None)
    bwd_dkdv_keys(q, k, v, grad_out, dk, dv, lse2, delta, 0, Nk, s)
    return dq, dk, dv
