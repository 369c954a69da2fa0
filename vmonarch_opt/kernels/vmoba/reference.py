"""Pure-PyTorch reference of VMoBA block-sparse video attention.

VMoBA (Wu et al. 2025, "Mixture-of-Block Attention for Video Diffusion Models"; public code
KwaiVGI/VMoBA ``src/vmoba.py``, built on MoonshotAI/MoBA) attends every query to a few key
*blocks* chosen from cheap block summaries. What the public code does, and what we do:

Partition (layer-wise recurrent 1D -> 2D -> 3D)
    Layer ``l`` uses ``("1d", "2d", "3d")[l % 3]`` (:func:`vmoba_partition_for_layer`). With the
    video grid ``(T, H, W)`` (tokens ordered ``(t, h, w)`` row-major) and ``chunk = (ct, ch, cw)``:
    ``"1d"`` blocks are ``ct`` consecutive frames at full spatial extent, ``"2d"`` blocks are
    ``ch x cw`` spatial tiles spanning all frames, ``"3d"`` blocks are ``ct x ch x cw`` cubes.
    Upstream asserts that the grid divides by the chunk; we allow any grid: edge blocks are
    smaller (partial blocks), their missing tokens are masked.
    Blocks are numbered ``(block_t, block_h, block_w)`` row-major; inside a block, tokens keep
    their ``(t, h, w)`` order ("block order", the order upstream obtains by rearranging q/k/v).

Block summaries and scores (group rule, ``selection="group"``)
    Upstream summarises each key block by its mean key and gates each query token with
    ``q . mean_k`` (the token rule below). The group rule keeps the mean key and selects per
    *query group* instead of per token so that its kernel runs on tiles: the tokens of every
    block, in block order, are cut into groups of at most ``QUERY_GROUP = 128`` tokens (a group
    never spans two blocks). The group
    logit for key block ``c`` is ``scale * mean_q(group) . mean_k(c)``, which equals the mean of
    the per-token gate logits of the group (the gate is linear in q).

Selection (group rule: global + threshold; top-k as an option)
    Upstream normalises the gates (min-max) and, in its ``head_global`` mode (the "global block
    selection" of the paper; default threshold 0.25), ranks all (query, block) entries of a
    head together and keeps the best until their cumulative normalised gate reaches
    ``threshold`` of the head's total, always keeping each query's own block. Ours
    uses softmaxed similarity: per group ``P[g, c] = softmax_c(logit)``
    and weight ``w[g, c] = n_g * P[g, c]`` (n_g = tokens in the group, so the head's total mass
    is the number of video tokens ``Nv``). Per (batch, head):

    * own pairs ``(g, block(g))`` are always kept;
    * ``target = threshold * Nv - sum of own weights``; the other pairs are ranked by ``P``
      (descending) and kept while the running sum of their weights has not yet reached
      ``target`` (the pair that crosses it is kept). Formally with
      ``F(v) = sum{w : other pair, P >= v}``, the cut value is ``v* = max{v : F(v) >= target}``
      and every other pair with ``P >= v*`` is kept (ties at the cut are kept together). If
      ``target <= 0`` no other pair is kept; if the others' total is below ``target`` all are.
    * ``threshold >= 1`` keeps every pair: the result equals dense attention.
    * ``topk > 0`` switches to global top-k: the same rule with ``w = 1`` and
      ``target = (min(topk, C) - 1) * G``, i.e. on average ``topk`` key blocks per query group
      (own block included), distributed over the head by score. ``threshold`` is then unused.

Token rule (``selection="token"``: upstream's own rule, ``moba_attn_varlen``)
    Per video query token ``i`` (rows in block order) and block ``c`` the gate is
    ``g_ic = q_i . kbar_c`` in float32 (float64 for float64 inputs), without the softmax scale
    (:func:`token_gate`). ``scope="query_head"`` ranks each token's C gates, ``"head_global"`` all
    ``Nv * C`` gates of a (batch, head) together (each sample alone: upstream's packed-batch call
    ranks a whole batch together). The own block is always kept (:func:`token_keep`).

    * threshold: the gates of a ranking are min-max normalised to ``n`` (a range <= 1e-6 is not
      divided); with ``T`` their sum and ``s`` the own entries' sum the others need the share
      ``r = max(0, threshold - s / (T + 1e-6))``; they are ranked by ``n`` and kept up to and
      including the first whose running sum over ``T + 1e-6`` reaches ``r`` (so the best other
      entry is kept even when ``r = 0``, as upstream's ``>=`` on a running sum starting at the
      first ranked entry does), with every entry tied with that last one; if the running sum
      never reaches ``r`` every entry is kept (:func:`threshold_keep`). Upstream keeps every entry
      there in ``head_global`` but only two others in ``query_head``: its fallback index there is
      ``full_like`` of a boolean tensor, i.e. 1 instead of C - 1; we do not copy that. With
      ``threshold >= 1`` no share can be reached: every block, exactly dense attention (upstream
      can cut a block there by float rounding of the share test).
    * top-k: the ``min(topk, C) - 1`` other blocks with the largest raw gates per token, or the
      ``(min(topk, C) - 1) * Nv`` largest other entries per head, ties with the last kept
      (:func:`topk_keep`). ``topk = 1`` is the own block alone: upstream falls back to full
      attention when no (token, head) of a call selected any block but its own.

    The selection is ``row_sel [B, H, Nv, C]``; each video query attends exactly to the tokens of
    its own selected blocks (plus text keys; with ``pooled_rest`` the others as pooled keys).

Pooled rest (``pooled_rest=True``; our addition, not in upstream VMoBA)
    Dropping the unselected blocks loses their attention mass, which for broad (high-entropy)
    heads is most of it. With ``pooled_rest`` every video query also attends to each block
    that was *not* selected for its group as one pooled key: the block's mean key ``kbar_c``
    with logit ``scale * q . kbar_c + log(n_c)`` (n_c keys that all looked like the mean) and
    the block's mean value ``vbar_c``. These enter the same softmax as the exact keys, so the
    row stays normalised; a selected block is never counted twice, and with every block
    selected the result is still exact dense attention. Cost: every video query against C
    pooled keys, ``4 * Nv * C * D`` FLOPs per head (C = N / block size: ~1/64 of dense
    attention with 64-token blocks). The coarse-plus-fine split is the idea of Video Sparse
    Attention's coarse stage and Native Sparse Attention's compressed branch, used here without
    training.

Text tokens (joint attention)
    ``text_before`` tokens precede and ``text_after`` tokens follow the video tokens. Every query
    attends to all text keys; text queries attend to all keys. Only video x video is sparse.

KV cache (``cached_frames = F > 0``)
    The keys are the whole key grid ``grid = (T_k, H, W)`` (the cached frames, then the new ones)
    and the queries are its last ``T_q = T_k - F`` frames (``N_q = T_q H W`` rows, no text).
    The key blocks partition the whole key grid exactly as above; a query's own block is the block
    holding its token; every query (token rule) or query group (group rule) selects among *all*
    ``C`` key blocks by the rule above, with the pooled rest over all of them. Query groups cut
    each block's new-frame tokens (block order) into runs of <= 128: there are no cached queries,
    so no group holds one, and the group rule's target is ``threshold * N_q``. Nothing is computed
    for the cached rows.

    When a KV-cache row equals the row of the same query in a full-grid run (``grid``, no
    cache, all ``T_k`` frames as queries, same chunk and partition): under the token rule with
    ``scope="query_head"`` (the default) always, for threshold and top-k selection, with or
    without the pooled rest, up to float summation order: a token's selection depends only on its
    own query and the blocks' mean keys, which are the same keys. Under ``scope="head_global"``
    and under the group rule the selection ranks every (query or group, block) entry of a head
    together (min-max range, running share, global cut), so it ranges over the queries present:
    the KV-cache rows are that rule applied to the new queries, and equal the full-grid rows when
    every block is selected (``threshold >= 1``, or ``topk >= C``) -- then both are dense attention.
    (The group rule's group summaries are means of the queries present, so even a query group
    that does not straddle the cache boundary would change the full run's cut through the others.)

The output is the exact softmax attention of each query over its selected keys, computed in
float32 (float64 for float64 inputs) and returned in ``q.dtype``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import TOKEN_EPS, VMoBALayout, VMoBASelection, _check_args, block_means, check_rule

__all__ = ["vmoba_select_reference", "vmoba_select_token_reference", "vmoba_attention_reference",
           "vmoba_attention_from_selection", "vmoba_flops", "token_gate", "token_keep", "threshold_keep", "topk_keep"]

_CHUNK_BYTES = 256 * 1024 * 1024


def _cut_value(P: torch.Tensor, w: torch.Tensor, own: torch.Tensor, target: torch.Tensor
               ) -> torch.Tensor:
    """Per row of P [R, M]: v* = max{v : sum(w[other & P >= v]) >= target} (see docstring).

    Returns [R] float: +inf when target <= 0 (no other pair), 0 when the others cannot reach
    the target (all pairs)."""
    R = P.shape[0]
    Po = torch.where(own, torch.full_like(P, -1.0), P)
    wo = torch.where(own, torch.zeros_like(w), w)
    sv, order = torch.sort(Po, dim=1, descending=True)
    cw = torch.cumsum(torch.gather(wo, 1, order), dim=1)
    reach = cw >= target[:, None]
    first = torch.argmax(reach.to(torch.int8), dim=1)
    cut = torch.gather(sv, 1, first[:, None])[:, 0]
    cut = torch.where(reach.any(dim=1), cut, torch.zeros_like(cut))
    cut = torch.where(target <= 0, torch.full_like(cut, float("inf")), cut)
    return cut.view(R)


def vmoba_select_reference(q: torch.Tensor, k: torch.Tensor, *, layout: VMoBALayout,
                           threshold: float, topk: int, scale: float) -> VMoBASelection:
    """Reference selection on an already validated layout (see module docstring)."""
    B, Hh, N, D = q.shape
    lay = layout
    C, G = lay.num_blocks, lay.num_groups
    dev = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if topk == 0 and threshold >= 1.0:
        sel = torch.ones(B, Hh, G, C, dtype=torch.bool, device=dev)
    else:
        tb = lay.text_before
        qv = q[:, :, tb:tb + lay.n_query_video].to(cdt)[:, :, lay.q_perm.to(dev)]  # block order
        kv = k[:, :, tb:tb + lay.n_video].to(cdt)[:, :, lay.perm.to(dev)]
        pos_block = torch.repeat_interleave(torch.arange(C), lay.block_len).to(dev)
        pos_group = torch.repeat_interleave(torch.arange(G), lay.group_len).to(dev)
        kbar = torch.zeros(B, Hh, C, D, dtype=cdt, device=dev).index_add_(2, pos_block, kv)
        kbar = kbar / lay.block_len.to(dev, cdt)[:, None]
        qbar = torch.zeros(B, Hh, G, D, dtype=cdt, device=dev).index_add_(2, pos_group, qv)
        n_g = lay.group_len.to(dev, cdt)
        qbar = qbar / n_g[:, None]
        logits = scale * torch.matmul(qbar, kbar.transpose(-1, -2))  # [B, H, G, C]
        P = torch.softmax(logits, dim=-1)
        own = torch.zeros(G, C, dtype=torch.bool, device=dev)
        own[torch.arange(G, device=dev), lay.group_block.to(dev)] = True
        own = own.expand(B, Hh, G, C)
        if topk > 0:
            w = torch.ones_like(P)
            target = torch.full((B, Hh), float((min(topk, C) - 1) * G), dtype=cdt, device=dev)
        else:
            w = P * n_g[:, None]
            own_mass = torch.where(own, w, torch.zeros_like(w)).sum(dim=(2, 3))
            target = threshold * lay.n_query_video - own_mass
        cut = _cut_value(P.reshape(B * Hh, G * C), w.reshape(B * Hh, G * C),
                         own.reshape(B * Hh, G * C), target.reshape(B * Hh))
        sel = own | (P >= cut.view(B, Hh, 1, 1))
    kv_idx, cnt = _block_lists(sel)
    return VMoBASelection(layout=lay, kv_idx=kv_idx, kv_cnt=cnt, threshold=float(threshold), topk=int(topk))


def _block_lists(sel: torch.Tensor) -> tuple:
    """``(kv_idx, kv_cnt)`` of a bool ``[..., C]`` mask: ascending block ids, -1 padded."""
    C = sel.shape[-1]
    cnt = sel.sum(-1).to(torch.int32)
    # ascending block ids first, padding (-1) after: sort keys put unselected blocks last
    cidx = torch.arange(C, device=sel.device).expand(sel.shape)
    key = torch.where(sel, cidx, cidx + C)
    kv_idx = torch.sort(key, dim=-1).values
    kv_idx = torch.where(kv_idx >= C, torch.full_like(kv_idx, -1), kv_idx).to(torch.int32)
    return kv_idx.contiguous(), cnt.contiguous()


# ----------------------------------------------------------------------------- token rule
def token_gate(q: torch.Tensor, k: torch.Tensor, layout: VMoBALayout) -> torch.Tensor:
    """The token rule's gate ``[B, H, Nv, C]``: each video query (rows in block order) dotted with
    the mean key of every block, in float32 (float64 for float64 inputs), without the softmax scale."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    tb = layout.text_before
    qv = q[:, :, tb + layout.q_perm.to(q.device)].to(cdt)
    return torch.matmul(qv, block_means(k, layout, cdt).transpose(-1, -2))


def _min_max_normalise(gate: torch.Tensor, dims) -> torch.Tensor:
    """``(gate - min) / (max - min)`` over ``dims``; a range <= TOKEN_EPS divides by 1 instead."""
    lo = gate.amin(dim=dims, keepdim=True)
    rng = gate.amax(dim=dims, keepdim=True) - lo
    return (gate - lo) / torch.where(rng <= TOKEN_EPS, torch.ones_like(rng), rng)


def threshold_keep(n: torch.Tensor, own: torch.Tensor, threshold: float) -> torch.Tensor:
    """Other entries kept by the token rule's threshold, per row of ``n`` (normalised gates >= 0,
    ``[R, E]``; ``own`` marks the entries always kept, [R, E] bool).

    With ``T`` the row's total and ``s`` the own entries' sum, the others need the share
    ``r = max(0, threshold - s / (T + eps))``. They are ranked by ``n`` (descending) and kept up to
    and including the first one at which their running sum divided by ``T + eps`` reaches ``r``;
    entries tied with that last one are kept too. At least the best other entry is kept (the
    first running sum always reaches ``r = 0``); if the others never reach ``r``, all are kept."""
    total = n.sum(1)
    share_needed = torch.clamp(threshold - (n * own).sum(1) / (total + TOKEN_EPS), min=0.0)
    others = torch.where(own, torch.full_like(n, -1.0), n)  # own entries rank after every other
    ranked, _ = torch.sort(others, dim=1, descending=True)
    running = torch.cumsum(ranked.clamp_min(0.0), dim=1) / (total + TOKEN_EPS)[:, None]
    reach = ((running >= share_needed[:, None]) & (ranked >= 0)).to(n.dtype)
    first = torch.argmax(reach, dim=1, keepdim=True)
    cut = torch.gather(ranked, 1, first)
    cut = torch.where(reach.amax(dim=1, keepdim=True) > 0, cut, torch.zeros_like(cut))  # never reached: all
    return ~own & (n >= cut)


def topk_keep(g: torch.Tensor, own: torch.Tensor, count: int, n_others: int) -> torch.Tensor:
    """Other entries kept by the token rule's top-k, per row of ``g`` ([R, E] raw gates, ``n_others``
    other entries per row): the ``count`` largest, and any tied with the last of them."""
    if count <= 0:
        return torch.zeros_like(own)
    if count >= n_others:
        return ~own
    others = torch.where(own, torch.full_like(g, float("-inf")), g)
    cut = torch.topk(others, count, dim=1).values[:, -1:]
    return ~own & (g >= cut)


def token_keep(gate: torch.Tensor, own: torch.Tensor, threshold: float, topk: int, scope: str) -> torch.Tensor:
    """The token rule on gates ``[B, H, Nv, C]`` (``own``: [Nv, C] bool, each token's own block):
    bool ``[B, H, Nv, C]``, own blocks included. Vectorised over batch and heads (the ONNX
    lowering traces it too)."""
    B, H, nv, C = gate.shape
    if topk == 0 and threshold >= 1.0:
        return torch.ones_like(gate, dtype=torch.bool)
    if scope == "query_head":  # one ranking per query token, over its C blocks
        rows, own_rows, per_row = gate.reshape(B * H * nv, C), own.repeat(B * H, 1), 1
    else:  # "head_global": one ranking per (batch, head), over every (token, block) entry
        rows, own_rows, per_row = gate.reshape(B * H, nv * C), own.reshape(1, nv * C).expand(B * H, -1), nv
    if topk > 0:
        kept = topk_keep(rows, own_rows, (min(topk, C) - 1) * per_row, (C - 1) * per_row)
    else:
        kept = threshold_keep(_min_max_normalise(rows, (1,)), own_rows, threshold)
    return kept.reshape(B, H, nv, C) | own


def vmoba_select_token_reference(q: torch.Tensor, k: torch.Tensor, *, layout: VMoBALayout,
                                 threshold: float, topk: int, scope: str = "query_head") -> VMoBASelection:
    """The token rule (module docstring) on an already validated layout: per video query token
    (rows in block order) its key blocks, as ``row_sel``."""
    lay = layout
    C = lay.num_blocks
    pos_block = torch.repeat_interleave(torch.arange(C), lay.q_block_len).to(q.device)
    own = torch.nn.functional.one_hot(pos_block, C).bool()  # [Nv, C], rows in block order
    if topk == 0 and threshold >= 1.0:
        keep = own.expand(q.shape[0], q.shape[1], -1, -1) | True
    else:
        keep = token_keep(token_gate(q, k, lay), own, threshold, topk, scope)
    return VMoBASelection(layout=lay, kv_idx=None, kv_cnt=None, threshold=float(threshold), topk=int(topk),
                          selection="token", scope=scope, row_sel=keep)


def vmoba_attention_from_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   selection: VMoBASelection, scale: float,
                                   pooled_rest: bool = False) -> torch.Tensor:
    """Exact softmax attention restricted to the selected blocks (plus dense text); with
    ``pooled_rest`` the unselected blocks join as pooled keys (module docstring)."""
    lay = selection.layout
    B, Hh, Nq, D = q.shape
    N = k.shape[2]  # keys (more than the queries with a KV cache)
    dev = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    tb, nv, nq = lay.text_before, lay.n_video, lay.n_query_video
    perm, qperm = lay.perm.to(dev), lay.q_perm.to(dev)
    out = torch.empty_like(q)
    kf, vf = k.to(cdt), v.to(cdt)
    # keys in the order [text_before, video in block order, text_after]
    korder = torch.cat([torch.arange(tb, device=dev), tb + perm,
                        torch.arange(tb + nv, N, device=dev)])
    kp, vp = kf[:, :, korder], vf[:, :, korder]
    key_block = torch.repeat_interleave(torch.arange(lay.num_blocks), lay.block_len).to(dev)
    sel = selection.mask().to(dev)  # [B, H, G, C]
    text_cols = torch.ones(B, Hh, 1, tb, dtype=torch.bool, device=dev)
    text_cols_after = torch.ones(B, Hh, 1, N - tb - nv, dtype=torch.bool, device=dev)
    q_group = torch.repeat_interleave(torch.arange(lay.num_groups), lay.group_len).to(dev)
    if pooled_rest:  # one pooled key per block, appended after the token keys
        kp = torch.cat([kp, block_means(k, lay, cdt)], dim=2)
        vp = torch.cat([vp, block_means(v, lay, cdt)], dim=2)
        log_n = torch.log(lay.block_len.to(dev, cdt))
    rows = max(1, min(nq, _CHUNK_BYTES // max(1, 3 * B * Hh * N * 4)))
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        qr = q[:, :, tb + qperm[r0:r1]].to(cdt)
        if selection.row_sel is not None:  # token rule: each token's own blocks
            group_sel = selection.row_mask(r0, r1).to(dev)  # [B, H, r, C]
        else:
            group_sel = sel[:, :, q_group[r0:r1]]
        parts = [text_cols.expand(-1, -1, r1 - r0, -1), group_sel[..., key_block],
                 text_cols_after.expand(-1, -1, r1 - r0, -1)]
        if pooled_rest:
            parts.append(~group_sel)  # pooled keys of the blocks not attended exactly
        mask = torch.cat(parts, dim=-1)
        logits = torch.matmul(qr, kp.transpose(-1, -2)) * scale
        if pooled_rest:
            logits[..., N:] += log_n
        logits = logits.masked_fill(~mask, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out[:, :, tb + qperm[r0:r1]] = torch.matmul(p, vp).to(q.dtype)
        del logits, p, mask, group_sel
    # text queries: dense over all keys (no pooled keys)
    text_rows = torch.cat([torch.arange(tb, device=dev), torch.arange(tb + nq, Nq, device=dev)])
    if text_rows.numel():
        logits = torch.matmul(q[:, :, text_rows].to(cdt), kf.transpose(-1, -2)) * scale
        out[:, :, text_rows] = torch.matmul(torch.softmax(logits, -1), vf).to(q.dtype)
    return out


def vmoba_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, chunk,
                              text_before: int = 0, text_after: int = 0, partition: str = "3d",
                              threshold: float = 0.25, topk: int = 0,
                              scale: Optional[float] = None, pooled_rest: bool = False,
                              selection: str = "group", scope: Optional[str] = None,
                              cached_frames: int = 0) -> torch.Tensor:
    """VMoBA attention output [B, H, N_q, D] in ``q.dtype`` (see module docstring; ``cached_frames``:
    the KV-cache form, "KV cache" there)."""
    s, lay, threshold, topk = _check_args(q, k, v, grid, chunk, text_before, text_after,
                                          partition, threshold, topk, scale,
                                          "vmoba_attention_reference", cached_frames)
    selection, scope = check_rule(selection, scope, "vmoba_attention_reference")
    if selection == "token":
        sel = vmoba_select_token_reference(q, k, layout=lay, threshold=threshold, topk=topk, scope=scope)
    else:
        sel = vmoba_select_reference(q, k, layout=lay, threshold=threshold, topk=topk, scale=s)
    return vmoba_attention_from_selection(q, k, v, sel, s, pooled_rest=pooled_rest)


def vmoba_flops(selection: VMoBASelection, head_dim: int, pooled_rest: bool = False) -> int:
    """Attention FLOPs actually executed for ``selection`` (QK^T and PV, 2 FLOPs per MAC each).

    Counted like ``4 * B * H * Nq * Nk * D`` for dense attention: selected video pairs (the
    kernels of both rules compute exactly those), plus every video query against the text keys,
    plus every text query against all keys. With every block selected this equals the dense count
    exactly. ``pooled_rest`` adds every video query against all C pooled keys (the kernel visits
    them all and masks the selected ones).
    """
    lay = selection.layout
    N, nt, nq = lay.n_tokens, lay.n_text, lay.n_query_video
    video = int(selection.video_pairs().sum())
    bh = selection.batch * selection.heads
    text = bh * (nq * nt + nt * N)
    pooled = bh * nq * lay.num_blocks if pooled_rest else 0
    return int(4 * int(head_dim) * (video + text + pooled))
