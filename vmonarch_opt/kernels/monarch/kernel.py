"""Monarch attention (MonarchAttention / VMonarch) forward in Triton.

Computes the same function as ``reference.monarch_attention_reference`` (read its
docstring for the algorithm, the text-token handling and ``recompute``) with three kernels:

* ``_r_step_kernel``: the R-step of every block as a flash-attention pass over the block's keys.
  One program = ``BLOCK_M`` positions j of one block m. It keeps the running max ``m`` and
  running sum ``l = sum 2^(y-m)`` (base-2 logits y) and accumulates ``R K`` and, in the final
  pass, ``R V`` with tensor-core dots: no B x B matrix is ever stored. The entropy term needs no
  work per logit: ``sum R log2 R = sum R y - m - log2 l`` and ``sum R y = s' q . (R K)`` (``s'``
  the base-2 logit scale), one row dot at the end. Writes ``AK = R K``, ``CL = sum R log2 R``
  and ``Y = R V`` in a position-major scratch layout ``[bh, B, M, D]`` so that
  the L-step reads contiguous runs.
  With text tokens, the first R-step also runs its query rows (= the video query rows) against
  the exact text keys and stores their normalised output ``TX`` and log2-sum-exp ``TL`` per row.
* ``_l_final_kernel``: the final L-step fused with the output. One program = one in-block
  position j and up to ``BLOCK_I`` query blocks i: a tiny flash attention whose "keys" are the
  M blocks (logit ``q . AK * s - CL``, value ``Y``) plus the text part (``TL``, ``TX``) as one
  more term of the same normalised softmax; writes the output rows in the caller's token order.
* ``_l_step_kernel`` (steps > 1 only): the intermediate L-step. One program = one position j
  and up to ``BLOCK_MB`` key blocks m: computes each query row's normaliser (blocks + ``TL``),
  then ``Qbar[m, j] = sum_i L[j,i,m] q[i,j] / sum_i L[j,i,m]`` (plain, or the log-domain
  recomputation with reset of ``recompute=True``), written as the next R-step's query.

Text query rows (joint attention) are exact dense attention over all N keys: on CUDA in fp16/bf16
one torch SDPA call on the gathered rows (cuDNN / FlashAttention; ``flash/kernel.py: sdpa_text_rows`` says
why), elsewhere ``_text_rows_kernel``, a dense flash pass split over key ranges (split-K) so that
the few text rows still fill the GPU, the partial results merged with their log-sum-exps on the
host side. Everything takes q/k/v in the caller's ``[batch, heads, N, head_dim]`` layout (any
strides with a unit last stride); block positions are mapped to sequence rows in-kernel
(``_tok``), with a fast path when blocks are contiguous runs of tokens (frame blocks, frame
groups, 1D blocks). fp16/bf16 inputs use tensor-core dots with fp32 accumulation; fp32 inputs
use IEEE fp32 dots. Under ``TRITON_INTERPRET=1`` small fixed tiles are used.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.kernel import sdpa_text_rows, text_rows_sdpa_into
from ..out_layout import empty_attention_out
from .layout import check_qkv, check_steps, make_layout, resolve_scale
from .reference import PLAIN_CBAR_EPS, RESET_MASS
from ..tuning import interpreting, tuning_cache, tuning_enabled

__all__ = ["monarch_attention_triton", "monarch_r_step_triton"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps 0 * (-inf) NaNs out of the entropy sums
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- index helpers
@triton.jit
def _tok(m, j, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG: tl.constexpr):
    """Sequence row of block position (m, j) (broadcasting) and whether it exists."""
    jj = j + m * 0  # broadcast first: the interpreter rejects scalar-bool & vector-bool masks
    if CONTIG:
        g = m * B + jj
        ok = (jj < B) & (g < Nv)
        return tb + g, ok
    else:
        t = (m // (nH * nW)) * bt + j // (bh * bw)
        h = ((m // nW) % nH) * bh + (j // bw) % bh
        w = (m % nW) * bw + j % bw
        ok = (jj < B) & (t < Tg) & (h < Hg) & (w < Wg)
        return tb + (t * Hg + h) * Wg + w, ok


@triton.jit
def _text_tok(t, tb, Nv):
    """Sequence row of the t-th text token (text before the video, then after it)."""
    return tl.where(t < tb, t, t + Nv)


# ----------------------------------------------------------------------------- R-step
@triton.jit
def _r_tile(q, k, v, acc_k, acc_v, m_i, l_i, col_ok, qk_scale, MASKED: tl.constexpr,
            FINAL: tl.constexpr, DOT_PREC: tl.constexpr):
    y = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # base-2 logits
    if MASKED:
        y = tl.where(col_ok[None, :], y, _NEG)
    m_new = tl.maximum(m_i, tl.max(y, 1))
    p = tl.math.exp2(y - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    pc = p.to(k.dtype)
    acc_k = tl.dot(pc, k, acc_k * alpha[:, None], input_precision=DOT_PREC)
    if FINAL:
        acc_v = tl.dot(pc, v, acc_v * alpha[:, None], input_precision=DOT_PREC)
    return acc_k, acc_v, m_new, l_i


@triton.jit
def _r_step_kernel(Q, K, V, QB, AK, CL, Y, TX, TL, LSE,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   H, M, B, Nv, tb, NT, Tg, Hg, Wg, bt, bh, bw, nH, nW, D, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CONTIG: tl.constexpr, QBAR: tl.constexpr, FINAL: tl.constexpr, TEXT: tl.constexpr,
                   EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, STORE_LSE: tl.constexpr):
    pid_j = tl.program_id(0)
    m = tl.program_id(1)
    pbh = tl.program_id(2)
    b = pbh // H
    h = pbh % H
    offs_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    kb = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vb = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    # scratch layout [bh, B, M, D] / [bh, B, M]
    # scratch: per-head base in int64, in-head offsets in int32 (the host checks they fit)
    s_off = pbh.to(tl.int64) * B * M
    s_row = offs_j * M + m
    QB = QB + s_off * D
    AK = AK + s_off * D
    Y = Y + s_off * D
    CL = CL + s_off
    TX = TX + s_off * D
    TL = TL + s_off
    LSE = LSE + s_off
    kb0 = kb
    vb0 = vb
    j_in = offs_j < B
    if QBAR:
        q = tl.load(QB + s_row[:, None] * D + offs_d[None, :], mask=j_in[:, None] & d_ok[None, :], other=0.0)
    else:
        qrow, q_ok = _tok(m, offs_j, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
        qp = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow[:, None] * sqn
        q = tl.load(qp + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(K.dtype.element_ty)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CONTIG:
        nk = tl.minimum(B, Nv - m * B)               # valid keys of block m: a prefix
        n_full = (nk // BLOCK_N) * BLOCK_N
        base = tb + m.to(tl.int64) * B
        kb = kb + base * skn
        vb = vb + base * svn
        for start in range(0, n_full, BLOCK_N):
            rows = start + offs_n
            if EVEN_D:
                k = tl.load(kb + rows[:, None] * skn + offs_d[None, :])
                v = tl.load(vb + rows[:, None] * svn + offs_d[None, :])
            else:
                k = tl.load(kb + rows[:, None] * skn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                v = tl.load(vb + rows[:, None] * svn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            acc_k, acc_v, m_i, l_i = _r_tile(q, k, v, acc_k, acc_v, m_i, l_i, offs_n < BLOCK_N,
                                                  qk_scale, False, FINAL, DOT_PREC)
        if n_full < nk:
            col_ok = n_full + offs_n < nk
            rows = n_full + offs_n
            k = tl.load(kb + rows[:, None] * skn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.load(vb + rows[:, None] * svn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc_k, acc_v, m_i, l_i = _r_tile(q, k, v, acc_k, acc_v, m_i, l_i, col_ok,
                                                  qk_scale, True, FINAL, DOT_PREC)
    else:
        for start in range(0, B, BLOCK_N):
            krow, col_ok = _tok(m, start + offs_n, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, False)
            rows = krow
            k = tl.load(kb + rows[:, None] * skn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.load(vb + rows[:, None] * svn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc_k, acc_v, m_i, l_i = _r_tile(q, k, v, acc_k, acc_v, m_i, l_i, col_ok,
                                                  qk_scale, True, FINAL, DOT_PREC)
    inv_l = 1.0 / l_i
    st_mask = j_in[:, None] & d_ok[None, :]
    ak = acc_k * inv_l[:, None]
    tl.store(AK + s_row[:, None] * D + offs_d[None, :], ak.to(AK.dtype.element_ty), mask=st_mask)
    # sum_l R log2 R = sum_l R (y_l - m - log2 l) and sum_l R y_l = qk_scale * q . (R K): the
    # entropy term needs no per-logit work in the loop
    tl.store(CL + s_row, qk_scale * tl.sum(q.to(tl.float32) * ak, 1) - m_i - tl.math.log2(l_i), mask=j_in)
    if STORE_LSE:  # the backward recomputes R from this log2-sum-exp
        tl.store(LSE + s_row, m_i + tl.math.log2(l_i), mask=j_in)
    if FINAL:
        tl.store(Y + s_row[:, None] * D + offs_d[None, :], (acc_v * inv_l[:, None]).to(Y.dtype.element_ty),
                 mask=st_mask)
    if TEXT:
        # the same query rows against the exact text keys (joint attention): normalised output and
        # log2-sum-exp, stored per row and folded into every L-step's softmax
        m_t = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
        l_t = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for t0 in range(0, NT, BLOCK_N):
            offs_t = t0 + offs_n
            t_ok = offs_t < NT
            trow = _text_tok(offs_t, tb, Nv)
            kt = tl.load(kb0 + trow[:, None] * skn + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(vb0 + trow[:, None] * svn + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            z = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            z = tl.where(t_ok[None, :], z, _NEG)
            acc_t, m_t, l_t = _online(z, vt, acc_t, m_t, l_t, DOT_PREC)
        tl.store(TX + s_row[:, None] * D + offs_d[None, :], (acc_t / l_t[:, None]).to(TX.dtype.element_ty),
                 mask=st_mask)
        tl.store(TL + s_row, m_t + tl.math.log2(l_t), mask=j_in)


# ----------------------------------------------------------------------------- L-steps
@triton.jit
def _online(z, val, acc, m_i, l_i, DOT_PREC: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(z, 1))
    p = tl.math.exp2(z - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(val.dtype), val, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _l_final_kernel(Q, O, AK, CL, Y, TX, TL,
                    sqb, sqh, sqn, sob, soh, son,
                    H, M, B, Nv, tb, NT, Tg, Hg, Wg, bt, bh, bw, nH, nW, D, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_MB: tl.constexpr,
                    CONTIG: tl.constexpr, DOT_PREC: tl.constexpr):
    j = tl.program_id(0)
    pid_i = tl.program_id(1)
    pbh = tl.program_id(2)
    b = pbh // H
    h = pbh % H
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    qrow, q_ok = _tok(offs_i, j, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
    q_ok = q_ok & (offs_i < M)
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow[:, None] * sqn + offs_d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(AK.dtype.element_ty)
    m_i = tl.zeros([BLOCK_I], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_I], dtype=tl.float32)
    acc = tl.zeros([BLOCK_I, HEAD_DIM], dtype=tl.float32)
    s_off = pbh.to(tl.int64) * B * M + j * M
    AK = AK + s_off * D
    Y = Y + s_off * D
    CL = CL + s_off
    TX = TX + s_off * D
    TL = TL + s_off
    for m0 in range(0, M, BLOCK_MB):
        offs_m = m0 + tl.arange(0, BLOCK_MB)
        m_ok = offs_m < M
        ak = tl.load(AK + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(Y + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        cl = tl.load(CL + offs_m, mask=m_ok, other=0.0)
        z = tl.dot(q, tl.trans(ak), input_precision=DOT_PREC) * qk_scale - cl[None, :]
        z = tl.where(m_ok[None, :], z, _NEG)
        acc, m_i, l_i = _online(z, y, acc, m_i, l_i, DOT_PREC)
    if NT > 0:  # text keys: per-row stats from the first R-step, one more "key" of the softmax
        i_ok = offs_i < M
        tx = tl.load(TX + offs_i[:, None] * D + offs_d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        tls = tl.load(TL + offs_i, mask=i_ok, other=0.0)
        m_new = tl.maximum(m_i, tls)
        alpha = tl.math.exp2(m_i - m_new)
        pt = tl.math.exp2(tls - m_new)
        l_i = l_i * alpha + pt
        acc = acc * alpha[:, None] + pt[:, None] * tx.to(tl.float32)
    out = acc / l_i[:, None]
    tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + qrow[:, None] * son + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _l_step_kernel(Q, QB, AK, CL, TL,
                   sqb, sqh, sqn,
                   H, M, B, Nv, tb, NT, Tg, Hg, Wg, bt, bh, bw, nH, nW, D, qk_scale,
                   reset_log2, plain_eps,
                   HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_MB: tl.constexpr,
                   CONTIG: tl.constexpr, RECOMPUTE: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    j = tl.program_id(0)
    pid_m = tl.program_id(1)
    pbh = tl.program_id(2)
    b = pbh // H
    h = pbh % H
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    s_off = pbh.to(tl.int64) * B * M + j * M
    AK = AK + s_off * D
    QB = QB + s_off * D
    CL = CL + s_off
    TL = TL + s_off
    offs_m = pid_m * BLOCK_MB + tl.arange(0, BLOCK_MB)
    m_ok = offs_m < M
    ak_m = tl.load(AK + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    cl_m = tl.load(CL + offs_m, mask=m_ok, other=0.0)
    qbase = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    acc_a = tl.zeros([BLOCK_MB, HEAD_DIM], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_MB], dtype=tl.float32)
    cmax = tl.zeros([BLOCK_MB], dtype=tl.float32) + _NEG
    for i0 in range(0, M, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        qrow, q_ok = _tok(offs_i, j, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
        q_ok = q_ok & (offs_i < M)
        q = tl.load(qbase + qrow[:, None] * sqn + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :],
                    other=0.0)
        q = q.to(AK.dtype.element_ty)
        # normaliser of each query row over all blocks and text keys (base 2)
        r_m = tl.zeros([BLOCK_I], dtype=tl.float32) + _NEG
        r_l = tl.zeros([BLOCK_I], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_MB):
            offs_m2 = m0 + tl.arange(0, BLOCK_MB)
            m2_ok = offs_m2 < M
            ak = tl.load(AK + offs_m2[:, None] * D + offs_d[None, :], mask=m2_ok[:, None] & d_ok[None, :],
                         other=0.0)
            cl = tl.load(CL + offs_m2, mask=m2_ok, other=0.0)
            z = tl.dot(q, tl.trans(ak), input_precision=DOT_PREC) * qk_scale - cl[None, :]
            z = tl.where(m2_ok[None, :], z, _NEG)
            mn = tl.maximum(r_m, tl.max(z, 1))
            r_l = r_l * tl.math.exp2(r_m - mn) + tl.sum(tl.math.exp2(z - mn[:, None]), 1)
            r_m = mn
        if NT > 0:  # text keys' log2-sum-exp of each row, from the first R-step
            tls = tl.load(TL + offs_i, mask=offs_i < M, other=0.0)
            mn = tl.maximum(r_m, tls)
            r_l = r_l * tl.math.exp2(r_m - mn) + tl.math.exp2(tls - mn)
            r_m = mn
        lse = r_m + tl.math.log2(r_l)
        z = tl.dot(q, tl.trans(ak_m), input_precision=DOT_PREC) * qk_scale - cl_m[None, :]
        log_l = z - lse[:, None]                                       # log2 L[j, i, m]
        ok = q_ok[:, None] & m_ok[None, :]
        if RECOMPUTE:
            c_new = tl.maximum(cmax, tl.max(tl.where(ok, log_l, _NEG), 0))
            p = tl.where(ok, tl.math.exp2(tl.where(ok, log_l - c_new[None, :], _NEG)), 0.0)
            sc = tl.math.exp2(cmax - c_new)
            acc_c = acc_c * sc + tl.sum(p, 0)
            acc_a = tl.dot(tl.trans(p).to(q.dtype), q, acc_a * sc[:, None], input_precision=DOT_PREC)
            cmax = c_new
        else:
            p = tl.where(ok, tl.math.exp2(tl.where(ok, log_l, _NEG)), 0.0)
            acc_c = acc_c + tl.sum(p, 0)
            acc_a = tl.dot(tl.trans(p).to(q.dtype), q, acc_a, input_precision=DOT_PREC)
    if RECOMPUTE:
        newq = acc_a / tl.maximum(acc_c, 1e-30)[:, None]
        reset = (cmax + tl.math.log2(tl.maximum(acc_c, 1e-30))) < reset_log2
        orow, o_ok = _tok(offs_m, j, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
        own = tl.load(qbase + orow[:, None] * sqn + offs_d[None, :],
                      mask=(o_ok & m_ok & reset)[:, None] & d_ok[None, :], other=0.0)
        newq = tl.where(reset[:, None], own.to(tl.float32), newq)
    else:
        newq = acc_a / tl.maximum(acc_c, plain_eps)[:, None]
    tl.store(QB + offs_m[:, None] * D + offs_d[None, :], newq.to(QB.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- text rows
@triton.jit
def _text_rows_kernel(Q, K, V, PO, PL, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                      H, N, Nv, tb, NT, D, qk_scale, keys_per_split, BH,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    """Text query rows x one contiguous range of keys (split-K); partial outputs merged on the host."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pbh = tl.program_id(2)
    b = pbh // H
    h = pbh % H
    offs_t = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = offs_t < NT
    trow = _text_tok(offs_t, tb, Nv)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + trow[:, None] * sqn + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    kb = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vb = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k0 = split * keys_per_split
    k1 = tl.minimum(k0 + keys_per_split, N)
    for start in range(k0, k1, BLOCK_N):
        cols = start + offs_n
        c_ok = cols < k1
        rows = cols
        k = tl.load(kb + rows[:, None] * skn + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(vb + rows[:, None] * svn + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        z = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        z = tl.where(c_ok[None, :], z, _NEG)
        acc, m_i, l_i = _online(z, v, acc, m_i, l_i, DOT_PREC)
    out = acc / l_i[:, None]
    prow = (split * BH + pbh).to(tl.int64) * NT + offs_t
    tl.store(PO + prow[:, None] * D + offs_d[None, :], out, mask=t_ok[:, None] & d_ok[None, :])
    tl.store(PL + prow, m_i + tl.math.log2(l_i), mask=t_ok)


# ----------------------------------------------------------------------------- launch
_CONFIG = tuning_cache("monarch_r")

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
_R_CANDIDATES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3),
                 (128, 64, 16, 2), (128, 128, 8, 2)]


# launched inside tuning.untuned() (calibration measures many kernel variants once each)
_DEFAULT_R = (64, 64, 4, 3)
_DEFAULT_R_WIDE = (64, 32, 4, 2)  # head_dim > 128


def _head_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _layout_args(lay):
    T, H, W = lay.grid
    bt, bh, bw = lay.block
    _, nH, nW = lay.nblocks
    return (T, H, W, bt, bh, bw, nH, nW)


def _launch_r(cfg, q, k, v, qbar, ak, cl, y, lay, scale, final, use_qbar, tx=None, tls=None, lse=None):
    BM, BN, warps, stages = cfg
    text = tx is not None and not use_qbar
    b, h, N, D = q.shape
    HD = _head_pad(D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(lay.B, BM), lay.M, b * h)
    _r_step_kernel[grid](q, k, v, qbar if use_qbar else ak, ak, cl, y if final else ak,
                         tx if text else ak, tls if text else cl, lse if lse is not None else cl,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                         v.stride(0), v.stride(1), v.stride(2),
                         h, lay.M, lay.B, lay.Nv, lay.text_before, lay.n_text, *_layout_args(lay), D,
                         scale * _LOG2E,
                         HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, CONTIG=lay.contiguous, QBAR=use_qbar,
                         FINAL=final, TEXT=text, EVEN_D=(HD == D), DOT_PREC=prec, STORE_LSE=lse is not None,
                         num_warps=warps, num_stages=stages)


def _pick_r_config(q, k, v, qbar, ak, cl, y, lay, scale, final, use_qbar, tx=None, tls=None):
    if _CONFIG.forced is not None:  # tuning.force_config("monarch_r", (BLOCK_M, BLOCK_N, warps, stages))
        return _CONFIG.forced
    if interpreting() or not q.is_cuda:
        return (16, 16, 4, 1)
    D = q.shape[-1]
    if q.dtype == torch.float32:  # IEEE fp32 dots: correctness path, smallest tiles were fastest
        return (32, 32, 4, 2)
    text = tx is not None and not use_qbar
    key = (q.device.index, q.dtype, D, final, use_qbar, text, lay.contiguous, triton.next_power_of_2(lay.B),
           q.shape[0] * q.shape[1] * lay.M >= 256)
    hit = _CONFIG.get(key)
    if hit is not None:
        return hit
    if not tuning_enabled():
        return _DEFAULT_R if D <= 128 else _DEFAULT_R_WIDE
    cands = _R_CANDIDATES
    if D > 128:
        cands = [(64, 32, 4, 2), (32, 32, 4, 2)]
    best, best_t = None, float("inf")
    for cfg in cands:
        try:
            t = triton.testing.do_bench(lambda: _launch_r(cfg, q, k, v, qbar, ak, cl, y, lay, scale, final,
                                                          use_qbar, tx, tls), warmup=3, rep=15, return_mode="median")
        except Exception as e:  # a config that does not compile / fit shared memory is skipped
            if os.environ.get("VMONARCH_TUNE_VERBOSE") == "1":
                print(f"monarch R-step {key} {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        if os.environ.get("VMONARCH_TUNE_VERBOSE") == "1":
            print(f"monarch R-step {key} {cfg}: {t:.4f} ms")
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("monarch_attention_triton: no R-step launch configuration compiled on this device; "
                           "set VMONARCH_FORCE_REFERENCE=1 to use the reference")
    _CONFIG.put(key, best)
    return best


def _l_cfg(q, M):
    """(BLOCK_I, BLOCK_MB, num_warps) of the L-step kernels."""
    if interpreting() or not q.is_cuda:
        return 16, 16, 4
    bm = min(64, max(16, triton.next_power_of_2(M)))
    # memory-bound: many small programs hide latency best (H100, Wan 480p, M=21: 2 warps
    # 0.187 ms, 4 warps 0.205, 8 warps 0.292)
    warps = 4 if bm >= 64 else 2
    return bm, bm, warps


def monarch_r_step_triton(q, k, v, *, grid, block, text_before=0, text_after=0, scale=None, final=True):
    """The first R-step alone (for tests / diagnostics): ``(a_l, c_l, y)`` with
    ``a_l = scale * R K`` and ``c_l = sum R log R`` (natural log), shapes ``[b*h, M, B, D]`` /
    ``[b*h, M, B]``, the same as ``monarch_reference_details``."""
    check_qkv(q, k, v)
    lay = make_layout(q.shape[2], grid, block, text_before, text_after)
    s = resolve_scale(scale, q.shape[-1])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, N, D = q.shape
    ak = torch.empty(b * h, lay.B, lay.M, D, dtype=q.dtype, device=q.device)
    cl = torch.empty(b * h, lay.B, lay.M, dtype=torch.float32, device=q.device)
    y = torch.empty_like(ak)
    cfg = _pick_r_config(q, k, v, ak, ak, cl, y, lay, s, final, False)
    _launch_r(cfg, q, k, v, ak, ak, cl, y, lay, s, final, False)
    return (s * ak.float()).transpose(1, 2), (cl * _LN2).transpose(1, 2), y.transpose(1, 2)


def _plan(q, k, v, lay, steps, s, recompute):
    """Allocate the output and scratch, and return ``(out, [(phase name, launch fn), ...])``."""
    b, h, N, D = q.shape
    M, B = lay.M, lay.B
    out = empty_attention_out(q)  # q's layout, like torch's SDPA (out_layout.py)
    ak = torch.empty(b * h, B, M, D, dtype=q.dtype, device=q.device)
    cl = torch.empty(b * h, B, M, dtype=torch.float32, device=q.device)
    y = torch.empty(b * h, B, M, D, dtype=q.dtype, device=q.device)
    qbar = torch.empty(b * h, B, M, D, dtype=q.dtype, device=q.device) if steps > 1 else ak
    # text keys seen by the video rows: normalised output + log2-sum-exp per row (first R-step)
    tx = torch.empty(b * h, B, M, D, dtype=q.dtype, device=q.device) if lay.n_text else None
    tls = torch.empty(b * h, B, M, dtype=torch.float32, device=q.device) if lay.n_text else None
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    HD = _head_pad(D)
    BI, BMB, lw = _l_cfg(q, M)
    la = _layout_args(lay)
    qk_scale = s * _LOG2E
    launches = []
    for step in range(steps):
        final = step == steps - 1
        use_qbar = step > 0

        def r_step(final=final, use_qbar=use_qbar):
            cfg = _pick_r_config(q, k, v, qbar, ak, cl, y, lay, s, final, use_qbar, tx, tls)
            _launch_r(cfg, q, k, v, qbar, ak, cl, y, lay, s, final, use_qbar, tx, tls)
        launches.append((f"r_step{step}", r_step))
        if not final:
            def l_step():
                _l_step_kernel[(B, triton.cdiv(M, BMB), b * h)](
                    q, qbar, ak, cl, tls if lay.n_text else cl, q.stride(0), q.stride(1), q.stride(2), h, M, B, lay.Nv, lay.text_before, lay.n_text, *la, D, qk_scale,
                    math.log2(RESET_MASS), PLAIN_CBAR_EPS,
                    HEAD_DIM=HD, BLOCK_I=BI, BLOCK_MB=BMB, CONTIG=lay.contiguous,
                    RECOMPUTE=bool(recompute), DOT_PREC=prec, num_warps=lw, num_stages=1)
            launches.append((f"l_step{step}", l_step))

    def l_final():
        _l_final_kernel[(B, triton.cdiv(M, BI), b * h)](
            q, out, ak, cl, y, tx if lay.n_text else ak, tls if lay.n_text else cl,
            q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            h, M, B, lay.Nv, lay.text_before, lay.n_text, *la, D, qk_scale,
            HEAD_DIM=HD, BLOCK_I=BI, BLOCK_MB=BMB, CONTIG=lay.contiguous, DOT_PREC=prec,
            num_warps=lw, num_stages=1)
    launches.append(("l_final", l_final))
    if lay.n_text and sdpa_text_rows(q):
        launches.append(("text_rows", lambda: text_rows_sdpa_into(q, k, v, out, lay.text_before, lay.Nv, s)))
    elif lay.n_text:
        interp = interpreting() or not q.is_cuda
        TBM, TBN, tw = (16, 16, 4) if interp else (64, 64, 8)
        NT = lay.n_text
        row_tiles = triton.cdiv(NT, TBM) * b * h
        if interp:
            n_split = 2 if N > 2 * TBN else 1
        else:  # enough programs to fill the GPU a few times, >= 2048 keys per split
            n_split = max(1, min(triton.cdiv(4 * 132, row_tiles), N // 2048))
        per = triton.cdiv(triton.cdiv(N, n_split), TBN) * TBN
        n_split = triton.cdiv(N, per)
        po = torch.empty(n_split, b * h, NT, D, dtype=torch.float32, device=q.device)
        pl = torch.empty(n_split, b * h, NT, dtype=torch.float32, device=q.device)
        t_idx = torch.cat([torch.arange(lay.text_before, device=q.device),
                           torch.arange(lay.text_before + lay.Nv, N, device=q.device)])

        def text_rows():
            _text_rows_kernel[(triton.cdiv(NT, TBM), n_split, b * h)](
                q, k, v, po, pl, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                h, N, lay.Nv, lay.text_before, NT, D, qk_scale, per, b * h,
                HEAD_DIM=HD, BLOCK_M=TBM, BLOCK_N=TBN, DOT_PREC=prec, num_warps=tw, num_stages=2)
            # merge the key splits: weights 2^(lse_s - lse) over the splits
            w = torch.softmax(pl * _LN2, dim=0)
            res = (w[..., None] * po).sum(0).view(b, h, NT, D)
            out.index_copy_(2, t_idx, res.to(out.dtype))
        launches.append(("text_rows", text_rows))
    return out, launches


def _prepare(q, k, v, grid, block, text_before, text_after, steps, scale):
    check_qkv(q, k, v)
    lay = make_layout(q.shape[2], grid, block, text_before, text_after)
    steps = check_steps(steps)
    s = resolve_scale(scale, q.shape[-1])
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"monarch_attention_triton: q/k/v must share one dtype of float16, bfloat16, float32; "
                         f"got {q.dtype}/{k.dtype}/{v.dtype} (cast them, or use the reference)")
    if q.shape[-1] > 256:
        raise ValueError(f"monarch_attention_triton: head_dim {q.shape[-1]} > 256 is unsupported; "
                         f"use the reference (VMONARCH_FORCE_REFERENCE=1)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # in-kernel offsets inside one (batch, head) are int32
    if max(q.stride(2), k.stride(2), v.stride(2)) * q.shape[2] >= 2 ** 31 or lay.B * lay.M * q.shape[-1] >= 2 ** 31:
        raise ValueError(f"monarch_attention_triton: sequence {q.shape[2]} x row stride "
                         f"{max(q.stride(2), k.stride(2), v.stride(2))} does not fit int32 offsets; "
                         f"make q/k/v contiguous in [batch, heads, seq, head_dim] or split the batch")
    return q, k, v, lay, steps, s


def monarch_phases(q, k, v, *, grid, block, text_before=0, text_after=0, steps=1, scale=None, recompute=False):
    """``(out, [(phase, launch fn)])`` for benchmarks: run the fns in order to compute ``out``."""
    q, k, v, lay, steps, s = _prepare(q, k, v, grid, block, text_before, text_after, steps, scale)
    return _plan(q, k, v, lay, steps, s, recompute)


def monarch_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, block,
                             text_before: int = 0, text_after: int = 0, steps: int = 1,
                             scale: Optional[float] = None, recompute: bool = False) -> torch.Tensor:
    """Monarch attention with the Triton kernels; same contract as ``monarch_attention_reference``."""
    q, k, v, lay, steps, s = _prepare(q, k, v, grid, block, text_before, text_after, steps, scale)
    out, launches = _plan(q, k, v, lay, steps, s, recompute)
    for _, fn in launches:
        fn()
    return out
