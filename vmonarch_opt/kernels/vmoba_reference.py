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

Block summaries and scores
    Upstream summarises each key block by its mean key and gates each query token with
    ``q . mean_k``. We keep the mean key, and select per *query group* instead of per token so
    that the kernel runs on tiles: the tokens of every block, in block order, are cut into
    groups of at most ``QUERY_GROUP = 128`` tokens (a group never spans two blocks). The group
    logit for key block ``c`` is ``scale * mean_q(group) . mean_k(c)``, which equals the mean of
    the per-token gate logits of the group (the gate is linear in q).

Selection (global + threshold; top-k as an option)
    Upstream normalises the gates (min-max) and, in its ``head_global`` mode (the "global block
    selection" of the paper; default threshold 0.25), ranks all (query, block) entries of a
    head together and keeps the best until their cumulative normalised gate reaches
    ``threshold`` of the head's total, always keeping each query's own block. Ours, as
    DESIGN.md §4 specifies, uses softmaxed similarity: per group ``P[g, c] = softmax_c(logit)``
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

The output is the exact softmax attention of each query over its selected keys, computed in
float32 (float64 for float64 inputs) and returned in ``q.dtype``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .flash_reference import check_attention_inputs

__all__ = [
    "QUERY_GROUP",
    "PARTITIONS",
    "VMoBALayout",
    "VMoBASelection",
    "vmoba_partition_for_layer",
    "vmoba_layout",
    "vmoba_select",
    "vmoba_select_reference",
    "vmoba_attention_reference",
    "vmoba_attention_from_selection",
    "vmoba_flops",
    "block_means",
]

QUERY_GROUP = 128
PARTITIONS = ("1d", "2d", "3d")
_CHUNK_BYTES = 256 * 1024 * 1024


def vmoba_partition_for_layer(layer_index: int) -> str:
    """The layer-wise recurrent partition: layer 0 -> "1d", 1 -> "2d", 2 -> "3d", 3 -> "1d", ..."""
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
        raise ValueError(f"layer_index must be a non-negative int, got {layer_index!r}")
    return PARTITIONS[layer_index % 3]


def _triple(x, name: str) -> tuple:
    try:
        t = tuple(int(v) for v in x)
    except TypeError:
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {x!r}") from None
    if len(t) != 3 or any(v < 1 for v in t) or any(int(v) != v for v in x):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {x!r}")
    return t


@dataclass(frozen=True)
class VMoBALayout:
    """Geometry of the key blocks and query groups of one (grid, chunk, partition).

    All index tensors are int64 on CPU unless moved with :meth:`to`.

    * ``perm[p]``: video-token index (0-based within the video tokens) of block-order position p.
    * ``block_off[c]``, ``block_len[c]``: block c occupies ``perm[block_off[c] : +block_len[c]]``.
    * ``group_block[g]``: the block ("own block") of query group g; ``group_start[g]`` its first
      position *inside* that block; ``group_len[g]`` its token count (<= QUERY_GROUP).
      Groups of one block are consecutive.
    """

    grid: tuple
    chunk: tuple  # effective (ct, ch, cw) after applying the partition and clipping to the grid
    partition: str
    text_before: int
    text_after: int
    perm: torch.Tensor
    block_off: torch.Tensor
    block_len: torch.Tensor
    group_block: torch.Tensor
    group_start: torch.Tensor
    group_len: torch.Tensor

    @property
    def n_video(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def n_text(self) -> int:
        return self.text_before + self.text_after

    @property
    def n_tokens(self) -> int:
        return self.n_video + self.n_text

    @property
    def num_blocks(self) -> int:
        return int(self.block_len.numel())

    @property
    def num_groups(self) -> int:
        return int(self.group_len.numel())

    @property
    def max_block_len(self) -> int:
        return int(self.block_len.max())


def _effective_chunk(grid: tuple, chunk: tuple, partition: str) -> tuple:
    T, H, W = grid
    ct, ch, cw = chunk
    if partition == "1d":
        eff = (ct, H, W)
    elif partition == "2d":
        eff = (T, ch, cw)
    elif partition == "3d":
        eff = (ct, ch, cw)
    else:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r} "
                         f"(vmoba_partition_for_layer(i) gives the layer's place in the cycle)")
    return tuple(min(e, g) for e, g in zip(eff, grid))


_LAYOUT_CACHE: dict = {}


def vmoba_layout(grid: Sequence[int], chunk: Sequence[int], partition: str = "3d",
                 text_before: int = 0, text_after: int = 0) -> VMoBALayout:
    """Block / query-group geometry (pure index arithmetic, cached on CPU)."""
    grid = _triple(grid, "grid")
    chunk = _triple(chunk, "chunk")
    for name, val in (("text_before", text_before), ("text_after", text_after)):
        if isinstance(val, bool) or int(val) != val or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    eff = _effective_chunk(grid, chunk, partition)
    key = (grid, eff, partition, int(text_before), int(text_after))
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None:
        return hit
    T, H, W = grid
    ct, ch, cw = eff
    nbt, nbh, nbw = -(-T // ct), -(-H // ch), -(-W // cw)
    tok = torch.arange(T * H * W).view(T, H, W)
    perm, lens = [], []
    for bt in range(nbt):
        for bh in range(nbh):
            for bw in range(nbw):
                blk = tok[bt * ct:(bt + 1) * ct, bh * ch:(bh + 1) * ch, bw * cw:(bw + 1) * cw]
                perm.append(blk.reshape(-1))
                lens.append(blk.numel())
    block_len = torch.tensor(lens, dtype=torch.int64)
    block_off = torch.cumsum(block_len, 0) - block_len
    gb, gs, gl = [], [], []
    for c, n in enumerate(lens):
        for s in range(0, n, QUERY_GROUP):
            gb.append(c)
            gs.append(s)
            gl.append(min(QUERY_GROUP, n - s))
    lay = VMoBALayout(grid=grid, chunk=eff, partition=partition, text_before=int(text_before),
                      text_after=int(text_after), perm=torch.cat(perm), block_off=block_off,
                      block_len=block_len, group_block=torch.tensor(gb, dtype=torch.int64),
                      group_start=torch.tensor(gs, dtype=torch.int64),
                      group_len=torch.tensor(gl, dtype=torch.int64))
    if len(_LAYOUT_CACHE) > 64:
        _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE[key] = lay
    return lay


@dataclass
class VMoBASelection:
    """The selected (query-group, key-block) pairs of every (batch, head).

    * ``layout``: the :class:`VMoBALayout` (blocks, groups, token permutation).
    * ``kv_idx``: int32 [B, H, G, C]; row (b, h, g) lists the selected key blocks of query group
      g in ascending order in its first ``kv_cnt[b, h, g]`` entries, the rest is -1.
    * ``kv_cnt``: int32 [B, H, G], >= 1 (the own block is always selected).
    * ``threshold``, ``topk``: the rule that produced it.

    Text keys are attended by every query and text queries attend to all keys; they are not
    listed here (see :func:`vmoba_flops`).
    """

    layout: VMoBALayout
    kv_idx: torch.Tensor
    kv_cnt: torch.Tensor
    threshold: float
    topk: int
    # (k, v) video rows copied into block order by the Triton selection when it was given v;
    # the attention kernel reads them instead of copying again (None: not made)
    block_kv: Optional[tuple] = field(default=None, repr=False, compare=False)
    # (mean key, mean value) per block, float32 [B*H, C, padded head_dim], made by the Triton
    # selection when asked to (pooled rest); None: not made
    block_means: Optional[tuple] = field(default=None, repr=False, compare=False)

    @property
    def batch(self) -> int:
        return int(self.kv_cnt.shape[0])

    @property
    def heads(self) -> int:
        return int(self.kv_cnt.shape[1])

    @property
    def num_pairs(self) -> int:
        """Total selected (query-group, key-block) pairs over batch and heads."""
        return int(self.kv_cnt.long().sum())

    def mask(self) -> torch.Tensor:
        """Dense bool [B, H, G, C] view of the selection (G x C per head, never tokens^2)."""
        B, H, G, C = self.kv_idx.shape
        m = torch.zeros(B, H, G, C + 1, dtype=torch.bool, device=self.kv_idx.device)
        idx = self.kv_idx.long()
        idx = idx.masked_fill(idx < 0, C)  # no boolean indexing: no device sync (CUDA graphs)
        m.scatter_(3, idx, True)
        return m[..., :C]

    def video_pairs(self) -> torch.Tensor:
        """Selected video (query token, key token) pairs per (batch, head), int64 [B, H]."""
        lay = self.layout
        m = self.mask().to(torch.float64)
        bl = lay.block_len.to(m.device, torch.float64)
        gl = lay.group_len.to(m.device, torch.float64)
        return torch.einsum("bhgc,g,c->bh", m, gl, bl).round().long()

    @property
    def density(self) -> float:
        """Fraction of the video x video token pairs that are computed (1.0 = dense)."""
        nv = self.layout.n_video
        return float(self.video_pairs().double().mean()) / float(nv * nv)


def _check_args(q, k, v, grid, chunk, text_before, text_after, partition, threshold, topk,
                scale, who):
    s = check_attention_inputs(q, k, v, scale, who)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{who}: VMoBA is self-attention over one token sequence; q has "
                         f"{q.shape[2]} tokens and k has {k.shape[2]}")
    lay = vmoba_layout(grid, chunk, partition, text_before, text_after)
    if q.shape[2] != lay.n_tokens:
        raise ValueError(f"{who}: sequence length {q.shape[2]} != text_before + T*H*W + text_after "
                         f"= {lay.text_before} + {lay.n_video} + {lay.text_after} = {lay.n_tokens}; "
                         f"pass the grid and text token counts of this attention site")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: threshold must be a number in (0, 1], got {threshold!r}") from None
    if not math.isfinite(threshold) or threshold <= 0.0:
        raise ValueError(f"{who}: threshold must be a finite number > 0 (1.0 keeps every block), "
                         f"got {threshold}")
    if isinstance(topk, bool) or int(topk) != topk or topk < 0:
        raise ValueError(f"{who}: topk must be a non-negative int (0 = threshold selection), "
                         f"got {topk!r}")
    return s, lay, threshold, int(topk)


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
        perm = lay.perm.to(dev)
        qv = q[:, :, tb:tb + lay.n_video].to(cdt)[:, :, perm]  # block order
        kv = k[:, :, tb:tb + lay.n_video].to(cdt)[:, :, perm]
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
            target = threshold * lay.n_video - own_mass
        cut = _cut_value(P.reshape(B * Hh, G * C), w.reshape(B * Hh, G * C),
                         own.reshape(B * Hh, G * C), target.reshape(B * Hh))
        sel = own | (P >= cut.view(B, Hh, 1, 1))
    cnt = sel.sum(-1).to(torch.int32)
    # ascending block ids first, padding (-1) after: sort keys put unselected blocks last
    cidx = torch.arange(C, device=dev).expand(B, Hh, G, C)
    key = torch.where(sel, cidx, cidx + C)
    kv_idx = torch.sort(key, dim=-1).values
    kv_idx = torch.where(kv_idx >= C, torch.full_like(kv_idx, -1), kv_idx).to(torch.int32)
    return VMoBASelection(layout=lay, kv_idx=kv_idx.contiguous(), kv_cnt=cnt.contiguous(),
                          threshold=float(threshold), topk=int(topk))


def vmoba_select(q: torch.Tensor, k: torch.Tensor, *, grid, chunk, text_before: int = 0,
                 text_after: int = 0, partition: str = "3d", threshold: float = 0.25,
                 topk: int = 0, scale: Optional[float] = None) -> VMoBASelection:
    """The block selection alone (a :class:`VMoBASelection`); Triton on CUDA, torch elsewhere."""
    s, lay, threshold, topk = _check_args(q, k, k, grid, chunk, text_before, text_after,
                                          partition, threshold, topk, scale, "vmoba_select")
    if q.is_cuda:
        from .vmoba import vmoba_select_triton
        return vmoba_select_triton(q, k, layout=lay, threshold=threshold, topk=topk, scale=s)
    return vmoba_select_reference(q, k, layout=lay, threshold=threshold, topk=topk, scale=s)


def _block_table(layout: VMoBALayout, device) -> tuple:
    """``(idx [C, Lmax], valid [C, Lmax])``: sequence index of each block's tokens, padded."""
    key = (layout.grid, layout.chunk, layout.partition, layout.text_before, layout.text_after, str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        L = layout.max_block_len
        pos = torch.arange(L)[None, :]
        valid = pos < layout.block_len[:, None]
        idx = torch.where(valid, layout.block_off[:, None] + pos, 0)
        idx = layout.perm[idx] + layout.text_before
        hit = (idx.to(device), valid.to(device))
        if len(_TABLE_CACHE) > 64:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = hit
    return hit


_TABLE_CACHE: dict = {}


def block_means(x: torch.Tensor, layout: VMoBALayout, dtype=None) -> torch.Tensor:
    """Mean of ``x [B, H, N, D]``'s video rows over each key block: ``[B, H, C, D]``, summed
    in float32 (float64 for float64 input) or ``dtype``. One gather of the video rows into a
    padded [C, longest block] table and a sum (no atomics: fast on the GPU too)."""
    cdt = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    idx, valid = _block_table(layout, x.device)
    rows = x[:, :, idx]  # [B, H, C, Lmax, D]
    if not bool(valid.all()):
        rows = rows.masked_fill(~valid[:, :, None], 0)
    n = layout.block_len.to(x.device, cdt)[:, None]
    return torch.sum(rows, dim=3, dtype=cdt) / n


def vmoba_attention_from_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   selection: VMoBASelection, scale: float,
                                   pooled_rest: bool = False) -> torch.Tensor:
    """Exact softmax attention restricted to the selected blocks (plus dense text); with
    ``pooled_rest`` the unselected blocks join as pooled keys (module docstring)."""
    lay = selection.layout
    B, Hh, N, D = q.shape
    dev = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    tb, nv = lay.text_before, lay.n_video
    perm = lay.perm.to(dev)
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
    rows = max(1, min(nv, _CHUNK_BYTES // max(1, 3 * B * Hh * N * 4)))
    for r0 in range(0, nv, rows):
        r1 = min(nv, r0 + rows)
        qr = q[:, :, tb + perm[r0:r1]].to(cdt)
        group_sel = sel[:, :, q_group[r0:r1]]  # [B, H, r, C]
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
        out[:, :, tb + perm[r0:r1]] = torch.matmul(p, vp).to(q.dtype)
        del logits, p, mask, group_sel
    # text queries: dense over all keys (no pooled keys)
    text_rows = torch.cat([torch.arange(tb, device=dev), torch.arange(tb + nv, N, device=dev)])
    if text_rows.numel():
        logits = torch.matmul(q[:, :, text_rows].to(cdt), kf.transpose(-1, -2)) * scale
        out[:, :, text_rows] = torch.matmul(torch.softmax(logits, -1), vf).to(q.dtype)
    return out


def vmoba_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, chunk,
                              text_before: int = 0, text_after: int = 0, partition: str = "3d",
                              threshold: float = 0.25, topk: int = 0,
                              scale: Optional[float] = None, pooled_rest: bool = False) -> torch.Tensor:
    """VMoBA attention output [B, H, N, D] in ``q.dtype`` (see module docstring)."""
    s, lay, threshold, topk = _check_args(q, k, v, grid, chunk, text_before, text_after,
                                          partition, threshold, topk, scale,
                                          "vmoba_attention_reference")
    sel = vmoba_select_reference(q, k, layout=lay, threshold=threshold, topk=topk, scale=s)
    return vmoba_attention_from_selection(q, k, v, sel, s, pooled_rest=pooled_rest)


def vmoba_flops(selection: VMoBASelection, head_dim: int, pooled_rest: bool = False) -> int:
    """Attention FLOPs actually executed for ``selection`` (QK^T and PV, 2 FLOPs per MAC each).

    Counted like ``4 * B * H * Nq * Nk * D`` for dense attention: selected video pairs, plus
    every video query against the text keys, plus every text query against all keys. With every
    block selected this equals the dense count exactly. ``pooled_rest`` adds every video query
    against all C pooled keys (the kernel visits them all and masks the selected ones).
    """
    lay = selection.layout
    N, nt, nv = lay.n_tokens, lay.n_text, lay.n_video
    video = int(selection.video_pairs().sum())
    bh = selection.batch * selection.heads
    text = bh * (nv * nt + nt * N)
    pooled = bh * nv * lay.num_blocks if pooled_rest else 0
    return int(4 * int(head_dim) * (video + text + pooled))
