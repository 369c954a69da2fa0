"""VMoBA block-sparse attention backward in Triton (the gradients of ``kernel.py``'s forward).

The block selection is a constant of the backward, as in VMoBA training: it is recomputed from
q and k by the forward's own selection kernels (deterministic: same inputs, same selection), so
the forward stores nothing. What the forward computes per video query row ``i`` (``reference.py``)
is one softmax over its exact keys (the tokens of its group's selected blocks and all text keys)
and, with ``pooled_rest``, one pooled key per unselected block ``c`` (key ``kbar_c``, logit
``scale * q . kbar_c + log n_c``, value ``vbar_c``). Text query rows are dense over all keys.
With ``P`` that softmax, ``delta_i = dO_i . O_i`` and ``dS = P * (dO V^T - delta)``:

* ``dq_i = scale * (sum_j dS_ij k_j + sum_c dS_ic kbar_c)``;
* ``dk_j = scale * sum_i dS_ij q_i`` over the queries that attend ``j`` exactly, plus, for a video
  key of block ``c``, ``(scale * sum_i dS_ic q_i) / n_c`` from the pooled key (``kbar_c`` is the
  block's mean key; the sum runs over the video queries whose group did not select ``c``);
* ``dv_j = sum_i P_ij dO_i`` likewise, plus ``(sum_i P_ic dO_i) / n_c``.

Kernels (nothing of size N x N; P recomputed tile by tile from the row logsumexp):

1. ``_vmoba_bwd_dq`` (query-major, one program per query tile of a (batch*head, group) row, the
   rows with most selected blocks first): pass 1 recomputes the row's base-2 logsumexp over its
   selected blocks, the text keys and the pooled keys (QK^T only) and ``delta``, and stores both
   per token (float32 ``[B*H, N]``); pass 2 accumulates dQ. Text query rows: ``flash/backward.py``'s
   dQ pass on their row ranges (same buffers).
2. ``_vmoba_bwd_pooled`` (with ``pooled_rest``): per tile of pooled keys and slice of query groups,
   the pooled keys' dK/dV sums over the queries that did not select the block; the slices are
   added by one torch sum (no atomics).
3. ``_vmoba_bwd_dkdv`` (key-major, one program per key tile of a (batch*head, block)): walks the
   *transposed* selection, the query groups that selected the block (a CSR list built with torch
   ops from the selection, ``[B*H, C, G]`` int32), then the text query rows, accumulating dK/dV in
   registers; adds the block's pooled share and writes each key row once. Text key rows:
   ``flash/backward.py``'s dK/dV pass over all query rows.

Rows are addressed through the block-order permutation (``perm``), as the forward's gather path
does; nothing is copied into block order. Memory besides the gradients: ``lse``/``delta`` (8 bytes
per token and head), the transposed selection and, with the pooled rest, ``[splits, B*H, C, D]``
float32 partial sums.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.backward import (_dkdv_tile, _dq_tile, _lse_tile, bwd_dkdv_keys, bwd_dq_rows,
                              flash_attention_backward_triton, unit_last)
from ..flash.kernel import _LOG2E, _NEG, _bucket
from ..out_layout import empty_attention_out
from ..tuning import interpreting, tuning_cache, tuning_enabled
from .groups import _device_layout, _group_pass, _head_pad
from .kernel import vmoba_select_triton
from .layout import VMoBASelection, _check_args, check_rule

__all__ = ["vmoba_attention_backward_triton", "vmoba_backward_with_selection", "transposed_selection"]


# ----------------------------------------------------------------------------- dQ (video rows)
# Row loads are written out inline: under TRITON_INTERPRET=1 every call of a jitted helper costs
# about a millisecond, which the CPU test suite pays per tile.
@triton.jit(do_not_specialize=["H", "G", "C", "D", "tb", "nv", "N", "NQ"])
def _vmoba_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA,
                  perm, group_block, group_start, group_len, block_off, block_len, QPERM, QBOFF,
                  ORDER, KV_IDX, KV_CNT, KBAR, VBAR, SELM, LOG2N,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn,
                  sgb, sgh, sgn,
                  H, G, C, D, tb, nv, N, NQ, qk_scale, sm_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  TPG: tl.constexpr, DOT_PREC: tl.constexpr, POOLED: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(ORDER + pid // TPG)  # batch*head*G + group, most selected blocks first
    bh = row // G
    g = row % G
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    r0 = (pid % TPG) * BLOCK_M
    glen = tl.load(group_len + g)
    if r0 < glen:
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        d_ok = offs_d < D
        row_ok = r0 + offs_m < glen
        rm = row_ok[:, None] & d_ok[None, :]
        qpos = tl.load(QBOFF + tl.load(group_block + g)) + tl.load(group_start + g) + r0
        qtok = (tl.load(QPERM + qpos + offs_m, mask=row_ok, other=0) + tb).to(tl.int64)
        q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
        o = tl.load(O + b * sob + h * soh + qtok[:, None] * son + offs_d[None, :], mask=rm, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        kb = K + b * skb + h * skh
        vb = V + b * svb + h * svh
        cnt = tl.load(KV_CNT + row)
        kvrow = KV_IDX + row.to(tl.int64) * C
        sel_row = SELM + row.to(tl.int64) * C
        kbarb = KBAR + bh.to(tl.int64) * C * HEAD_DIM
        vbarb = VBAR + bh.to(tl.int64) * C * HEAD_DIM
        # ---- pass 1: the row logsumexp over everything the row attends (QK^T only)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i in range(0, cnt):  # the group's selected blocks
            c = tl.load(kvrow + i)
            boff = tl.load(block_off + c)
            blen = tl.load(block_len + c)
            for n0 in range(0, blen, BLOCK_N):
                col_ok = n0 + offs_n < blen
                ktok = (tl.load(perm + boff + n0 + offs_n, mask=col_ok, other=0) + tb).to(tl.int64)
                k = tl.load(kb + ktok[:, None] * skn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                m_i, l_i = _lse_tile(q, k, m_i, l_i, qk_scale, col_ok, True, DOT_PREC)
        for t0 in range(0, tb, BLOCK_N):  # text keys before the video
            col_ok = t0 + offs_n < tb
            ktok = (t0 + offs_n).to(tl.int64)
            k = tl.load(kb + ktok[:, None] * skn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            m_i, l_i = _lse_tile(q, k, m_i, l_i, qk_scale, col_ok, True, DOT_PREC)
        for t0 in range(tb + nv, N, BLOCK_N):  # and after it
            col_ok = t0 + offs_n < N
            ktok = (t0 + offs_n).to(tl.int64)
            k = tl.load(kb + ktok[:, None] * skn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            m_i, l_i = _lse_tile(q, k, m_i, l_i, qk_scale, col_ok, True, DOT_PREC)
        if POOLED:  # one pooled key per block not selected for this group
            for c0 in range(0, C, BLOCK_N):
                cols = c0 + offs_n
                in_c = cols < C
                ok = in_c & (tl.load(sel_row + cols, mask=in_c, other=1) == 0)
                kt = tl.load(kbarb + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
                s = s + tl.load(LOG2N + cols, mask=in_c, other=0.0)[None, :]
                s = tl.where(ok[None, :], s, _NEG)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
                m_i = m_new
        lse2 = m_i + tl.math.log2(l_i)
        st = bh.to(tl.int64) * NQ + qtok
        tl.store(LSE + st, lse2, mask=row_ok)
        tl.store(DELTA + st, delta, mask=row_ok)
        # ---- pass 2: dQ
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for i in range(0, cnt):
            c = tl.load(kvrow + i)
            boff = tl.load(block_off + c)
            blen = tl.load(block_len + c)
            for n0 in range(0, blen, BLOCK_N):
                col_ok = n0 + offs_n < blen
                cm = col_ok[:, None] & d_ok[None, :]
                ktok = (tl.load(perm + boff + n0 + offs_n, mask=col_ok, other=0) + tb).to(tl.int64)
                k = tl.load(kb + ktok[:, None] * skn + offs_d[None, :], mask=cm, other=0.0)
                v = tl.load(vb + ktok[:, None] * svn + offs_d[None, :], mask=cm, other=0.0)
                dq = _dq_tile(q, do, k, v, dq, lse2, delta, qk_scale, col_ok, True, DOT_PREC)
        for t0 in range(0, tb, BLOCK_N):
            col_ok = t0 + offs_n < tb
            cm = col_ok[:, None] & d_ok[None, :]
            ktok = (t0 + offs_n).to(tl.int64)
            k = tl.load(kb + ktok[:, None] * skn + offs_d[None, :], mask=cm, other=0.0)
            v = tl.load(vb + ktok[:, None] * svn + offs_d[None, :], mask=cm, other=0.0)
            dq = _dq_tile(q, do, k, v, dq, lse2, delta, qk_scale, col_ok, True, DOT_PREC)
        for t0 in range(tb + nv, N, BLOCK_N):
            col_ok = t0 + offs_n < N
            cm = col_ok[:, None] & d_ok[None, :]
            ktok = (t0 + offs_n).to(tl.int64)
            k = tl.load(kb + ktok[:, None] * skn + offs_d[None, :], mask=cm, other=0.0)
            v = tl.load(vb + ktok[:, None] * svn + offs_d[None, :], mask=cm, other=0.0)
            dq = _dq_tile(q, do, k, v, dq, lse2, delta, qk_scale, col_ok, True, DOT_PREC)
        if POOLED:
            for c0 in range(0, C, BLOCK_N):
                cols = c0 + offs_n
                in_c = cols < C
                ok = in_c & (tl.load(sel_row + cols, mask=in_c, other=1) == 0)
                kt = tl.load(kbarb + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
                vt = tl.load(vbarb + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
                s = s + tl.load(LOG2N + cols, mask=in_c, other=0.0)[None, :]
                p = tl.where(ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
                ds = p * (dp - delta[:, None])
                dq = tl.dot(ds.to(kt.dtype), kt, dq, input_precision=DOT_PREC)
        tl.store(DQ + b * sgb + h * sgh + qtok[:, None] * sgn + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=rm)


# ----------------------------------------------------------------------------- pooled keys' dK/dV
@triton.jit(do_not_specialize=["H", "G", "C", "D", "tb", "N", "GPS", "BH"])
def _vmoba_bwd_pooled(Q, DO, LSE, DELTA, KBAR, VBAR, SELM, LOG2N, PART_K, PART_V,
                      perm, group_block, group_start, group_len, block_off,
                      sqb, sqh, sqn, sdb, sdh, sdn,
                      H, G, C, D, tb, N, GPS, BH, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    """Unscaled sums ``sum_i dS_ic q_i`` and ``sum_i P_ic dO_i`` of pooled keys ``c`` (one tile)
    over the video query groups ``[split * GPS, +GPS)`` that did not select ``c``."""
    pid_c = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    cols = pid_c * BLOCK_P + tl.arange(0, BLOCK_P)
    in_c = cols < C
    mb = bh.to(tl.int64) * C * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    kt = tl.load(KBAR + mb, mask=in_c[:, None], other=0.0)
    vt = tl.load(VBAR + mb, mask=in_c[:, None], other=0.0)
    log2n = tl.load(LOG2N + cols, mask=in_c, other=0.0)
    dkb = tl.zeros([BLOCK_P, HEAD_DIM], dtype=tl.float32)
    dvb = tl.zeros([BLOCK_P, HEAD_DIM], dtype=tl.float32)
    qb = Q + b * sqb + h * sqh
    dob = DO + b * sdb + h * sdh
    g0 = split * GPS
    g1 = tl.minimum(G, g0 + GPS)
    for g in range(g0, g1):
        row = bh.to(tl.int64) * G + g
        ok = in_c & (tl.load(SELM + row * C + cols, mask=in_c, other=1) == 0)
        if tl.max(ok.to(tl.int32), 0) > 0:  # some block of the tile is pooled for this group
            gpos = tl.load(block_off + tl.load(group_block + g)) + tl.load(group_start + g)
            glen = tl.load(group_len + g)
            for r0 in range(0, glen, BLOCK_M):
                row_ok = r0 + offs_m < glen
                rm = row_ok[:, None] & d_ok[None, :]
                qtok = (tl.load(perm + gpos + r0 + offs_m, mask=row_ok, other=0) + tb).to(tl.int64)
                q = tl.load(qb + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
                do = tl.load(dob + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
                st = bh.to(tl.int64) * N + qtok
                lse2 = tl.load(LSE + st, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + st, mask=row_ok, other=0.0)
                s_t = tl.dot(kt, tl.trans(q), input_precision=DOT_PREC) * qk_scale + log2n[:, None]
                p_t = tl.where(ok[:, None] & row_ok[None, :], tl.math.exp2(s_t - lse2[None, :]), 0.0)
                dvb = tl.dot(p_t.to(do.dtype), do, dvb, input_precision=DOT_PREC)
                dp_t = tl.dot(vt, tl.trans(do), input_precision=DOT_PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dkb = tl.dot(ds_t.to(q.dtype), q, dkb, input_precision=DOT_PREC)
    dst = ((split * BH + bh).to(tl.int64) * C + cols)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(PART_K + dst, dkb, mask=in_c[:, None])
    tl.store(PART_V + dst, dvb, mask=in_c[:, None])


# ----------------------------------------------------------------------------- dK/dV (video keys)
@triton.jit(do_not_specialize=["H", "G", "C", "D", "tb", "nv", "N"])
def _vmoba_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                    perm, group_block, group_start, group_len, block_off, block_len, QPERM, QBOFF,
                    ORDER, Q_IDX, Q_CNT, DKBAR, DVBAR,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                    skgb, skgh, skgn, svgb, svgh, svgn,
                    H, G, C, D, tb, nv, N, qk_scale, sm_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    TPB: tl.constexpr, DOT_PREC: tl.constexpr, POOLED: tl.constexpr):
    # nv, N: the video and all query rows (LSE/DELTA rows, text query ranges); keys via perm
    pid = tl.program_id(0)
    rowc = tl.load(ORDER + pid // TPB)  # batch*head*C + block, most selecting groups first
    bh = rowc // C
    c = rowc % C
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    n0 = (pid % TPB) * BLOCK_N
    blen = tl.load(block_len + c)
    if n0 < blen:
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        d_ok = offs_d < D
        col_ok = n0 + offs_n < blen
        cm = col_ok[:, None] & d_ok[None, :]
        ktok = (tl.load(perm + tl.load(block_off + c) + n0 + offs_n, mask=col_ok, other=0) + tb).to(tl.int64)
        k = tl.load(K + b * skb + h * skh + ktok[:, None] * skn + offs_d[None, :], mask=cm, other=0.0)
        v = tl.load(V + b * svb + h * svh + ktok[:, None] * svn + offs_d[None, :], mask=cm, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        qb = Q + b * sqb + h * sqh
        dob = DO + b * sdb + h * sdh
        stb = LSE + bh.to(tl.int64) * N
        dtb = DELTA + bh.to(tl.int64) * N
        qn = tl.load(Q_CNT + rowc)
        qrow = Q_IDX + rowc.to(tl.int64) * G
        for i in range(0, qn):  # the query groups that selected this block
            g = tl.load(qrow + i)
            gpos = tl.load(QBOFF + tl.load(group_block + g)) + tl.load(group_start + g)
            glen = tl.load(group_len + g)
            for r0 in range(0, glen, BLOCK_M):
                row_ok = r0 + offs_m < glen
                rm = row_ok[:, None] & d_ok[None, :]
                qtok = (tl.load(QPERM + gpos + r0 + offs_m, mask=row_ok, other=0) + tb).to(tl.int64)
                q = tl.load(qb + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
                do = tl.load(dob + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
                lse2 = tl.load(stb + qtok, mask=row_ok, other=0.0)
                delta = tl.load(dtb + qtok, mask=row_ok, other=0.0)
                dk, dv = _dkdv_tile(k, v, q, do, dk, dv, lse2, delta, qk_scale, row_ok, DOT_PREC)
        for r0 in range(0, tb, BLOCK_M):  # text query rows (before the video) attend every key
            row_ok = r0 + offs_m < tb
            rm = row_ok[:, None] & d_ok[None, :]
            qtok = (r0 + offs_m).to(tl.int64)
            q = tl.load(qb + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
            do = tl.load(dob + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
            lse2 = tl.load(stb + qtok, mask=row_ok, other=0.0)
            delta = tl.load(dtb + qtok, mask=row_ok, other=0.0)
            dk, dv = _dkdv_tile(k, v, q, do, dk, dv, lse2, delta, qk_scale, row_ok, DOT_PREC)
        for r0 in range(tb + nv, N, BLOCK_M):  # and after it
            row_ok = r0 + offs_m < N
            rm = row_ok[:, None] & d_ok[None, :]
            qtok = (r0 + offs_m).to(tl.int64)
            q = tl.load(qb + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
            do = tl.load(dob + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
            lse2 = tl.load(stb + qtok, mask=row_ok, other=0.0)
            delta = tl.load(dtb + qtok, mask=row_ok, other=0.0)
            dk, dv = _dkdv_tile(k, v, q, do, dk, dv, lse2, delta, qk_scale, row_ok, DOT_PREC)
        if POOLED:  # the block's pooled key, shared equally by its n_c keys (already / n_c)
            pb = rowc.to(tl.int64) * HEAD_DIM + offs_d
            dk += tl.load(DKBAR + pb)[None, :]
            dv += tl.load(DVBAR + pb)[None, :]
        tl.store(DK + b * skgb + h * skgh + ktok[:, None] * skgn + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=cm)
        tl.store(DV + b * svgb + h * svgh + ktok[:, None] * svgn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=cm)


# ----------------------------------------------------------------------------- host side
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head_dim; query groups hold at
# most 128 tokens, so BLOCK_M <= 128. The dK/dV and pooled kernels keep two [BLOCK_N, D] float32
# accumulators in registers for their whole loop: fewer key rows for wide heads.
_CANDIDATES = {
    "dq": {64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
           128: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
           256: [(64, 32, 8, 1), (32, 32, 4, 1)]},
    "dkdv": {64: [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3)],
             128: [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
             256: [(32, 64, 8, 1), (32, 32, 4, 1)]},
    "pooled": {64: [(64, 64, 4, 2), (64, 32, 4, 2)],
               128: [(64, 64, 4, 2), (64, 32, 4, 2)],
               256: [(32, 32, 4, 1), (32, 16, 4, 1)]},
}
_FP32 = {"dq": [(64, 32, 4, 2)], "dkdv": [(32, 64, 4, 2)], "pooled": [(32, 32, 4, 2)]}
_INTERP = {"dq": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "pooled": (16, 16, 4, 1)}
_TUNED = {kind: tuning_cache(f"vmoba_bwd_{kind}") for kind in _CANDIDATES}


def _config(kind: str, q, lay, pooled: bool, launch) -> tuple:
    """Launch config of backward kernel ``kind``: forced (``force_config("vmoba_bwd_<kind>")``),
    interpreter, cached, untuned default, or timed now (the kernels only write their outputs)."""
    cache = _TUNED[kind]
    if cache.forced is not None:
        return cache.forced
    if interpreting() or not q.is_cuda:
        return _INTERP[kind]
    if q.dtype == torch.float32:
        return _FP32[kind][0]
    HD = _head_pad(q.shape[-1])
    cands = _CANDIDATES[kind][64 if HD <= 64 else 128 if HD <= 128 else 256]
    key = (q.device.index, q.dtype, q.shape[-1], lay.grid, lay.chunk, lay.partition,
           lay.text_before, lay.text_after, _bucket(q.shape[0] * q.shape[1]), pooled)
    hit = cache.get(key)
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
        raise RuntimeError("vmoba backward: no launch configuration compiled on this device; set "
                           "VMONARCH_FORCE_REFERENCE=1 to use the reference backward")
    cache.put(key, best)
    return best


def transposed_selection(sel: VMoBASelection) -> tuple:
    """``(q_idx, q_cnt)``: for every (batch*head, key block) the query groups that selected it,
    ascending in the first ``q_cnt`` entries of ``q_idx [B*H, C, G]`` (int32, -1 after) — the
    CSR transpose of ``kv_idx``, by a cumsum and a scatter (no sort, no host sync)."""
    B, H, G, C = sel.kv_idx.shape
    m = sel.mask().reshape(B * H, G, C).transpose(1, 2)  # [BH, C, G]
    q_cnt = m.sum(-1, dtype=torch.int32)
    pos = torch.cumsum(m.to(torch.int32), -1) - 1
    idx = torch.where(m, pos, torch.full_like(pos, G)).long()
    gid = torch.arange(G, dtype=torch.int32, device=m.device).expand(B * H, C, G)
    q_idx = torch.full((B * H, C, G + 1), -1, dtype=torch.int32, device=m.device)
    q_idx.scatter_(2, idx, gid)  # unselected entries all land in the dropped column G
    return q_idx[..., :G].contiguous(), q_cnt.contiguous()


def _pooled_means(q, k, v, sel: VMoBASelection, dl: dict) -> tuple:
    """Mean key / value per block (float32 ``[B*H, C, padded D]``), as the forward used them."""
    B, H, _, D = k.shape
    C, HD = sel.layout.num_blocks, _head_pad(D)
    if sel.block_means is not None and sel.block_means[0].shape == (B * H, C, HD) \
            and sel.block_means[0].device == q.device:
        return sel.block_means
    _, kbar, vbar, _, _ = _group_pass(q, k, v, sel.layout, dl, False, True)
    return kbar, vbar


def _pooled_split(q, bh: int, ctiles: int, G: int) -> int:
    """Slices of query groups per pooled-key tile: enough programs to fill the GPU."""
    if interpreting() or not q.is_cuda:
        return min(G, 2)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(G, -(-4 * sms // max(1, bh * ctiles))))


def vmoba_backward_with_selection(q, k, v, out, grad_out, selection: VMoBASelection, scale: float,
                                  pooled_rest: bool = False):
    """``(dq, dk, dv)`` of ``vmoba_attention_with_selection(q, k, v, selection, scale,
    pooled_rest)`` (the selection held constant), given its output and the output gradient. A
    token-rule selection runs the backward of ``token.py``."""
    if selection.row_sel is not None:
        from .token import token_backward_with_selection
        return token_backward_with_selection(q, k, v, out, grad_out, selection, scale, pooled_rest=pooled_rest)
    lay = selection.layout
    B, H, N, D = q.shape  # N: query rows (the keys are k.shape[2]: more with a KV cache)
    NK = k.shape[2]
    dq, dk, dv = empty_attention_out(q), empty_attention_out(k), empty_attention_out(v)
    q, k, v, out, grad_out = unit_last(q, k, v, out.to(q.dtype), grad_out.to(q.dtype))
    dev = q.device
    dl = _device_layout(lay, dev)
    BH, C, G, HD = B * H, lay.num_blocks, lay.num_groups, _head_pad(D)
    tb, nv, ta, nq = lay.text_before, lay.n_video, lay.text_after, lay.n_query_video
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    lse2 = torch.empty(BH, N, dtype=torch.float32, device=dev)
    delta = torch.empty(BH, N, dtype=torch.float32, device=dev)
    kv_idx, kv_cnt = selection.kv_idx.contiguous(), selection.kv_cnt.contiguous()
    if pooled_rest:
        kbar32, vbar32 = _pooled_means(q, k, v, selection, dl)
        kbar, vbar = kbar32.to(q.dtype).contiguous(), vbar32.to(v.dtype).contiguous()
        selm = selection.mask().to(torch.int8).contiguous()
        log2n = dl["log2n"]
    else:
        kbar = vbar = selm = log2n = q  # placeholders, not read
    qk_scale = scale * _LOG2E
    common = (dl["perm"], dl["group_block"], dl["group_start"], dl["group_len"], dl["block_off"])

    # 1. dQ, lse and delta of the video rows (query-major), then of the text rows
    order_q = torch.argsort(kv_cnt.reshape(-1), descending=True).to(torch.int32)
    gmax = int(lay.group_len.max())

    def launch_dq(cfg):
        BM, BN, warps, stages = cfg
        tpg = triton.cdiv(gmax, BM)
        _vmoba_bwd_dq[(G * tpg * BH,)](
            q, k, v, out, grad_out, dq, lse2, delta, *common, dl["block_len"], dl["qperm"], dl["qblock_off"],
            order_q, kv_idx, kv_cnt, kbar, vbar, selm, log2n,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            H, G, C, D, tb, nv, NK, N, qk_scale, scale,
            HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, TPG=tpg, DOT_PREC=prec, POOLED=pooled_rest,
            num_warps=warps, num_stages=stages)

    launch_dq(_config("dq", q, lay, pooled_rest, launch_dq))
    bwd_dq_rows(q, k, v, out, grad_out, dq, lse2, delta, 0, tb, scale)  # (no text with a KV cache)
    bwd_dq_rows(q, k, v, out, grad_out, dq, lse2, delta, tb + nv, ta, scale)

    # 2. the pooled keys' gradient sums, per block and already divided by its size
    dkbar = dvbar = q  # placeholders
    if pooled_rest:
        def launch_pooled(cfg):
            BM, BP, warps, stages = cfg
            ctiles = triton.cdiv(C, BP)
            split = _pooled_split(q, BH, ctiles, G)
            part_k = torch.empty(split, BH, C, HD, dtype=torch.float32, device=dev)
            part_v = torch.empty(split, BH, C, HD, dtype=torch.float32, device=dev)
            _vmoba_bwd_pooled[(ctiles, BH, split)](  # (it reads queries only: their block order)
                q, grad_out, lse2, delta, kbar, vbar, selm, log2n, part_k, part_v, dl["qperm"],
                dl["group_block"], dl["group_start"], dl["group_len"], dl["qblock_off"],
                q.stride(0), q.stride(1), q.stride(2),
                grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                H, G, C, D, tb, N, triton.cdiv(G, split), BH, qk_scale,
                HEAD_DIM=HD, BLOCK_M=BM, BLOCK_P=BP, DOT_PREC=prec,
                num_warps=warps, num_stages=stages)
            return part_k, part_v

        part_k, part_v = launch_pooled(_config("pooled", q, lay, True, launch_pooled))
        inv_n = (1.0 / lay.block_len.to(dev, torch.float32))[None, :, None]
        dkbar = (part_k.sum(0) * inv_n).contiguous()
        dvbar = (part_v.sum(0) * inv_n).contiguous()

    # 3. dK/dV of the video keys (key-major over the transposed selection), then of the text keys
    q_idx, q_cnt = transposed_selection(selection)
    order_k = torch.argsort(q_cnt.reshape(-1), descending=True).to(torch.int32)

    def launch_dkdv(cfg):
        BM, BN, warps, stages = cfg
        tpb = triton.cdiv(lay.max_block_len, BN)
        _vmoba_bwd_dkdv[(C * tpb * BH,)](
            q, k, v, grad_out, dk, dv, lse2, delta, *common, dl["block_len"], dl["qperm"], dl["qblock_off"],
            order_k, q_idx, q_cnt, dkbar, dvbar,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            H, G, C, D, tb, nq, N, qk_scale, scale,
            HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, TPB=tpb, DOT_PREC=prec, POOLED=pooled_rest,
            num_warps=warps, num_stages=stages)

    launch_dkdv(_config("dkdv", q, lay, pooled_rest, launch_dkdv))
    bwd_dkdv_keys(q, k, v, grad_out, dk, dv, lse2, delta, 0, tb, scale)
    bwd_dkdv_keys(q, k, v, grad_out, dk, dv, lse2, delta, tb + nv, ta, scale)
    return dq, dk, dv


def vmoba_attention_backward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    out: torch.Tensor, grad_out: torch.Tensor, *, grid, chunk,
                                    text_before: int = 0, text_after: int = 0,
                                    partition: str = "3d", threshold: float = 0.25, topk: int = 0,
                                    scale: Optional[float] = None, pooled_rest: bool = False,
                                    selection: str = "group", scope: Optional[str] = None,
                                    cached_frames: int = 0):
    """``(dq, dk, dv)`` of ``vmoba_attention_triton`` with the same arguments, given its output
    ``out`` and the output gradient; the selection is recomputed by the same kernels."""
    s, lay, threshold, topk = _check_args(q, k, v, grid, chunk, text_before, text_after,
                                          partition, threshold, topk, scale,
                                          "vmoba_attention_backward_triton", cached_frames)
    selection, scope = check_rule(selection, scope, "vmoba_attention_backward_triton")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"vmoba_attention_backward_triton: dtype {q.dtype} unsupported; use "
                         f"float16, bfloat16 or float32")
    if q.shape[-1] > 256:
        raise ValueError(f"vmoba_attention_backward_triton: head_dim {q.shape[-1]} > 256 is "
                         f"unsupported")
    for name, t in (("out", out), ("grad_out", grad_out)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"vmoba_attention_backward_triton: {name} has shape {tuple(t.shape)}, "
                             f"expected {tuple(q.shape)} (the forward's output)")
    if topk == 0 and threshold >= 1.0:  # every block selected: the forward ran dense attention
        return flash_attention_backward_triton(q, k, v, out, grad_out, scale=s)
    if selection == "token":
        from .token import token_backward_with_selection, vmoba_select_token_triton
        sel = vmoba_select_token_triton(q, k, layout=lay, threshold=threshold, topk=topk, scope=scope, v=v,
                                        pooled=pooled_rest)
        return token_backward_with_selection(q, k, v, out, grad_out, sel, s, pooled_rest=pooled_rest)
    sel = vmoba_select_triton(q, k, layout=lay, threshold=threshold, topk=topk, scale=s,
                              v=v if pooled_rest else None, copy_kv=False, pooled=pooled_rest)
    return vmoba_backward_with_selection(q, k, v, out, grad_out, sel, s, pooled_rest=pooled_rest)
