"""Geometry of VMoBA's key blocks and query groups on a video grid, the selection record, and
argument checks: shared by the pure-PyTorch reference and the Triton kernels (see
``reference.py`` for the algorithm)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..flash.reference import check_attention_inputs

__all__ = ["QUERY_GROUP", "PARTITIONS", "SELECTIONS", "SCOPES", "TOKEN_EPS", "MAX_TOKEN_BLOCKS", "VMoBALayout", "VMoBASelection",
           "vmoba_partition_for_layer", "vmoba_layout", "block_means", "default_scope", "check_rule"]

QUERY_GROUP = 128
PARTITIONS = ("1d", "2d", "3d")
SELECTIONS = ("group", "token")  # selection rules (reference.py)
SCOPES = ("query_head", "head_global")  # where the token rule normalises and ranks
TOKEN_EPS = 1e-6  # the token rule's epsilon (gate range floor, share denominators), as the paper code's
MAX_TOKEN_BLOCKS = 512  # the token rule's Triton selection holds a token's C gates in registers


def default_scope(selection: str) -> str:
    """The scope a rule uses when none is given: the token rule per (query token, head) as the paper
    implementation's default; the group rule has only its per-head scope."""
    return "query_head" if selection == "token" else "head_global"


def check_rule(selection, scope, who: str) -> tuple:
    """``(selection, scope)`` validated (``scope=None``: the rule's default)."""
    if selection not in SELECTIONS:
        raise ValueError(f"{who}: selection must be one of {SELECTIONS}, got {selection!r} (\"token\": the "
                         f"paper implementation's per-query-token rule; \"group\": per query group of "
                         f"<= {QUERY_GROUP} tokens)")
    scope = default_scope(selection) if scope is None else scope
    if scope not in SCOPES:
        raise ValueError(f"{who}: scope must be one of {SCOPES} (or None for the rule's default), got {scope!r}")
    if selection == "group" and scope != "head_global":
        raise ValueError(f"{who}: the group rule ranks its (group, block) pairs over the whole head: use "
                         f"scope=\"head_global\" (or None), or selection=\"token\" for scope={scope!r}")
    return selection, scope



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
      position *inside* that block's queries; ``group_len[g]`` its token count (<= QUERY_GROUP).
      Groups of one block are consecutive.

    KV-cache form (``cached_frames = F > 0``): ``grid`` is the *key* grid ``(T_k, H, W)`` and the
    queries are its last ``T_k - F`` frames. ``perm`` / ``block_off`` / ``block_len`` describe the
    key blocks of the whole key grid; the queries have their own block order:

    * ``q_perm[p]``: query video-token index (0-based within the queries' video tokens) of query
      position p; the queries of key block c (its tokens in frames >= F, in block order) occupy
      positions ``[q_block_off[c], +q_block_len[c])`` (a block entirely in the cache has none);
    * groups cut each block's *queries* into runs of <= QUERY_GROUP: a group never holds a cached
      token (there are no cached queries) and never spans two blocks.

    Without a cache ``q_perm is perm`` and ``q_block_off is block_off``: one geometry. ``keys`` is
    the layout whose groups cover every key (the KV form's key summaries are summed over it).
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
    cached_frames: int = 0
    q_perm: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    q_block_off: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    q_block_len: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    key_layout: Optional["VMoBALayout"] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.q_perm is None:  # no cache: the queries are the keys
            object.__setattr__(self, "q_perm", self.perm)
            object.__setattr__(self, "q_block_off", self.block_off)
            object.__setattr__(self, "q_block_len", self.block_len)

    @property
    def keys(self) -> "VMoBALayout":
        """The layout whose query groups cover every key token (``self`` without a cache)."""
        return self if self.key_layout is None else self.key_layout

    @property
    def n_video(self) -> int:
        """Video tokens of the (key) grid."""
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def n_query_video(self) -> int:
        """Video query tokens: ``n_video`` without a cache, the last ``T_k - F`` frames with one."""
        return (self.grid[0] - self.cached_frames) * self.grid[1] * self.grid[2]

    @property
    def n_text(self) -> int:
        return self.text_before + self.text_after

    @property
    def n_tokens(self) -> int:
        """Key sequence length."""
        return self.n_video + self.n_text

    @property
    def n_query_tokens(self) -> int:
        return self.n_query_video + self.n_text

    @property
    def num_blocks(self) -> int:
        return int(self.block_len.numel())

    @property
    def num_groups(self) -> int:
        return int(self.group_len.numel())

    @property
    def max_block_len(self) -> int:
        # the first block is a whole (clipped) chunk: no tensor read, so it works while tracing
        return self.chunk[0] * self.chunk[1] * self.chunk[2]


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


def _faking() -> bool:
    """A FakeTensorMode is active (AOT autograd / torch.export tracing): tensors made now are fake
    and real ones may not mix with them, so the layout caches are neither read nor written."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _groups(lens) -> tuple:
    """Query groups of blocks holding ``lens`` queries each: runs of <= QUERY_GROUP."""
    gb, gs, gl = [], [], []
    for c, n in enumerate(lens):
        for s in range(0, n, QUERY_GROUP):
            gb.append(c)
            gs.append(s)
            gl.append(min(QUERY_GROUP, n - s))
    i64 = dict(dtype=torch.int64)
    return torch.tensor(gb, **i64), torch.tensor(gs, **i64), torch.tensor(gl, **i64)


def vmoba_layout(grid: Sequence[int], chunk: Sequence[int], partition: str = "3d",
                 text_before: int = 0, text_after: int = 0, cached_frames: int = 0) -> VMoBALayout:
    """Block / query-group geometry (pure index arithmetic, cached on CPU). ``cached_frames = F``:
    the KV-cache form, ``grid`` the key grid and the queries its last frames (``VMoBALayout``)."""
    grid = _triple(grid, "grid")
    chunk = _triple(chunk, "chunk")
    for name, val in (("text_before", text_before), ("text_after", text_after), ("cached_frames", cached_frames)):
        if isinstance(val, bool) or int(val) != val or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    F = int(cached_frames)
    if F:
        if F >= grid[0]:
            raise ValueError(f"cached_frames={F} leaves no query frame of the key grid {grid}: the queries are the "
                             f"last grid[0] - cached_frames frames")
        if text_before or text_after:
            raise ValueError("the KV-cache form of VMoBA has no text tokens (text_before = text_after = 0)")
    eff = _effective_chunk(grid, chunk, partition)
    key = (grid, eff, partition, int(text_before), int(text_after), F)
    faking = _faking()
    hit = None if faking else _LAYOUT_CACHE.get(key)
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
    perm = torch.cat(perm)
    extra = {}
    if F:  # the queries: each block's tokens in frames >= F, in block order
        keys = vmoba_layout(grid, chunk, partition)
        first = F * H * W
        is_q = perm >= first
        q_perm = perm[is_q] - first
        q_len = torch.stack([is_q[o:o + n].sum() for o, n in zip(block_off.tolist(), lens)]).to(torch.int64)
        extra = dict(cached_frames=F, q_perm=q_perm, q_block_off=torch.cumsum(q_len, 0) - q_len,
                     q_block_len=q_len, key_layout=keys)
        lens = q_len.tolist()
    gb, gs, gl = _groups(lens)
    lay = VMoBALayout(grid=grid, chunk=eff, partition=partition, text_before=int(text_before),
                      text_after=int(text_after), perm=perm, block_off=block_off,
                      block_len=block_len, group_block=gb, group_start=gs, group_len=gl, **extra)
    if faking:
        return lay
    if len(_LAYOUT_CACHE) > 64:
        _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE[key] = lay
    return lay


@dataclass
class VMoBASelection:
    """The selected key blocks of every (batch, head) and query group (group rule) or video query
    token (token rule).

    * ``layout``: the :class:`VMoBALayout` (blocks, groups, token permutation).
    * ``kv_idx``: int32 [B, H, G, C]; row (b, h, g) lists the selected key blocks of query group
      g in ascending order in its first ``kv_cnt[b, h, g]`` entries, the rest is -1. Group rule
      only (None for the token rule).
    * ``kv_cnt``: int32 [B, H, G], >= 1 (the own block is always selected); group rule only.
    * ``row_sel`` (token rule only): bool [B, H, Nv, C], True where the video token at
      block-order position p selected key block c (its own block always).
    * ``threshold``, ``topk``, ``selection`` (``"group"`` | ``"token"``), ``scope``: the rule.

    Text keys are attended by every query and text queries attend to all keys; they are not
    listed here (see :func:`vmoba_flops`).
    """

    layout: VMoBALayout
    kv_idx: Optional[torch.Tensor]
    kv_cnt: Optional[torch.Tensor]
    threshold: float
    topk: int
    # (k, v) video rows copied into block order by the Triton selection when it was given v;
    # the attention kernel reads them instead of copying again (None: not made)
    block_kv: Optional[tuple] = field(default=None, repr=False, compare=False)
    # (mean key, mean value) per block, float32 [B*H, C, padded head_dim], made by the Triton
    # selection when asked to (pooled rest); None: not made
    block_means: Optional[tuple] = field(default=None, repr=False, compare=False)
    selection: str = "group"
    scope: str = "head_global"
    row_sel: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @property
    def _shape_src(self) -> torch.Tensor:
        return self.row_sel if self.row_sel is not None else self.kv_cnt

    @property
    def batch(self) -> int:
        return int(self._shape_src.shape[0])

    @property
    def heads(self) -> int:
        return int(self._shape_src.shape[1])

    @property
    def num_pairs(self) -> int:
        """Selected (query group or token, key block) pairs over batch and heads."""
        if self.row_sel is not None:
            return int(self.row_sel.sum())
        return int(self.kv_cnt.long().sum())

    def mask(self) -> torch.Tensor:
        """Dense bool [B, H, G, C] view of the selection (G x C per head, never tokens^2); under
        the token rule the union over each group's tokens."""
        if self.row_sel is not None:
            lay = self.layout
            pos_group = torch.repeat_interleave(torch.arange(lay.num_groups), lay.group_len).to(self.row_sel.device)
            B, H, _, C = self.row_sel.shape
            cnt = torch.zeros(B, H, lay.num_groups, C, dtype=torch.int32, device=self.row_sel.device)
            return cnt.index_add_(2, pos_group, self.row_sel.to(torch.int32)) > 0
        B, H, G, C = self.kv_idx.shape
        m = torch.zeros(B, H, G, C + 1, dtype=torch.bool, device=self.kv_idx.device)
        idx = self.kv_idx.long()
        idx = idx.masked_fill(idx < 0, C)  # no boolean indexing: no device sync (CUDA graphs)
        m.scatter_(3, idx, True)
        return m[..., :C]

    def row_mask(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Bool [B, H, rows, C]: the key blocks of the video tokens at block-order positions
        ``[start, stop)`` (token rule: their own; group rule: their group's)."""
        lay = self.layout
        stop = lay.n_query_video if stop is None else stop
        if self.row_sel is not None:
            return self.row_sel[:, :, start:stop]
        pos_group = torch.repeat_interleave(torch.arange(lay.num_groups), lay.group_len)[start:stop]
        return self.mask()[:, :, pos_group.to(self.kv_idx.device)]

    def video_pairs(self) -> torch.Tensor:
        """Selected video (query token, key token) pairs per (batch, head), int64 [B, H]."""
        lay = self.layout
        if self.row_sel is not None:
            per_block = self.row_sel.sum(2, dtype=torch.int64)  # [B, H, C] tokens selecting each block
            # (a product and a sum, not `@`: CUDA has no int64 matmul)
            return (per_block * lay.block_len.to(per_block.device)).sum(-1)
        m = self.mask().to(torch.float64)
        bl = lay.block_len.to(m.device, torch.float64)
        gl = lay.group_len.to(m.device, torch.float64)
        return torch.einsum("bhgc,g,c->bh", m, gl, bl).round().long()

    @property
    def density(self) -> float:
        """Fraction of the video query x video key token pairs that are computed (1.0 = dense):
        the kernels of both rules compute exactly the selected pairs."""
        lay = self.layout
        return float(self.video_pairs().double().mean()) / float(lay.n_query_video * lay.n_video)


def _check_args(q, k, v, grid, chunk, text_before, text_after, partition, threshold, topk,
                scale, who, cached_frames: int = 0):
    s = check_attention_inputs(q, k, v, scale, who)
    if cached_frames:  # KV cache: the queries are the last frames of the key grid
        lay = vmoba_layout(grid, chunk, partition, text_before, text_after, cached_frames)
        if k.shape[2] != lay.n_tokens or q.shape[2] != lay.n_query_tokens:
            raise ValueError(f"{who}: KV-cache VMoBA over the key grid {'x'.join(map(str, lay.grid))} with "
                             f"cached_frames={lay.cached_frames} takes {lay.n_tokens} keys and the last "
                             f"{lay.n_query_tokens} of them as queries; got {k.shape[2]} keys and {q.shape[2]} "
                             f"queries (pass the key grid and the number of cached frames)")
    elif q.shape[2] != k.shape[2]:
        raise ValueError(f"{who}: VMoBA is self-attention over one token sequence; q has "
                         f"{q.shape[2]} tokens and k has {k.shape[2]} (a KV cache: pass cached_frames)")
    else:
        lay = vmoba_layout(grid, chunk, partition, text_before, text_after)
    if k.shape[2] != lay.n_tokens:
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



def _block_table(layout: VMoBALayout, device) -> tuple:
    """``(idx [C, Lmax], valid [C, Lmax])``: sequence index of each block's tokens, padded."""
    key = (layout.grid, layout.chunk, layout.partition, layout.text_before, layout.text_after, str(device))
    faking = _faking()
    hit = None if faking else _TABLE_CACHE.get(key)
    if hit is None:
        L = layout.max_block_len
        pos = torch.arange(L)[None, :]
        valid = pos < layout.block_len[:, None]
        idx = torch.where(valid, layout.block_off[:, None] + pos, 0)
        idx = layout.perm[idx] + layout.text_before
        hit = (idx.to(device), valid.to(device))
        if faking:
            return hit
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
    if any(g % c for g, c in zip(layout.grid, layout.chunk)):  # partial edge blocks: padded slots
        rows = rows.masked_fill(~valid[:, :, None], 0)
    n = layout.block_len.to(x.device, cdt)[:, None]
    return torch.sum(rows, dim=3, dtype=cdt) / n
