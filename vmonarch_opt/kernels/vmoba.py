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

Key/value tiles are read in one of three ways (``kv_mode``): 0 gathers rows of the original
k/v through the permutation; 1 first copies the video keys/values into block order (one
gather pass) and then reads contiguous rows; 2 is 1 with TMA tensor-descriptor loads (Hopper).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .flash import _LOG2E, _NEG, TensorDescriptor, _flash_into, _online_tile, interpreting
from .vmoba_reference import (QUERY_GROUP, VMoBALayout, VMoBASelection, _check_args)

__all__ = ["vmoba_attention_triton", "vmoba_select_triton", "vmoba_attention_with_selection"]


# ----------------------------------------------------------------------------- selection kernels
@triton.jit
def _group_mean_q(Q, QBAR, perm, block_off, group_block, group_start, group_len,
                  sqb, sqh, sqn, H, G, D, tb,
                  HEAD_DIM: tl.constexpr, QG: tl.constexpr):
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    c = tl.load(group_block + g)
    n = tl.load(group_len + g)
    start = tl.load(block_off + c) + tl.load(group_start + g)
    offs = tl.arange(0, QG)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs < n
    tok = (tl.load(perm + start + offs, mask=ok, other=0) + tb).to(tl.int64)
    base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    x = tl.load(base + tok[:, None] * sqn + offs_d[None, :],
                mask=ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    tl.store(QBAR + (bh.to(tl.int64) * G + g) * HEAD_DIM + offs_d, tl.sum(x, 0) / n.to(tl.float32))


@triton.jit
def _block_mean_k(K, KBAR, perm, block_off, block_len, skb, skh, skn, H, C, D, tb,
                  HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = tl.load(block_off + c)
    n = tl.load(block_len + c)
    offs = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in range(0, n, ROWS):
        ok = r0 + offs < n
        tok = (tl.load(perm + start + r0 + offs, mask=ok, other=0) + tb).to(tl.int64)
        x = tl.load(base + tok[:, None] * skn + offs_d[None, :],
                    mask=ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x, 0)
    tl.store(KBAR + (bh.to(tl.int64) * C + c) * HEAD_DIM + offs_d, acc / n.to(tl.float32))


@triton.jit
def _group_probs(QBAR, KBAR, P, G, C, scale, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
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
    p_base = P + (bh * G + g) * C
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        ok = cc < C
        kb = tl.load(kb_base + cc[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        lg = tl.sum(kb * qb[None, :], 1) * scale
        tl.store(p_base + cc, tl.exp(lg - m_all) / s_all, mask=ok)


@triton.jit
def _cut_search(P, CUT, group_block, group_len, G, C, threshold, n_video, topk_target,
                TOPK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per (batch, head): bit pattern of v* = max{v : sum(w[other & P >= v]) >= target}."""
    bh = tl.program_id(0).to(tl.int64)
    base = P + bh * G * C
    E = G * C
    offs = tl.arange(0, BLOCK_E)
    j16 = tl.arange(0, 16)
    # pass 0: weight of the own pairs (threshold mode) and of all other pairs
    own_w = tl.zeros([BLOCK_E], dtype=tl.float32)
    oth_w = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + offs
        ok = e < E
        g = e // C
        p = tl.load(base + e, mask=ok, other=0.0)
        own = (e % C) == tl.load(group_block + g, mask=ok, other=-1)
        if TOPK:
            w = tl.where(ok, 1.0, 0.0)
        else:
            w = p * tl.load(group_len + g, mask=ok, other=0).to(tl.float32)
        own_w += tl.where(ok & own, w, 0.0)
        oth_w += tl.where(ok & ~own, w, 0.0)
    if TOPK:
        target = topk_target
    else:
        target = threshold * n_video - tl.sum(own_w, 0)
    total = tl.sum(oth_w, 0)
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
            F = tl.zeros([16], dtype=tl.float32)
            for e0 in range(0, E, BLOCK_E):
                e = e0 + offs
                ok = e < E
                g = e // C
                p = tl.load(base + e, mask=ok, other=0.0)
                own = (e % C) == tl.load(group_block + g, mask=ok, other=-1)
                if TOPK:
                    w = tl.where(ok, 1.0, 0.0)
                else:
                    w = p * tl.load(group_len + g, mask=ok, other=0).to(tl.float32)
                bits = p.to(tl.int32, bitcast=True)
                hit = (bits[:, None] >= cand[None, :]) & (ok & ~own)[:, None]
                F += tl.sum(tl.where(hit, w[:, None], 0.0), 0)
            good = F >= target
            lo = tl.maximum(lo, tl.max(tl.where(good, cand, 0), 0))
            hi = tl.min(tl.where(good, hi, cand), 0)
        result = lo
    tl.store(CUT + bh, result)


@triton.jit
def _compact(P, CUT, KV_IDX, KV_CNT, group_block, G, C, BLOCK_C: tl.constexpr):
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
        bits = tl.load(P + row + cc, mask=ok, other=0.0).to(tl.int32, bitcast=True)
        sel = ok & ((bits >= cut) | (cc == own))
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
               perm, block_off, block_len, group_block, group_start, group_len, KV_IDX, KV_CNT,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
               spb, sph, spn,
               H, G, C, D, tb, nv, N, TPB, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               TPG: tl.constexpr, KV_MODE: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = pid // TPG
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
        row = (bh.to(tl.int64) * G + g)
        n_iter = tl.load(KV_CNT + row) * TPB
        idx_base = KV_IDX + row * C
        for it in range(0, n_iter):
            c = tl.load(idx_base + it // TPB)
            cols = (it % TPB) * BLOCK_N + offs_n
            boff = tl.load(block_off + c)
            col_ok = cols < tl.load(block_len + c)
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
            else:
                start = boff + (it % TPB) * BLOCK_N
                k = desc_k.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
                v = desc_v.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
                # rows past the block belong to the next block: zero v so masked p=0 is exact
                v = tl.where(col_ok[:, None], v, tl.zeros_like(v))
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
    qbar = torch.empty(BH, G, HD, dtype=torch.float32, device=dev)
    kbar = torch.empty(BH, C, HD, dtype=torch.float32, device=dev)
    P = torch.empty(BH, G, C, dtype=torch.float32, device=dev)
    cut = torch.empty(BH, dtype=torch.int32, device=dev)
    interp = interpreting() or not q.is_cuda
    _group_mean_q[(G, BH)](q, qbar, dl["perm"], dl["block_off"], dl["group_block"],
                           dl["group_start"], dl["group_len"], q.stride(0), q.stride(1),
                           q.stride(2), H, G, D, lay.text_before, HEAD_DIM=HD, QG=QUERY_GROUP,
                           num_warps=4)
    _block_mean_k[(C, BH)](k, kbar, dl["perm"], dl["block_off"], dl["block_len"], k.stride(0),
                           k.stride(1), k.stride(2), H, C, D, lay.text_before, HEAD_DIM=HD,
                           ROWS=32 if interp else 64, num_warps=4)
    block_c = min(128, max(16, triton.next_power_of_2(C)))
    _group_probs[(G, BH)](qbar, kbar, P, G, C, float(scale), HEAD_DIM=HD, BLOCK_C=block_c,
                          num_warps=4)
    topk_target = float((min(topk, C) - 1) * G) if topk > 0 else 0.0
    _cut_search[(BH,)](P, cut, dl["group_block"], dl["group_len"], G, C, float(threshold),
                       float(lay.n_video), topk_target, TOPK=topk > 0,
                       BLOCK_E=256 if interp else 1024, num_warps=4 if interp else 8)
    _compact[(G, BH)](P, cut, kv_idx, kv_cnt, dl["group_block"], G, C, BLOCK_C=block_c,
                      num_warps=4)
    return VMoBASelection(lay, kv_idx, kv_cnt, float(threshold), int(topk))


# (BLOCK_M, BLOCK_N, num_warps, num_stages, kv_mode)
_CUDA_CANDIDATES = [(128, 64, 4, 3, 0), (128, 64, 8, 3, 0), (128, 128, 8, 2, 0),
                    (128, 64, 4, 3, 1), (128, 64, 8, 3, 1), (128, 128, 8, 2, 1),
                    (128, 64, 8, 3, 2), (128, 128, 8, 2, 2)]
_TUNED: dict = {}
_FORCED: Optional[tuple] = None  # benchmarks/tests may pin a config (tuple as above)


def _tma_ok(t: torch.Tensor) -> bool:
    if TensorDescriptor is None or interpreting() or not t.is_cuda:
        return False
    if torch.cuda.get_device_capability(t.device)[0] < 9 or t.shape[-1] not in (64, 128):
        return False
    return all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def _launch_sparse(cfg, q, k, v, out, sel: VMoBASelection, scale: float, kvp=None):
    BM, BN, warps, stages, mode = cfg
    lay = sel.layout
    B, H, N, D = q.shape
    dl = _device_layout(lay, q.device)
    HD = _head_pad(D)
    tb, nv = lay.text_before, lay.n_video
    if mode in (1, 2):
        if kvp is None:
            perm = dl["perm"].long() + tb
            kvp = (k.index_select(2, perm), v.index_select(2, perm))
        kp, vp = kvp
    else:
        kp, vp = k, v
    if mode == 2:
        dk = TensorDescriptor(kp, list(kp.shape), list(kp.stride()), [1, 1, BN, HD])
        dv = TensorDescriptor(vp, list(vp.shape), list(vp.stride()), [1, 1, BN, HD])
    else:
        dk = dv = kp  # unused placeholders
    tpb = triton.cdiv(lay.max_block_len, BN)
    tpg = triton.cdiv(int(lay.group_len.max()), BM)  # query tiles per group
    grid = (lay.num_groups * tpg, B * H)
    _vmoba_fwd[grid](q, k, v, kp, vp, out, dk, dv,
                     dl["perm"], dl["block_off"], dl["block_len"], dl["group_block"],
                     dl["group_start"], dl["group_len"], sel.kv_idx, sel.kv_cnt,
                     q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                     out.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
                     H, lay.num_groups, lay.num_blocks, D, tb, nv, N, tpb, scale * _LOG2E,
                     HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, TPG=tpg, KV_MODE=mode,
                     EVEN_D=(HD == D), DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                     num_warps=warps, num_stages=stages)


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
    tma = _tma_ok(k) and _tma_ok(v)
    best, best_t = None, float("inf")
    perm = _device_layout(lay, q.device)["perm"].long() + lay.text_before
    kvp = (k.index_select(2, perm), v.index_select(2, perm))
    for cfg in _CUDA_CANDIDATES:
        if cfg[4] == 2 and not tma:
            continue
        try:
            t = triton.testing.do_bench(lambda: _launch_sparse(cfg, q, k, v, out, sel, scale, kvp),
                                        warmup=5, rep=20, return_mode="median")
        except Exception:
            continue
        if cfg[4] in (1, 2):  # the permutation copy is part of the cost
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
    _launch_sparse(cfg, q, k, v, out, selection, scale)
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
    sel = vmoba_select_triton(q, k, layout=lay, threshold=threshold, topk=topk, scale=s)
    return vmoba_attention_with_selection(q, k, v, sel, s)
