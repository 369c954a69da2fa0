"""VMoBA block-sparse video attention in Triton (semantics: ``vmoba_reference.py``).

Two stages, nothing of size N x N anywhere:

1. Selection (:func:`vmoba_select_triton`), four small kernels per (batch, head):
   ``_group_mean_q`` (mean query of each query group), ``_block_mean_k`` (mean key of each key
   block), ``_group_probs`` (softmax over key blocks of ``scale * qbar . kbar``, G x C floats
   per head) and ``_cut_search``, which finds the global cut value ``v*`` of the threshold /
   top-k rule exactly: the probabilities are >= 0, so their float bit patterns are ordered
   like the values and ``v* = max{v : F(v) >= target}`` is found by a 16-way search over the
   bit pattern (8 passes over the head's G x C probabilities, 16 candidate cuts per pass).
   ``_compact`` then writes each group's selected key blocks (own block always, plus the
   others with ``P >= v*``) as an ascending index list ``kv_idx`` with count ``kv_cnt``.
2. Attention (``_vmoba_fwd``): one program per (query tile of a group, batch*head). It loads
   its query rows through the block-order permutation, walks the group's selected key blocks
   tile by tile (a flat loop over ``kv_cnt * tiles_per_block`` iterations, block tails and
   short edge blocks masked), then the text keys, with the online softmax of ``flash.py``
   (fp32 accumulation), and scatters the normalised rows back to token order. Text query rows
   (joint attention) attend to all keys through the dense flash kernel.

Key/value tiles are read in one of four ways (``kv_mode``): 0 gathers rows of the original
k/v through the permutation; 1 first copies the video keys/values into block order (one
gather pass) and then reads contiguous rows; 2 is 1 with TMA tensor-descriptor loads (Hopper);
3 is 2 with the group's selected-block list held in registers, so that no memory load sits
between the loop counter and the tile address (deeper software pipelining). Programs visit
the (batch*head, group) rows with the most selected blocks first. The launch configuration is
picked once per (device, dtype, head_dim, grid, chunk, text, batch*heads) by timing candidates.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .flash import _LOG2E, _NEG, TensorDescriptor, _flash_into, _online_tile, interpreting
from .tuning import tuning_enabled
from .vmoba_reference import (QUERY_GROUP, VMoBALayout, VMoBASelection, _check_args)

__all__ = ["vmoba_attention_triton", "vmoba_select_triton", "vmoba_attention_with_selection"]


# ----------------------------------------------------------------------------- selection kernels
@triton.jit
def _group_sums(Q, K, QBAR, KSUM, perm, block_off, group_block, group_start, group_len,
                sqb, sqh, sqn, skb, skh, skn, H, G, D, tb,
                HEAD_DIM: tl.constexpr, QG: tl.constexpr):
    """Per (query group, batch*head): mean query and sum of keys over the group's tokens."""
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    c = tl.load(group_block + g)
    n = tl.load(group_len + g)
    start = tl.load(block_off + c) + tl.load(group_start + g)
    offs = tl.arange(0, QG)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs < n
    msk = ok[:, None] & (offs_d[None, :] < D)
    tok = (tl.load(perm + start + offs, mask=ok, other=0) + tb).to(tl.int64)
    x = tl.load(Q + b * sqb + h * sqh + tok[:, None] * sqn + offs_d[None, :], mask=msk, other=0.0)
    y = tl.load(K + b * skb + h * skh + tok[:, None] * skn + offs_d[None, :], mask=msk, other=0.0)
    dst = (bh.to(tl.int64) * G + g) * HEAD_DIM + offs_d
    tl.store(QBAR + dst, tl.sum(x.to(tl.float32), 0) / n.to(tl.float32))
    tl.store(KSUM + dst, tl.sum(y.to(tl.float32), 0))


@triton.jit
def _block_means(KSUM, KBAR, block_len, block_g0, block_gn, G, C, HEAD_DIM: tl.constexpr):
    """Per (key block, batch*head): mean key = sum of the block's group key sums / block size."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    g0 = tl.load(block_g0 + c)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for i in range(0, tl.load(block_gn + c)):
        acc += tl.load(KSUM + (bh * G + g0 + i) * HEAD_DIM + offs_d)
    tl.store(KBAR + (bh * C + c) * HEAD_DIM + offs_d, acc / tl.load(block_len + c).to(tl.float32))


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


# ----------------------------------------------------------------------------- attention kernel
@triton.jit(do_not_specialize=["H", "G", "C", "D", "tb", "nv", "N", "TPB"])
def _vmoba_fwd(Q, K, V, KP, VP, O, desc_k, desc_v,
               perm, group_block, group_start, group_len, block_off, ORDER, KV_OFF, KV_LEN, KV_CNT,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
               spb, sph, spn,
               H, G, C, D, tb, nv, N, TPB, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               TPG: tl.constexpr, KV_MODE: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_PREC: tl.constexpr, PRELOAD_C: tl.constexpr):
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
        qpos = tl.load(block_off + tl.load(group_block + g)) + tl.load(group_start + g) + r0
        qtok = (tl.load(perm + qpos + offs_m, mask=row_ok, other=0) + tb).to(tl.int64)
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
        cnt = tl.load(KV_CNT + row)
        n_iter = cnt * TPB
        off_base = KV_OFF + row.to(tl.int64) * C
        len_base = KV_LEN + row.to(tl.int64) * C
        if PRELOAD_C > 0:  # the group's block list in registers: no load feeds the tile address
            offs_c = tl.arange(0, PRELOAD_C)
            off_vec = tl.load(off_base + offs_c, mask=offs_c < cnt, other=0)
            len_vec = tl.load(len_base + offs_c, mask=offs_c < cnt, other=0)
        for it in range(0, n_iter):
            # selected block it // TPB starts at position boff of the block order; tile it % TPB
            i = it // TPB
            if PRELOAD_C > 0:
                pick = offs_c == i
                boff = tl.sum(tl.where(pick, off_vec, 0), 0)
                blen = tl.sum(tl.where(pick, len_vec, 0), 0)
            else:
                boff = tl.load(off_base + i)
                blen = tl.load(len_base + i)
            j0 = (it - i * TPB) * BLOCK_N
            cols = j0 + offs_n
            col_ok = cols < blen
            if KV_MODE == 0:
                tok = (tl.load(perm + boff + cols, mask=col_ok, other=0) + tb).to(tl.int64)
                k = tl.load(kb + tok[:, None] * skn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(vb + tok[:, None] * svn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            elif KV_MODE == 1:
                pos = (boff + cols).to(tl.int64)
                k = tl.load(kpb + pos[:, None] * spn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(vpb + pos[:, None] * spn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            else:  # 2, 3: TMA (3 = mode 2 with the block list preloaded)
                # rows past the block's end belong to the next block (or are TMA zero-fill):
                # their p is exactly 0, so they add nothing (v is finite)
                k = desc_k.load([b, h, boff + j0, 0]).reshape(BLOCK_N, HEAD_DIM)
                v = desc_v.load([b, h, boff + j0, 0]).reshape(BLOCK_N, HEAD_DIM)
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
        out = acc / l_i[:, None]
        tl.store(O + b64 * sob + h64 * soh + qtok[:, None] * son + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- host side
_DEV_LAYOUT: dict = {}


def _device_layout(lay: VMoBALayout, device) -> dict:
    key = (id(lay), str(device))
    hit = _DEV_LAYOUT.get(key)
    if hit is not None and hit["layout"] is lay:
        return hit
    i32 = dict(dtype=torch.int32, device=device)
    d = dict(layout=lay, perm=lay.perm.to(**i32), block_off=lay.block_off.to(**i32),
             block_len=lay.block_len.to(**i32), group_block=lay.group_block.to(**i32),
             group_start=lay.group_start.to(**i32), group_len=lay.group_len.to(**i32))
    gn = torch.bincount(lay.group_block, minlength=lay.num_blocks)
    d["block_g0"] = (torch.cumsum(gn, 0) - gn).to(**i32)  # groups of block c: [g0, g0 + gn)
    d["block_gn"] = gn.to(**i32)
    if len(_DEV_LAYOUT) > 64:
        _DEV_LAYOUT.clear()
    _DEV_LAYOUT[key] = d
    return d


def _head_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def vmoba_select_triton(q: torch.Tensor, k: torch.Tensor, *, layout: VMoBALayout,
                        threshold: float, topk: int, scale: float) -> VMoBASelection:
    """Selection with the Triton kernels (arguments already validated; see module docstring)."""
    lay = layout
    B, H, N, D = q.shape
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
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    HD = _head_pad(D)
    f32 = dict(dtype=torch.float32, device=dev)
    qbar = torch.empty(BH, G, HD, **f32)
    ksum = torch.empty(BH, G, HD, **f32)
    kbar = torch.empty(BH, C, HD, **f32)
    key = torch.empty(BH, G, C, dtype=torch.int32, device=dev)
    wgt = torch.empty(BH, G, C, **f32)
    own_w = torch.empty(BH, G, **f32)
    cut = torch.empty(BH, dtype=torch.int32, device=dev)
    interp = interpreting() or not q.is_cuda
    _group_sums[(G, BH)](q, k, qbar, ksum, dl["perm"], dl["block_off"], dl["group_block"],
                         dl["group_start"], dl["group_len"], q.stride(0), q.stride(1), q.stride(2),
                         k.stride(0), k.stride(1), k.stride(2), H, G, D, lay.text_before,
                         HEAD_DIM=HD, QG=QUERY_GROUP, num_warps=4)
    _block_means[(C, BH)](ksum, kbar, dl["block_len"], dl["block_g0"], dl["block_gn"], G, C,
                          HEAD_DIM=HD, num_warps=1 if interp else 2)
    block_c = min(128, max(16, triton.next_power_of_2(C)))
    _group_scores[(G, BH)](qbar, kbar, key, wgt, own_w, dl["group_block"], dl["group_len"], G, C,
                           float(scale), TOPK=topk > 0, HEAD_DIM=HD, BLOCK_C=block_c,
                           num_warps=4)
    topk_target = float((min(topk, C) - 1) * G) if topk > 0 else 0.0
    _cut_search[(BH,)](key, wgt, own_w, cut, G, C, float(threshold), float(lay.n_video),
                       topk_target, TOPK=topk > 0, BLOCK_E=256 if interp else 512,
                       BLOCK_G=256, num_warps=4 if interp else 8)
    _compact[(G, BH)](key, cut, kv_idx, kv_cnt, dl["group_block"], G, C, BLOCK_C=block_c,
                      num_warps=4)
    return VMoBASelection(lay, kv_idx, kv_cnt, float(threshold), int(topk))


# (BLOCK_M, BLOCK_N, num_warps, num_stages, kv_mode)
_CUDA_CANDIDATES = [(128, 64, 4, 3, 0), (128, 128, 8, 3, 1),
                    (128, 128, 8, 3, 2), (128, 128, 8, 5, 2), (128, 64, 8, 5, 2),
                    (128, 128, 8, 3, 3), (128, 128, 8, 2, 3), (128, 64, 8, 4, 3)]
_MAX_PRELOAD = 256  # mode 3 keeps up to this many block offsets per group in registers
_TUNED: dict = {}
_FORCED: Optional[tuple] = None  # benchmarks/tests may pin a config (tuple as above)


def _tma_ok(t: torch.Tensor) -> bool:
    if TensorDescriptor is None or interpreting() or not t.is_cuda:
        return False
    if torch.cuda.get_device_capability(t.device)[0] < 9 or t.shape[-1] not in (64, 128):
        return False
    return all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def _sparse_plan(sel: VMoBASelection, dl: dict):
    """Per-selection launch data: row visiting order (most selected blocks first) and, for
    every selected block, its start position in block order and its length."""
    idx = sel.kv_idx.long().clamp_min(0)
    kv_off = dl["block_off"][idx].contiguous()
    kv_len = dl["block_len"][idx].contiguous()
    order = torch.argsort(sel.kv_cnt.reshape(-1), descending=True).to(torch.int32)
    return order, kv_off, kv_len


def _launch_sparse(cfg, q, k, v, out, sel: VMoBASelection, scale: float, kvp=None, plan=None):
    BM, BN, warps, stages, mode = cfg
    lay = sel.layout
    B, H, N, D = q.shape
    dl = _device_layout(lay, q.device)
    HD = _head_pad(D)
    tb, nv = lay.text_before, lay.n_video
    if mode in (1, 2, 3):
        if kvp is None:
            perm = dl["perm"].long() + tb
            kvp = (k.index_select(2, perm), v.index_select(2, perm))
        kp, vp = kvp
    else:
        kp, vp = k, v
    if mode in (2, 3):
        dk = TensorDescriptor(kp, list(kp.shape), list(kp.stride()), [1, 1, BN, HD])
        dv = TensorDescriptor(vp, list(vp.shape), list(vp.stride()), [1, 1, BN, HD])
    else:
        dk = dv = kp  # unused placeholders
    order, kv_off, kv_len = plan if plan is not None else _sparse_plan(sel, dl)
    tpb = triton.cdiv(lay.max_block_len, BN)
    tpg = triton.cdiv(int(lay.group_len.max()), BM)  # query tiles per group
    preload = max(16, triton.next_power_of_2(lay.num_blocks)) if mode == 3 else 0
    grid = (lay.num_groups * tpg * B * H,)
    _vmoba_fwd[grid](q, k, v, kp, vp, out, dk, dv,
                     dl["perm"], dl["group_block"], dl["group_start"], dl["group_len"],
                     dl["block_off"], order, kv_off, kv_len, sel.kv_cnt,
                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                     out.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
                     H, lay.num_groups, lay.num_blocks, D, tb, nv, N, tpb, scale * _LOG2E,
                     HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, TPG=tpg, KV_MODE=mode,
                     EVEN_D=(HD == D), DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                     PRELOAD_C=preload, num_warps=warps, num_stages=stages)


def _bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pick_config(q, k, v, out, sel, scale):
    if _FORCED is not None:
        return _FORCED
    if interpreting() or not q.is_cuda:
        return (32, 16, 4, 1, 0)
    D = q.shape[-1]
    if D > 128 or q.dtype == torch.float32:
        return (64, 32, 4, 2, 0)
    lay = sel.layout
    key = (q.device.index, q.dtype, D, lay.grid, lay.chunk, lay.text_before, lay.text_after,
           _bucket(q.shape[0] * q.shape[1]))
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    if not tuning_enabled():
        return (64, 32, 4, 2, 0)  # the fp32 / wide-head config: small tiles, plain loads, any CUDA device
    tma = _tma_ok(k) and _tma_ok(v)
    best, best_t = None, float("inf")
    dl = _device_layout(lay, q.device)
    perm = dl["perm"].long() + lay.text_before
    kvp = (k.index_select(2, perm), v.index_select(2, perm))
    plan = _sparse_plan(sel, dl)
    for cfg in _CUDA_CANDIDATES:
        if cfg[4] >= 2 and not tma:
            continue
        if cfg[4] == 3 and lay.num_blocks > _MAX_PRELOAD:
            continue
        try:
            t = triton.testing.do_bench(lambda: _launch_sparse(cfg, q, k, v, out, sel, scale, kvp,
                                                                       plan),
                                        warmup=5, rep=20, return_mode="median")
        except Exception:
            continue
        if cfg[4] in (1, 2, 3):  # the permutation copy is part of the cost
            t += triton.testing.do_bench(lambda: (k.index_select(2, perm), v.index_select(2, perm)),
                                         warmup=2, rep=10, return_mode="median")
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("vmoba_attention_triton: no launch configuration compiled on this "
                           "device; set VMONARCH_FORCE_REFERENCE=1 to use the reference")
    _TUNED[key] = best
    return best


def vmoba_attention_with_selection(q, k, v, selection: VMoBASelection, scale: float,
                                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-sparse attention over an existing selection (text rows/columns dense)."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lay = selection.layout
    if out is None:
        out = torch.empty_like(q)
    cfg = _pick_config(q, k, v, out, selection, scale)
    _launch_sparse(cfg, q, k, v, out, selection, scale,
                   plan=_sparse_plan(selection, _device_layout(lay, q.device)))
    tb, nv = lay.text_before, lay.n_video
    if tb:
        _flash_into(q[:, :, :tb], k, v, out[:, :, :tb], scale)
    if lay.text_after:
        _flash_into(q[:, :, tb + nv:], k, v, out[:, :, tb + nv:], scale)
    return out


def vmoba_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, chunk,
                           text_before: int = 0, text_after: int = 0, partition: str = "3d",
                           threshold: float = 0.25, topk: int = 0,
                           scale: Optional[float] = None) -> torch.Tensor:
    """VMoBA attention with the Triton kernels; same contract as ``vmoba_attention_reference``."""
    s, lay, threshold, topk = _check_args(q, k, v, grid, chunk, text_before, text_after,
                                          partition, threshold, topk, scale,
                                          "vmoba_attention_triton")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"vmoba_attention_triton: dtype {q.dtype} unsupported; use float16, "
                         f"bfloat16 or float32")
    if q.shape[-1] > 256:
        raise ValueError(f"vmoba_attention_triton: head_dim {q.shape[-1]} > 256 is unsupported")
    if topk == 0 and threshold >= 1.0:
        # every block selected: exactly dense attention, run by the dense flash kernel
        from .flash import flash_attention_triton
        return flash_attention_triton(q, k, v, scale=s)
    sel = vmoba_select_triton(q, k, layout=lay, threshold=threshold, topk=topk, scale=s)
    return vmoba_attention_with_selection(q, k, v, sel, s)
