"""VMoBA's per-group and per-block summaries in Triton, shared by the group rule's kernels
(``kernel.py``) and the token rule's (``token.py``): one read of the video rows gives the mean
query of every query group, the mean key (and value) of every key block and, optionally, the
key/value rows copied into block order. Also the layout's index tensors on the device."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tuning import interpreting
from .layout import QUERY_GROUP, VMoBALayout

__all__ = ["_group_pass", "_device_layout", "_head_pad"]


@triton.jit
def _group_sums(Q, K, V, QBAR, KSUM, VSUM, KP, VP, perm, block_off, group_block, group_start,
                group_len, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, spb, sph, spn, H, G, D, tb,
                HEAD_DIM: tl.constexpr, QG: tl.constexpr, COPY_KV: tl.constexpr,
                SUM_V: tl.constexpr, HAS_Q: tl.constexpr = True, HAS_K: tl.constexpr = True):
    """Per (query group, batch*head): mean query and sum of keys over the group's tokens; with
    COPY_KV also the group's key/value rows copied to their block-order positions in KP/VP; with
    SUM_V also the sum of its values (for the pooled rest's mean values). A KV cache runs it
    twice: over the key groups without HAS_Q, over the query groups without HAS_K."""
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
    dst = (bh.to(tl.int64) * G + g) * HEAD_DIM + offs_d
    if HAS_Q:
        x = tl.load(Q + b * sqb + h * sqh + tok[:, None] * sqn + offs_d[None, :], mask=msk, other=0.0)
        tl.store(QBAR + dst, tl.sum(x.to(tl.float32), 0) / n.to(tl.float32))
    if HAS_K:
        y = tl.load(K + b * skb + h * skh + tok[:, None] * skn + offs_d[None, :], mask=msk, other=0.0)
        tl.store(KSUM + dst, tl.sum(y.to(tl.float32), 0))
    if HAS_K and (COPY_KV or SUM_V):
        z = tl.load(V + b * svb + h * svh + tok[:, None] * svn + offs_d[None, :], mask=msk,
                    other=0.0)
        if SUM_V:
            tl.store(VSUM + dst, tl.sum(z.to(tl.float32), 0))
        if COPY_KV:
            pos = (start + offs).to(tl.int64)
            tl.store(KP + b * spb + h * sph + pos[:, None] * spn + offs_d[None, :], y, mask=msk)
            tl.store(VP + b * spb + h * sph + pos[:, None] * spn + offs_d[None, :], z, mask=msk)


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


_DEV_LAYOUT: dict = {}


def _device_layout(lay: VMoBALayout, device) -> dict:
    """The layout's index tensors (int32) on ``device``: key blocks (``perm``, ``block_off``,
    ``block_len``), the queries' block order (``qperm``, ``qblock_off``: the same tensors without
    a KV cache), the query groups, and ``keys`` (the key layout's, whose groups cover every key)."""
    key = (id(lay), str(device))
    hit = _DEV_LAYOUT.get(key)
    if hit is not None and hit["layout"] is lay:
        return hit
    i32 = dict(dtype=torch.int32, device=device)
    d = dict(layout=lay, perm=lay.perm.to(**i32), block_off=lay.block_off.to(**i32),
             block_len=lay.block_len.to(**i32), group_block=lay.group_block.to(**i32),
             group_start=lay.group_start.to(**i32), group_len=lay.group_len.to(**i32))
    if lay.cached_frames:
        d["qperm"], d["qblock_off"] = lay.q_perm.to(**i32), lay.q_block_off.to(**i32)
        d["keys"] = _device_layout(lay.keys, device)
    else:
        d["qperm"], d["qblock_off"], d["keys"] = d["perm"], d["block_off"], d
    gn = torch.bincount(lay.group_block, minlength=lay.num_blocks)
    d["block_g0"] = (torch.cumsum(gn, 0) - gn).to(**i32)  # groups of block c: [g0, g0 + gn)
    d["block_gn"] = gn.to(**i32)
    d["log2n"] = torch.log2(lay.block_len.to(torch.float32)).to(device)  # pooled logit offsets
    if len(_DEV_LAYOUT) > 64:
        _DEV_LAYOUT.clear()
    _DEV_LAYOUT[key] = d
    return d


def _head_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _group_pass(q, k, v, lay: VMoBALayout, dl: dict, copy: bool, pooled: bool, need_q: bool = True) -> tuple:
    """One read of the video rows: mean query per group, mean key per block (float32
    ``[B*H, G or C, padded D]``); with ``pooled`` also the mean value per block, with ``copy``
    the key/value rows in block order. Returns ``(qbar, kbar, vbar or None, kp, vp)`` (kp/vp:
    ``k`` placeholders without ``copy``). With a KV cache the keys are read over the key layout's
    groups and the queries (``need_q``: else qbar is None) over the query groups."""
    if lay.cached_frames:
        _, kbar, vbar, kp, vp = _group_pass(q, k, v, lay.keys, dl["keys"], copy, pooled, need_q=False)
        qbar = None
        if need_q:
            B, H, _, D = q.shape
            qq = q if q.stride(-1) == 1 else q.contiguous()
            qbar = torch.empty(B * H, lay.num_groups, _head_pad(D), dtype=torch.float32, device=q.device)
            _group_sums[(lay.num_groups, B * H)](
                qq, qq, qq, qbar, qbar, qbar, qq, qq, dl["qperm"], dl["qblock_off"], dl["group_block"],
                dl["group_start"], dl["group_len"], qq.stride(0), qq.stride(1), qq.stride(2), 0, 0, 0, 0, 0, 0,
                0, 0, 0, H, lay.num_groups, D, lay.text_before, HEAD_DIM=_head_pad(D), QG=QUERY_GROUP,
                COPY_KV=False, SUM_V=False, HAS_Q=True, HAS_K=False, num_warps=4)
        return qbar, kbar, vbar, kp, vp
    B, H, _, D = q.shape
    C, G, BH, HD = lay.num_blocks, lay.num_groups, B * H, _head_pad(D)
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    if v is not None and v.stride(-1) != 1:
        v = v.contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    qbar = torch.empty(BH, G, HD, **f32)
    ksum = torch.empty(BH, G, HD, **f32)
    kbar = torch.empty(BH, C, HD, **f32)
    if copy:
        kp = torch.empty(B, H, lay.n_video, D, dtype=k.dtype, device=q.device)
        vp = torch.empty(B, H, lay.n_video, D, dtype=v.dtype, device=q.device)
    else:
        kp = vp = k  # placeholders, not touched
    vv = v if v is not None else k
    vsum = torch.empty(BH, G, HD, **f32) if pooled else ksum
    _group_sums[(G, BH)](q, k, vv, qbar, ksum, vsum, kp, vp, dl["perm"], dl["block_off"],
                         dl["group_block"], dl["group_start"], dl["group_len"],
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                         k.stride(2), vv.stride(0), vv.stride(1), vv.stride(2),
                         kp.stride(0), kp.stride(1), kp.stride(2), H, G, D, lay.text_before,
                         HEAD_DIM=HD, QG=QUERY_GROUP, COPY_KV=copy, SUM_V=pooled, HAS_Q=need_q, num_warps=4)
    warps = 1 if interpreting() or not q.is_cuda else 2
    _block_means[(C, BH)](ksum, kbar, dl["block_len"], dl["block_g0"], dl["block_gn"], G, C,
                          HEAD_DIM=HD, num_warps=warps)
    vbar = None
    if pooled:
        vbar = torch.empty(BH, C, HD, **f32)
        _block_means[(C, BH)](vsum, vbar, dl["block_len"], dl["block_g0"], dl["block_gn"], G, C,
                              HEAD_DIM=HD, num_warps=warps)
    return qbar, kbar, vbar, kp, vp
