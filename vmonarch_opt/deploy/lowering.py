"""Pure-PyTorch decompositions of the ``vmonarch::*`` ops into ONNX-friendly operations.

The custom ops (``ops.py``) are opaque to ONNX. For export, every rewritten site is traced through
the functions below instead; they compute the same function as the references
(``kernels/monarch/reference.py``, ``kernels/vmoba/reference.py``) using only operations that
have standard ONNX equivalents: Reshape/Transpose/Pad/Slice/Concat, batched MatMul, Softmax,
ReduceMax/ReduceSum, Exp/Log, Where, Gather, TopK (sort), CumSum and ArgMax. Everything that
depends only on the site's configuration — the block layout, padding masks, token permutations —
is computed in Python at trace time and becomes a constant of the graph; everything that depends
on the data — Monarch's factors, VMoBA's block selection — is computed in the graph.

* **Monarch** (:func:`monarch_lowered`): the video tokens are padded to whole blocks with a
  constant pad and reshaped/transposed to ``[.., M blocks, B positions, D]``; the R-step is a
  batched MatMul + masked Softmax inside each block, the entropy term ``Σ R log R`` is
  ``Σ R·s − logsumexp`` (Log/Mul), the L-step a batched MatMul + Softmax over the block axis
  (text keys of joint attention enter the same softmax with exact logits); T > 1 alternating
  steps and ``recompute`` are unrolled. Text query rows are dense.
* **VMoBA** (:func:`vmoba_lowered`): mean query per query group and mean key per key block by
  Gather + ReduceSum, group×block scores by MatMul + Softmax, the global threshold / top-k cut
  by a sort (TopK) + CumSum + ArgMax over the head, then every group's selected key blocks are
  gathered by their in-graph indices and attended with a masked Softmax (plus the dense text
  keys). The number of selected blocks is data-dependent, so the graph gathers up to all
  ``C`` blocks per group and masks the unselected slots: the result is exact, the cost that of
  dense attention (ONNX has no block-sparse attention operator). The token rule computes its
  per-token gates ``q · mean key`` by MatMul and its per-token (or per-head) selection with the
  reference's own functions (min-max, TopK sort, CumSum, ArgMax, Gather); every query then
  scores all ``C`` blocks, its unselected ones masked.
* **Dense** (:func:`dense_lowered`): ``softmax(q kᵀ · scale) v``.
* **MonarchRT** (:func:`monarch_rt_lowered`): the video tokens are reshaped/transposed to
  ``[.., tiles, rows, columns, D]``; the per-query-tile R-step is one broadcast MatMul of the query
  tiles against every key tile (``[.., Aq, Ag, rows, b2, b2]`` scores: ``N²/rows`` per head, the
  reference's cost) + Softmax, the entropy term ``Σ R·s − logsumexp``, the L-step a MatMul +
  Softmax over all key rows per (tile, column) with the exact text keys; more steps unrolled.

Every function takes q/k/v as ``[batch, heads, N, D]`` and an optional ``key_valid``
(``[batch, N]`` bool): keys where it is False are dropped, exactly as
``passes/keypad.py`` drops padded text tokens before calling the op.

Computation is in float32 (float64 for float64 inputs), the result in ``q.dtype``, as the
references do.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["monarch_lowered", "vmoba_lowered", "dense_lowered", "monarch_rt_lowered"]

_NEG_INF = float("-inf")


@contextlib.contextmanager
def _real_tensors():
    """Layout constants depend only on the site's configuration: they are computed with real
    tensors, outside any tracer (torch.export's fake and proxy modes, torch-function modes), and
    enter the traced graph as constants."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch._C.DisableTorchFunction():
        yield


def _cdt(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp as Max/Sub/Exp/Sum/Log (every reduced row has a finite entry)."""
    m = x.amax(dim=dim, keepdim=True)
    return (m + torch.log(torch.exp(x - m).sum(dim=dim, keepdim=True))).squeeze(dim)


def _key_bias(key_valid: Optional[torch.Tensor], cols: torch.Tensor, dtype) -> Optional[torch.Tensor]:
    """Additive bias [b, 1, 1, len(cols)] (0 or -inf) for the key columns ``cols`` (a constant index)."""
    if key_valid is None:
        return None
    kv = key_valid[:, cols]
    zero = torch.zeros((), dtype=dtype, device=kv.device)
    return torch.where(kv, zero, torch.full((), _NEG_INF, dtype=dtype, device=kv.device))[:, None, None, :]


def _dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    return torch.matmul(torch.softmax(s, dim=-1), v)


def dense_lowered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact attention ``softmax(q kᵀ · scale) v`` (MatMul, Mul, Softmax, MatMul)."""
    cdt = _cdt(q)
    bias = _key_bias(key_valid, torch.arange(k.shape[-2], device=q.device), cdt)
    return _dense_rows(q.to(cdt), k.to(cdt), v.to(cdt), scale, bias).to(q.dtype)


def _text_index(tb: int, nv: int, n: int, device) -> torch.Tensor:
    return torch.cat([torch.arange(tb, device=device), torch.arange(tb + nv, n, device=device)])


# ------------------------------------------------------------------------------------- Monarch
def _to_blocks(x: torch.Tensor, grid, block, nblk) -> torch.Tensor:
    """Video tokens [b, h, Nv, D] -> [b, h, M, B, D] in the layout of ``kernels/monarch/layout.py``
    (tiles in (t, h, w) order, positions inside a tile in (t, h, w) order; zero padding)."""
    b, h, _, d = x.shape
    (T, H, W), (bt, bh, bw), (nT, nH, nW) = grid, block, nblk
    x = x.reshape(b, h, T, H, W, d)
    pad = (0, 0, 0, nW * bw - W, 0, nH * bh - H, 0, nT * bt - T)
    if any(pad):
        x = F.pad(x, pad)
    x = x.reshape(b, h, nT, bt, nH, bh, nW, bw, d).permute(0, 1, 2, 4, 6, 3, 5, 7, 8)
    return x.reshape(b, h, nT * nH * nW, bt * bh * bw, d)


def _from_blocks(x: torch.Tensor, grid, block, nblk) -> torch.Tensor:
    """Inverse of :func:`_to_blocks` (padding dropped): [b, h, M, B, D] -> [b, h, Nv, D]."""
    b, h, _, _, d = x.shape
    (T, H, W), (bt, bh, bw), (nT, nH, nW) = grid, block, nblk
    x = x.reshape(b, h, nT, nH, nW, bt, bh, bw, d).permute(0, 1, 2, 5, 3, 6, 4, 7, 8)
    x = x.reshape(b, h, nT * bt, nH * bh, nW * bw, d)[:, :, :T, :H, :W]
    return x.reshape(b, h, T * H * W, d)


def monarch_lowered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, block,
                    text_before: int = 0, text_after: int = 0, steps: int = 1,
                    scale: Optional[float] = None, recompute: bool = False,
                    key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Monarch attention (same function as ``monarch_attention_reference``) in ONNX-friendly ops.

    ``key_valid`` ([batch, N] bool, True everywhere on the video tokens) drops text keys: the
    result equals the reference run on the sequence without them.
    """
    from ..kernels.monarch.layout import check_qkv, check_steps, make_layout, resolve_scale
    from ..kernels.monarch.reference import PLAIN_CBAR_EPS, RESET_MASS

    check_qkv(q, k, v)
    with _real_tensors():
        lay = make_layout(q.shape[2], grid, block, text_before, text_after)
        _, valid = lay.token_index()
    steps = check_steps(steps)
    scale = resolve_scale(scale, q.shape[-1])
    cdt = _cdt(q)
    N, tb, nv, nt = lay.N, lay.text_before, lay.Nv, lay.n_text
    g, blk, nblk = lay.grid, lay.block, lay.nblocks
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)

    # constants of the layout: valid[m, j] (is position j of block m a real token)
    dev = q.device
    valid = valid.to(dev)
    kbias = torch.zeros(valid.shape, dtype=cdt, device=dev).masked_fill(~valid, _NEG_INF)   # [M, B(l)]
    qvalid_ji = valid.T.contiguous()                                          # [B(j), M(i)]

    vid = slice(tb, tb + nv)
    qb = _to_blocks(qf[:, :, vid], g, blk, nblk)                              # [b, h, M, B, D]
    kb = _to_blocks(kf[:, :, vid], g, blk, nblk)
    vb = _to_blocks(vf[:, :, vid], g, blk, nblk)
    qj = qb.transpose(2, 3)                                                   # [b, h, B(j), M(i), D]
    tidx = _text_index(tb, nv, N, dev)
    if nt:
        kt, vt = kf[:, :, tidx], vf[:, :, tidx]                               # [b, h, nt, D]
        tbias = _key_bias(key_valid, tidx, cdt)                               # [b, 1, 1, nt] or None
    qbar = qb
    video_out = None
    for step in range(steps):
        final = step == steps - 1
        # R-step: softmax inside every block over its valid keys
        s = torch.matmul(qbar, kb.transpose(-1, -2)) * scale + kbias[:, None, :]  # [b, h, M, B(j), B(l)]
        lse = _lse(s, -1)
        r = torch.exp(s - lse[..., None])
        a_l = torch.matmul(r, kb) * scale                                     # [b, h, M, B, D]
        c_l = (r * torch.where(valid[:, None, :], s, torch.zeros((), dtype=cdt, device=dev))).sum(-1) - lse  # [b, h, M, B]
        # L-step logits z[b, h, j, i, m] = q[i, j] . A_L[m, j] - cL[m, j]; text keys exact
        z = torch.matmul(qj, a_l.transpose(2, 3).transpose(-1, -2)) - c_l.transpose(-1, -2)[:, :, :, None, :]
        if nt:
            zt = torch.matmul(qj, kt[:, :, None].transpose(-1, -2)) * scale   # [b, h, B, M, nt]
            if tbias is not None:
                zt = zt + tbias[:, :, None]
            lse_row = _lse(torch.cat([z, zt], -1), -1)
        else:
            lse_row = _lse(z, -1)                                             # [b, h, B(j), M(i)]
        if final:
            y = torch.matmul(r, vb)                                           # [b, h, M, B, D]
            p = torch.exp(z - lse_row[..., None])
            o = torch.matmul(p, y.transpose(2, 3))                            # [b, h, B(j), M(i), D]
            if nt:
                o = o + torch.matmul(torch.exp(zt - lse_row[..., None]), vt[:, :, None])
            video_out = _from_blocks(o.transpose(2, 3), g, blk, nblk)
            break
        log_l = torch.where(qvalid_ji[:, :, None], z - lse_row[..., None],
                            torch.full((), _NEG_INF, dtype=cdt, device=dev))              # [b, h, j, i, m]
        if recompute:
            w = torch.softmax(log_l, dim=-2)                                  # over queries i
            newq = torch.matmul(w.transpose(-1, -2), qj).transpose(2, 3)      # [b, h, M(m), B(j), D]
            log_cbar = _lse(log_l, -2).transpose(-1, -2)                      # [b, h, M, B]
            qbar = torch.where((log_cbar < math.log(RESET_MASS))[..., None], qb, newq)
        else:
            lw = torch.exp(log_l)
            cbar = lw.sum(-2).transpose(-1, -2)                               # [b, h, M, B]
            abar = torch.matmul(lw.transpose(-1, -2), qj).transpose(2, 3)
            qbar = abar / cbar.clamp_min(PLAIN_CBAR_EPS)[..., None]
    if not nt:
        return video_out.to(q.dtype)
    text_out = _dense_rows(qf[:, :, tidx], kf, vf, scale, _key_bias(key_valid, torch.arange(N, device=dev), cdt))
    parts = [text_out[:, :, :tb], video_out, text_out[:, :, tb:]]
    return torch.cat([p for p in parts if p.shape[2]], dim=2).to(q.dtype)


# --------------------------------------------------------------------------------------- VMoBA
_TABLES: dict = {}


def _vmoba_tables(lay):
    """Constant gather tables of a VMoBA layout (video-token indices; ``Nv`` = the zero pad row).
    Query-side tables index the query video tokens (the last frames with a KV cache: ``q_perm``)."""
    key = (lay.grid, lay.chunk, lay.partition, lay.cached_frames)
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = _build_vmoba_tables(lay)
    return _TABLES[key]


def _build_vmoba_tables(lay):
    nv, nq = lay.n_video, lay.n_query_video
    C, G = lay.num_blocks, lay.num_groups
    Lb = int(lay.block_len.max())
    Lg = int(lay.group_len.max())
    perm = lay.perm
    permp = torch.cat([perm, torch.tensor([nv])])
    pos = torch.arange(Lb)[None, :]
    bvalid = pos < lay.block_len[:, None]                                     # [C, Lb]
    btok = permp[torch.where(bvalid, lay.block_off[:, None] + pos, torch.full_like(pos, nv))]
    qpermp = torch.cat([lay.q_perm, torch.tensor([nq])])  # query side: the keys' own without a KV cache
    gpos = torch.arange(Lg)[None, :]
    gvalid = gpos < lay.group_len[:, None]                                    # [G, Lg]
    gstart = lay.q_block_off[lay.group_block] + lay.group_start
    gtok = qpermp[torch.where(gvalid, gstart[:, None] + gpos, torch.full_like(gpos, nq))]
    # inverse: natural video query token p sits at flat slot g * Lg + l of the group layout
    inv = torch.empty(nq, dtype=torch.int64)
    slots = torch.arange(G * Lg).reshape(G, Lg)
    inv[gtok[gvalid]] = slots[gvalid]
    own = torch.zeros(G, C, dtype=torch.bool)
    own[torch.arange(G), lay.group_block] = True
    # token rule: block-order position of each group slot (nv: the padding row), own block per position
    gposb = torch.where(gvalid, gstart[:, None] + gpos, torch.full_like(gpos, nq))
    pos_own = F.one_hot(torch.repeat_interleave(torch.arange(C), lay.q_block_len), C).bool()
    return dict(C=C, G=G, Lb=Lb, Lg=Lg, btok=btok, bvalid=bvalid, gtok=gtok, gvalid=gvalid, inv=inv,
                own=own, block_len=lay.block_len, group_len=lay.group_len, perm=lay.q_perm, gposb=gposb,
                pos_own=pos_own)


def _vmoba_selection(qbar, kbar, t, *, threshold: float, topk: int, scale: float, nv: int):
    """Selected (group, block) pairs, [b, h, G, C] bool: the rule of ``vmoba_select_reference``."""
    b, h, G, _ = qbar.shape
    C = kbar.shape[2]
    cdt, dev = qbar.dtype, qbar.device
    if topk == 0 and threshold >= 1.0:
        return torch.ones(b, h, G, C, dtype=torch.bool, device=dev)
    P = torch.softmax(torch.matmul(qbar, kbar.transpose(-1, -2)) * scale, dim=-1)   # [b, h, G, C]
    own = t["own"]
    zero = torch.zeros((), dtype=cdt, device=dev)
    if topk > 0:
        w = torch.ones_like(P)
        target = torch.full((b, h), float((min(topk, C) - 1) * G), dtype=cdt, device=dev)
    else:
        w = P * t["group_len"].to(cdt)[:, None]
        target = threshold * nv - torch.where(own, w, zero).sum(dim=(2, 3))
    # cut value v* = max{v : sum(w[other pairs with P >= v]) >= target}, per (batch, head)
    Po = torch.where(own, torch.full((), -1.0, dtype=cdt, device=dev), P).reshape(b * h, G * C)
    wo = torch.where(own, zero, w).reshape(b * h, G * C)
    sv, order = torch.sort(Po, dim=1, descending=True)
    cw = torch.cumsum(torch.gather(wo, 1, order), dim=1)
    tg = target.reshape(b * h, 1)
    reach = (cw >= tg).to(cdt)
    first = torch.argmax(reach, dim=1, keepdim=True)
    cut = torch.gather(sv, 1, first)
    cut = torch.where(reach.amax(dim=1, keepdim=True) > 0, cut, zero)
    cut = torch.where(tg <= 0, torch.full((), float("inf"), dtype=cdt, device=dev), cut)
    return own | (P >= cut.reshape(b, h, 1, 1))


def vmoba_lowered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, chunk,
                  text_before: int = 0, text_after: int = 0, partition: str = "3d",
                  threshold: float = 0.25, topk: int = 0, scale: Optional[float] = None,
                  key_valid: Optional[torch.Tensor] = None, pooled_rest: bool = False,
                  selection: str = "group", scope: Optional[str] = None, cached_frames: int = 0) -> torch.Tensor:
    """VMoBA attention (same function as ``vmoba_attention_reference``) in ONNX-friendly ops.

    ``key_valid`` ([batch, N] bool, True everywhere on the video tokens) drops text keys.
    ``pooled_rest``: the unselected blocks join the softmax as pooled keys (mean key, logit +
    log(block size), mean value), as in the reference. ``selection`` / ``scope``: the rule.
    ``cached_frames``: the KV-cache form (q = the last frames of the key grid ``grid``).
    """
    from ..kernels.vmoba.layout import _check_args, check_rule

    with _real_tensors():
        scale, lay, threshold, topk = _check_args(q, k, v, grid, chunk, text_before, text_after, partition,
                                                  threshold, topk, scale, "vmoba_lowered", cached_frames)
        selection, scope = check_rule(selection, scope, "vmoba_lowered")
        tables = _vmoba_tables(lay)
    if selection == "token":
        return _vmoba_token_lowered(q, k, v, lay, tables, threshold, topk, scope, scale, key_valid, pooled_rest)
    b, h, N, D = q.shape
    cdt, dev = _cdt(q), q.device
    t = {k_: (x.to(dev) if isinstance(x, torch.Tensor) else x) for k_, x in tables.items()}
    tb, nv, nq = lay.text_before, lay.n_video, lay.n_query_video  # (nq < nv: KV cache, no text)
    C, G, Lb = t["C"], t["G"], t["Lb"]
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    zrow = torch.zeros(b, h, 1, D, dtype=cdt, device=dev)
    qv = torch.cat([qf[:, :, tb:tb + nq], zrow], dim=2)                      # video tokens + a zero row
    kv = torch.cat([kf[:, :, tb:tb + nv], zrow], dim=2)
    vv = torch.cat([vf[:, :, tb:tb + nv], zrow], dim=2)

    # block summaries and the in-graph selection
    qg = qv[:, :, t["gtok"]]                                                  # [b, h, G, Lg, D]
    kblk = kv[:, :, t["btok"]]                                                # [b, h, C, Lb, D]
    vblk = vv[:, :, t["btok"]]
    qbar = qg.sum(-2) / t["group_len"].to(cdt)[:, None]
    kbar = kblk.sum(-2) / t["block_len"].to(cdt)[:, None]
    sel = _vmoba_selection(qbar, kbar, t, threshold=threshold, topk=topk, scale=scale, nv=nq)

    # selected block indices per group, ascending, unselected slots last (masked)
    cidx = torch.arange(C, device=dev).to(cdt)
    order_key = torch.where(sel, cidx, cidx + C)
    slot = torch.sort(order_key, dim=-1).values                               # [b, h, G, C]
    slot_ok = slot < C
    kv_idx = torch.where(slot_ok, slot, torch.zeros((), dtype=cdt, device=dev)).to(torch.int64)

    # gather every group's key blocks by those indices
    base = (torch.arange(b * h, device=dev) * C).reshape(b, h, 1, 1)
    flat = (kv_idx + base).reshape(-1)
    kg = kblk.reshape(b * h * C, Lb, D)[flat].reshape(b, h, G, C * Lb, D)
    vg = vblk.reshape(b * h * C, Lb, D)[flat].reshape(b, h, G, C * Lb, D)
    tok_ok = t["bvalid"][kv_idx] & slot_ok[..., None]                         # [b, h, G, C, Lb]
    neg = torch.full((), _NEG_INF, dtype=cdt, device=dev)
    bias = torch.where(tok_ok, torch.zeros((), dtype=cdt, device=dev), neg).reshape(b, h, G, 1, C * Lb)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale + bias                 # [b, h, G, Lg, C*Lb]
    logits, values = [s], [vg]                                                # one softmax over all parts
    if pooled_rest:  # one pooled key per unselected block
        vbar = vblk.sum(-2) / t["block_len"].to(cdt)[:, None]
        log_n = torch.log(t["block_len"].to(cdt))
        pbias = torch.where(sel, neg, torch.zeros((), dtype=cdt, device=dev)) + log_n   # [b, h, G, C]
        logits.append(torch.matmul(qg, kbar[:, :, None].transpose(-1, -2)) * scale + pbias[..., None, :])
        values.append(vbar[:, :, None])
    tidx = _text_index(tb, nq, N, dev)
    if tidx.numel():
        kt, vt = kf[:, :, tidx], vf[:, :, tidx]
        st = torch.matmul(qg, kt[:, :, None].transpose(-1, -2)) * scale       # [b, h, G, Lg, nt]
        tbias = _key_bias(key_valid, tidx, cdt)
        if tbias is not None:
            st = st + tbias[:, :, None]
        logits.append(st)
        values.append(vt[:, :, None])
    return _vmoba_groups_out(logits, values, t["inv"], qf, kf, vf, tidx, tb, scale, key_valid, q.dtype)


def _vmoba_groups_out(logits: list, values: list, inv, qf, kf, vf, tidx, tb: int, scale: float, key_valid,
                      dtype) -> torch.Tensor:
    """VMoBA's lowered output: one softmax over the query groups' logit parts (``[b, h, G, Lg, *]``
    each, with their values), the video rows put back in token order (``inv``), and the text rows
    ``tidx`` attended densely, in sequence order."""
    if len(logits) == 1:
        og = torch.matmul(torch.softmax(logits[0], dim=-1), values[0])          # [b, h, G, Lg, D]
    else:
        p = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
        og, at = 0, 0
        for lg, val in zip(logits, values):
            n_ = lg.shape[-1]
            og = og + torch.matmul(p[..., at:at + n_], val)
            at += n_
    b, h, G, Lg, D = og.shape
    video_out = og.reshape(b, h, G * Lg, D)[:, :, inv]
    if not tidx.numel():
        return video_out.to(dtype)
    N = kf.shape[2]
    text_out = _dense_rows(qf[:, :, tidx], kf, vf, scale, _key_bias(key_valid, torch.arange(N, device=kf.device),
                                                                    kf.dtype))
    parts = [text_out[:, :, :tb], video_out, text_out[:, :, tb:]]
    return torch.cat([p_ for p_ in parts if p_.shape[2]], dim=2).to(dtype)


def _vmoba_token_lowered(q, k, v, lay, tables, threshold, topk, scope, scale, key_valid, pooled_rest):
    """The token rule (``vmoba_select_token_reference`` + ``vmoba_attention_from_selection``):
    per-token selection in the graph, then each query group against all ``C`` key blocks with its
    tokens' unselected blocks masked."""
    from ..kernels.vmoba.reference import token_keep

    b, h, N, D = q.shape
    cdt, dev = _cdt(q), q.device
    t = {k_: (x.to(dev) if isinstance(x, torch.Tensor) else x) for k_, x in tables.items()}
    tb, nv, nq = lay.text_before, lay.n_video, lay.n_query_video  # (nq < nv: KV cache, no text)
    C, G, Lb, Lg = t["C"], t["G"], t["Lb"], t["Lg"]
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    zrow = torch.zeros(b, h, 1, D, dtype=cdt, device=dev)
    qv = torch.cat([qf[:, :, tb:tb + nq], zrow], dim=2)
    kv = torch.cat([kf[:, :, tb:tb + nv], zrow], dim=2)
    vv = torch.cat([vf[:, :, tb:tb + nv], zrow], dim=2)
    kblk = kv[:, :, t["btok"]]                                                # [b, h, C, Lb, D]
    vblk = vv[:, :, t["btok"]]
    kbar = kblk.sum(-2) / t["block_len"].to(cdt)[:, None]                     # [b, h, C, D]
    gate = torch.matmul(qv[:, :, t["perm"]], kbar.transpose(-1, -2))         # [b, h, Nq, C], block order
    keep = token_keep(gate, t["pos_own"], threshold, topk, scope)
    keep = torch.cat([keep, torch.zeros(b, h, 1, C, dtype=torch.bool, device=dev)], dim=2)
    keep_g = keep[:, :, t["gposb"]]                                           # [b, h, G, Lg, C]
    qg = qv[:, :, t["gtok"]]                                                  # [b, h, G, Lg, D]
    kall = kblk.reshape(b, h, 1, C * Lb, D)
    vall = vblk.reshape(b, h, 1, C * Lb, D)
    neg = torch.full((), _NEG_INF, dtype=cdt, device=dev)
    zero = torch.zeros((), dtype=cdt, device=dev)
    tok_ok = keep_g[..., None] & t["bvalid"]                                  # [b, h, G, Lg, C, Lb]
    s = torch.matmul(qg, kall.transpose(-1, -2)) * scale + torch.where(tok_ok, zero, neg).reshape(b, h, G, Lg, C * Lb)
    logits, values = [s], [vall]
    if pooled_rest:
        vbar = vblk.sum(-2) / t["block_len"].to(cdt)[:, None]
        pbias = torch.where(keep_g, neg, zero) + torch.log(t["block_len"].to(cdt))
        logits.append(torch.matmul(qg, kbar[:, :, None].transpose(-1, -2)) * scale + pbias)
        values.append(vbar[:, :, None])
    tidx = _text_index(tb, nq, N, dev)
    if tidx.numel():
        st = torch.matmul(qg, kf[:, :, tidx][:, :, None].transpose(-1, -2)) * scale
        tbias = _key_bias(key_valid, tidx, cdt)
        if tbias is not None:
            st = st + tbias[:, :, None]
        logits.append(st)
        values.append(vf[:, :, tidx][:, :, None])
    return _vmoba_groups_out(logits, values, t["inv"], qf, kf, vf, tidx, tb, scale, key_valid, q.dtype)


# ------------------------------------------------------------------------------------ MonarchRT
def _to_tiles(x: torch.Tensor, lay) -> torch.Tensor:
    """Video tokens [b, h, Nv, D] -> [b, h, tiles, rows, columns, D] (``kernels/monarch_rt/layout.py``)."""
    b, h, _, d = x.shape
    T, H, W = lay.grid
    f, hr, wr = lay.tiling
    x = x.reshape(b, h, T // f, f, hr, lay.hc, wr, lay.b2, d).permute(0, 1, 2, 4, 6, 3, 5, 7, 8)
    return x.reshape(b, h, lay.n_tiles, lay.b1, lay.b2, d)


def _from_tiles(x: torch.Tensor, lay) -> torch.Tensor:
    """Inverse of :func:`_to_tiles`: [b, h, tiles, rows, columns, D] -> [b, h, Nv, D]."""
    b, h = x.shape[:2]
    d = x.shape[-1]
    T, H, W = lay.grid
    f, hr, wr = lay.tiling
    x = x.reshape(b, h, T // f, hr, wr, f, lay.hc, lay.b2, d).permute(0, 1, 2, 5, 3, 6, 4, 7, 8)
    return x.reshape(b, h, T * H * W, d)


def monarch_rt_lowered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, tiling,
                       text_before: int = 0, text_after: int = 0, steps: int = 1,
                       scale: Optional[float] = None, key_valid: Optional[torch.Tensor] = None,
                       cached_frames: int = 0) -> torch.Tensor:
    """MonarchRT attention (same function as ``monarch_rt_reference``) in ONNX-friendly ops.

    ``key_valid`` ([batch, N] bool, True everywhere on the video tokens) drops text keys: the
    result equals the reference run on the sequence without them. ``cached_frames``: the KV-cache
    form (``grid`` the key grid, q its last frames; the query tiles are then the tiles of the query
    grid ``(T - cached_frames, H, W)``, which are the key grid's last tiles in the same order).
    """
    from ..kernels.monarch_rt.layout import check_q_rows, check_qkv, check_steps, make_rt_layout, resolve_scale
    from ..kernels.monarch_rt.reference import CBAR_EPS

    check_qkv(q, k, v, cached_frames)
    with _real_tensors():
        lay = make_rt_layout(k.shape[2], grid, tiling, text_before, text_after, cached_frames)
        check_q_rows(q, lay)
        # the query tiles' layout: the query grid, tiled like the key grid
        qlay = make_rt_layout(lay.Nq, lay.query_grid, tiling, text_before, text_after) if lay.cached_frames else lay
    steps = check_steps(steps)
    scale = resolve_scale(scale, q.shape[-1])
    cdt = _cdt(q)
    b, h, _, D = q.shape
    N = k.shape[2]
    tb, nv, nt = lay.text_before, lay.Nv, lay.n_text
    A, Aq, b1, b2 = lay.n_tiles, lay.n_query_tiles, lay.b1, lay.b2
    gk = A * b1
    dev = q.device
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    vid = slice(tb, tb + nv)
    qt = _to_tiles(qf[:, :, tb:tb + qlay.Nv], qlay)                           # [b, h, Aq, b1, b2, D]
    kt = _to_tiles(kf[:, :, vid], lay)[:, :, None]                            # [b, h, 1, Ag, b1, b2, D]
    vt = _to_tiles(vf[:, :, vid], lay)[:, :, None]
    qj = qt.transpose(3, 4)                                                   # [b, h, A, b2(j), b1(i), D]
    tidx = _text_index(tb, nv, N, dev)
    if nt:
        kx = kf[:, :, tidx][:, :, None, None]                                 # [b, h, 1, 1, nt, D]
        vx = vf[:, :, tidx][:, :, None, None]
        tbias = _key_bias(key_valid, tidx, cdt)                               # [b, 1, 1, nt] or None
    qbar = qt[:, :, :, None]                                                  # [b, h, Aq, 1, b1(k), b2(j), D]
    video_out = None
    for step in range(steps):
        final = step == steps - 1
        # R-step of every (query tile, key tile, row, column): softmax over the row's columns
        s = torch.matmul(qbar, kt.transpose(-1, -2)) * scale                  # [b, h, Aq, Ag, b1, b2(j), b2(l)]
        lse = _lse(s, -1)
        r = torch.exp(s - lse[..., None])
        a_l = torch.matmul(r, kt) * scale                                     # [b, h, A, Ag, b1, b2, D]
        c_l = (r * s).sum(-1) - lse                                           # [b, h, A, Ag, b1, b2]
        # L-step logits z[b, h, a, j, i, (g, k)] = q[a, i, j] . A_L[a, g, k, j] - cL[a, g, k, j]
        akj = a_l.permute(0, 1, 2, 5, 3, 4, 6).reshape(b, h, Aq, b2, gk, D)
        z = torch.matmul(qj, akj.transpose(-1, -2)) - c_l.permute(0, 1, 2, 5, 3, 4).reshape(b, h, Aq, b2, 1, gk)
        if nt:
            zt = torch.matmul(qj, kx.transpose(-1, -2)) * scale               # [b, h, A, b2, b1, nt]
            if tbias is not None:
                zt = zt + tbias[:, :, None, None]
            lse_row = _lse(torch.cat([z, zt], -1), -1)
        else:
            lse_row = _lse(z, -1)                                             # [b, h, A, b2, b1]
        w = torch.exp(z - lse_row[..., None])
        if final:
            y = torch.matmul(r, vt).permute(0, 1, 2, 5, 3, 4, 6).reshape(b, h, Aq, b2, gk, D)
            o = torch.matmul(w, y)                                            # [b, h, A, b2(j), b1(i), D]
            if nt:
                o = o + torch.matmul(torch.exp(zt - lse_row[..., None]), vx)
            video_out = _from_tiles(o.transpose(3, 4), qlay)
            break
        cbar = w.sum(-2)                                                      # [b, h, A, b2, gk]
        abar = torch.matmul(w.transpose(-1, -2), qj)                          # [b, h, A, b2, gk, D]
        qbar = (abar / cbar.clamp_min(CBAR_EPS)[..., None]).reshape(b, h, Aq, b2, A, b1, D)
        qbar = qbar.permute(0, 1, 2, 4, 5, 3, 6)                              # [b, h, A, Ag, b1, b2, D]
    if not nt:
        return video_out.to(q.dtype)
    text_out = _dense_rows(qf[:, :, tidx], kf, vf, scale, _key_bias(key_valid, torch.arange(N, device=dev), cdt))
    parts = [text_out[:, :, :tb], video_out, text_out[:, :, tb:]]
    return torch.cat([p for p in parts if p.shape[2]], dim=2).to(q.dtype)
