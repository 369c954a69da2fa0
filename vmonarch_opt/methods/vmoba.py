"""Block-sparse VMoBA: each query group attends to the key blocks its gate selects (1D/2D/3D
partitions of the video grid in a layer-wise cycle), optionally with the unselected blocks kept
as pooled keys. Kernels: ``kernels/vmoba/``.

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
    ~1/block-size of dense attention's cost."""

    chunk: Optional[tuple] = None
    partition: Optional[str] = None
    threshold: float = 0.25
    topk: int = 0
    pooled_rest: bool = False
    method = "vmoba"


def default_vmoba_chunk(grid: tuple) -> tuple:
    return tuple(max(1, -(-g // 4)) for g in grid)


def vmoba_config(site, threshold: float, layer: int, pooled_rest: bool = False,
                 topk_fraction: Optional[float] = None) -> Optional[VMoBAConfig]:
    """The VMoBA candidate of ``site``: threshold selection, or global top-k keeping
    ``topk_fraction`` of the key blocks per query group (then ``None`` if that is every block)."""
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
    return VMoBAConfig(chunk=chunk, partition=part, threshold=threshold, topk=topk, pooled_rest=pooled_rest)


@torch.library.custom_op("vmonarch::vmoba_attention", mutates_args=(), tags=OP_TAGS)
def vmoba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], chunk: list[int],
                    text_before: int, text_after: int, partition: str, threshold: float, topk: int,
                    scale: float, pooled_rest: bool = False) -> torch.Tensor:
    return in_q_layout(q, dispatch.vmoba_attention(q, k, v, grid=tuple(grid), chunk=tuple(chunk),
                                                   text_before=text_before, text_after=text_after,
                                                   partition=partition, threshold=threshold, topk=topk,
                                                   scale=scale, pooled_rest=pooled_rest))


@vmoba_attention.register_fake
def _(q, k, v, grid, chunk, text_before, text_after, partition, threshold, topk, scale, pooled_rest=False):
    return empty_attention_out(q)  # the layout of every real path (in_q_layout)


def _reference(q, k, v, grid, chunk, text_before, text_after, partition, threshold, topk, scale,
               pooled_rest=False):
    from ..kernels.vmoba.reference import vmoba_attention_reference

    return vmoba_attention_reference(q, k, v, grid=tuple(grid), chunk=tuple(chunk), text_before=text_before,
                                     text_after=text_after, partition=partition, threshold=threshold,
                                     topk=topk, scale=scale, pooled_rest=bool(pooled_rest))


@torch.library.custom_op("vmonarch::vmoba_attention_backward", mutates_args=(), tags=OP_TAGS)
def vmoba_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             grad_out: torch.Tensor, grid: list[int], chunk: list[int], text_before: int,
                             text_after: int, partition: str, threshold: float, topk: int, scale: float,
                             pooled_rest: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        pooled_rest=bool(pooled_rest))
    return in_q_layout(q, dq), in_q_layout(k, dk), in_q_layout(v, dv)


@vmoba_attention_backward.register_fake
def _(q, k, v, out, grad_out, grid, chunk, text_before, text_after, partition, threshold, topk, scale,
      pooled_rest=False):
    return empty_attention_out(q), empty_attention_out(k), empty_attention_out(v)


def _kernel_covers(q, *args) -> bool:
    """The Triton backward covers every call the Triton forward runs (its dtypes and head sizes)."""
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256


register_autograd(vmoba_attention, _reference, vmoba_attention_backward, _kernel_covers)


def _select(q, k, args: dict, scale: float):
    return dispatch.vmoba_select(q, k, grid=tuple(args["grid"]), chunk=tuple(args["chunk"]),
                                 text_before=args["text_before"], text_after=args["text_after"],
                                 partition=args["partition"], threshold=args["threshold"], topk=args["topk"],
                                 scale=scale)


class VMoBAMethod(Method):
    name = "vmoba"
    config_cls = VMoBAConfig
    default_rank = 1
    measured_flops = True
    flops_source = "measured: the block selection on the calibration batch"
    lowered_as = "in-graph block selection (MatMul/Softmax/TopK/CumSum) + gather-based block attention"
    grid_params = ("chunk",)

    def describe(self, cfg) -> str:
        c = "×".join(map(str, cfg.chunk)) if cfg.chunk else "auto"
        s = f"vmoba {cfg.partition or 'cycle'} {c} thr{cfg.threshold:g}"
        s += f" top{cfg.topk}" if cfg.topk else ""
        return s + (" +pooled" if cfg.pooled_rest else "")

    def config_from_args(self, args: dict):
        return VMoBAConfig(chunk=tuple(args["chunk"]), partition=args["partition"], threshold=args["threshold"],
                           topk=args["topk"], pooled_rest=args.get("pooled_rest", False))

    def resolve_args(self, cfg, site, layer: int) -> dict:
        from ..kernels.vmoba.layout import vmoba_partition_for_layer

        nv = site.seq_q - site.text_before - site.text_after
        grid = tuple(site.grid) if site.grid else (1, 1, nv)
        chunk = tuple(cfg.chunk) if cfg.chunk is not None else default_vmoba_chunk(grid)
        part = cfg.partition if cfg.partition is not None else vmoba_partition_for_layer(layer)
        return dict(grid=list(grid), chunk=list(chunk), text_before=site.text_before,
                    text_after=site.text_after, partition=part, threshold=float(cfg.threshold),
                    topk=int(cfg.topk), pooled_rest=bool(cfg.pooled_rest))

    def check_config(self, cfg, site) -> Optional[str]:
        from ..kernels.vmoba.layout import PARTITIONS

        t = cfg.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            return f"threshold={t!r}: a number > 0 (the share of attention weight kept; ≥ 1 keeps every block)"
        if isinstance(cfg.topk, bool) or not isinstance(cfg.topk, int) or cfg.topk < 0:
            return f"topk={cfg.topk!r}: an integer ≥ 0 (0: threshold selection)"
        if not isinstance(cfg.pooled_rest, bool):
            return f"pooled_rest={cfg.pooled_rest!r}: true or false"
        if cfg.partition is not None and cfg.partition not in PARTITIONS:
            return f"partition={cfg.partition!r}: one of {PARTITIONS} (or null for the layer-wise cycle)"
        return None if cfg.chunk is None else check_tile("chunk", cfg.chunk, site)

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
        s = f"{args['partition']} chunk={'×'.join(map(str, args['chunk']))} thr={args['threshold']:g}"
        s += f" top{args['topk']}" if args.get("topk") else ""
        return s + (" +pooled rest" if args.get("pooled_rest") else "")

    def candidates(self, site, budget, layer: int) -> list:
        rules = [(thr, None) for thr in budget.vmoba_thresholds if thr < 1.0]  # 1.0: exactly dense
        rules += [(0.25, frac) for frac in budget.vmoba_topk]
        out = []
        for thr, frac in rules:
            for pooled in budget.vmoba_pooled:
                cfg = vmoba_config(site, thr, layer, pooled, frac)
                if cfg is not None:
                    out.append(("vmoba", cfg))
        return out

    def calibration_run(self, q, k, v, args: dict, scale: float):
        from ..kernels.vmoba.reference import vmoba_flops

        pooled = args.get("pooled_rest", False)
        sel = _select(q, k, args, scale)
        out = dispatch.vmoba_attention_with_selection(q, k, v, sel, scale, pooled_rest=pooled)
        return out, int(vmoba_flops(sel, q.shape[-1], pooled)), float(sel.density)

    def executed(self, q, k, v, args: dict, scale: float):
        from ..kernels.vmoba.reference import vmoba_flops

        sel = _select(q, k, args, scale)
        return int(vmoba_flops(sel, q.shape[-1], args.get("pooled_rest", False))), float(sel.density)

    def rederive(self, cfg, layout: Optional[str], site):
        if layout == "vmoba":  # chunks re-derived for the new grid
            return VMoBAConfig(chunk=None, partition=cfg.partition, threshold=cfg.threshold, topk=cfg.topk,
                               pooled_rest=cfg.pooled_rest)
        return cfg

    def run(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        return torch.ops.vmonarch.vmoba_attention(q, k, v, args["grid"], args["chunk"], args["text_before"],
                                                  args["text_after"], args["partition"], args["threshold"],
                                                  args["topk"], scale, args.get("pooled_rest", False))

    def adapt_args(self, args: dict, old_grid: tuple, new_grid: tuple) -> dict:
        # the number of chunks per dimension is kept: block count, top-k and threshold mean the same
        n_chunks = [math.ceil(g / c) for g, c in zip(old_grid, args["chunk"])]
        return {**args, "grid": list(new_grid), "chunk": [max(1, math.ceil(g / n)) for g, n in zip(new_grid, n_chunks)]}

    def lower(self, q, k, v, args: dict, scale: float, key_valid=None) -> torch.Tensor:
        from ..deploy.lowering import vmoba_lowered

        return vmoba_lowered(q, k, v, grid=args["grid"], chunk=args["chunk"], text_before=args["text_before"],
                             text_after=args["text_after"], partition=args["partition"],
                             threshold=args["threshold"], topk=args["topk"], scale=scale, key_valid=key_valid,
                             pooled_rest=args.get("pooled_rest", False))


register(VMoBAMethod())
