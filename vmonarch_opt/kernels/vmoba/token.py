"""VMoBA's token rule in Triton: per-query-token block selection, block-sparse attention over
each token's own blocks, and its backward (semantics: ``reference.py``, "Token rule").

Why this shape. Under the token rule every video query has its own set of key blocks. Tiles of
queries that share one key tile (what tensor cores need) therefore either run the union of their
rows' sets with per-row masks, or are formed per key block. On the benchmark inputs
(``benchmarks/video_inputs.py``, 3D blocks, 64 blocks, threshold 0.25) the tokens select 12.6 %
of the pairs but the union over 64 (128) consecutive tokens covers 45 % (57 %); sorting the
tokens by their block sets first still leaves 40 % (52 %). A union kernel would compute about
3.5x the selected FLOPs. So, as MoBA does, the work is organised per key block:

1. **pairs** (``_tok_pairs``, one program per (slice, key block c, head)): the video queries that
   selected block c (a list per (head, block), made from the selection by a cumsum and a
   scatter) are gathered BLOCK_M at a time and run against the block's keys (a flash pass over
   ``block_len`` keys, read contiguously from a block-order copy of k/v). Each (query, block)
   pair leaves a partial result in a slot ``[head, query, block]``: the normalised partial output
   (q's dtype) and its base-2 logsumexp (float32). Exactly the selected pairs are computed.
2. **rows** (``_tok_rows``, one program per tile of video queries in block order): merges each
   query's partials by their logsumexp (a partial is one "key" with logit lse_c and value o_c),
   then runs the text keys and, with the pooled rest, the pooled keys of the blocks the query did
   not select in the same online softmax, and writes the output row.

Slots are dense per (query, block) so that their address needs no count of the pairs before
them: nothing is read back to the host, and a call can be captured in a CUDA graph. Only the
selected slots are written or read; the buffer's size is bounded by running the heads in chunks
(``_PARTIAL_BUDGET`` bytes of slots per chunk). Counting at Wan 480p (12 heads, 64 blocks of ~512
tokens, D = 128, bf16, 12.5 % of the pairs): the selected pairs cost ~0.8 TFLOP (~260 kFLOP per
(query, block) pair); the partials add ~0.5 KB of writes and reads per pair (~1.6 GB in all), at
H200 rates (~500 TFLOP/s achieved, ~4.8 TB/s) about a fifth of the pass's time, against 3.5x the
FLOPs for the union.

Backward (selection held constant, recomputed from q and k as in ``backward.py``): ``_tok_pairs``
again in logsumexp-only mode, ``_tok_rows`` merging them into the row logsumexp (plus
``delta = dO · O``), ``_tok_pairs`` in dQ mode (float32 partial dQ per slot), ``_tok_rows``
summing them with the text and pooled keys' shares, ``_tok_pooled_bwd`` for the pooled keys' dK/dV
sums, and ``_tok_dkdv`` per key tile over the list of queries that selected its block (no
atomics; each key row written once). Text rows and text keys use the dense flash passes.

Selection: ``_tok_select_qh`` decides a whole query token's blocks in registers (scope
``query_head``); scope ``head_global`` stores the gate, reduces its range and sums per head, finds
the cut value with a 16-way search over the float bits (``_tok_hg_count`` / ``_tok_hg_update``,
8 rounds, parallel over slices of each head's entries) and writes the selection
(``_tok_hg_finish``). Everything is on the device; no host synchronisation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..flash.backward import _dkdv_tile, _dq_tile, _lse_tile, bwd_dkdv_keys, bwd_dq_rows, unit_last
from ..flash.kernel import _LOG2E, _NEG, _flash_into, _online_tile, sdpa_text_rows, text_rows_sdpa_into
from ..out_layout import empty_attention_out
from ..tuning import interpreting
from .groups import _device_layout, _group_pass, _head_pad
from .layout import MAX_TOKEN_BLOCKS, TOKEN_EPS, VMoBALayout, VMoBASelection

__all__ = ["vmoba_select_token_triton", "token_attention_with_selection", "token_backward_with_selection"]

# bytes of per-(query, block) slots per head chunk: Wan 480p needs ~0.55 GB per head (bf16), Wan-14B 720p
# ~1.3 GB, HunyuanVideo 720p ~2 GB; fewer chunks mean fewer launches (each chunk: lists, pairs, rows)
_PARTIAL_BUDGET = 4 << 30
_BIG = tl.constexpr(3.0e38)


# ----------------------------------------------------------------------------- selection
@triton.jit(do_not_specialize=["H", "nv", "C", "D", "tb"])
def _tok_select_qh(Q, KBAR, SEL, perm, pos_block, sqb, sqh, sqn, H, nv, C, D, tb, threshold, n_top,
                   EPS: tl.constexpr, TOPK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Scope query_head: every query token of the tile ranks its own C gates (q . mean key)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    p = pid * BLOCK_M + offs_m
    row_ok = p < nv
    c_ok = offs_c < C
    qtok = (tl.load(perm + p, mask=row_ok, other=0) + tb).to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqn + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    kb = tl.load(KBAR + (bh * C + offs_c[:, None]) * HEAD_DIM + offs_d[None, :], mask=c_ok[:, None], other=0.0)
    g = tl.dot(q, tl.trans(kb), input_precision="ieee")  # [BLOCK_M, BLOCK_C] gates, float32
    own = tl.load(pos_block + p, mask=row_ok, other=0)
    is_own = offs_c[None, :] == own[:, None]
    other = c_ok[None, :] & (offs_c[None, :] != own[:, None])
    if TOPK:  # keep an other block when fewer than n_top others have a larger gate
        n_above = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.int32)
        for j in range(0, C):
            gj = tl.sum(tl.where(offs_c[None, :] == j, g, 0.0), 1)
            n_above += ((gj[:, None] > g) & (own != j)[:, None]).to(tl.int32)
        keep = other & (n_above < n_top)
    else:  # min-max normalise, then the share rule (reference.threshold_keep, closed form)
        lo = tl.min(tl.where(c_ok[None, :], g, _BIG), 1)
        hi = tl.max(tl.where(c_ok[None, :], g, -_BIG), 1)
        rng = hi - lo
        den = tl.where(rng <= EPS, 1.0, rng)
        n = tl.where(c_ok[None, :], (g - lo[:, None]) / den[:, None], 0.0)
        total = tl.sum(n, 1)
        need = tl.maximum(threshold - tl.sum(tl.where(is_own, n, 0.0), 1) / (total + EPS), 0.0)
        above = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # sum of the others ranked above
        n_above = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.int32)
        for j in range(0, C):
            nj = tl.sum(tl.where(offs_c[None, :] == j, n, 0.0), 1)
            gt = (nj[:, None] > n) & (own != j)[:, None]
            above += tl.where(gt, nj[:, None], 0.0)
            n_above += gt.to(tl.int32)
        keep = other & ((n_above == 0) | (above / (total + EPS)[:, None] < need[:, None]))
    keep = keep | (is_own & c_ok[None, :])
    tl.store(SEL + (bh * nv + p[:, None]) * C + offs_c[None, :], keep.to(tl.int8),
             mask=row_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["H", "nv", "C", "D", "tb", "n_tiles"])
def _tok_hg_gate(Q, KBAR, GATE, STATS, perm, pos_block, sqb, sqh, sqn, H, nv, C, D, tb, n_tiles,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Scope head_global, pass 1: store the tile's gates; its min / max over every entry and
    over the other (not own) entries."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    p = pid * BLOCK_M + offs_m
    row_ok = p < nv
    c_ok = offs_c < C
    qtok = (tl.load(perm + p, mask=row_ok, other=0) + tb).to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqn + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    kb = tl.load(KBAR + (bh * C + offs_c[:, None]) * HEAD_DIM + offs_d[None, :], mask=c_ok[:, None], other=0.0)
    g = tl.dot(q, tl.trans(kb), input_precision="ieee")
    ok = row_ok[:, None] & c_ok[None, :]
    tl.store(GATE + (bh * nv + p[:, None]) * C + offs_c[None, :], g, mask=ok)
    own = tl.load(pos_block + p, mask=row_ok, other=0)
    oth = ok & (offs_c[None, :] != own[:, None])
    st = STATS + (bh * n_tiles + pid) * 4
    tl.store(st, tl.min(tl.min(tl.where(ok, g, _BIG), 1), 0))
    tl.store(st + 1, tl.max(tl.max(tl.where(ok, g, -_BIG), 1), 0))
    tl.store(st + 2, tl.min(tl.min(tl.where(oth, g, _BIG), 1), 0))
    tl.store(st + 3, tl.max(tl.max(tl.where(oth, g, -_BIG), 1), 0))


@triton.jit(do_not_specialize=["nv", "C", "n_tiles"])
def _tok_hg_sums(GATE, NORM, SUMS, pos_block, nv, C, n_tiles, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Scope head_global threshold, pass 2: per tile the sums of the normalised gates (all, own,
    others) and the largest other one."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    p = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = (p < nv)[:, None] & (offs_c < C)[None, :]
    g = tl.load(GATE + (bh * nv + p[:, None]) * C + offs_c[None, :], mask=ok, other=0.0)
    n = tl.where(ok, (g - tl.load(NORM + bh * 2)) / tl.load(NORM + bh * 2 + 1), 0.0)
    own = tl.load(pos_block + p, mask=p < nv, other=0)
    is_own = offs_c[None, :] == own[:, None]
    st = SUMS + (bh * n_tiles + pid) * 4
    tl.store(st, tl.sum(tl.sum(n, 1), 0))
    tl.store(st + 1, tl.sum(tl.sum(tl.where(is_own, n, 0.0), 1), 0))
    tl.store(st + 2, tl.sum(tl.sum(tl.where(is_own, 0.0, n), 1), 0))
    tl.store(st + 3, tl.max(tl.max(tl.where(ok & ~is_own, n, -1.0), 1), 0))


@triton.jit
def _order_key(x, TOPK: tl.constexpr):
    """int64 keys ordered like the float32 values: raw gates (top-k), normalised gates >= 0."""
    bits = x.to(tl.int32, bitcast=True)
    if TOPK:
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(tl.int64)


@triton.jit
def _candidates(LO, HI, bh, j16):
    lo = tl.load(LO + bh)
    hi = tl.load(HI + bh)
    step = tl.maximum((hi - lo + 15) // 16, 1)
    return lo, hi, tl.minimum(lo + (j16 + 1) * step, hi)


@triton.jit(do_not_specialize=["nv", "C", "BH", "per_split"])
def _tok_hg_count(GATE, NORM, pos_block, LO, HI, PART, nv, C, BH, per_split,
                  TOPK: tl.constexpr, BLOCK_E: tl.constexpr):
    """One round of the cut search: per slice of a head's entries, the weight (normalised gate,
    or 1 for top-k) of the other entries whose key is >= each of 16 candidate keys."""
    sp = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    j16 = tl.arange(0, 16).to(tl.int64)
    lo, hi, cand = _candidates(LO, HI, bh, j16)
    E = nv * C
    start = sp * per_split
    end = tl.minimum(E, start + per_split)
    offs = tl.arange(0, BLOCK_E)
    if not TOPK:
        mn = tl.load(NORM + bh * 2)
        den = tl.load(NORM + bh * 2 + 1)
    acc = tl.zeros([BLOCK_E, 16], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + offs
        ok = e < end
        g = tl.load(GATE + bh * E + e, mask=ok, other=0.0)
        ok = ok & (tl.load(pos_block + e // C, mask=ok, other=0) != e % C)
        if TOPK:
            key = _order_key(g, True)
            w = tl.where(ok, 1.0, 0.0)
        else:
            n = (g - mn) / den
            key = _order_key(n, False)
            w = tl.where(ok, n, 0.0)
        acc += tl.where(key[:, None] >= cand[None, :], w[:, None], 0.0)
    tl.store(PART + (sp * BH + bh) * 16 + j16, tl.sum(acc, 0))


@triton.jit(do_not_specialize=["S", "BH"])
def _tok_hg_update(PART, LO, HI, NEED, SCALE, S, BH, TOPK: tl.constexpr):
    """Narrow [LO, HI) to the candidates around the cut: F(LO) meets the need, F(HI) does not."""
    bh = tl.program_id(0).to(tl.int64)
    j16 = tl.arange(0, 16).to(tl.int64)
    lo, hi, cand = _candidates(LO, HI, bh, j16)
    F = tl.zeros([16], dtype=tl.float32)
    for sp in range(0, S):
        F += tl.load(PART + (sp * BH + bh) * 16 + j16)
    if TOPK:
        good = F >= tl.load(NEED + bh) - 0.5
    else:
        good = F / tl.load(SCALE + bh) >= tl.load(NEED + bh)
    tl.store(LO + bh, tl.maximum(lo, tl.max(tl.where(good, cand, lo), 0)))
    tl.store(HI + bh, tl.minimum(hi, tl.min(tl.where(good, hi, cand), 0)))


@triton.jit(do_not_specialize=["nv", "C"])
def _tok_hg_finish(GATE, NORM, CUT, SEL, pos_block, nv, C, TOPK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Scope head_global, last pass: keep the own block and every other entry with key >= cut."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    p = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = (p < nv)[:, None] & (offs_c < C)[None, :]
    g = tl.load(GATE + (bh * nv + p[:, None]) * C + offs_c[None, :], mask=ok, other=0.0)
    if TOPK:
        key = _order_key(g, True)
    else:
        key = _order_key((g - tl.load(NORM + bh * 2)) / tl.load(NORM + bh * 2 + 1), False)
    own = tl.load(pos_block + p, mask=p < nv, other=0)
    keep = (key >= tl.load(CUT + bh)) | (offs_c[None, :] == own[:, None])
    tl.store(SEL + (bh * nv + p[:, None]) * C + offs_c[None, :], keep.to(tl.int8), mask=ok)


def _order_key_torch(x: torch.Tensor, topk: bool) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) if topk else bits


def _select_head_global(q, kbar, lay: VMoBALayout, dl: dict, threshold: float, topk: int, sel8: torch.Tensor,
                        bm: int, bc: int) -> None:
    B, H, _, D = q.shape
    BH, C, nv = B * H, lay.num_blocks, lay.n_query_video
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    n_tiles = triton.cdiv(nv, bm)
    gate = torch.empty(BH, nv, C, **f32)
    stats = torch.empty(BH, n_tiles, 4, **f32)
    _tok_hg_gate[(n_tiles, BH)](q, kbar, gate, stats, dl["qperm"], dl["pos_block"], q.stride(0), q.stride(1),
                                q.stride(2), H, nv, C, D, lay.text_before, n_tiles,
                                HEAD_DIM=_head_pad(D), BLOCK_M=bm, BLOCK_C=bc, num_warps=4)
    lo, hi = stats[..., 0].amin(1), stats[..., 1].amax(1)
    i64 = dict(dtype=torch.int64, device=dev)
    big = torch.iinfo(torch.int64)
    if topk:
        norm = stats  # unused placeholder
        count, n_others = (min(topk, C) - 1) * nv, nv * (C - 1)
        if count <= 0 or count >= n_others:  # no other entry / every one: no search
            cut = torch.full((BH,), big.max if count <= 0 else big.min, **i64)
            return _finish_hg(gate, norm, cut, sel8, dl, nv, C, True, bm, bc)
        lo_key = _order_key_torch(stats[..., 2].amin(1), True)
        hi_key = _order_key_torch(stats[..., 3].amax(1), True) + 1
        need = torch.full((BH,), float(count), **f32)
        scale = need  # unused
    else:
        rng = hi - lo
        norm = torch.stack([lo, torch.where(rng <= TOKEN_EPS, torch.ones_like(rng), rng)], 1).contiguous()
        sums = torch.empty(BH, n_tiles, 4, **f32)
        _tok_hg_sums[(n_tiles, BH)](gate, norm, sums, dl["pos_block"], nv, C, n_tiles, BLOCK_M=bm, BLOCK_C=bc,
                                    num_warps=4)
        total, own, others = sums[..., 0].sum(1), sums[..., 1].sum(1), sums[..., 2].sum(1)
        best = sums[..., 3].amax(1)
        scale = total + TOKEN_EPS
        need = torch.clamp(threshold - own / scale, min=0.0)
        lo_key = torch.zeros(BH, **i64)
        hi_key = _order_key_torch(best.clamp_min(0.0), False) + 1
    lo_key, hi_key = lo_key.contiguous(), hi_key.contiguous()
    E = nv * C
    if interpreting() or not q.is_cuda:
        splits, block_e = 1, 256
    else:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        splits, block_e = max(1, min(triton.cdiv(E, 4096), triton.cdiv(4 * sms, BH))), 256
    per_split = triton.cdiv(E, splits)
    part = torch.empty(splits, BH, 16, **f32)
    for _ in range(8):  # 16-way search over int32 keys: 16^8 = 2^32
        _tok_hg_count[(splits, BH)](gate, norm, dl["pos_block"], lo_key, hi_key, part, nv, C, BH, per_split,
                                    TOPK=bool(topk), BLOCK_E=block_e, num_warps=4)
        _tok_hg_update[(BH,)](part, lo_key, hi_key, need, scale, splits, BH, TOPK=bool(topk), num_warps=1)
    cut = lo_key
    if not topk:  # share already met: the best other entry (and its ties); never met: every entry
        cut = torch.where(need <= 0, hi_key - 1, cut)
        cut = torch.where(others / scale < need, torch.full_like(cut, big.min), cut)
    _finish_hg(gate, norm, cut.contiguous(), sel8, dl, nv, C, bool(topk), bm, bc)


def _finish_hg(gate, norm, cut, sel8, dl, nv, C, topk, bm, bc):
    BH = gate.shape[0]
    _tok_hg_finish[(triton.cdiv(nv, bm), BH)](gate, norm, cut, sel8, dl["pos_block"], nv, C, TOPK=topk,
                                              BLOCK_M=bm, BLOCK_C=bc, num_warps=4)


def _token_dl(lay: VMoBALayout, dev) -> dict:
    """``_device_layout`` plus ``pos_block``: the own key block of every query position. Query rows
    are addressed through ``qperm`` (the queries' block order; ``perm`` itself without a KV cache)
    and counted by ``lay.n_query_video``; key rows through ``perm`` / ``block_off``."""
    dl = _device_layout(lay, dev)
    if "pos_block" not in dl:
        dl["pos_block"] = torch.repeat_interleave(torch.arange(lay.num_blocks), lay.q_block_len).to(
            dtype=torch.int32, device=dev)
    return dl


def vmoba_select_token_triton(q: torch.Tensor, k: torch.Tensor, *, layout: VMoBALayout, threshold: float,
                              topk: int, scope: str, v: Optional[torch.Tensor] = None,
                              pooled: bool = False) -> VMoBASelection:
    """The token rule's selection with the Triton kernels (arguments already validated). Given
    ``v`` the pass that averages the keys also copies k and v into block order (read by the
    attention); with ``pooled`` it keeps every block's mean key and value."""
    lay = layout
    B, H, N, D = q.shape
    C, nv = lay.num_blocks, lay.n_query_video
    if C > MAX_TOKEN_BLOCKS:
        raise ValueError(f"the token rule's Triton selection ranks each token's key blocks in registers: at most "
                         f"{MAX_TOKEN_BLOCKS} blocks, this layout has {C}; use a larger chunk")
    dev = q.device
    dl = _token_dl(lay, dev)
    sel = torch.empty(B, H, nv, C, dtype=torch.bool, device=dev)
    copy = v is not None
    need_means = not (topk == 0 and threshold >= 1.0) or pooled
    kbar = vbar = kp = vp = None
    if need_means or copy:
        _, kbar, vbar, kp, vp = _group_pass(q, k, v if (copy or pooled) else None, lay, dl, copy, pooled and v is not None,
                                            need_q=False)
    if topk == 0 and threshold >= 1.0:
        sel.fill_(True)
    else:
        sel8 = sel.view(torch.int8)
        bc = max(32, triton.next_power_of_2(C))
        bm = 16 if interpreting() or not q.is_cuda else max(16, min(64, 8192 // bc))
        qq = q if q.stride(-1) == 1 else q.contiguous()
        if scope == "query_head":
            _tok_select_qh[(triton.cdiv(nv, bm), B * H)](
                qq, kbar, sel8, dl["qperm"], dl["pos_block"], qq.stride(0), qq.stride(1), qq.stride(2), H, nv, C, D,
                lay.text_before, float(threshold), int(min(topk, C) - 1) if topk else 0, EPS=TOKEN_EPS,
                TOPK=bool(topk), HEAD_DIM=_head_pad(D), BLOCK_M=bm, BLOCK_C=bc, num_warps=4)
        else:
            _select_head_global(qq, kbar, lay, dl, float(threshold), int(topk), sel8, bm, bc)
    return VMoBASelection(lay, None, None, float(threshold), int(topk), block_kv=(kp, vp) if copy else None,
                          block_means=(kbar, vbar) if pooled and vbar is not None else None,
                          selection="token", scope=scope, row_sel=sel)


# ----------------------------------------------------------------------------- attention passes
@triton.jit(do_not_specialize=["H", "bh0", "nv", "C", "D", "tb", "N", "S"])
def _tok_pairs(Q, KP, VP, DO, LSE, DELTA, OP, LP, QLIST, QCNT, perm, block_off, block_len,
               sqb, sqh, sqn, spb, sph, spn, sdb, sdh, sdn,
               H, bh0, nv, C, D, tb, N, S, qk_scale,
               MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Per (slice, key block c, head of the chunk): the queries that selected c, BLOCK_M at a time,
    against c's keys. MODE 0: partial output + logsumexp; 1: logsumexp only; 2: partial dQ
    (float32, unscaled) from the row logsumexp and delta."""
    sid = tl.program_id(0)
    c = tl.program_id(1)
    bhl = tl.program_id(2).to(tl.int64)
    bh = bh0 + bhl
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    cnt = tl.load(QCNT + bhl * C + c)
    boff = tl.load(block_off + c)
    blen = tl.load(block_len + c)
    qb = Q + b * sqb + h * sqh
    kpb = KP + b * spb + h * sph
    vpb = VP + b * spb + h * sph
    lst = QLIST + (bhl * C + c) * nv
    for t in range(sid, tl.cdiv(cnt, BLOCK_M), S):
        i = t * BLOCK_M + offs_m
        row_ok = i < cnt
        rm = row_ok[:, None] & d_ok[None, :]
        p = tl.load(lst + i, mask=row_ok, other=0).to(tl.int64)
        qtok = (tl.load(perm + p, mask=row_ok, other=0) + tb).to(tl.int64)
        q = tl.load(qb + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if MODE == 2:
            do = tl.load(DO + b * sdb + h * sdh + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
            lse2 = tl.load(LSE + bh * N + qtok, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * N + qtok, mask=row_ok, other=0.0)
        for n0 in range(0, blen, BLOCK_N):
            col_ok = n0 + offs_n < blen
            kpos = (boff + n0 + offs_n).to(tl.int64)
            cm = col_ok[:, None] & d_ok[None, :]
            k = tl.load(kpb + kpos[:, None] * spn + offs_d[None, :], mask=cm, other=0.0)
            if MODE == 1:
                m_i, l_i = _lse_tile(q, k, m_i, l_i, qk_scale, col_ok, True, DOT_PREC)
            else:
                v = tl.load(vpb + kpos[:, None] * spn + offs_d[None, :], mask=cm, other=0.0)
                if MODE == 0:
                    acc, m_i, l_i, _w = _online_tile(q, k, v, acc, m_i, l_i, l_i, qk_scale, col_ok, True, False,
                                                     DOT_PREC)
                else:
                    acc = _dq_tile(q, do, k, v, acc, lse2, delta, qk_scale, col_ok, True, DOT_PREC)
        slot = (bhl * nv + p) * C + c
        if MODE == 2:
            tl.store(OP + slot[:, None] * D + offs_d[None, :], acc, mask=rm)
        else:
            l_i = tl.where(row_ok, l_i, 1.0)  # rows past the list: nothing to normalise
            tl.store(LP + slot, m_i + tl.math.log2(l_i), mask=row_ok)
            if MODE == 0:
                tl.store(OP + slot[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(OP.dtype.element_ty),
                         mask=rm)


@triton.jit(do_not_specialize=["H", "bh0", "nv", "C", "D", "tb", "N"])
def _tok_rows(Q, K, V, O, DO, OUT, LSE, DELTA, OP, LP, SEL, KBAR, VBAR, LOG2N, perm,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn, sxb, sxh, sxn,
              H, bh0, nv, C, D, tb, N, qk_scale, sm_scale,
              MODE: tl.constexpr, POOLED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Per tile of video queries (block order) of a head of the chunk: their partials merged with the
    text keys and the pooled keys. MODE 0: output rows (to OUT); 1: row logsumexp and delta
    (LSE, DELTA); 2: dQ rows (to OUT), from float32 partial dQs."""
    pid = tl.program_id(0)
    bhl = tl.program_id(1).to(tl.int64)
    bh = bh0 + bhl
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    p = (pid * BLOCK_M + offs_m).to(tl.int64)
    row_ok = p < nv
    rm = row_ok[:, None] & d_ok[None, :]
    qtok = (tl.load(perm + p, mask=row_ok, other=0) + tb).to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
    kb = K + b * skb + h * skh
    vb = V + b * svb + h * svh
    selr = SEL + (bh * nv + p) * C
    slot = (bhl * nv + p) * C
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if MODE == 2:
        do = tl.load(DO + b * sdb + h * sdh + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
        lse2 = tl.load(LSE + bh * N + qtok, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + qtok, mask=row_ok, other=0.0)
    # ---- the partials of the selected blocks
    for c in range(0, C):
        sel = (tl.load(selr + c, mask=row_ok, other=0) != 0) & row_ok
        sm = sel[:, None] & d_ok[None, :]
        if MODE == 2:
            acc += tl.load(OP + (slot + c)[:, None] * D + offs_d[None, :], mask=sm, other=0.0)
        else:
            lc = tl.load(LP + slot + c, mask=sel, other=_NEG)
            m_new = tl.maximum(m_i, lc)
            alpha = tl.math.exp2(m_i - m_new)
            beta = tl.where(sel, tl.math.exp2(lc - m_new), 0.0)
            l_i = l_i * alpha + beta
            if MODE == 0:
                oc = tl.load(OP + (slot + c)[:, None] * D + offs_d[None, :], mask=sm, other=0.0)
                acc = acc * alpha[:, None] + oc.to(tl.float32) * beta[:, None]
            m_i = m_new
    # ---- text keys: every video query attends to all of them
    for part in range(0, 2):
        t_lo = tl.where(part == 0, 0, tb + nv)
        t_hi = tl.where(part == 0, tb, N)
        for t0 in range(t_lo, t_hi, BLOCK_N):
            cols = t0 + offs_n
            col_ok = cols < t_hi
            cm = col_ok[:, None] & d_ok[None, :]
            k = tl.load(kb + cols[:, None].to(tl.int64) * skn + offs_d[None, :], mask=cm, other=0.0)
            if MODE == 1:
                m_i, l_i = _lse_tile(q, k, m_i, l_i, qk_scale, col_ok, True, DOT_PREC)
            else:
                v = tl.load(vb + cols[:, None].to(tl.int64) * svn + offs_d[None, :], mask=cm, other=0.0)
                if MODE == 0:
                    acc, m_i, l_i, _w = _online_tile(q, k, v, acc, m_i, l_i, l_i, qk_scale, col_ok, True, False,
                                                     DOT_PREC)
                else:
                    acc = _dq_tile(q, do, k, v, acc, lse2, delta, qk_scale, col_ok, True, DOT_PREC)
    # ---- pooled keys of the blocks each query did not select
    if POOLED:
        kbarb = KBAR + bh * C * HEAD_DIM
        vbarb = VBAR + bh * C * HEAD_DIM
        for c0 in range(0, C, BLOCK_N):
            cols = c0 + offs_n
            in_c = cols < C
            picked = tl.load(selr[:, None] + cols[None, :], mask=row_ok[:, None] & in_c[None, :], other=1)
            ok = in_c[None, :] & (picked == 0)
            kt = tl.load(kbarb + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=in_c[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            s = tl.where(ok, s + tl.load(LOG2N + cols, mask=in_c, other=0.0)[None, :], _NEG)
            if MODE == 2:
                vt = tl.load(vbarb + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=in_c[:, None], other=0.0)
                pp = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
                acc = tl.dot((pp * (dp - delta[:, None])).to(kt.dtype), kt, acc, input_precision=DOT_PREC)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                pp = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(pp, 1)
                if MODE == 0:
                    vt = tl.load(vbarb + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=in_c[:, None], other=0.0)
                    acc = tl.dot(pp.to(vt.dtype), vt, acc * alpha[:, None], input_precision=DOT_PREC)
                m_i = m_new
    l_i = tl.where(row_ok, l_i, 1.0)  # rows past the video: nothing to normalise
    if MODE == 0:
        tl.store(OUT + b * sxb + h * sxh + qtok[:, None] * sxn + offs_d[None, :],
                 (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=rm)
    elif MODE == 1:
        o = tl.load(O + b * sob + h * soh + qtok[:, None] * son + offs_d[None, :], mask=rm, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
        tl.store(LSE + bh * N + qtok, m_i + tl.math.log2(l_i), mask=row_ok)
        tl.store(DELTA + bh * N + qtok, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=row_ok)
    else:
        tl.store(OUT + b * sxb + h * sxh + qtok[:, None] * sxn + offs_d[None, :],
                 (acc * sm_scale).to(OUT.dtype.element_ty), mask=rm)


@triton.jit(do_not_specialize=["H", "bh0", "nv", "C", "D", "tb", "N", "RPS", "BHC"])
def _tok_pooled_bwd(Q, DO, LSE, DELTA, SEL, KBAR, VBAR, LOG2N, PART_K, PART_V, perm,
                    sqb, sqh, sqn, sdb, sdh, sdn, H, bh0, nv, C, D, tb, N, RPS, BHC, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PREC: tl.constexpr):
    """Unscaled sums ``sum_i dS_ic q_i`` and ``sum_i P_ic dO_i`` of a tile of pooled keys c over the
    video queries ``[split * RPS, +RPS)`` (block order) that did not select c."""
    pid_c = tl.program_id(0)
    bhl = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    bh = bh0 + bhl
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    cols = pid_c * BLOCK_P + tl.arange(0, BLOCK_P)
    in_c = cols < C
    mb = bh * C * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    kt = tl.load(KBAR + mb, mask=in_c[:, None], other=0.0)
    vt = tl.load(VBAR + mb, mask=in_c[:, None], other=0.0)
    log2n = tl.load(LOG2N + cols, mask=in_c, other=0.0)
    dkb = tl.zeros([BLOCK_P, HEAD_DIM], dtype=tl.float32)
    dvb = tl.zeros([BLOCK_P, HEAD_DIM], dtype=tl.float32)
    r_end = tl.minimum(nv, (split + 1) * RPS)
    for r0 in range(split * RPS, r_end, BLOCK_M):
        p = (r0 + offs_m).to(tl.int64)
        row_ok = p < r_end
        rm = row_ok[:, None] & d_ok[None, :]
        qtok = (tl.load(perm + p, mask=row_ok, other=0) + tb).to(tl.int64)
        q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
        lse2 = tl.load(LSE + bh * N + qtok, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + qtok, mask=row_ok, other=0.0)
        picked = tl.load(SEL + (bh * nv + p[None, :]) * C + cols[:, None], mask=in_c[:, None] & row_ok[None, :],
                         other=1)
        ok = in_c[:, None] & row_ok[None, :] & (picked == 0)
        s_t = tl.dot(kt, tl.trans(q), input_precision=DOT_PREC) * qk_scale + log2n[:, None]
        p_t = tl.where(ok, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dvb = tl.dot(p_t.to(do.dtype), do, dvb, input_precision=DOT_PREC)
        dp_t = tl.dot(vt, tl.trans(do), input_precision=DOT_PREC)
        dkb = tl.dot((p_t * (dp_t - delta[None, :])).to(q.dtype), q, dkb, input_precision=DOT_PREC)
    dst = ((split * BHC + bhl) * C + cols)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(PART_K + dst, dkb, mask=in_c[:, None])
    tl.store(PART_V + dst, dvb, mask=in_c[:, None])


@triton.jit(do_not_specialize=["H", "bh0", "nv", "C", "D", "tb", "N", "TPB"])
def _tok_dkdv(Q, KP, VP, DO, DK, DV, LSE, DELTA, QLIST, QCNT, perm, QPERM, block_off, block_len, DKBAR, DVBAR,
              sqb, sqh, sqn, spb, sph, spn, sdb, sdh, sdn, skgb, skgh, skgn, svgb, svgh, svgn,
              H, bh0, nv, C, D, tb, N, TPB, qk_scale, sm_scale,
              POOLED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """Per key tile of block c of a head of the chunk: dK/dV over the queries that selected c, then
    the text query rows (dense), plus the block's pooled-key share; each key row written once."""
    pid = tl.program_id(0)
    bhl = tl.program_id(1).to(tl.int64)
    bh = bh0 + bhl
    b = bh // H
    h = bh % H
    c = pid // TPB
    n0 = (pid % TPB) * BLOCK_N
    blen = tl.load(block_len + c)
    if n0 < blen:
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        d_ok = offs_d < D
        col_ok = n0 + offs_n < blen
        cm = col_ok[:, None] & d_ok[None, :]
        kpos = (tl.load(block_off + c) + n0 + offs_n).to(tl.int64)
        k = tl.load(KP + b * spb + h * sph + kpos[:, None] * spn + offs_d[None, :], mask=cm, other=0.0)
        v = tl.load(VP + b * spb + h * sph + kpos[:, None] * spn + offs_d[None, :], mask=cm, other=0.0)
        ktok = (tl.load(perm + kpos, mask=col_ok, other=0) + tb).to(tl.int64)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        qb = Q + b * sqb + h * sqh
        dob = DO + b * sdb + h * sdh
        cnt = tl.load(QCNT + bhl * C + c)
        lst = QLIST + (bhl * C + c) * nv
        for i0 in range(0, cnt, BLOCK_M):  # the video queries that selected block c
            i = i0 + offs_m
            row_ok = i < cnt
            rm = row_ok[:, None] & d_ok[None, :]
            p = tl.load(lst + i, mask=row_ok, other=0).to(tl.int64)
            qtok = (tl.load(QPERM + p, mask=row_ok, other=0) + tb).to(tl.int64)
            q = tl.load(qb + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
            do = tl.load(dob + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
            lse2 = tl.load(LSE + bh * N + qtok, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * N + qtok, mask=row_ok, other=0.0)
            dk, dv = _dkdv_tile(k, v, q, do, dk, dv, lse2, delta, qk_scale, row_ok, DOT_PREC)
        for part in range(0, 2):  # text query rows attend every key
            r_lo = tl.where(part == 0, 0, tb + nv)
            r_hi = tl.where(part == 0, tb, N)
            for r0 in range(r_lo, r_hi, BLOCK_M):
                qtok = (r0 + offs_m).to(tl.int64)
                row_ok = qtok < r_hi
                rm = row_ok[:, None] & d_ok[None, :]
                q = tl.load(qb + qtok[:, None] * sqn + offs_d[None, :], mask=rm, other=0.0)
                do = tl.load(dob + qtok[:, None] * sdn + offs_d[None, :], mask=rm, other=0.0)
                lse2 = tl.load(LSE + bh * N + qtok, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + bh * N + qtok, mask=row_ok, other=0.0)
                dk, dv = _dkdv_tile(k, v, q, do, dk, dv, lse2, delta, qk_scale, row_ok, DOT_PREC)
        if POOLED:  # the block's pooled key is its mean key: each key gets 1/n_c (already divided)
            pb = (bh * C + c) * HEAD_DIM + offs_d
            dk += tl.load(DKBAR + pb)[None, :]
            dv += tl.load(DVBAR + pb)[None, :]
        tl.store(DK + b * skgb + h * skgh + ktok[:, None] * skgn + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=cm)
        tl.store(DV + b * svgb + h * svgh + ktok[:, None] * svgn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=cm)


# ----------------------------------------------------------------------------- host side
def _tiles(q) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the pair, row and dK/dV passes."""
    if interpreting() or not q.is_cuda:
        return 16, 16, 4, 1
    if q.dtype == torch.float32 or q.shape[-1] > 128:
        return 32, 32, 4, 1
    return 64, 64, 4, 2


def _chunks(BH: int, per_head: int):
    """Head ranges whose per-(query, block) slots fit ``_PARTIAL_BUDGET`` (at least one head)."""
    step = max(1, min(BH, _PARTIAL_BUDGET // max(1, per_head)))
    return [(h0, min(BH, h0 + step)) for h0 in range(0, BH, step)]


def _query_lists(sel8: torch.Tensor, h0: int, h1: int) -> tuple:
    """For heads ``[h0, h1)`` (of ``[B*H, Nv, C]``): per (head, block) the block-order positions of
    the queries that selected it, ascending, ``[hc, C, Nv]`` int32 (-1 after ``cnt``), and ``cnt``."""
    m = sel8[h0:h1].transpose(1, 2) != 0  # [hc, C, Nv]
    nv = m.shape[-1]
    cnt = m.sum(-1, dtype=torch.int32)
    pos = torch.cumsum(m.to(torch.int32), -1) - 1
    idx = torch.where(m, pos, torch.full_like(pos, nv)).long()
    rows = torch.arange(nv, dtype=torch.int32, device=m.device).expand(m.shape)
    lst = torch.full((m.shape[0], m.shape[1], nv + 1), -1, dtype=torch.int32, device=m.device)
    lst.scatter_(2, idx, rows)  # unselected entries all land in the dropped column Nv
    return lst[..., :nv].contiguous(), cnt.contiguous()


def _slices(q, hc: int, C: int, nv: int, bm: int) -> int:
    """Programs per (head, block) of the pair pass: enough to fill the GPU, one in the interpreter."""
    if interpreting() or not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(triton.cdiv(nv, bm), triton.cdiv(8 * sms, hc * C)))


def _block_order(k, v, sel: VMoBASelection, dl: dict):
    if sel.block_kv is not None and sel.block_kv[0] is not None:
        kp, vp = sel.block_kv
        if kp.shape[:2] == k.shape[:2] and kp.dtype == k.dtype and vp.dtype == v.dtype and kp.device == k.device:
            return kp, vp
    perm = dl["perm"].long() + sel.layout.text_before
    return k.index_select(2, perm).contiguous(), v.index_select(2, perm).contiguous()


def _pooled_means(q, k, v, sel: VMoBASelection, dl: dict) -> tuple:
    B, H, _, D = k.shape
    C, HD = sel.layout.num_blocks, _head_pad(D)
    if sel.block_means is not None and sel.block_means[0].shape == (B * H, C, HD) \
            and sel.block_means[0].device == q.device:
        return sel.block_means
    _, kbar, vbar, _, _ = _group_pass(q, k, v, sel.layout, dl, False, True)
    return kbar, vbar


def _rows_launch(mode, q, k, v, o, do, outp, lse2, delta, op, lp, sel8, pooled_args, dl, lay, h0, h1, scale,
                 cfg, prec):
    B, H, N, D = q.shape
    BM, BN, warps, stages = cfg
    kbar, vbar, log2n = pooled_args if pooled_args is not None else (q, q, q)
    o = q if o is None else o
    do = q if do is None else do
    _tok_rows[(triton.cdiv(lay.n_query_video, BM), h1 - h0)](  # (text keys: none with a KV cache)
        q, k, v, o, do, outp, lse2, delta, op, lp, sel8, kbar, vbar, log2n, dl["qperm"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        outp.stride(0), outp.stride(1), outp.stride(2),
        H, h0, lay.n_query_video, lay.num_blocks, D, lay.text_before, N, scale * _LOG2E, scale,
        MODE=mode, POOLED=pooled_args is not None, HEAD_DIM=_head_pad(D), BLOCK_M=BM, BLOCK_N=BN, DOT_PREC=prec,
        num_warps=warps, num_stages=stages)


def _pairs_launch(mode, q, kp, vp, do, lse2, delta, op, lp, qlist, qcnt, dl, lay, h0, h1, scale, cfg, prec):
    B, H, N, D = q.shape
    BM, BN, warps, stages = cfg
    hc, C, nv = h1 - h0, lay.num_blocks, lay.n_query_video
    S = _slices(q, hc, C, nv, BM)
    do = q if do is None else do
    _tok_pairs[(S, C, hc)](
        q, kp, vp, do, lse2, delta, op, lp, qlist, qcnt, dl["qperm"], dl["block_off"], dl["block_len"],
        q.stride(0), q.stride(1), q.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, h0, nv, C, D, lay.text_before, N, S, scale * _LOG2E,
        MODE=mode, HEAD_DIM=_head_pad(D), BLOCK_M=BM, BLOCK_N=BN, DOT_PREC=prec, num_warps=warps,
        num_stages=stages)


def token_attention_with_selection(q, k, v, selection: VMoBASelection, scale: float,
                                   out: Optional[torch.Tensor] = None, pooled_rest: bool = False) -> torch.Tensor:
    """Attention of every video query over its own selected blocks (and all text keys; with
    ``pooled_rest`` the blocks it did not select as pooled keys); text queries dense."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lay = selection.layout
    B, H, N, D = q.shape
    BH, C, nv = B * H, lay.num_blocks, lay.n_query_video  # query rows (keys: k.shape[2])
    if out is None:
        out = empty_attention_out(q)
    dl = _token_dl(lay, q.device)
    kp, vp = _block_order(k, v, selection, dl)
    sel8 = selection.row_sel.reshape(BH, nv, C).view(torch.int8)
    pooled = None
    if pooled_rest:
        kbar, vbar = _pooled_means(q, k, v, selection, dl)
        pooled = (kbar.to(q.dtype).contiguous(), vbar.to(v.dtype).contiguous(), dl["log2n"])
    cfg = _tiles(q)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    lse_dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    for h0, h1 in _chunks(BH, nv * C * (D * q.element_size() + 8)):
        qlist, qcnt = _query_lists(sel8, h0, h1)
        op = torch.empty(h1 - h0, nv, C, D, dtype=q.dtype, device=q.device)
        lp = torch.empty(h1 - h0, nv, C, dtype=torch.float32, device=q.device)
        _pairs_launch(0, q, kp, vp, None, lse_dummy, lse_dummy, op, lp, qlist, qcnt, dl, lay, h0, h1, scale, cfg,
                      prec)
        _rows_launch(0, q, k, v, None, None, out, lse_dummy, lse_dummy, op, lp, sel8, pooled, dl, lay, h0, h1,
                     scale, cfg, prec)
        del op, lp
    tb = lay.text_before
    if (tb or lay.text_after) and sdpa_text_rows(q):
        text_rows_sdpa_into(q, k, v, out, tb, nv, scale)
        return out
    if tb:
        _flash_into(q[:, :, :tb], k, v, out[:, :, :tb], scale)
    if lay.text_after:
        _flash_into(q[:, :, tb + nv:], k, v, out[:, :, tb + nv:], scale)
    return out


def token_backward_with_selection(q, k, v, out, grad_out, selection: VMoBASelection, scale: float,
                                  pooled_rest: bool = False):
    """``(dq, dk, dv)`` of ``token_attention_with_selection`` (the selection held constant)."""
    lay = selection.layout
    B, H, N, D = q.shape
    dq, dk, dv = empty_attention_out(q), empty_attention_out(k), empty_attention_out(v)
    q, k, v, out, grad_out = unit_last(q, k, v, out.to(q.dtype), grad_out.to(q.dtype))
    dev = q.device
    dl = _token_dl(lay, dev)
    BH, C, nv = B * H, lay.num_blocks, lay.n_query_video  # query rows (keys: k.shape[2])
    tb, ta = lay.text_before, lay.text_after
    kp, vp = _block_order(k, v, selection, dl)
    sel8 = selection.row_sel.reshape(BH, nv, C).view(torch.int8)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cfg = _tiles(q)
    BM, BN, warps, stages = cfg
    HD = _head_pad(D)
    lse2 = torch.empty(BH, N, dtype=torch.float32, device=dev)
    delta = torch.empty(BH, N, dtype=torch.float32, device=dev)
    pooled = None
    if pooled_rest:
        kbar32, vbar32 = _pooled_means(q, k, v, selection, dl)
        pooled = (kbar32.to(q.dtype).contiguous(), vbar32.to(v.dtype).contiguous(), dl["log2n"])
    # text query rows first: their lse/delta are read by the video keys' dK/dV pass
    bwd_dq_rows(q, k, v, out, grad_out, dq, lse2, delta, 0, tb, scale)
    bwd_dq_rows(q, k, v, out, grad_out, dq, lse2, delta, tb + nv, ta, scale)
    qk_scale = scale * _LOG2E
    for h0, h1 in _chunks(BH, nv * C * (D * 4 + 12)):
        hc = h1 - h0
        qlist, qcnt = _query_lists(sel8, h0, h1)
        lp = torch.empty(hc, nv, C, dtype=torch.float32, device=dev)
        # 1. row logsumexp and delta of the video rows
        _pairs_launch(1, q, kp, vp, None, lse2, delta, lp, lp, qlist, qcnt, dl, lay, h0, h1, scale, cfg, prec)
        _rows_launch(1, q, k, v, out, grad_out, dq, lse2, delta, lp, lp, sel8, pooled, dl, lay, h0, h1, scale,
                     cfg, prec)
        del lp
        # 2. dQ: float32 partials per (query, block), summed with the text and pooled keys' shares
        dqp = torch.empty(hc, nv, C, D, dtype=torch.float32, device=dev)
        _pairs_launch(2, q, kp, vp, grad_out, lse2, delta, dqp, dqp, qlist, qcnt, dl, lay, h0, h1, scale, cfg,
                      prec)
        _rows_launch(2, q, k, v, out, grad_out, dq, lse2, delta, dqp, dqp, sel8, pooled, dl, lay, h0, h1, scale,
                     cfg, prec)
        del dqp
        # 3. the pooled keys' dK/dV sums (per block, / block size), then dK/dV of the video keys
        dkbar = dvbar = q  # placeholders
        if pooled is not None:
            kbar, vbar, log2n = pooled
            bp = 16 if interpreting() or not q.is_cuda else 32
            ctiles = triton.cdiv(C, bp)
            if interpreting() or not q.is_cuda:
                splits = min(2, triton.cdiv(nv, BM))
            else:
                sms = torch.cuda.get_device_properties(dev).multi_processor_count
                splits = max(1, min(triton.cdiv(nv, BM), triton.cdiv(4 * sms, hc * ctiles)))
            rps = triton.cdiv(triton.cdiv(nv, splits), BM) * BM
            splits = triton.cdiv(nv, rps)
            part_k = torch.empty(splits, hc, C, HD, dtype=torch.float32, device=dev)
            part_v = torch.empty(splits, hc, C, HD, dtype=torch.float32, device=dev)
            _tok_pooled_bwd[(ctiles, hc, splits)](
                q, grad_out, lse2, delta, sel8, kbar, vbar, log2n, part_k, part_v, dl["qperm"],
                q.stride(0), q.stride(1), q.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                H, h0, nv, C, D, tb, N, rps, hc, qk_scale,
                HEAD_DIM=HD, BLOCK_M=BM, BLOCK_P=bp, DOT_PREC=prec, num_warps=warps, num_stages=1)
            inv_n = (1.0 / lay.block_len.to(dev, torch.float32))[None, :, None]
            dkbar = torch.zeros(BH, C, HD, dtype=torch.float32, device=dev)
            dvbar = torch.zeros(BH, C, HD, dtype=torch.float32, device=dev)
            dkbar[h0:h1] = part_k.sum(0) * inv_n
            dvbar[h0:h1] = part_v.sum(0) * inv_n
        tpb = triton.cdiv(lay.max_block_len, BN)
        _tok_dkdv[(C * tpb, hc)](
            q, kp, vp, grad_out, dk, dv, lse2, delta, qlist, qcnt, dl["perm"], dl["qperm"], dl["block_off"],
            dl["block_len"],
            dkbar, dvbar, q.stride(0), q.stride(1), q.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            H, h0, nv, C, D, tb, N, tpb, qk_scale, scale,
            POOLED=pooled is not None, HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, DOT_PREC=prec, num_warps=warps,
            num_stages=stages)
    bwd_dkdv_keys(q, k, v, grad_out, dk, dv, lse2, delta, 0, tb, scale)
    bwd_dkdv_keys(q, k, v, grad_out, dk, dv, lse2, delta, tb + nv, ta, scale)
    return dq, dk, dv
