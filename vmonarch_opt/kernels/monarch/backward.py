"""Monarch attention backward (steps = 1, every block layout, text tokens) in Triton.

The gradient of ``reference.monarch_attention_reference`` at ``steps=1``. Notation as in the
reference (natural-log logits here; the kernels work in base 2 like the forward): for each block
m and in-block position j the R-step gives ``R = softmax_l(y)``, ``y_l = s q[m,j] . k[m,l]``,
``AK = sum_l R k``, ``Y = sum_l R v``, ``CL = sum_l R y - lse_R``; the L-step for query (i, j)
is a softmax over the blocks m (logit ``z = s q[i,j] . AK[m,j] - CL[m,j]``, value ``Y[m,j]``)
and the exact text keys (logit ``s q . k_t``, value ``v_t``).

Given ``dO`` and ``Delta = dO . out`` per row:

* L-step (per position j, the M x M softmax over blocks): ``dz = L (dO . Y - Delta)``;
  ``dY[m] = sum_i L dO_i``, ``dAK[m] = s sum_i dz q_i``, ``dCL[m] = -sum_i dz`` and
  ``dq_i += s sum_m dz AK[m]``;
* R-step (per block, a flash-attention backward with two "output gradients"): with
  ``dP_l = dAK . k_l + dY . v_l + dCL y_l`` and ``D = dAK . AK + dY . Y + dCL sum_l R y``,
  ``dy_l = R_l (dP_l - D)``; ``dq += s sum_l dy_l k_l``; ``dk_l += s sum_j dy q_j + sum_j R dAK_j``;
  ``dv_l += sum_j R dY_j``;
* text keys seen by video rows and text query rows (exact dense attention): the plain softmax
  backward with each row's log-sum-exp, done with batched matmuls over chunks of rows (a few
  hundred text tokens: cuBLAS work, no N x N tensor).

What is recomputed and what is kept: the backward re-runs the forward's R-step kernel (one flash
pass inside the blocks) to get ``AK``, ``Y``, ``CL``, the text statistics and the R-step
log-sum-exp; the L-step's log-sum-exp is recomputed from those (M logits per row). Nothing N x N
or N x (N/B) is stored: the extra memory is two ``[batch*heads, B, M, head_dim]`` scratch
tensors in the input dtype (``dAK`` and ``dY`` overwrite ``AK`` and ``Y`` in place), a float32
``dq`` accumulator, and float32 ``dk``/``dv`` only with text tokens (which add to every key). Kernels, in order:

1. ``_l_bwd_dq_kernel``: one program = position j x a tile of query blocks i: each row's L-step
   log-sum-exp (stored for the later passes) and ``dq`` from the L-step;
2. ``_l_bwd_dkv_kernel``: one program = position j x a tile of blocks m, looping over the query
   blocks: ``dY``, ``dAK``, ``dCL`` and ``D`` of the R-step (written over ``Y`` / ``AK``);
3. ``_r_bwd_dkv_kernel``: one program = a tile of keys of block m, looping over the block's
   positions j: ``dk``, ``dv`` of the video keys (no atomics: each program owns its keys);
4. ``_r_bwd_dq_kernel``: one program = a tile of positions of block m, looping over its keys:
   adds the R-step part of ``dq``.

``steps > 1`` is not covered here (the op differentiates the reference there).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..tuning import interpreting
from .kernel import _LN2, _LOG2E, _NEG, _head_pad, _layout_args, _launch_r, _pick_r_config, _prepare, _tok

__all__ = ["monarch_attention_backward_triton", "dense_rows_backward"]


# ----------------------------------------------------------------------------- L-step backward
@triton.jit
def _l_bwd_tile(q, do, ak, y, cl, lse, delta, row_ok, m_ok, qk_scale, DOT_PREC: tl.constexpr):
    """One [query rows x blocks] tile of the L-step backward: ``L`` (from the block logits and
    each row's log2-sum-exp) and ``dz = L (dO . Y - Delta)``."""
    z = tl.dot(q, tl.trans(ak), input_precision=DOT_PREC) * qk_scale - cl[None, :]
    p = tl.where(row_ok[:, None] & m_ok[None, :], tl.math.exp2(z - lse[:, None]), 0.0)
    dl = tl.dot(do, tl.trans(y), input_precision=DOT_PREC)
    return p, p * (dl - delta[:, None])


@triton.jit
def _l_bwd_dq_kernel(Q, DO, DELTA, AK, CL, Y, TL, LSEL, DQ,
                     sqb, sqh, sqn, sdb, sdh, sdn, sgb, sgh, sgn,
                     H, M, B, Nv, tb, NT, Tg, Hg, Wg, bt, bh, bw, nH, nW, D, qk_scale, sm_scale,
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
    ld = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow[:, None] * sqn + offs_d[None, :],
                mask=ld, other=0.0).to(AK.dtype.element_ty)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + qrow[:, None] * sdn + offs_d[None, :],
                 mask=ld, other=0.0).to(AK.dtype.element_ty)
    delta = tl.load(DELTA + pbh.to(tl.int64) * (Nv + NT) + qrow, mask=q_ok, other=0.0)
    s_off = pbh.to(tl.int64) * B * M + j * M
    AK = AK + s_off * D
    Y = Y + s_off * D
    CL = CL + s_off
    TL = TL + s_off
    LSEL = LSEL + s_off
    # pass 1: each row's log2-sum-exp over the blocks (and the text keys' share)
    r_m = tl.zeros([BLOCK_I], dtype=tl.float32) + _NEG
    r_l = tl.zeros([BLOCK_I], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_MB):
        offs_m = m0 + tl.arange(0, BLOCK_MB)
        m_ok = offs_m < M
        ak = tl.load(AK + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        cl = tl.load(CL + offs_m, mask=m_ok, other=0.0)
        z = tl.dot(q, tl.trans(ak), input_precision=DOT_PREC) * qk_scale - cl[None, :]
        z = tl.where(m_ok[None, :], z, _NEG)
        mn = tl.maximum(r_m, tl.max(z, 1))
        r_l = r_l * tl.math.exp2(r_m - mn) + tl.sum(tl.math.exp2(z - mn[:, None]), 1)
        r_m = mn
    if NT > 0:
        tls = tl.load(TL + offs_i, mask=offs_i < M, other=0.0)
        mn = tl.maximum(r_m, tls)
        r_l = r_l * tl.math.exp2(r_m - mn) + tl.math.exp2(tls - mn)
        r_m = mn
    lse = r_m + tl.math.log2(r_l)
    tl.store(LSEL + offs_i, lse, mask=offs_i < M)
    # pass 2: dz = L (dO . Y - Delta); dq = s sum_m dz AK[m]
    acc = tl.zeros([BLOCK_I, HEAD_DIM], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_MB):
        offs_m = m0 + tl.arange(0, BLOCK_MB)
        m_ok = offs_m < M
        ak = tl.load(AK + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(Y + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        cl = tl.load(CL + offs_m, mask=m_ok, other=0.0)
        p, dz = _l_bwd_tile(q, do, ak, y, cl, lse, delta, q_ok, m_ok, qk_scale, DOT_PREC)
        acc = tl.dot(dz.to(ak.dtype), ak, acc, input_precision=DOT_PREC)
    tl.store(DQ + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + qrow[:, None] * sgn + offs_d[None, :],
             acc * sm_scale, mask=ld)


@triton.jit
def _l_bwd_dkv_kernel(Q, DO, DELTA, AK, CL, Y, LSEL, LSER, DT,
                      sqb, sqh, sqn, sdb, sdh, sdn,
                      H, M, B, Nv, tb, NT, Tg, Hg, Wg, bt, bh, bw, nH, nW, D, qk_scale, sm_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_MB: tl.constexpr,
                      CONTIG: tl.constexpr, DOT_PREC: tl.constexpr):
    j = tl.program_id(0)
    pid_m = tl.program_id(1)
    pbh = tl.program_id(2)
    b = pbh // H
    h = pbh % H
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    s_off = pbh.to(tl.int64) * B * M + j * M
    AK = AK + s_off * D
    Y = Y + s_off * D
    CL = CL + s_off
    LSEL = LSEL + s_off
    LSER = LSER + s_off
    DT = DT + s_off
    offs_m = pid_m * BLOCK_MB + tl.arange(0, BLOCK_MB)
    m_ok = offs_m < M
    st = m_ok[:, None] & d_ok[None, :]
    ak = tl.load(AK + offs_m[:, None] * D + offs_d[None, :], mask=st, other=0.0)
    y = tl.load(Y + offs_m[:, None] * D + offs_d[None, :], mask=st, other=0.0)
    cl = tl.load(CL + offs_m, mask=m_ok, other=0.0)
    qbase = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    dbase = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    acc_y = tl.zeros([BLOCK_MB, HEAD_DIM], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_MB, HEAD_DIM], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_MB], dtype=tl.float32)
    for i0 in range(0, M, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        qrow, q_ok = _tok(offs_i, j, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
        q_ok = q_ok & (offs_i < M)
        ld = q_ok[:, None] & d_ok[None, :]
        q = tl.load(qbase + qrow[:, None] * sqn + offs_d[None, :], mask=ld, other=0.0).to(AK.dtype.element_ty)
        do = tl.load(dbase + qrow[:, None] * sdn + offs_d[None, :], mask=ld, other=0.0).to(AK.dtype.element_ty)
        delta = tl.load(DELTA + pbh.to(tl.int64) * (Nv + NT) + qrow, mask=q_ok, other=0.0)
        lse = tl.load(LSEL + offs_i, mask=offs_i < M, other=0.0)
        p, dz = _l_bwd_tile(q, do, ak, y, cl, lse, delta, q_ok, m_ok, qk_scale, DOT_PREC)
        acc_y = tl.dot(tl.trans(p).to(do.dtype), do, acc_y, input_precision=DOT_PREC)
        acc_a = tl.dot(tl.trans(dz).to(q.dtype), q, acc_a, input_precision=DOT_PREC)
        acc_c -= tl.sum(dz, 0)
    d_ak = acc_a * sm_scale
    # D = dAK . AK + dY . Y + dCL * sum_l R y  (natural log; sum_l R y = CL + lse_R)
    ybar = (cl + tl.load(LSER + offs_m, mask=m_ok, other=0.0)) * 0.6931471805599453
    dterm = tl.sum(d_ak * ak.to(tl.float32), 1) + tl.sum(acc_y * y.to(tl.float32), 1) + acc_c * ybar
    tl.store(DT + offs_m, dterm, mask=m_ok)
    # dAK / dY / dCL overwrite AK / Y / CL: this program is the only reader of its entries
    tl.store(AK + offs_m[:, None] * D + offs_d[None, :], d_ak.to(AK.dtype.element_ty), mask=st)
    tl.store(Y + offs_m[:, None] * D + offs_d[None, :], acc_y.to(Y.dtype.element_ty), mask=st)
    tl.store(CL + offs_m, acc_c, mask=m_ok)


# ----------------------------------------------------------------------------- R-step backward
@triton.jit
def _r_bwd_tile(q, k, v, dak, dy, dcl, dt, lse, row_ok, col_ok, qk_scale, DOT_PREC: tl.constexpr):
    """One [positions x keys] tile of the R-step backward: ``R`` (from the base-2 logits and the
    saved log2-sum-exp) and ``dy = R (dAK . k + dY . v + dCL y - D)`` (natural-log logits y)."""
    yl = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale       # base-2 logits
    r = tl.where(row_ok[:, None] & col_ok[None, :], tl.math.exp2(yl - lse[:, None]), 0.0)
    dp = tl.dot(dak, tl.trans(k), input_precision=DOT_PREC)
    dp = tl.dot(dy, tl.trans(v), dp, input_precision=DOT_PREC)
    dp += dcl[:, None] * (yl * 0.6931471805599453)
    return r, r * (dp - dt[:, None])


@triton.jit
def _r_bwd_dkv_kernel(Q, K, V, DAK, DY, DCL, DT, LSER, DK, DV,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn,
                      H, M, B, Nv, tb, Tg, Hg, Wg, bt, bh, bw, nH, nW, D, qk_scale, sm_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
                      CONTIG: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pbh = tl.program_id(2)
    b = pbh // H
    h = pbh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    krow, k_ok = _tok(m, offs_n, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
    kld = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + krow[:, None] * skn + offs_d[None, :],
                mask=kld, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + krow[:, None] * svn + offs_d[None, :],
                mask=kld, other=0.0)
    qbase = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    s_off = pbh.to(tl.int64) * B * M + m
    acc_k = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    offs_jb = tl.arange(0, BLOCK_J)
    for j0 in range(0, B, BLOCK_J):
        offs_j = j0 + offs_jb
        j_in = offs_j < B
        qrow, q_ok = _tok(m, offs_j, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
        q = tl.load(qbase + qrow[:, None] * sqn + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :],
                    other=0.0).to(K.dtype.element_ty)
        srow = s_off + offs_j * M
        sld = j_in[:, None] & d_ok[None, :]
        dak = tl.load(DAK + srow[:, None] * D + offs_d[None, :], mask=sld, other=0.0)
        dy = tl.load(DY + srow[:, None] * D + offs_d[None, :], mask=sld, other=0.0)
        dcl = tl.load(DCL + srow, mask=j_in, other=0.0)
        dt = tl.load(DT + srow, mask=j_in, other=0.0)
        lse = tl.load(LSER + srow, mask=j_in, other=0.0)
        r, ds = _r_bwd_tile(q, k, v, dak, dy, dcl, dt, lse, j_in, k_ok, qk_scale, DOT_PREC)
        ds = ds * sm_scale
        acc_k = tl.dot(tl.trans(ds).to(q.dtype), q, acc_k, input_precision=DOT_PREC)
        rc = tl.trans(r).to(dak.dtype)
        acc_k = tl.dot(rc, dak, acc_k, input_precision=DOT_PREC)
        acc_v = tl.dot(rc, dy, acc_v, input_precision=DOT_PREC)
    tl.store(DK + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + krow[:, None] * sgn + offs_d[None, :],
             acc_k.to(DK.dtype.element_ty), mask=kld)
    tl.store(DV + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + krow[:, None] * sgn + offs_d[None, :],
             acc_v.to(DV.dtype.element_ty), mask=kld)


@triton.jit
def _r_bwd_dq_kernel(Q, K, V, DAK, DY, DCL, DT, LSER, DQ,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn,
                     H, M, B, Nv, tb, Tg, Hg, Wg, bt, bh, bw, nH, nW, D, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
                     CONTIG: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_j = tl.program_id(0)
    m = tl.program_id(1)
    pbh = tl.program_id(2)
    b = pbh // H
    h = pbh % H
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    j_in = offs_j < B
    qrow, q_ok = _tok(m, offs_j, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
    qld = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow[:, None] * sqn + offs_d[None, :],
                mask=qld, other=0.0).to(K.dtype.element_ty)
    srow = pbh.to(tl.int64) * B * M + m + offs_j * M
    sld = j_in[:, None] & d_ok[None, :]
    dak = tl.load(DAK + srow[:, None] * D + offs_d[None, :], mask=sld, other=0.0)
    dy = tl.load(DY + srow[:, None] * D + offs_d[None, :], mask=sld, other=0.0)
    dcl = tl.load(DCL + srow, mask=j_in, other=0.0)
    dt = tl.load(DT + srow, mask=j_in, other=0.0)
    lse = tl.load(LSER + srow, mask=j_in, other=0.0)
    kbase = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vbase = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    acc = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    offs_nb = tl.arange(0, BLOCK_N)
    for n0 in range(0, B, BLOCK_N):
        krow, k_ok = _tok(m, n0 + offs_nb, Tg, Hg, Wg, bt, bh, bw, nH, nW, B, Nv, tb, CONTIG)
        kld = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kbase + krow[:, None] * skn + offs_d[None, :], mask=kld, other=0.0)
        v = tl.load(vbase + krow[:, None] * svn + offs_d[None, :], mask=kld, other=0.0)
        _, ds = _r_bwd_tile(q, k, v, dak, dy, dcl, dt, lse, j_in, k_ok, qk_scale, DOT_PREC)
        acc = tl.dot(ds.to(k.dtype), k, acc, input_precision=DOT_PREC)
    dq_ptr = DQ + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + qrow[:, None] * sgn + offs_d[None, :]
    prev = tl.load(dq_ptr, mask=qld, other=0.0)
    tl.store(dq_ptr, prev + acc * sm_scale, mask=qld)


# ----------------------------------------------------------------------------- text parts (torch)
def dense_rows_backward(q, k, v, do, delta, lse, scale: float, dk, dv, max_elems: int = 1 << 26):
    """Softmax-attention backward of some query rows against some keys, by batched matmuls.

    q, do: ``[c, R, D]`` (fp32); k, v: ``[c, S, D]``; delta ``[c, R]`` = rowwise ``dO . out``;
    lse ``[c, R]``: each row's natural log-sum-exp over *all* the keys its softmax normalises
    over (these keys may be only part of them), or None to normalise over these keys alone.
    Adds the key gradients into ``dk``/``dv`` (``[c, S, D]`` fp32) and returns ``dq`` ``[c, R, D]``.
    Chunked over rows so that no temporary exceeds ``max_elems`` elements.
    """
    c, R, D = q.shape
    S = k.shape[1]
    dq = torch.empty_like(q)
    step = max(1, max_elems // max(1, c * S))
    for r0 in range(0, R, step):
        sl = slice(r0, min(R, r0 + step))
        logits = scale * torch.bmm(q[:, sl], k.transpose(1, 2))
        ls = torch.logsumexp(logits, -1) if lse is None else lse[:, sl]
        p = torch.exp(logits - ls[..., None])
        dv += torch.bmm(p.transpose(1, 2), do[:, sl])
        ds = p * (torch.bmm(do[:, sl], v.transpose(1, 2)) - delta[:, sl, None])
        dq[:, sl] = scale * torch.bmm(ds, k)
        dk += scale * torch.bmm(ds.transpose(1, 2), q[:, sl])
    return dq


# ----------------------------------------------------------------------------- launch
def _bwd_cfg(q, D: int):
    """(BLOCK_J, BLOCK_N, num_warps, num_stages) of the R-step backward passes."""
    if interpreting() or not q.is_cuda:
        return 16, 16, 4, 1
    if q.dtype == torch.float32:
        return 32, 32, 4, 2
    if D <= 64:
        return 64, 64, 4, 2
    if D <= 128:
        return 64, 64, 8, 2
    return 32, 32, 4, 1


def _l_bwd_cfg(q, M: int):
    if interpreting() or not q.is_cuda:
        return 16, 16, 4
    bm = min(64, max(16, triton.next_power_of_2(M)))
    return bm, bm, 4


def monarch_attention_backward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                      grad_out: torch.Tensor, *, grid, block, text_before: int = 0,
                                      text_after: int = 0, steps: int = 1, scale: Optional[float] = None,
                                      recompute: bool = False):
    """``(dq, dk, dv)`` of Monarch attention at ``steps=1`` (``out`` is the forward's output).

    Same contract as ``monarch_attention_triton``; the gradients come back contiguous
    ``[batch, heads, N, head_dim]`` in q's dtype.
    """
    q, k, v, lay, steps, s = _prepare(q, k, v, grid, block, text_before, text_after, steps, scale)
    if steps != 1:
        raise ValueError(f"monarch_attention_backward_triton: steps={steps} is not covered by the backward "
                         f"kernels (steps=1 only); differentiate the reference instead")
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"monarch_attention_backward_triton: out {tuple(out.shape)} and grad_out "
                         f"{tuple(grad_out.shape)} must have q's shape {tuple(q.shape)}")
    do = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    do = do.to(q.dtype)
    b, h, N, D = q.shape
    M, B, NT = lay.M, lay.B, lay.n_text
    dev = q.device
    # 1. recompute the R-step: AK, CL, Y (+ text statistics) and its log2-sum-exp
    ak = torch.empty(b * h, B, M, D, dtype=q.dtype, device=dev)
    y = torch.empty_like(ak)
    cl = torch.empty(b * h, B, M, dtype=torch.float32, device=dev)
    lse_r = torch.empty_like(cl)
    tx = torch.empty_like(ak) if NT else None
    tls = torch.empty_like(cl) if NT else None
    cfg = _pick_r_config(q, k, v, ak, ak, cl, y, lay, s, True, False, tx, tls)
    _launch_r(cfg, q, k, v, ak, ak, cl, y, lay, s, True, False, tx, tls, lse=lse_r)
    del tx  # the text keys' backward recomputes its probabilities from the row LSE
    # Delta = dO . out per row
    delta = (do.float() * out.float()).sum(-1).reshape(b * h, N).contiguous()
    # dq sums the L-step's and the R-step's shares: fp32. The video keys' dk/dv are written once by
    # the R-step pass, so without text they go straight to q's dtype; text adds to every key: fp32.
    dq = torch.zeros(b, h, N, D, dtype=torch.float32, device=dev)
    if NT:
        dk = torch.zeros(b, h, N, D, dtype=torch.float32, device=dev)
        dv = torch.zeros_like(dk)
    else:  # every video key belongs to exactly one block: all rows are written
        dk = torch.empty(b, h, N, D, dtype=q.dtype, device=dev)
        dv = torch.empty_like(dk)
    lse_l = torch.empty_like(cl)
    dt = torch.empty_like(cl)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    HD = _head_pad(D)
    la = _layout_args(lay)
    qk_scale = s * _LOG2E
    BI, BMB, lw = _l_bwd_cfg(q, M)
    common = (h, M, B, lay.Nv, lay.text_before, NT, *la, D, qk_scale, s)
    # 2. L-step: row LSEs and dq; then dY, dAK, dCL, D (written over Y, AK, CL)
    _l_bwd_dq_kernel[(B, triton.cdiv(M, BI), b * h)](
        q, do, delta, ak, cl, y, tls if NT else cl, lse_l, dq,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), *common,
        HEAD_DIM=HD, BLOCK_I=BI, BLOCK_MB=BMB, CONTIG=lay.contiguous, DOT_PREC=prec, num_warps=lw, num_stages=1)
    _l_bwd_dkv_kernel[(B, triton.cdiv(M, BMB), b * h)](
        q, do, delta, ak, cl, y, lse_l, lse_r, dt,
        q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2), *common,
        HEAD_DIM=HD, BLOCK_I=BI, BLOCK_MB=BMB, CONTIG=lay.contiguous, DOT_PREC=prec, num_warps=lw, num_stages=1)
    dak, dy, dcl = ak, y, cl
    # 3. R-step: dk, dv of the video keys, then the R-step's share of dq
    BJ, BN, warps, stages = _bwd_cfg(q, D)
    rcommon = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
               h, M, B, lay.Nv, lay.text_before, *la, D, qk_scale, s)
    _r_bwd_dkv_kernel[(triton.cdiv(B, BN), M, b * h)](
        q, k, v, dak, dy, dcl, dt, lse_r, dk, dv, *rcommon,
        HEAD_DIM=HD, BLOCK_J=BJ, BLOCK_N=BN, CONTIG=lay.contiguous, DOT_PREC=prec,
        num_warps=warps, num_stages=stages)
    _r_bwd_dq_kernel[(triton.cdiv(B, BJ), M, b * h)](
        q, k, v, dak, dy, dcl, dt, lse_r, dq, *rcommon,
        HEAD_DIM=HD, BLOCK_J=BJ, BLOCK_N=BN, CONTIG=lay.contiguous, DOT_PREC=prec,
        num_warps=warps, num_stages=stages)
    if NT:
        _text_backward(q, k, v, do, delta, lse_l, lay, s, dq, dk, dv)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def _text_backward(q, k, v, do, delta, lse_l, lay, s, dq, dk, dv):
    """Text keys seen by the video rows (with each row's L-step LSE) and the text query rows
    (dense over all keys): plain softmax backward by matmuls, added into dq / dk / dv."""
    b, h, N, D = q.shape
    c = b * h
    idx, valid = lay.token_index(q.device)
    t_idx = lay.text_index(q.device)
    v_rows = torch.arange(lay.text_before, lay.text_before + lay.Nv, device=q.device)
    qf, kf, vf, dof = (x.reshape(c, N, D) for x in (q, k, v, do))
    dqf, dkf, dvf = (x.view(c, N, D) for x in (dq, dk, dv))
    # the video rows' natural LSE in sequence order
    lse_seq = torch.empty(c, N, dtype=torch.float32, device=q.device)
    lse_seq[:, idx[valid]] = (lse_l.transpose(1, 2) * _LN2)[:, valid]
    kt, vt = kf[:, t_idx].float(), vf[:, t_idx].float()
    dkt = torch.zeros_like(kt)
    dvt = torch.zeros_like(vt)
    dqv = dense_rows_backward(qf[:, v_rows].float(), kt, vt, dof[:, v_rows].float(), delta[:, v_rows],
                              lse_seq[:, v_rows], s, dkt, dvt)
    dqf[:, v_rows] += dqv
    dkf[:, t_idx] += dkt
    dvf[:, t_idx] += dvt
    # text query rows: exact attention over all N keys
    dka = torch.zeros(c, N, D, dtype=torch.float32, device=q.device)
    dva = torch.zeros_like(dka)
    dqt = dense_rows_backward(qf[:, t_idx].float(), kf.float(), vf.float(), dof[:, t_idx].float(),
                              delta[:, t_idx], None, s, dka, dva)
    dqf[:, t_idx] = dqt
    dkf += dka
    dvf += dva
