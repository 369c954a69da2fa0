"""MonarchRT attention backward (``steps = 1``, text tokens included) in Triton.

The gradient of ``reference.monarch_rt_reference`` at one step. Natural-log notation (the kernels
work in base 2 like the forward): for query tile a, key row (g, k) and column j the R-step gives
``R = softmax_l(y)``, ``y_l = s q[a,k,j] . K[g,k,l]``, ``AK = sum_l R K``, ``Y = sum_l R V``,
``CL = sum_l R y - lse_R``; the L-step of query (a, i, j) is a softmax over the key rows (logit
``z = s q[a,i,j] . AK[a,g,k,j] - CL[a,g,k,j]``, value ``Y``) and the exact text keys.

Given ``dO`` and ``Delta = dO . out`` per row:

* L-step (per query tile a and column j, over rows i and key rows (g, k)):
  ``dz = L (dO . Y - Delta)``; ``dY = sum_i L dO_i``, ``dAK = s sum_i dz q_i``,
  ``dCL = -sum_i dz``; ``dq[a,i,j] += s sum_(g,k) dz AK``;
* R-step (per (a, g, k, j), a flash-attention backward with two "output gradients"): with
  ``dP_l = dAK . K_l + dY . V_l + dCL y_l`` and ``Dt = dAK . AK + dY . Y + dCL sum_l R y``,
  ``dy_l = R_l (dP_l - Dt)``; ``dq[a,k,j] += s sum_g sum_l dy_l K_l`` (the R-step query is the
  query tile's token at row k: it gathers over every key tile g);
  ``dK[g,k,l] += sum_(a,j) (s dy_l q[a,k,j] + R_l dAK)``, ``dV[g,k,l] += sum_(a,j) R_l dY`` (over
  every query tile a);
* text keys seen by video rows and text query rows: plain softmax backward by batched matmuls
  (``kernels/monarch/backward.dense_rows_backward``).

Query tiles run in the forward's chunks. Per chunk: the forward's R pass is recomputed (with its
log-sum-exp), then

1. ``_rt_l_bwd_dq_kernel``: one program = tile a, column j, a tile of rows i: each row's L-step
   log-sum-exp (kept for the later passes and the text backward) and the L-step ``dq``;
2. ``_rt_l_bwd_dr_kernel``: one program = tile a, column j, a tile of key rows, looping over the
   rows i: ``dY``, ``dAK``, ``dCL`` (written over ``Y``, ``AK``, ``CL``) and ``Dt``;
3. ``_rt_r_bwd_dq_kernel``: one program = tile a, row k, a tile of columns j, looping over the key
   tiles g and their columns: adds the R-step ``dq`` (each program owns its query rows);
4. ``_rt_r_bwd_dkv_kernel``: one program = key row (g, k) and a tile of its columns l, looping
   over the chunk's query tiles and columns j: adds ``dK``, ``dV`` (each program owns its keys;
   chunks run one after another, so no atomics).

KV cache (``cached_frames = F > 0``): as in the forward, the chunks run over the query tiles (the
new frames' tiles, numbered among the key tiles), q / dO / dq rows are the key-sequence index minus
``QOFF = F*H*W``, and the dK / dV pass runs one program per key row of the whole key grid: ``dq``
has q's rows, ``dk`` / ``dv`` k's (a cached key gets its share from every new query tile).

No N x N tensor: the extra memory is the forward's chunk scratch plus fp32 ``[b*h, chunk, b2, key
rows]`` statistics and fp32 gradient accumulators.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..monarch.backward import dense_rows_backward
from ..tuning import interpreting
from .kernel import (_LN2, _LOG2E, _NEG, _Scratch, _geom, _head_pad, _prec, _row_start, check_scratch, l_config,
                     launch_r, pick_r_config, prepare, tiles_per_chunk)

__all__ = ["monarch_rt_backward_triton"]


# ----------------------------------------------------------------------------- L-step backward
@triton.jit
def _rt_l_bwd_dq_kernel(Q, DO, DELTA, AK, CL, Y, TL, LSEL, DQ,
                        sqb, sqh, sqn, sdb, sdh, sdn, sgb, sgh, sgn,
                        H, a0, NA, AG, B1, B2, n_it, N, Hg, Wg, f, hc, wc, nH, nW, tb, QOFF, NT, D, qk_scale,
                        sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr,
                        DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    al = tl.program_id(1)
    pbh = tl.program_id(2)
    it = pid % n_it
    j = pid // n_it
    a = a0 + al
    b = pbh // H
    h = pbh % H
    offs_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < B1
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    qrow = _row_start(a, offs_i, Hg, Wg, f, hc, wc, nH, nW, tb) - QOFF + j       # rows of q (N of them)
    ld = i_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow[:, None] * sqn + offs_d[None, :],
                mask=ld, other=0.0).to(AK.dtype.element_ty)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + qrow[:, None] * sdn + offs_d[None, :],
                 mask=ld, other=0.0).to(AK.dtype.element_ty)
    delta = tl.load(DELTA + pbh.to(tl.int64) * N + qrow, mask=i_ok, other=0.0)
    GK = AG * B1
    base = pbh.to(tl.int64) * NA * B2 + al * B2 + j
    AK = AK + base * GK * D
    Y = Y + base * GK * D
    CL = CL + base * GK
    # pass 1: each row's log2-sum-exp over the key rows and the text keys
    r_m = tl.zeros([BLOCK_I], dtype=tl.float32) + _NEG
    r_l = tl.zeros([BLOCK_I], dtype=tl.float32)
    for g0 in range(0, GK, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_ok = offs_g < GK
        ak = tl.load(AK + offs_g[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        cl = tl.load(CL + offs_g, mask=g_ok, other=0.0)
        z = tl.dot(q, tl.trans(ak), input_precision=DOT_PREC) * qk_scale - cl[None, :]
        z = tl.where(g_ok[None, :], z, _NEG)
        mn = tl.maximum(r_m, tl.max(z, 1))
        r_l = r_l * tl.math.exp2(r_m - mn) + tl.sum(tl.math.exp2(z - mn[:, None]), 1)
        r_m = mn
    trow = base * B1 + offs_i
    if NT > 0:
        tls = tl.load(TL + trow, mask=i_ok, other=0.0)
        mn = tl.maximum(r_m, tls)
        r_l = r_l * tl.math.exp2(r_m - mn) + tl.math.exp2(tls - mn)
        r_m = mn
    lse = r_m + tl.math.log2(r_l)
    tl.store(LSEL + trow, lse, mask=i_ok)
    # pass 2: dz = L (dO . Y - Delta); dq = s sum dz AK
    acc = tl.zeros([BLOCK_I, HEAD_DIM], dtype=tl.float32)
    for g0 in range(0, GK, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_ok = offs_g < GK
        ak = tl.load(AK + offs_g[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(Y + offs_g[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        cl = tl.load(CL + offs_g, mask=g_ok, other=0.0)
        z = tl.dot(q, tl.trans(ak), input_precision=DOT_PREC) * qk_scale - cl[None, :]
        p = tl.where(i_ok[:, None] & g_ok[None, :], tl.math.exp2(z - lse[:, None]), 0.0)
        dl = tl.dot(do, tl.trans(y), input_precision=DOT_PREC)
        dz = p * (dl - delta[:, None])
        acc = tl.dot(dz.to(ak.dtype), ak, acc, input_precision=DOT_PREC)
    tl.store(DQ + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + qrow[:, None] * sgn + offs_d[None, :],
             acc * sm_scale, mask=ld)


@triton.jit
def _rt_l_bwd_dr_kernel(Q, DO, DELTA, AK, CL, Y, LSEL, LSER, DT,
                        sqb, sqh, sqn, sdb, sdh, sdn,
                        H, a0, NA, AG, B1, B2, n_gt, N, Hg, Wg, f, hc, wc, nH, nW, tb, QOFF, D, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr,
                        DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    al = tl.program_id(1)
    pbh = tl.program_id(2)
    gt = pid % n_gt
    j = pid // n_gt
    a = a0 + al
    b = pbh // H
    h = pbh % H
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    GK = AG * B1
    base = pbh.to(tl.int64) * NA * B2 + al * B2 + j
    AK = AK + base * GK * D
    Y = Y + base * GK * D
    CL = CL + base * GK
    LSER = LSER + base * GK
    DT = DT + base * GK
    LSEL = LSEL + base * B1
    offs_g = gt * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = offs_g < GK
    st = g_ok[:, None] & d_ok[None, :]
    ak = tl.load(AK + offs_g[:, None] * D + offs_d[None, :], mask=st, other=0.0)
    y = tl.load(Y + offs_g[:, None] * D + offs_d[None, :], mask=st, other=0.0)
    cl = tl.load(CL + offs_g, mask=g_ok, other=0.0)
    qbase = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    dbase = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    acc_y = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_G], dtype=tl.float32)
    for i0 in range(0, B1, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < B1
        qrow = _row_start(a, offs_i, Hg, Wg, f, hc, wc, nH, nW, tb) - QOFF + j
        ld = i_ok[:, None] & d_ok[None, :]
        q = tl.load(qbase + qrow[:, None] * sqn + offs_d[None, :], mask=ld, other=0.0).to(AK.dtype.element_ty)
        do = tl.load(dbase + qrow[:, None] * sdn + offs_d[None, :], mask=ld, other=0.0).to(AK.dtype.element_ty)
        delta = tl.load(DELTA + pbh.to(tl.int64) * N + qrow, mask=i_ok, other=0.0)
        lse = tl.load(LSEL + offs_i, mask=i_ok, other=0.0)
        z = tl.dot(q, tl.trans(ak), input_precision=DOT_PREC) * qk_scale - cl[None, :]
        p = tl.where(i_ok[:, None] & g_ok[None, :], tl.math.exp2(z - lse[:, None]), 0.0)
        dl = tl.dot(do, tl.trans(y), input_precision=DOT_PREC)
        dz = p * (dl - delta[:, None])
        acc_y = tl.dot(tl.trans(p).to(do.dtype), do, acc_y, input_precision=DOT_PREC)
        acc_a = tl.dot(tl.trans(dz).to(q.dtype), q, acc_a, input_precision=DOT_PREC)
        acc_c -= tl.sum(dz, 0)
    d_ak = acc_a * sm_scale
    # Dt = dAK . AK + dY . Y + dCL * sum_l R y  (natural log: sum_l R y = (CL + lse_R) ln 2)
    ybar = (cl + tl.load(LSER + offs_g, mask=g_ok, other=0.0)) * 0.6931471805599453
    dterm = tl.sum(d_ak * ak.to(tl.float32), 1) + tl.sum(acc_y * y.to(tl.float32), 1) + acc_c * ybar
    tl.store(DT + offs_g, dterm, mask=g_ok)
    # dAK / dY / dCL over AK / Y / CL: this program is the only reader of its entries
    tl.store(AK + offs_g[:, None] * D + offs_d[None, :], d_ak.to(AK.dtype.element_ty), mask=st)
    tl.store(Y + offs_g[:, None] * D + offs_d[None, :], acc_y.to(Y.dtype.element_ty), mask=st)
    tl.store(CL + offs_g, acc_c, mask=g_ok)


# ----------------------------------------------------------------------------- R-step backward
@triton.jit
def _rt_r_bwd_dq_kernel(Q, K, V, DAK, DY, DCL, DT, LSER, DQ,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn,
                        H, a0, NA, AG, B1, B2, n_jt, Hg, Wg, f, hc, wc, nH, nW, tb, QOFF, D, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
                        DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    al = tl.program_id(1)
    pbh = tl.program_id(2)
    jt = pid % n_jt
    kr = pid // n_jt
    a = a0 + al
    b = pbh // H
    h = pbh % H
    offs_j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < B2
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    qrow = _row_start(a, kr, Hg, Wg, f, hc, wc, nH, nW, tb) - QOFF + offs_j
    qld = j_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + qrow[:, None] * sqn + offs_d[None, :],
                mask=qld, other=0.0).to(K.dtype.element_ty)
    kbase = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vbase = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    GK = AG * B1
    s_off = pbh.to(tl.int64) * NA * B2 * GK
    acc = tl.zeros([BLOCK_J, HEAD_DIM], dtype=tl.float32)
    for g in range(0, AG):
        srow = s_off + (al * B2 + offs_j) * GK + g * B1 + kr
        dak = tl.load(DAK + srow[:, None] * D + offs_d[None, :], mask=qld, other=0.0)
        dy = tl.load(DY + srow[:, None] * D + offs_d[None, :], mask=qld, other=0.0)
        dcl = tl.load(DCL + srow, mask=j_ok, other=0.0)
        dt = tl.load(DT + srow, mask=j_ok, other=0.0)
        lse = tl.load(LSER + srow, mask=j_ok, other=0.0)
        krow0 = _row_start(g, kr, Hg, Wg, f, hc, wc, nH, nW, tb)
        for l0 in range(0, B2, BLOCK_L):
            cols = l0 + offs_l
            c_ok = cols < B2
            kld = c_ok[:, None] & d_ok[None, :]
            k = tl.load(kbase + (krow0 + cols)[:, None] * skn + offs_d[None, :], mask=kld, other=0.0)
            v = tl.load(vbase + (krow0 + cols)[:, None] * svn + offs_d[None, :], mask=kld, other=0.0)
            yl = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale     # base-2 logits
            r = tl.where(j_ok[:, None] & c_ok[None, :], tl.math.exp2(yl - lse[:, None]), 0.0)
            dp = tl.dot(dak, tl.trans(k), input_precision=DOT_PREC)
            dp = tl.dot(dy, tl.trans(v), dp, input_precision=DOT_PREC)
            dp += dcl[:, None] * (yl * 0.6931471805599453)
            ds = r * (dp - dt[:, None])
            acc = tl.dot(ds.to(k.dtype), k, acc, input_precision=DOT_PREC)
    dq_ptr = DQ + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + qrow[:, None] * sgn + offs_d[None, :]
    prev = tl.load(dq_ptr, mask=qld, other=0.0)
    tl.store(dq_ptr, prev + acc * sm_scale, mask=qld)


@triton.jit
def _rt_r_bwd_dkv_kernel(Q, K, V, DAK, DY, DCL, DT, LSER, DK, DV,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn,
                         H, a0, NA, n_a, AG, B1, B2, n_lt, Hg, Wg, f, hc, wc, nH, nW, tb, QOFF, D, qk_scale,
                         sm_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    pbh = tl.program_id(1)
    lt = pid % n_lt
    rest = pid // n_lt
    kr = rest % B1
    g = rest // B1
    b = pbh // H
    h = pbh % H
    offs_l = lt * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok = offs_l < B2
    offs_jb = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    krow = _row_start(g, kr, Hg, Wg, f, hc, wc, nH, nW, tb) + offs_l
    kld = c_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + krow[:, None] * skn + offs_d[None, :],
                mask=kld, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + krow[:, None] * svn + offs_d[None, :],
                mask=kld, other=0.0)
    qbase = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    GK = AG * B1
    s_off = pbh.to(tl.int64) * NA * B2 * GK
    acc_k = tl.zeros([BLOCK_L, HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_L, HEAD_DIM], dtype=tl.float32)
    for al in range(0, n_a):          # every query tile of the chunk
        qrow0 = _row_start(a0 + al, kr, Hg, Wg, f, hc, wc, nH, nW, tb) - QOFF
        for j0 in range(0, B2, BLOCK_J):
            offs_j = j0 + offs_jb
            j_ok = offs_j < B2
            qld = j_ok[:, None] & d_ok[None, :]
            q = tl.load(qbase + (qrow0 + offs_j)[:, None] * sqn + offs_d[None, :], mask=qld,
                        other=0.0).to(K.dtype.element_ty)
            srow = s_off + (al * B2 + offs_j) * GK + g * B1 + kr
            dak = tl.load(DAK + srow[:, None] * D + offs_d[None, :], mask=qld, other=0.0)
            dy = tl.load(DY + srow[:, None] * D + offs_d[None, :], mask=qld, other=0.0)
            dcl = tl.load(DCL + srow, mask=j_ok, other=0.0)
            dt = tl.load(DT + srow, mask=j_ok, other=0.0)
            lse = tl.load(LSER + srow, mask=j_ok, other=0.0)
            yl = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale      # [BLOCK_J, BLOCK_L]
            r = tl.where(j_ok[:, None] & c_ok[None, :], tl.math.exp2(yl - lse[:, None]), 0.0)
            dp = tl.dot(dak, tl.trans(k), input_precision=DOT_PREC)
            dp = tl.dot(dy, tl.trans(v), dp, input_precision=DOT_PREC)
            dp += dcl[:, None] * (yl * 0.6931471805599453)
            ds = r * (dp - dt[:, None]) * sm_scale
            acc_k = tl.dot(tl.trans(ds).to(q.dtype), q, acc_k, input_precision=DOT_PREC)
            rc = tl.trans(r).to(dak.dtype)
            acc_k = tl.dot(rc, dak, acc_k, input_precision=DOT_PREC)
            acc_v = tl.dot(rc, dy, acc_v, input_precision=DOT_PREC)
    # earlier chunks' shares are already there: add (this program owns these keys; sg*: dk's strides)
    dk_ptr = DK + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + krow[:, None] * sgn + offs_d[None, :]
    dv_ptr = DV + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + krow[:, None] * sgn + offs_d[None, :]
    tl.store(dk_ptr, tl.load(dk_ptr, mask=kld, other=0.0) + acc_k, mask=kld)
    tl.store(dv_ptr, tl.load(dv_ptr, mask=kld, other=0.0) + acc_v, mask=kld)


# ----------------------------------------------------------------------------- launch
def _bwd_cfg(q, D: int):
    """(BLOCK_J, BLOCK_L, num_warps, num_stages) of the R-step backward passes."""
    if interpreting() or not q.is_cuda:
        return 16, 16, 4, 1
    if q.dtype == torch.float32:
        return 32, 32, 4, 2
    if D <= 64:
        return 64, 64, 4, 2
    if D <= 128:
        return 64, 64, 8, 2
    return 32, 32, 4, 1


def monarch_rt_backward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                               grad_out: torch.Tensor, *, grid, tiling, text_before: int = 0, text_after: int = 0,
                               steps: int = 1, scale: Optional[float] = None, chunk_tiles: Optional[int] = None,
                               cached_frames: int = 0):
    """``(dq, dk, dv)`` of MonarchRT attention at ``steps=1`` (``out`` is the forward's output).

    Same contract as ``monarch_rt_triton`` (``cached_frames``: KV cache); the gradients come back
    contiguous ``[batch, heads, seq, head_dim]`` in q's dtype, dq with q's rows, dk / dv with k's.
    """
    who = "monarch_rt_backward_triton"
    q, k, v, lay, s = prepare(q, k, v, grid, tiling, text_before, text_after, steps, scale, who, cached_frames)
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"{who}: out {tuple(out.shape)} and grad_out {tuple(grad_out.shape)} must have q's shape "
                         f"{tuple(q.shape)}")
    do = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    do = do.to(q.dtype)
    b, h, N, D = q.shape                 # N: q's rows (the new frames' tokens with a KV cache)
    A, A0, B1, B2, NT = lay.n_tiles, lay.n_cached_tiles, lay.b1, lay.b2, lay.n_text
    QOFF = lay.q_offset
    na = chunk_tiles or tiles_per_chunk(lay, A - A0)
    check_scratch(lay, na, D, who)
    dev = q.device
    delta = (do.float() * out.float()).sum(-1).reshape(b * h, N).contiguous()
    dq = torch.zeros(b, h, N, D, dtype=torch.float32, device=dev)
    dk = torch.zeros(b, h, k.shape[2], D, dtype=torch.float32, device=dev)
    dv = torch.zeros_like(dk)
    sc = _Scratch(q, lay, na, lse=True)
    cfg = pick_r_config(q, k, v, lay, sc, s)
    lse_l = torch.empty(b * h, na, B2, B1, dtype=torch.float32, device=dev)
    dt = torch.empty_like(sc.cl)
    lse_seq = torch.empty(b * h, N, dtype=torch.float32, device=dev) if NT else None
    idx = lay.token_index(dev) if NT else None
    prec = _prec(q)
    HD = _head_pad(D)
    qk_scale = s * _LOG2E
    BI, BG, lw = l_config(q, lay)
    n_it = triton.cdiv(B1, BI)
    n_gt = triton.cdiv(A * B1, BG)
    BJ, BL, warps, stages = _bwd_cfg(q, D)
    n_jt = triton.cdiv(B2, BJ)
    n_lt = triton.cdiv(B2, BL)
    geo = _geom(lay)
    qkv_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2))
    for a0 in range(A0, A, na):     # query tiles only (numbered among the key tiles)
        n = min(na, A - a0)
        # 1. recompute the R pass: AK, CL, Y, its log2-sum-exp (+ the text statistics)
        launch_r(cfg, q, k, v, lay, sc, a0, n, s)
        # 2. L-step: row LSEs and dq; then dY, dAK, dCL (over Y, AK, CL) and Dt
        _rt_l_bwd_dq_kernel[(B2 * n_it, n, b * h)](
            q, do, delta, sc.ak, sc.cl, sc.y, sc.tl if NT else sc.cl, lse_l, dq,
            q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            h, a0, na, A, B1, B2, n_it, N, *geo, lay.text_before, QOFF, NT, D, qk_scale, s,
            HEAD_DIM=HD, BLOCK_I=BI, BLOCK_G=BG, DOT_PREC=prec, num_warps=lw, num_stages=1)
        _rt_l_bwd_dr_kernel[(B2 * n_gt, n, b * h)](
            q, do, delta, sc.ak, sc.cl, sc.y, lse_l, sc.lse, dt,
            q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
            h, a0, na, A, B1, B2, n_gt, N, *geo, lay.text_before, QOFF, D, qk_scale, s,
            HEAD_DIM=HD, BLOCK_I=BI, BLOCK_G=BG, DOT_PREC=prec, num_warps=lw, num_stages=1)
        # 3. R-step: dq of the chunk's query rows, then dK / dV of every key row
        _rt_r_bwd_dq_kernel[(n_jt * B1, n, b * h)](
            q, k, v, sc.ak, sc.y, sc.cl, dt, sc.lse, dq, *qkv_strides, dq.stride(0), dq.stride(1), dq.stride(2),
            h, a0, na, A, B1, B2, n_jt, *geo, lay.text_before, QOFF, D, qk_scale, s,
            HEAD_DIM=HD, BLOCK_J=BJ, BLOCK_L=BL, DOT_PREC=prec, num_warps=warps, num_stages=stages)
        _rt_r_bwd_dkv_kernel[(n_lt * B1 * A, b * h)](
            q, k, v, sc.ak, sc.y, sc.cl, dt, sc.lse, dk, dv, *qkv_strides, dk.stride(0), dk.stride(1), dk.stride(2),
            h, a0, na, n, A, B1, B2, n_lt, *geo, lay.text_before, QOFF, D, qk_scale, s,
            HEAD_DIM=HD, BLOCK_J=BJ, BLOCK_L=BL, DOT_PREC=prec, num_warps=warps, num_stages=stages)
        if NT:  # the chunk's video rows' natural L-step LSE, in sequence order (no text with a cache)
            rows = idx[a0:a0 + n].permute(0, 2, 1).reshape(-1)                 # (tile, column, row) order
            lse_seq[:, rows] = lse_l[:, :n].reshape(b * h, -1) * _LN2
    if NT:
        _text_backward(q, k, v, do, delta, lse_seq, lay, s, dq, dk, dv)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def _text_backward(q, k, v, do, delta, lse_seq, lay, s, dq, dk, dv):
    """Text keys seen by the video rows (with each row's L-step LSE) and the text query rows
    (dense over all keys): plain softmax backward by matmuls, added into dq / dk / dv."""
    b, h, N, D = q.shape
    c = b * h
    t_idx = lay.text_index(q.device)
    v_rows = torch.arange(lay.text_before, lay.text_before + lay.Nv, device=q.device)
    qf, kf, vf, dof = (x.reshape(c, N, D) for x in (q, k, v, do))
    dqf, dkf, dvf = (x.view(c, N, D) for x in (dq, dk, dv))
    kt, vt = kf[:, t_idx].float(), vf[:, t_idx].float()
    dkt = torch.zeros_like(kt)
    dvt = torch.zeros_like(vt)
    dqv = dense_rows_backward(qf[:, v_rows].float(), kt, vt, dof[:, v_rows].float(), delta[:, v_rows],
                              lse_seq[:, v_rows], s, dkt, dvt)
    dqf[:, v_rows] += dqv
    dkf[:, t_idx] += dkt
    dvf[:, t_idx] += dvt
    dka = torch.zeros(c, N, D, dtype=torch.float32, device=q.device)
    dva = torch.zeros_like(dka)
    dqt = dense_rows_backward(qf[:, t_idx].float(), kf.float(), vf.float(), dof[:, t_idx].float(),
                              delta[:, t_idx], None, s, dka, dva)
    dqf[:, t_idx] = dqt
    dkf += dka
    dvf += dva
