"""VMoBA block-sparse video attention in Triton (semantics: ``reference.py``).

Two stages, nothing of size N x N anywhere:

1. Selection (:func:`vmoba_select_triton`), small kernels per (batch, head): ``_group_sums``
   (mean query and key sum of each query group; given ``v`` it also copies the video keys and
   values into block order, so that every key block is a contiguous run of rows),
   ``_block_means`` (mean key of each key block), ``_group_scores`` (softmax over key blocks of
   ``scale * qbar . kbar``, G x C floats per head), then the global cut value ``v*`` of the
   threshold / top-k rule, exactly: ``v* = max{v : F(v) >= target}`` where F(v) is the weight
   of the other pairs with probability >= v. ``_cut_search`` finds it with a 16-way search over
   the float bit pattern, which orders like the value for probabilities >= 0 (8 passes over the
   head's G x C entries, one program per head; a torch segmented sort + cumsum measured no
   faster on the GPU and costs ten launches). ``_compact`` then writes each group's selected
   key blocks (own block always, plus the others with ``P >= v*``) as an ascending index list
   ``kv_idx`` with count ``kv_cnt``.
2. Attention (``_vmoba_fwd``): one program per (query tile of a group, batch*head). It loads
   its query rows through the block-order permutation, runs the online softmax of ``flash/kernel.py``
   (fp32 accumulation) over the group's selected key blocks, then the text keys, and scatters
   the normalised rows back to token order. Text query rows (joint attention) attend to all
   keys through the dense flash kernel. With ``pooled_rest`` the program then visits the C
   block-mean keys/values (one pooled key per block, logit + log2 of the block size, the
   group's selected blocks masked), in the same online softmax.

Key/value tiles are read in one of three ways (``kv_mode``): 0 walks each selected block in
``ceil(longest block / BLOCK_N)`` tiles, gathering rows of the original k/v through the
permutation, every tile masked (no copy; the fallback for fp32 and wide heads); 1 and 2 read the
block-order copy through exact per-row tile lists built by ``_tile_lists`` (the full BLOCK_N-row
tiles of every selected block, run without a mask, then each block's partial last tile, masked),
with pointer loads (1) or TMA tensor-descriptor loads (2, Hopper). The tile starts are read
into registers 32 at a time rather than one global load per tile: a load feeding the next
tile's address inside the loop kept the pipeliner from prefetching (H100, Wan 480p at 90 %
sparsity: 1.87 -> 1.55 ms). Programs visit the
(batch*head, group) rows with the most tiles first. The launch configuration is picked once
per (device, dtype, head_dim, grid, chunk, text, batch*heads) by timing candidates.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.kernel import (_LOG2E, _NEG, TensorDescriptor, _bucket, _flash_into, _online_tile, sdpa_text_rows,
                            text_rows_sdpa_into)
from ..out_layout import empty_attention_out
from ..tuning import interpreting, tuning_cache, tuning_enabled
from .groups import _device_layout, _group_pass, _head_pad
from .layout import VMoBALayout, VMoBASelection, _check_args, check_rule

__all__ = ["vmoba_attention_triton", "vmoba_select_triton", "vmoba_attention_with_selection"]


# ----------------------------------------------------------------------------- selection kernels
@triton.jit
def _group_scores(QBAR, KBAR, KEY, W, OWNW, group_block, group_len, G, C, scale,
                  TOPK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (group, batch*head): P = softmax_c(scale * qbar . kbar); writes the rank key
    (float bits of P, -1 for the own block), the weight of every other pair (n_g * P, or 1
    for top-k; 0 for the own block) and the own pair's weight."""
    g = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, BLOCK_C)
    qb = tl.load(QBAR + (bh * G + g) * HEAD_DIM + offs_d)
    kb_base = KBAR + bh * C * HEAD_DIM
    m = tl.full([BLOCK_C], _NEG, tl.float32)
    s = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        ok = cc < C
        kb = tl.load(kb_base + cc[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        lg = tl.where(ok, tl.sum(kb * qb[None, :], 1) * scale, _NEG)
        m_new = tl.maximum(m, lg)
        s = s * tl.exp(m - m_new) + tl.where(ok, tl.exp(lg - m_new), 0.0)
        m = m_new
    m_all = tl.max(m, 0)
    s_all = tl.sum(s * tl.exp(m - m_all), 0)
    own = tl.load(group_block + g)
    n_g = tl.load(group_len + g).to(tl.float32)
    row = (bh * G + g) * C
    own_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        ok = cc < C
        kb = tl.load(kb_base + cc[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        p = tl.exp(tl.sum(kb * qb[None, :], 1) * scale - m_all) / s_all
        is_own = cc == own
        if TOPK:
            w = tl.where(is_own, 0.0, 1.0)
        else:
            w = tl.where(is_own, 0.0, p * n_g)
            own_w += tl.where(is_own & ok, p * n_g, 0.0)
        tl.store(KEY + row + cc, tl.where(is_own, -1, p.to(tl.int32, bitcast=True)), mask=ok)
        tl.store(W + row + cc, w, mask=ok)
    tl.store(OWNW + bh * G + g, tl.sum(own_w, 0))


@triton.jit
def _cut_search(KEY, W, OWNW, CUT, G, C, threshold, n_video, topk_target,
                TOPK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):
    """Per (batch, head): bit pattern of v* = max{v : sum(w[other & P >= v]) >= target}."""
    bh = tl.program_id(0).to(tl.int64)
    E = G * C
    kbase = KEY + bh * E
    wbase = W + bh * E
    offs = tl.arange(0, BLOCK_E)
    j16 = tl.arange(0, 16)
    tot = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        tot += tl.load(wbase + e0 + offs, mask=e0 + offs < E, other=0.0)
    total = tl.sum(tot, 0)
    if TOPK:
        target = topk_target
    else:
        ow = tl.zeros([BLOCK_G], dtype=tl.float32)
        og = tl.arange(0, BLOCK_G)
        for g0 in range(0, G, BLOCK_G):
            ow += tl.load(OWNW + bh * G + g0 + og, mask=g0 + og < G, other=0.0)
        target = threshold * n_video - tl.sum(ow, 0)
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + 0x3F800001  # just above 1.0: F(hi) = 0 < target
    if target <= 0.0:
        result = tl.zeros([], dtype=tl.int32) + 0x7F800000  # +inf: no other pair
    elif total < target:
        result = tl.zeros([], dtype=tl.int32)  # 0: every pair
    else:
        for it in range(8):
            step = tl.maximum((hi - lo + 15) // 16, 1)
            cand = tl.minimum(lo + (j16 + 1) * step, hi)
            acc = tl.zeros([BLOCK_E, 16], dtype=tl.float32)
            for e0 in range(0, E, BLOCK_E):
                ok = e0 + offs < E
                key = tl.load(kbase + e0 + offs, mask=ok, other=-1)
                w = tl.load(wbase + e0 + offs, mask=ok, other=0.0)
                acc += tl.where(key[:, None] >= cand[None, :], w[:, None], 0.0)
            F = tl.sum(acc, 0)
            good = F >= target
            lo = tl.maximum(lo, tl.max(tl.where(good, cand, 0), 0))
            hi = tl.min(tl.where(good, hi, cand), 0)
        result = lo
    tl.store(CUT + bh, result)


@triton.jit
def _compact(KEY, CUT, KV_IDX, KV_CNT, group_block, G, C, BLOCK_C: tl.constexpr):
    """Per (group, batch*head): ascending list of selected blocks (own + key >= cut), -1 after."""
    g = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cut = tl.load(CUT + bh)
    own = tl.load(group_block + g)
    row = (bh * G + g) * C
    offs = tl.arange(0, BLOCK_C)
    cnt = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs
        ok = cc < C
        key = tl.load(KEY + row + cc, mask=ok, other=-1)
        sel = ok & ((key >= cut) | (cc == own))
        si = sel.to(tl.int32)
        pos = cnt + tl.cumsum(si, 0) - si
        tl.store(KV_IDX + row + pos, cc, mask=sel)
        cnt += tl.sum(si, 0)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs
        tl.store(KV_IDX + row + cc, tl.full([BLOCK_C], -1, tl.int32), mask=(cc < C) & (cc >= cnt))
    tl.store(KV_CNT + bh * G + g, cnt)


@triton.jit
def _tile_lists(KV_IDX, KV_CNT, block_off, block_len, FULL, NFULL, TAIL, TLEN, NTAIL, C, MAXT,
                BLOCK_N: tl.constexpr, TPB: tl.constexpr):
    """Per (batch*head, group) row: the key tiles of its selected blocks in block order, as
    start positions of the full BLOCK_N-row tiles (FULL, NFULL of them) and of the partial last
    tile of each block whose length is not a multiple of BLOCK_N (TAIL, TLEN rows; NTAIL)."""
    row = tl.program_id(0).to(tl.int64)
    cnt = tl.load(KV_CNT + row)
    offs = tl.arange(0, TPB)
    nf = tl.zeros([], dtype=tl.int32)
    nt = tl.zeros([], dtype=tl.int32)
    for i in range(0, cnt):
        c = tl.load(KV_IDX + row * C + i)
        off = tl.load(block_off + c)
        ln = tl.load(block_len + c)
        full = ln // BLOCK_N
        tl.store(FULL + row * MAXT + nf + offs, off + offs * BLOCK_N, mask=offs < full)
        nf += full
        rem = ln - full * BLOCK_N
        has = rem > 0
        tl.store(TAIL + row * C + nt, off + full * BLOCK_N, mask=has)
        tl.store(TLEN + row * C + nt, rem, mask=has)
        nt += has.to(tl.int32)
    tl.store(NFULL + row, nf)
    tl.store(NTAIL + row, nt)


@triton.jit
def _kv_tile(kpb, vpb, desc_k, desc_v, b, h, pos, offs_n, offs_d, col_ok, d_ok, spn,
             TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Key/value rows [pos, pos + BLOCK_N) of the block-order copy."""
    if TMA:
        # rows past col_ok belong to the next block (or are TMA zero-fill); the caller masks
        # their logits, so they add nothing (v is finite)
        k = desc_k.load([b, h, pos, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, h, pos, 0]).reshape(BLOCK_N, HEAD_DIM)
    else:
        p = (pos + offs_n).to(tl.int64)
        m = col_ok[:, None] & d_ok[None, :]
        k = tl.load(kpb + p[:, None] * spn + offs_d[None, :], mask=m, other=0.0)
        v = tl.load(vpb + p[:, None] * spn + offs_d[None, :], mask=m, other=0.0)
    return k, v


# ----------------------------------------------------------------------------- attention kernel
@triton.jit(do_not_specialize=["H", "G", "C", "D", "tb", "nv", "N", "TPB", "MAXT"])
def _vmoba_fwd(Q, K, V, KP, VP, O, desc_k, desc_v,
               perm, group_block, group_start, group_len, block_off, QPERM, QBOFF,
               ORDER, KV_OFF, KV_LEN, KV_CNT,
               FULL, NFULL, TAIL, TLEN, NTAIL, KBAR, VBAR, SELM, LOG2N,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
               spb, sph, spn,
               H, G, C, D, tb, nv, N, TPB, MAXT, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               TPG: tl.constexpr, KV_MODE: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_PREC: tl.constexpr, TCH: tl.constexpr, POOLED: tl.constexpr):
    # programs visit the (batch*head, group) rows heaviest first (ORDER: sorted by block count)
    pid = tl.program_id(0)
    row = tl.load(ORDER + pid // TPG)
    bh = row // G
    g = row % G
    b = bh // H
    h = bh % H
    r0 = (pid % TPG) * BLOCK_M
    glen = tl.load(group_len + g)
    if r0 < glen:
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        d_ok = offs_d < D
        row_ok = r0 + offs_m < glen
        # the queries' own block order (the keys' without a KV cache)
        qpos = tl.load(QBOFF + tl.load(group_block + g)) + tl.load(group_start + g) + r0
        qtok = (tl.load(QPERM + qpos + offs_m, mask=row_ok, other=0) + tb).to(tl.int64)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q = tl.load(Q + b64 * sqb + h64 * sqh + qtok[:, None] * sqn + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kb = K + b64 * skb + h64 * skh
        vb = V + b64 * svb + h64 * svh
        kpb = KP + b64 * spb + h64 * sph
        vpb = VP + b64 * spb + h64 * sph
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        w_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if KV_MODE >= 1:  # exact tile lists over the block-order copy: 1 pointer loads, 2 TMA
            rl = row.to(tl.int64)
            n_full = tl.load(NFULL + rl)
            all_ok = offs_n < BLOCK_N
            # tile starts read TCH at a time into registers: no global load inside the
            # tile loop, so the pipeliner can issue the next tiles' loads early
            offs_t = tl.arange(0, TCH)
            for c0 in range(0, n_full, TCH):
                posv = tl.load(FULL + rl * MAXT + c0 + offs_t, mask=c0 + offs_t < n_full,
                               other=0)
                for it in range(0, tl.minimum(TCH, n_full - c0)):
                    pos = tl.sum(tl.where(offs_t == it, posv, 0), 0)
                    k, v = _kv_tile(kpb, vpb, desc_k, desc_v, b, h, pos, offs_n, offs_d,
                                    all_ok, d_ok, spn, KV_MODE == 2, BLOCK_N, HEAD_DIM)
                    acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale,
                                                      all_ok, False, False, DOT_PREC)
            n_tail = tl.load(NTAIL + rl)
            for c0 in range(0, n_tail, TCH):
                tm = c0 + offs_t < n_tail
                posv = tl.load(TAIL + rl * C + c0 + offs_t, mask=tm, other=0)
                lenv = tl.load(TLEN + rl * C + c0 + offs_t, mask=tm, other=0)
                for it in range(0, tl.minimum(TCH, n_tail - c0)):
                    sel_t = offs_t == it
                    pos = tl.sum(tl.where(sel_t, posv, 0), 0)
                    col_ok = offs_n < tl.sum(tl.where(sel_t, lenv, 0), 0)
                    k, v = _kv_tile(kpb, vpb, desc_k, desc_v, b, h, pos, offs_n, offs_d,
                                    col_ok, d_ok, spn, KV_MODE == 2, BLOCK_N, HEAD_DIM)
                    acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale,
                                                      col_ok, True, False, DOT_PREC)
        else:  # 0: walk the selected blocks tile by tile, rows gathered through the permutation
            cnt = tl.load(KV_CNT + row)
            off_base = KV_OFF + row.to(tl.int64) * C
            len_base = KV_LEN + row.to(tl.int64) * C
            for it in range(0, cnt * TPB):
                i = it // TPB  # selected block i starts at position boff of the block order
                boff = tl.load(off_base + i)
                blen = tl.load(len_base + i)
                cols = (it - i * TPB) * BLOCK_N + offs_n
                col_ok = cols < blen
                tok = (tl.load(perm + boff + cols, mask=col_ok, other=0) + tb).to(tl.int64)
                k = tl.load(kb + tok[:, None] * skn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(vb + tok[:, None] * svn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale, col_ok,
                                                  True, False, DOT_PREC)
        # text keys (joint attention): every query attends to all of them
        for t0 in range(0, tb, BLOCK_N):
            cols = t0 + offs_n
            col_ok = cols < tb
            tok = cols.to(tl.int64)
            k = tl.load(kb + tok[:, None] * skn + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(vb + tok[:, None] * svn + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale, col_ok,
                                              True, False, DOT_PREC)
        for t0 in range(tb + nv, N, BLOCK_N):
            cols = t0 + offs_n
            col_ok = cols < N
            tok = cols.to(tl.int64)
            k = tl.load(kb + tok[:, None] * skn + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(vb + tok[:, None] * svn + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale, col_ok,
                                              True, False, DOT_PREC)
        if POOLED:  # the blocks not selected for this group, one pooled key each
            sel_row = SELM + row.to(tl.int64) * C
            kbarb = KBAR + bh.to(tl.int64) * C * HEAD_DIM
            vbarb = VBAR + bh.to(tl.int64) * C * HEAD_DIM
            # not software-pipelined: a few tiles at most, and its buffers would come on top
            # of the main loop's shared memory
            for c0 in tl.range(0, C, BLOCK_N, num_stages=1):
                cols = c0 + offs_n
                in_c = cols < C
                ok = in_c & (tl.load(sel_row + cols, mask=in_c, other=1) == 0)
                kt = tl.load(kbarb + cols[:, None] * HEAD_DIM + offs_d[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0)
                vt = tl.load(vbarb + cols[:, None] * HEAD_DIM + offs_d[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0)
                # base-2 logits with the block's log2(size) added: n_c keys like the mean key
                qk = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
                qk = qk + tl.load(LOG2N + cols, mask=in_c, other=0.0)[None, :]
                qk = tl.where(ok[None, :], qk, _NEG)
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                p = tl.math.exp2(qk - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None], input_precision=DOT_PREC)
                m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + b64 * sob + h64 * soh + qtok[:, None] * son + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- host side
# _cut_search on CUDA: (BLOCK_E, num_warps) candidates, the first is the untuned default; one
# program per head walks its G x C entries 8 times, so wider blocks and more warps keep more
# loads in flight
_CUT_CANDIDATES = [(512, 8), (1024, 16), (2048, 16), (1024, 8)]
_CUT_TUNED = tuning_cache("vmoba_cut")


def _cut_config(launch, E: int, device) -> tuple:
    if not tuning_enabled():
        return _CUT_CANDIDATES[0]
    key = (device.index, _bucket(E))
    hit = _CUT_TUNED.get(key)
    if hit is None:
        best_t = float("inf")
        for cfg in _CUT_CANDIDATES:
            try:
                t = triton.testing.do_bench(lambda: launch(cfg), warmup=3, rep=10,
                                            return_mode="median")
            except Exception:
                continue
            if t < best_t:
                hit, best_t = cfg, t
        hit = hit or _CUT_CANDIDATES[0]
        _CUT_TUNED.put(key, hit)
    return hit


def vmoba_select_triton(q: torch.Tensor, k: torch.Tensor, *, layout: VMoBALayout,
                        threshold: float, topk: int, scale: float,
                        v: Optional[torch.Tensor] = None, copy_kv: bool = True,
                        pooled: bool = False) -> VMoBASelection:
    """Selection with the Triton kernels (arguments already validated; see module docstring).

    Given ``v``, the pass that reads the keys also copies the video keys/values into block
    order (``selection.block_kv``, unless ``copy_kv=False``), which the attention kernel then
    reads contiguously; with ``pooled`` it also keeps the mean key and mean value of every
    block (``selection.block_means``, for the pooled rest)."""
    lay = layout
    B, H, _, D = q.shape
    C, G = lay.num_blocks, lay.num_groups
    dev = q.device
    dl = _device_layout(lay, dev)
    BH = B * H
    kv_cnt = torch.empty(B, H, G, dtype=torch.int32, device=dev)
    kv_idx = torch.empty(B, H, G, C, dtype=torch.int32, device=dev)
    if topk == 0 and threshold >= 1.0:
        kv_idx.copy_(torch.arange(C, dtype=torch.int32, device=dev).expand(B, H, G, C))
        kv_cnt.fill_(C)
        return VMoBASelection(lay, kv_idx, kv_cnt, float(threshold), int(topk))
    copy = v is not None and copy_kv
    pooled = pooled and v is not None
    qbar, kbar, vbar, kp, vp = _group_pass(q, k, v, lay, dl, copy, pooled)
    HD = _head_pad(D)
    f32 = dict(dtype=torch.float32, device=dev)
    key = torch.empty(BH, G, C, dtype=torch.int32, device=dev)
    wgt = torch.empty(BH, G, C, **f32)
    own_w = torch.empty(BH, G, **f32)
    cut = torch.empty(BH, dtype=torch.int32, device=dev)
    interp = interpreting() or not q.is_cuda
    block_c = min(128, max(16, triton.next_power_of_2(C)))
    _group_scores[(G, BH)](qbar, kbar, key, wgt, own_w, dl["group_block"], dl["group_len"], G, C,
                           float(scale), TOPK=topk > 0, HEAD_DIM=HD, BLOCK_C=block_c,
                           num_warps=4)
    topk_target = float((min(topk, C) - 1) * G) if topk > 0 else 0.0
    def cut_launch(cfg):
        _cut_search[(BH,)](key, wgt, own_w, cut, G, C, float(threshold), float(lay.n_query_video),
                           topk_target, TOPK=topk > 0, BLOCK_E=cfg[0], BLOCK_G=256,
                           num_warps=cfg[1])

    cut_launch((256, 4) if interp else _cut_config(cut_launch, G * C, dev))
    _compact[(G, BH)](key, cut, kv_idx, kv_cnt, dl["group_block"], G, C, BLOCK_C=block_c,
                      num_warps=4)
    return VMoBASelection(lay, kv_idx, kv_cnt, float(threshold), int(topk),
                          block_kv=(kp, vp) if copy else None,
                          block_means=(kbar, vbar) if pooled else None)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, kv_mode); where TMA is available the pointer-load
# tile-list mode 1 is not tried (2x slower than mode 2 on H100 at Wan 480p and 16k)
_CUDA_CANDIDATES = [(128, 64, 4, 3, 0), (128, 128, 8, 3, 1), (128, 64, 4, 3, 1),
                    (128, 128, 8, 3, 2), (128, 128, 8, 2, 2), (128, 64, 8, 3, 2),
                    (128, 64, 4, 3, 2), (64, 64, 4, 3, 2)]
_TUNED = tuning_cache("vmoba")
_TCH = 32  # tile starts read into registers per chunk in kv modes 1/2


def _tma_capable(device) -> bool:
    """Tensor-descriptor (TMA) loads available: Hopper or newer, outside the interpreter."""
    if TensorDescriptor is None or interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _desc_ok(t: torch.Tensor) -> bool:
    """``t``'s shape and strides fit a tensor descriptor of our key/value tiles."""
    if TensorDescriptor is None or t.shape[-1] not in (64, 128):
        return False
    return all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def _sparse_plan(sel: VMoBASelection, dl: dict, cfg) -> dict:
    """Per-selection launch data for one launch configuration: the row visiting order (most
    work first) and either, per selected block, its start in block order and its length
    (kv_mode 0) or the exact key-tile lists of every row (kv_mode 1, 2)."""
    BN, mode = cfg[1], cfg[4]
    lay = sel.layout
    dev = sel.kv_cnt.device
    i32 = dict(dtype=torch.int32, device=dev)
    kv_idx, kv_cnt = sel.kv_idx.contiguous(), sel.kv_cnt.contiguous()
    rows, C = kv_cnt.numel(), lay.num_blocks
    if mode >= 1:
        per_block = max(1, lay.max_block_len // BN)  # full tiles of the longest block
        maxt = C * per_block
        plan = dict(full=torch.empty(rows, maxt, **i32), nfull=torch.empty(rows, **i32),
                    tail=torch.empty(rows, C, **i32), tlen=torch.empty(rows, C, **i32),
                    ntail=torch.empty(rows, **i32), maxt=maxt)
        _tile_lists[(rows,)](kv_idx, kv_cnt, dl["block_off"], dl["block_len"], plan["full"],
                             plan["nfull"], plan["tail"], plan["tlen"], plan["ntail"], C, maxt,
                             BLOCK_N=BN, TPB=max(16, triton.next_power_of_2(per_block)),
                             num_warps=1)
        plan["order"] = torch.argsort(plan["nfull"] + plan["ntail"],
                                      descending=True).to(torch.int32)
        plan["kv_off"] = plan["kv_len"] = plan["nfull"]  # unused placeholders
        return plan
    idx = kv_idx.long().clamp_min(0)
    z = torch.zeros(1, **i32)  # placeholders for the tile-list arguments
    return dict(kv_off=dl["block_off"][idx].contiguous(), kv_len=dl["block_len"][idx].contiguous(),
                order=torch.argsort(kv_cnt.reshape(-1), descending=True).to(torch.int32),
                full=z, nfull=z, tail=z, tlen=z, ntail=z, maxt=1)


def _block_order_kv(k, v, sel: VMoBASelection, dl: dict):
    """(k, v) video rows in block order: the selection's copy if it made one, else a gather."""
    if sel.block_kv is not None:
        kp, vp = sel.block_kv
        if kp.shape[:2] == k.shape[:2] and kp.dtype == k.dtype and vp.dtype == v.dtype \
                and kp.device == k.device:
            return kp, vp
    perm = dl["perm"].long() + sel.layout.text_before
    return k.index_select(2, perm), v.index_select(2, perm)


def _pooled_args(q, k, v, sel: VMoBASelection) -> tuple:
    """Kernel inputs of the pooled rest: block-mean keys and values ``[B*H, C, padded D]`` in
    the dtypes of q and v (averaged in float32: by the selection when it kept them, else by the
    selection's group pass run again), the selection as an int8 ``[B*H*G, C]`` mask, and
    ``log2(block size)`` per block."""
    lay = sel.layout
    B, H, _, D = k.shape
    C, HD = lay.num_blocks, _head_pad(D)
    dl = _device_layout(lay, q.device)
    if sel.block_means is not None and sel.block_means[0].shape == (B * H, C, HD) \
            and sel.block_means[0].device == q.device:
        kbar, vbar = sel.block_means
    else:
        _, kbar, vbar, _, _ = _group_pass(q, k, v, lay, dl, False, True)
    kbar, vbar = kbar.to(q.dtype), vbar.to(v.dtype)
    selm = sel.mask().to(torch.int8).contiguous()
    return kbar, vbar, selm, dl["log2n"]


def _launch_sparse(cfg, q, k, v, out, sel: VMoBASelection, scale: float, kvp=None, plan=None,
                   pooled=None):
    BM, BN, warps, stages, mode = cfg
    lay = sel.layout
    B, H, _, D = q.shape
    N = k.shape[2]  # keys: the text key ranges (more than the queries with a KV cache)
    dl = _device_layout(lay, q.device)
    HD = _head_pad(D)
    tb, nv = lay.text_before, lay.n_video
    if mode >= 1:
        kp, vp = kvp if kvp is not None else _block_order_kv(k, v, sel, dl)
    else:
        kp, vp = k, v
    if mode == 2 and not (_desc_ok(kp) and _desc_ok(vp)):
        mode = 1  # same tile lists, pointer loads
    if mode == 2:
        dk = TensorDescriptor(kp, list(kp.shape), list(kp.stride()), [1, 1, BN, HD])
        dv = TensorDescriptor(vp, list(vp.shape), list(vp.stride()), [1, 1, BN, HD])
    else:
        dk = dv = kp  # unused placeholders
    if plan is None:
        plan = _sparse_plan(sel, dl, cfg)
    tpb = triton.cdiv(lay.max_block_len, BN)
    tpg = triton.cdiv(int(lay.group_len.max()), BM)  # query tiles per group
    grid = (lay.num_groups * tpg * B * H,)
    kbar, vbar, selm, log2n = pooled if pooled is not None else (q,) * 4  # placeholders
    _vmoba_fwd[grid](q, k, v, kp, vp, out, dk, dv,
                     dl["perm"], dl["group_block"], dl["group_start"], dl["group_len"],
                     dl["block_off"], dl["qperm"], dl["qblock_off"], plan["order"], plan["kv_off"], plan["kv_len"],
                     sel.kv_cnt,
                     plan["full"], plan["nfull"], plan["tail"], plan["tlen"], plan["ntail"],
                     kbar, vbar, selm, log2n,
                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                     out.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
                     H, lay.num_groups, lay.num_blocks, D, tb, nv, N, tpb, plan["maxt"],
                     scale * _LOG2E,
                     HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, TPG=tpg, KV_MODE=mode,
                     EVEN_D=(HD == D), DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                     TCH=_TCH, POOLED=pooled is not None, num_warps=warps, num_stages=stages)


def _config_key(q, lay, pooled: bool = False):
    return (q.device.index, q.dtype, q.shape[-1], lay.grid, lay.chunk, lay.text_before,
            lay.text_after, _bucket(q.shape[0] * q.shape[1]), pooled, lay.cached_frames)


def _fixed_config(q) -> Optional[tuple]:
    """The configuration used without tuning, or None where tuning decides."""
    if _TUNED.forced is not None:  # tuning.force_config("vmoba", ...)
        return _TUNED.forced
    if interpreting() or not q.is_cuda:
        return (32, 16, 4, 1, 1)
    if q.shape[-1] > 128 or q.dtype == torch.float32:
        return (64, 32, 4, 2, 0)
    return None


_UNTUNED = (64, 64, 4, 2, 1)  # without tuning: exact tile lists, plain loads, any CUDA device
_UNTUNED_TMA = (128, 128, 8, 3, 2)  # ... TMA loads where the device and strides allow them


def _known_config(q, lay, pooled: bool = False) -> Optional[tuple]:
    """The configuration a launch will use, if known before selecting (None: to be tuned)."""
    fixed = _fixed_config(q)
    if fixed is not None:
        return fixed
    hit = _TUNED.get(_config_key(q, lay, pooled))
    if hit is not None:
        return hit
    if tuning_enabled():
        return None
    return _UNTUNED_TMA if q.shape[-1] in (64, 128) and _tma_capable(q.device) else _UNTUNED


def _pick_config(q, k, v, out, sel, scale, pooled=None):
    """The launch config: fixed, already tuned, or timed now (with the pooled rest if given)."""
    lay = sel.layout
    known = _known_config(q, lay, pooled is not None)
    if known is not None:
        return known
    key = _config_key(q, lay, pooled is not None)
    tma = _tma_capable(q.device) and q.shape[-1] in (64, 128)  # the block-order copy is dense
    best, best_t = None, float("inf")
    dl = _device_layout(lay, q.device)
    perm = dl["perm"].long() + lay.text_before
    kvp = (k.index_select(2, perm), v.index_select(2, perm))
    # the block-order copy is made by the selection pass (a fused extra write of k and v):
    # charge the block-order modes about half a separate gather
    t_copy = 0.5 * triton.testing.do_bench(
        lambda: (k.index_select(2, perm), v.index_select(2, perm)), warmup=2, rep=10,
        return_mode="median")
    for cfg in _CUDA_CANDIDATES:
        if (cfg[4] == 2 and not tma) or (cfg[4] == 1 and tma):
            continue
        try:
            plan = _sparse_plan(sel, dl, cfg)
            t = triton.testing.do_bench(lambda: _launch_sparse(cfg, q, k, v, out, sel, scale, kvp,
                                                                       plan, pooled),
                                        warmup=5, rep=20, return_mode="median")
            if cfg[4] >= 1:  # the tile lists are built per call
                t += triton.testing.do_bench(lambda: _sparse_plan(sel, dl, cfg), warmup=2,
                                             rep=10, return_mode="median")
        except Exception:
            continue
        if cfg[4] >= 1:
            t += t_copy
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("vmoba_attention_triton: no launch configuration compiled on this "
                           "device; set VMONARCH_FORCE_REFERENCE=1 to use the reference")
    _TUNED.put(key, best)
    return best


def vmoba_attention_with_selection(q, k, v, selection: VMoBASelection, scale: float,
                                   out: Optional[torch.Tensor] = None,
                                   pooled_rest: bool = False) -> torch.Tensor:
    """Block-sparse attention over an existing selection (text rows/columns dense); with
    ``pooled_rest`` the unselected blocks join as pooled keys (``reference.py``). A token-rule
    selection runs the kernels of ``token.py``."""
    if selection.row_sel is not None:
        from .token import token_attention_with_selection
        return token_attention_with_selection(q, k, v, selection, scale, out=out, pooled_rest=pooled_rest)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lay = selection.layout
    if out is None:
        out = empty_attention_out(q)
    pooled = _pooled_args(q, k, v, selection) if pooled_rest else None
    cfg = _pick_config(q, k, v, out, selection, scale, pooled)
    _launch_sparse(cfg, q, k, v, out, selection, scale, pooled=pooled)
    tb, nv = lay.text_before, lay.n_video
    if (tb or lay.text_after) and sdpa_text_rows(q):  # (never with a KV cache: no text there)
        text_rows_sdpa_into(q, k, v, out, tb, nv, scale)
        return out
    if tb:
        _flash_into(q[:, :, :tb], k, v, out[:, :, :tb], scale)
    if lay.text_after:
        _flash_into(q[:, :, tb + nv:], k, v, out[:, :, tb + nv:], scale)
    return out


def vmoba_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, chunk,
                           text_before: int = 0, text_after: int = 0, partition: str = "3d",
                           threshold: float = 0.25, topk: int = 0,
                           scale: Optional[float] = None, pooled_rest: bool = False,
                           selection: str = "group", scope: Optional[str] = None,
                           cached_frames: int = 0) -> torch.Tensor:
    """VMoBA attention with the Triton kernels; same contract as ``vmoba_attention_reference``
    (``cached_frames``: the KV-cache form, queries = the last frames of the key grid)."""
    s, lay, threshold, topk = _check_args(q, k, v, grid, chunk, text_before, text_after,
                                          partition, threshold, topk, scale,
                                          "vmoba_attention_triton", cached_frames)
    selection, scope = check_rule(selection, scope, "vmoba_attention_triton")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"vmoba_attention_triton: dtype {q.dtype} unsupported; use float16, "
                         f"bfloat16 or float32")
    if q.shape[-1] > 256:
        raise ValueError(f"vmoba_attention_triton: head_dim {q.shape[-1]} > 256 is unsupported")
    if topk == 0 and threshold >= 1.0:
        # every block selected: exactly dense attention, run by the dense flash kernel
        from ..flash.kernel import flash_attention_triton
        return flash_attention_triton(q, k, v, scale=s)
    if selection == "token":
        from .token import token_attention_with_selection, vmoba_select_token_triton
        sel = vmoba_select_token_triton(q, k, layout=lay, threshold=threshold, topk=topk, scope=scope, v=v,
                                        pooled=pooled_rest)
        return token_attention_with_selection(q, k, v, sel, s, pooled_rest=pooled_rest)
    # the selection pass also copies k/v into block order unless the kernel will gather
    cfg = _known_config(q, lay, pooled_rest)
    copy = cfg is None or cfg[4] >= 1
    sel = vmoba_select_triton(q, k, layout=lay, threshold=threshold, topk=topk, scale=s,
                              v=v if copy or pooled_rest else None, copy_kv=copy,
                              pooled=pooled_rest)
    return vmoba_attention_with_selection(q, k, v, sel, s, pooled_rest=pooled_rest)
