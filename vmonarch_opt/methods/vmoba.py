"""Block-sparse VMoBA: each video query attends to the key blocks its gate selects (1D/2D/3D
partitions of the video grid in a layer-wise cycle), optionally with the unselected blocks kept
as pooled keys. Two selection rules (``VMoBAConfig.selection``): the paper implementation's per
query token (``"token"``, kernels ``kernels/vmoba/token.py``) and ours per query group
(``"group"``, ``kernels/vmoba/kernel.py``).

Backward: where the forward ran our Triton kernels, ``vmonarch::vmoba_attention_backward`` runs
the Triton backward (``kernels/vmoba/backward.py``): the selection is recomputed from q and k by
the forward's selection kernels and held constant (as in VMoBA training), the row logsumexp is
recomputed, dK/dV are accumulated key-block-major over the transposed selection (no atomics), and
nothing of size N x N is kept. Elsewhere the reference is differentiated by autograd."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels import dispatch
from ..ops import OP_TAGS, empty_attention_out, in_q_layout, register_autograd
from .base import Method, Shape, check_tile
from .registry import register

__all__ = ["VMoBAConfig", "VMoBAMethod", "default_vmoba_chunk", "vmoba_config", "vmoba_attention",
           "vmoba_attention_backward"]


@dataclass(frozen=True)
class VMoBAConfig:
    """Block-sparse VMoBA. ``chunk=None`` picks ~4 blocks per grid dimension; ``partition=None``
    follows the layer-wise 1D→2D→3D cycle. ``pooled_rest=True`` keeps the blocks a query did
    not select as one pooled key each (mean key + log block size, mean value) instead of
    dropping them: it restores the attention mass that broad heads spread over the rest, for
    ~1/block-size of dense attention's cost.

    ``selection`` is the rule that picks each query's key blocks; ``threshold`` and ``topk``
    mean different things under the two rules (``topk > 0`` replaces the threshold):

    * ``"token"`` (the default): the rule of the VMoBA paper's public implementation
      (KwaiVGI/VMoBA ``moba_attn_varlen``), per video query token. Its gate for block c is
      ``q · mean key of c`` in float32, without the softmax scale. ``scope="query_head"`` (the
      default; theirs too) min-max normalises each token's C gates and ranks them per token;
      ``scope="head_global"`` normalises and ranks all (token, block) entries of a (batch, head)
      together. The own block is always kept. **threshold**: the other blocks are added in
      descending normalised gate until their running sum, divided by the sum over all blocks
      (+1e-6), reaches ``threshold`` minus the own block's share; the block that reaches it
      is kept, and so is the best other block when the own share alone already meets it (their
      ``>=`` on a running sum that starts at the first ranked block). **topk**: the own block
      plus the ``topk - 1`` other blocks with the largest raw gates per token (``query_head``),
      or per head the ``(topk - 1) · Nv`` largest other (token, block) gates (``head_global``).
      Where their code differs we say so: where no running sum can reach the threshold (a
      threshold ≥ 1, or a token whose gates are all equal, e.g. q = 0) their ``query_head`` code
      builds the fallback cut index with ``full_like`` on a *boolean* tensor, so it keeps only
      the two best other blocks; we keep every block (what ``C - 1`` was meant to give, and what
      their ``head_global`` code does). A threshold ≥ 1 is exactly dense here (theirs can drop a
      block by float rounding of the share test). Where every (token, head) of a call keeps only
      its own block (``topk == 1``, or one block) their code falls back to full attention; we do
      not: ``topk = 1`` is the own block alone, so that cost falls as ``topk`` falls (their
      fallback exists because their second flash call cannot take zero queries). Ties at a cut
      are kept together (their order of tied gates is an unstable sort's); their packed-batch
      call normalises ``head_global`` over every sample of the batch, we per sample.
    * ``"group"``: the earlier rule of this package, per query group of ≤ 128 tokens in block
      order: ``P = softmax_c(scale · mean q of the group · mean key of c)``, ranked over the
      whole head (``scope`` must be ``"head_global"`` or None). **threshold**: pairs are kept
      until their softmax mass, weighted by group size, reaches ``threshold · Nv`` (the own
      blocks count first); **topk**: on average ``topk`` blocks per query group, distributed over
      the head by score.

    ``threshold`` 0.25 keeps about 13 % of the pairs under the token rule and about 2 % (little
    more than the own blocks) under the group rule on our structured benchmark inputs
    (docs/calibration.md has the table, ``benchmarks/bench_vmoba.py --rules-table`` makes it). The
    token rule with ``scope="query_head"`` is the default because at equal density it was the more
    accurate there (attention error at top-4 / 8 / 16 of 64 3D blocks 0.276 / 0.209 / 0.136 against
    the group rule's 0.294 / 0.232 / 0.157; with the pooled rest 0.127 / 0.091 / 0.053 against
    0.136 / 0.100 / 0.067; ``head_global`` 0.247 at top-8), and because a threshold or top-k from
    the paper or from FastVideo's configs then means what it says there. Calibration tries both
    rules and keeps the cheaper one within the error budget."""

    chunk: Optional[tuple] = None
    partition: Optional[str] = None
    threshold: float = 0.25
    topk: int = 0
    pooled_rest: bool = False
    selection: str = "token"
    scope: Optional[str] = None
    method = "vmoba"


def default_vmoba_chunk(grid: tuple) -> tuple:
    return tuple(max(1, -(-g // 4)) for g in grid)


def vmoba_config(site, threshold: float, layer: int, pooled_rest: bool = False,
                 topk_fraction: Optional[float] = None, selection: str = "token") -> Optional[VMoBAConfig]:
    """The VMoBA candidate of ``site`` under rule ``selection``: threshold selection, or top-k
    keeping ``topk_fraction`` of the key blocks per query (then ``None`` if that is every block)."""
    from ..kernels.vmoba.layout import vmoba_layout, vmoba_partition_for_layer

    nv = site.seq_q - site.text_before - site.text_after
    if site.grid is None:
        if nv < 16:
            return None
        grid, chunk, part = (1, 1, nv), (1, 1, -(-nv // 8)), "3d"
    else:
        grid, chunk, part = tuple(site.grid), default_vmoba_chunk(site.grid), vmoba_partition_for_layer(layer)
    topk = 0
    if topk_fraction is not None:
        blocks = vmoba_layout(grid, chunk, part).num_blocks
        topk = max(1, round(topk_fraction * blocks))
        if topk >= blocks:
            return None  # every block: exactly dense
    return VMoBAConfig(chunk=chunk, partition=part, threshold=threshold, topk=topk, pooled_rest=pooled_rest,
                       selection=selection)


@torch.library.custom_op("vmonarch::vmoba_attention", mutates_args=(), tags=OP_TAGS)
def vmoba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], chunk: list[int],
                    text_before: int, text_after: int, partition: str, threshold: float, topk: int,
                    scale: float, pooled_rest: bool = False, selection: str = "group",
                    scope: str = "", cached_frames: int = 0) -> torch.Tensor:
    """``selection``: ``"group"`` | ``"token"`` (``VMoBAConfig``); ``scope``: ``"query_head"`` |
    ``"head_global"`` | ``""`` (the rule's default). ``cached_frames = F > 0``: the KV-cache form,
    ``grid`` the key grid and q its last ``grid[0] - F`` frames (``kernels/vmoba/reference.py``)."""
    return in_q_layout(q, dispatch.vmoba_attention(q, k, v, grid=tuple(grid), chunk=tuple(chunk),
                                                   text_before=text_before, text_after=text_after,
                                                   partition=partition, threshold=threshold, topk=topk,
                                                   scale=scale, pooled_rest=pooled_rest, selection=selection,
                                                   scope=scope or None, cached_frames=cached_frames))


@vmoba_attention.register_fake
def _(q, k, v, grid, chunk, text_before, text_after, partition, threshold, topk, scale, pooled_rest=False,
      selection="group", scope="", cached_frames=0):
    return empty_attention_out(q)  # the layout of every real path (in_q_layout)


def _reference(q, k, v, grid, chunk, text_before, text_after, partition, threshold, topk, scale,
               pooled_rest=False, selection="group", scope="", cached_frames=0):
    from ..kernels.vmoba.reference import vmoba_attention_reference

    return vmoba_attention_reference(q, k, v, grid=tuple(grid), chunk=tuple(chunk), text_before=text_before,
                                     text_after=text_after, partition=partition, threshold=threshold,
                                     topk=topk, scale=scale, pooled_rest=bool(pooled_rest), selection=selection,
                                     scope=scope or None, cached_frames=cached_frames)


@torch.library.custom_op("vmonarch::vmoba_attention_backward", mutates_args=(), tags=OP_TAGS)
def vmoba_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             grad_out: torch.Tensor, grid: list[int], chunk: list[int], text_before: int,
                             text_after: int, partition: str, threshold: float, topk: int, scale: float,
                             pooled_rest: bool = False, selection: str = "group",
                             scope: str = "", cached_frames: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``vmoba_attention`` (selection constant) by the Triton backward kernels.
    The op's autograd calls it only where the kernels run; elsewhere it differentiates the reference."""
    if not dispatch.use_triton(q):
        raise RuntimeError("vmonarch::vmoba_attention_backward runs our Triton backward kernels, which need CUDA "
                           "tensors (or, for tests, TRITON_INTERPRET=1 with VMONARCH_INTERPRET_KERNELS=1); "
                           "elsewhere call .backward() on vmonarch::vmoba_attention's output (the reference is "
                           "differentiated)")
    dq, dk, dv = dispatch.vmoba_attention_backward(
        q, k, v, out, grad_out, grid=tuple(grid), chunk=tuple(chunk), text_before=text_before,
        text_after=text_after, partition=partition, threshold=threshold, topk=topk, scale=scale,
        pooled_rest=bool(pooled_rest), selection=selection, scope=scope or None, cached_frames=cached_frames)
    return in_q_layout(q, dq), in_q_layout(k, dk), in_q_layout(v, dv)


@vmoba_attention_backward.register_fake
def _(q, k, v, out, grad_out, grid, chunk, text_before, text_after, partition, threshold, topk, scale,
      pooled_rest=False, selection="group", scope="", cached_frames=0):
    return empty_attention_out(q), empty_attention_out(k), empty_attention_out(v)


def _kernel_covers(q, *args) -> bool:
    """The Triton backward covers every call the Triton forward runs (its dtypes and head sizes)."""
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256


register_autograd(vmoba_attention, _reference, vmoba_attention_backward, _kernel_covers)


def _select(q, k, args: dict, scale: float):
    """The selection of one op call with ``args`` (no ``causal_chunk``: see ``_calls``)."""
    return dispatch.vmoba_select(q, k, grid=tuple(args["grid"]), chunk=tuple(args["chunk"]),
                                 text_before=args["text_before"], text_after=args["text_after"],
                                 partition=args["partition"], threshold=args["threshold"], topk=args["topk"],
                                 scale=scale, selection=args.get("selection", "group"),
                                 scope=args.get("scope") or None, cached_frames=int(args.get("cached_frames") or 0))


def _calls(method, args: dict, n_q: int, n_k: int) -> list:
    """``[(query rows [r0, r1), keys [0, k1), op args)]``: the op calls ``Method.apply`` makes for a
    plan (``methods/causal.calls``; VMoBA's block-causal mode is "cached": no prefix rows)."""
    from . import causal

    return [(c.r0, c.r1, c.k1, c.args) for c in causal.calls(method, args, n_q, n_k)]


def _rule(args: dict) -> tuple:
    """``(selection, scope)`` of op arguments (plans saved before the token rule: the group rule)."""
    from ..kernels.vmoba.layout import default_scope

    sel = args.get("selection", "group")
    return sel, args.get("scope") or default_scope(sel)


class VMoBAMethod(Method):
    name = "vmoba"
    config_cls = VMoBAConfig
    default_rank = 1
    measured_flops = True
    flops_source = "measured: the block selection on the calibration batch"
    lowered_as = "in-graph block selection (MatMul/Softmax/TopK/CumSum) + gather-based block attention"
    grid_params = ("chunk",)

    def describe(self, cfg) -> str:
        from ..kernels.vmoba.layout import default_scope

        c = "×".join(map(str, cfg.chunk)) if cfg.chunk else "auto"
        rule = cfg.selection if cfg.scope in (None, default_scope(cfg.selection)) else f"{cfg.selection}/{cfg.scope}"
        s = f"vmoba {rule} {cfg.partition or 'cycle'} {c} thr{cfg.threshold:g}"
        s += f" top{cfg.topk}" if cfg.topk else ""
        return s + (" +pooled" if cfg.pooled_rest else "")

    def config_from_args(self, args: dict):
        sel, scope = _rule(args)
        return VMoBAConfig(chunk=tuple(args["chunk"]), partition=args["partition"], threshold=args["threshold"],
                           topk=args["topk"], pooled_rest=args.get("pooled_rest", False), selection=sel,
                           scope=scope)

    def config_from_dict(self, d: dict, strict: bool = False):
        # profiles saved before the token rule existed hold group-rule choices without these fields
        d = dict(d)
        if "selection" not in d:
            d.setdefault("selection", "group")
            d.setdefault("scope", None)
        return super().config_from_dict(d, strict)

    def resolve_args(self, cfg, site, layer: int) -> dict:
        from ..kernels.vmoba.layout import vmoba_partition_for_layer

        nv = site.seq_q - site.text_before - site.text_after
        grid = tuple(site.grid) if site.grid else (1, 1, nv)
        chunk = tuple(cfg.chunk) if cfg.chunk is not None else default_vmoba_chunk(grid)
        from ..kernels.vmoba.layout import default_scope

        part = cfg.partition if cfg.partition is not None else vmoba_partition_for_layer(layer)
        return dict(grid=list(grid), chunk=list(chunk), text_before=site.text_before,
                    text_after=site.text_after, partition=part, threshold=float(cfg.threshold),
                    topk=int(cfg.topk), pooled_rest=bool(cfg.pooled_rest), selection=cfg.selection,
                    scope=cfg.scope or default_scope(cfg.selection))

    def check_config(self, cfg, site) -> Optional[str]:
        from ..kernels.vmoba.layout import PARTITIONS, check_rule

        try:
            check_rule(cfg.selection, cfg.scope, "VMoBAConfig")
        except ValueError as e:
            return str(e).replace("VMoBAConfig: ", "")

        t = cfg.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            return f"threshold={t!r}: a number > 0 (the share of attention weight kept; ≥ 1 keeps every block)"
        if isinstance(cfg.topk, bool) or not isinstance(cfg.topk, int) or cfg.topk < 0:
            return f"topk={cfg.topk!r}: an integer ≥ 0 (0: threshold selection)"
        if not isinstance(cfg.pooled_rest, bool):
            return f"pooled_rest={cfg.pooled_rest!r}: true or false"
        if cfg.partition is not None and cfg.partition not in PARTITIONS:
            return f"partition={cfg.partition!r}: one of {PARTITIONS} (or null for the layer-wise cycle)"
        if cfg.chunk is None:
            return None
        bad = check_tile("chunk", cfg.chunk, site)
        if bad is None and cfg.selection == "token":
            from ..kernels.vmoba.layout import MAX_TOKEN_BLOCKS, vmoba_layout

            args = self.resolve_args(cfg, site, 2)
            C = vmoba_layout(args["grid"], args["chunk"], cfg.partition or "3d").num_blocks
            if C > MAX_TOKEN_BLOCKS:
                bad = (f"chunk {'×'.join(map(str, cfg.chunk))} makes {C} key blocks; the token rule's kernels rank "
                       f"at most {MAX_TOKEN_BLOCKS} per query: use a larger chunk or selection=\"group\"")
        return bad

    def flops(self, shape: Shape, args: dict, density: Optional[float] = None) -> Optional[int]:
        if density is None:
            return None  # depends on the selection: measured on real q/k
        from ..kernels.vmoba.layout import vmoba_layout

        nv = shape.seq_q - args["text_before"] - args["text_after"]
        # text rows and columns stay dense; video×video pairs at the measured density; with the
        # pooled rest every video query also meets one pooled key per block
        pairs = shape.seq_q * shape.seq_k - nv * nv + density * nv * nv
        if args.get("pooled_rest"):  # every video query also scores each block's pooled key (vmoba_flops)
            pairs += nv * vmoba_layout(args["grid"], args["chunk"], args["partition"]).num_blocks
        return round(4 * shape.batch * shape.heads * pairs * shape.head_dim)

    def params(self, args: dict) -> str:
        sel, scope = _rule(args)
        s = (f"{sel}/{scope} {args['partition']} chunk={'×'.join(map(str, args['chunk']))} "
             f"thr={args['threshold']:g}")
        s += f" top{args['topk']}" if args.get("topk") else ""
        return s + (" +pooled rest" if args.get("pooled_rest") else "")

    def candidates(self, site, budget, layer: int) -> list:
        # both rules (the cheapest within the budget wins); 1.0 is exactly dense under both
        rules = [("group", thr, None) for thr in budget.vmoba_thresholds if thr < 1.0]
        rules += [("group", 0.25, frac) for frac in budget.vmoba_topk]
        rules += [("token", thr, None) for thr in budget.vmoba_token_thresholds if thr < 1.0]
        out = []
        for selection, thr, frac in rules:
            for pooled in budget.vmoba_pooled:
                cfg = vmoba_config(site, thr, layer, pooled, frac, selection)
                if cfg is not None:
                    out.append(("vmoba", cfg))
        return out

    def _measure(self, q, k, v, args: dict, scale: float, want_out: bool):
        """``(output or None, FLOPs, density)`` of a plan of any structure: the selection of every
        op call ``apply`` makes (``_calls``), FLOPs summed over them, and the density over the video
        (query, key) pairs the calls can see (a block-causal plan's visible pairs)."""
        from ..kernels.vmoba.reference import vmoba_flops

        pooled = args.get("pooled_rest", False)
        outs, flops, pairs, seen = [], 0, 0, 0
        for r0, r1, k1, a in _calls(self, args, q.shape[-2], k.shape[-2]):
            qq, kk, vv = q[..., r0:r1, :], k[..., :k1, :], v[..., :k1, :]
            sel = _select(qq, kk, a, scale)
            if want_out:
                outs.append(dispatch.vmoba_attention_with_selection(qq, kk, vv, sel, scale, pooled_rest=pooled))
            flops += int(vmoba_flops(sel, q.shape[-1], pooled))
            lay = sel.layout
            pairs += float(sel.video_pairs().double().sum())
            seen += sel.batch * sel.heads * lay.n_query_video * lay.n_video
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)) if want_out else None
        return out, flops, pairs / seen

    def calibration_run(self, q, k, v, args: dict, scale: float):
        return self._measure(q, k, v, args, scale, True)

    def executed(self, q, k, v, args: dict, scale: float):
        _, flops, density = self._measure(q, k, v, args, scale, False)
        return flops, density

    def rederive(self, cfg, layout: Optional[str], site):
        if layout == "vmoba":  # chunks re-derived for the new grid
            return VMoBAConfig(chunk=None, partition=cfg.partition, threshold=cfg.threshold, topk=cfg.topk,
                               pooled_rest=cfg.pooled_rest, selection=cfg.selection, scope=cfg.scope)
        return cfg

    def run(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        sel, scope = _rule(args)
        return torch.ops.vmonarch.vmoba_attention(q, k, v, args["grid"], args["chunk"], args["text_before"],
                                                  args["text_after"], args["partition"], args["threshold"],
                                                  args["topk"], scale, args.get("pooled_rest", False), sel, scope)

    # ------------------------------------------------------------------ KV cache and block-causal
    # The KV-cache form: the key blocks partition the whole key grid, each new query (token rule) or
    # query group (group rule) selects among all of them; kernels/vmoba/reference.py ("KV cache")
    # says when its rows equal those of a full-grid run. Block-causal plans run in "cached" mode:
    # chunk c's queries against the key blocks of its visible prefix grid (methods/causal.py), so a
    # query's selection ranges exactly over the key blocks of the frames it sees.
    causal_mode = "cached"
    lowers_cached = True  # lower() takes cached_frames (deploy/lowering.py)

    def cached_unsupported(self, args: dict) -> Optional[str]:
        from ..kernels.vmoba.layout import MAX_TOKEN_BLOCKS, vmoba_layout

        if args.get("text_before") or args.get("text_after"):
            return "VMoBA's KV-cache form has no text tokens"
        try:
            lay = vmoba_layout(args["grid"], args["chunk"], args["partition"], cached_frames=args["cached_frames"])
        except ValueError as e:
            return str(e)
        if _rule(args)[0] == "token" and lay.num_blocks > MAX_TOKEN_BLOCKS:
            return (f"the key grid {'×'.join(map(str, lay.grid))} makes {lay.num_blocks} key blocks; the token "
                    f"rule's kernels rank at most {MAX_TOKEN_BLOCKS} per query")
        return None

    def run_cached(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        sel, scope = _rule(args)
        return torch.ops.vmonarch.vmoba_attention(q, k, v, args["grid"], args["chunk"], 0, 0, args["partition"],
                                                  args["threshold"], args["topk"], scale,
                                                  args.get("pooled_rest", False), sel, scope,
                                                  int(args["cached_frames"]))

    def cached_flops(self, shape: Shape, args: dict, density: Optional[float] = None) -> Optional[int]:
        if density is None:
            return None  # depends on the selection: measured on real q/k
        from ..kernels.vmoba.layout import vmoba_layout

        # every (query, key) pair is video: selected pairs at the measured density, plus with the
        # pooled rest every query against one pooled key per key block (vmoba_flops)
        pairs = density * shape.seq_q * shape.seq_k
        if args.get("pooled_rest"):
            pairs += shape.seq_q * vmoba_layout(args["grid"], args["chunk"], args["partition"]).num_blocks
        return round(4 * shape.batch * shape.heads * pairs * shape.head_dim)

    def adapt_args(self, args: dict, old_grid: tuple, new_grid: tuple) -> dict:
        # the number of chunks per dimension is kept: block count, top-k and threshold mean the same
        n_chunks = [math.ceil(g / c) for g, c in zip(old_grid, args["chunk"])]
        return {**args, "grid": list(new_grid), "chunk": [max(1, math.ceil(g / n)) for g, n in zip(new_grid, n_chunks)]}

    def lower(self, q, k, v, args: dict, scale: float, key_valid=None) -> torch.Tensor:
        from ..deploy.lowering import vmoba_lowered

        sel, scope = _rule(args)
        return vmoba_lowered(q, k, v, grid=args["grid"], chunk=args["chunk"], text_before=args["text_before"],
                             text_after=args["text_after"], partition=args["partition"],
                             threshold=args["threshold"], topk=args["topk"], scale=scale, key_valid=key_valid,
                             pooled_rest=args.get("pooled_rest", False), selection=sel, scope=scope,
                             cached_frames=int(args.get("cached_frames") or 0))


register(VMoBAMethod())
