"""Monarch attention (MonarchAttention / VMonarch): the attention matrix restricted to a Monarch
matrix on the site's video grid, blocks of ``block = (bt, bh, bw)`` tokens (frame blocks
``(1, H, W)`` by default). Kernels: ``kernels/monarch/``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels import dispatch
from ..ops import OP_TAGS, empty_attention_out, in_q_layout, register_autograd
from .base import Method, Shape, check_tile
from .registry import register

__all__ = ["MonarchConfig", "MonarchMethod", "default_monarch_block", "layout_config", "monarch_attention",
           "monarch_attention_backward"]

LAYOUTS = ("frame", "frame_group", "tile", "1d")


@dataclass(frozen=True)
class MonarchConfig:
    """Monarch attention. ``block=None`` picks frame blocks (1, H, W) when the grid is known
    (VMonarch), row groups for single-frame grids, and ~√N 1D blocks without a grid."""

    block: Optional[tuple] = None
    steps: int = 1
    recompute: bool = False
    method = "monarch"


def default_monarch_block(grid: tuple) -> tuple:
    """Frame blocks for videos; for a single frame, groups of rows of about √N tokens; for a
    single position over time (factorised temporal attention), runs of about √T frames."""
    t, h, w = grid
    if t > 1 and h * w == 1:  # temporal attention over one position: ~√T frames per block
        return (max(1, math.isqrt(max(t - 1, 0)) + 1), 1, 1)
    if t > 1:
        return (1, h, w)
    n = h * w
    if h == 1:
        return (1, 1, max(1, math.isqrt(max(w - 1, 0)) + 1))
    rows = max(1, round(math.sqrt(n) / w)) if w < math.sqrt(n) else 1
    if rows == 1 and w > math.sqrt(n):
        return (1, 1, max(1, round(math.sqrt(n))))
    return (1, min(rows, h), w)


def layout_config(layout: str, site, steps: int = 1) -> Optional[MonarchConfig]:
    """The Monarch config of a named layout at ``site``'s grid (None where it does not apply)."""
    nv = site.seq_q - site.text_before - site.text_after
    rec = steps > 1
    if site.grid is None:
        if layout != "1d" or nv < 4:
            return None
        return MonarchConfig(block=(1, 1, math.isqrt(nv - 1) + 1), steps=steps, recompute=rec)
    T, H, W = site.grid
    if layout == "frame":
        block = default_monarch_block(site.grid)
    elif layout == "frame_group":
        if T < 4:
            return None
        block = (2, H, W)
    elif layout == "tile":
        if H * W < 4:
            return None
        block = (1, -(-H // 2), -(-W // 2))
    elif layout == "1d":
        return None  # 1D blocks are for sites without a grid; with one, the layouts above apply
    else:
        raise ValueError(f"unknown layout {layout!r}")
    block = tuple(min(b, g) for b, g in zip(block, site.grid))
    if block == tuple(site.grid):
        return None  # one block: exactly dense, never cheaper
    return MonarchConfig(block=block, steps=steps, recompute=rec)


@torch.library.custom_op("vmonarch::monarch_attention", mutates_args=(), tags=OP_TAGS)
def monarch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], block: list[int],
                      text_before: int, text_after: int, steps: int, scale: float, recompute: bool) -> torch.Tensor:
    return in_q_layout(q, dispatch.monarch_attention(q, k, v, grid=tuple(grid), block=tuple(block),
                                                     text_before=text_before, text_after=text_after,
                                                     steps=steps, scale=scale, recompute=recompute))


@monarch_attention.register_fake
def _(q, k, v, grid, block, text_before, text_after, steps, scale, recompute):
    return empty_attention_out(q)  # the layout of every real path (in_q_layout)


def _reference(q, k, v, grid, block, text_before, text_after, steps, scale, recompute):
    from ..kernels.monarch.reference import monarch_attention_reference

    return monarch_attention_reference(q, k, v, grid=tuple(grid), block=tuple(block), text_before=text_before,
                                       text_after=text_after, steps=steps, scale=scale, recompute=recompute)


@torch.library.custom_op("vmonarch::monarch_attention_backward", mutates_args=())
def monarch_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                               grad_out: torch.Tensor, grid: list[int], block: list[int], text_before: int,
                               text_after: int, steps: int, scale: float,
                               recompute: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by the Triton backward kernels (``kernels/monarch/backward.py``, steps = 1)."""
    if not dispatch.use_triton(q):
        raise RuntimeError("vmonarch::monarch_attention_backward runs the Triton kernels (CUDA tensors); on "
                           "other devices monarch_attention's autograd differentiates the reference")
    return dispatch.monarch_attention_backward(q, k, v, out, grad_out, grid=tuple(grid), block=tuple(block),
                                               text_before=text_before, text_after=text_after, steps=steps,
                                               scale=scale, recompute=recompute)


@monarch_attention_backward.register_fake
def _(q, k, v, out, grad_out, grid, block, text_before, text_after, steps, scale, recompute):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _kernel_backward_covers(q, grid, block, text_before, text_after, steps, scale, recompute) -> bool:
    """The backward kernels cover one step (the R and L passes of the final pass), fp16/bf16/fp32
    and head_dim <= 256; more steps differentiate the reference."""
    return steps == 1 and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256


register_autograd(monarch_attention, _reference, monarch_attention_backward, _kernel_backward_covers)


class MonarchMethod(Method):
    name = "monarch"
    config_cls = MonarchConfig
    default_rank = 0
    lowered_as = "block reshape/transpose + batched MatMul/Softmax (R and L steps, entropy via Log/Mul)"
    grid_params = ("block",)

    def describe(self, cfg) -> str:
        b = "×".join(map(str, cfg.block)) if cfg.block else "auto"
        return f"monarch {b} s{cfg.steps}" + ("r" if cfg.recompute and cfg.steps > 1 else "")

    def config_from_args(self, args: dict):
        return MonarchConfig(block=tuple(args["block"]), steps=args["steps"], recompute=args["recompute"])

    def resolve_args(self, cfg, site, layer: int) -> dict:
        nv = site.seq_q - site.text_before - site.text_after
        grid = tuple(site.grid) if site.grid else (1, 1, nv)
        if cfg.block is not None:
            block = tuple(cfg.block)
            if len(block) == 1:
                block = (1, 1, block[0])
            elif site.grid is None and len(block) == 3:  # no grid: 1D blocks of as many tokens
                block = (1, 1, math.prod(block))
        elif site.grid:
            block = default_monarch_block(grid)
        else:
            block = (1, 1, max(1, math.isqrt(max(nv - 1, 0)) + 1))
        if len(block) != 3 or any(b < 1 for b in block):
            raise ValueError(f"MonarchConfig.block={cfg.block!r}: give (bt, bh, bw) ≥ 1")
        return dict(grid=list(grid), block=[min(b, g) for b, g in zip(block, grid)],
                    text_before=site.text_before, text_after=site.text_after,
                    steps=int(cfg.steps), recompute=bool(cfg.recompute))

    def check_config(self, cfg, site) -> Optional[str]:
        if isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1:
            return f"steps={cfg.steps!r}: an integer ≥ 1"
        if not isinstance(cfg.recompute, bool):
            return f"recompute={cfg.recompute!r}: true or false"
        return None if cfg.block is None else check_tile("block", cfg.block, site)

    def flops(self, shape: Shape, args: dict, density: Optional[float] = None) -> Optional[int]:
        from ..kernels.monarch.reference import monarch_flops

        return int(monarch_flops(shape.batch, shape.heads, shape.seq_q, shape.head_dim, grid=tuple(args["grid"]),
                                 block=tuple(args["block"]), text_before=args["text_before"],
                                 text_after=args["text_after"], steps=args["steps"]))

    def plan_note(self, site, args: dict) -> str:
        return "; 1D blocks: " + site.grid_source if site.grid is None else ""

    def params(self, args: dict) -> str:
        s = f"block={'×'.join(map(str, args['block']))} steps={args['steps']}"
        return s + (" recompute" if args.get("recompute") else "")

    def candidates(self, site, budget, layer: int) -> list:
        out = []
        for layout in budget.layouts:
            for steps in budget.monarch_steps:
                cfg = layout_config(layout, site, steps)
                if cfg is not None:
                    out.append((layout, cfg))
        return out

    def rederive(self, cfg, layout: Optional[str], site):
        if layout in LAYOUTS:
            return layout_config(layout, site, cfg.steps) or MonarchConfig(steps=cfg.steps, recompute=cfg.recompute)
        return cfg

    def run(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        return torch.ops.vmonarch.monarch_attention(q, k, v, args["grid"], args["block"], args["text_before"],
                                                    args["text_after"], args["steps"], scale, args["recompute"])

    def adapt_args(self, args: dict, old_grid: tuple, new_grid: tuple) -> dict:
        # a block dimension that spanned the whole grid dimension spans the new one (frame blocks
        # stay frame blocks); the others are kept, clipped to the new grid
        block = [g_new if b == g_old else min(b, g_new) for b, g_old, g_new in zip(args["block"], old_grid, new_grid)]
        return {**args, "grid": list(new_grid), "block": block}

    def cached_unsupported(self, args: dict) -> Optional[str]:
        # block-causal masks run in the default "prefix" mode: each chunk's rows of Monarch on the
        # chunks it sees (its R step reads the queries of every key block, all in that prefix)
        return ("Monarch's R step needs the queries of every key block, and a KV cache keeps only keys and values: "
                "MonarchRT (methods=(..., 'monarch_rt')), whose R step uses the new frames' own queries, runs it")

    def ring_unsupported(self, args: dict, sizes: tuple) -> Optional[str]:
        from ..kernels.monarch.ring import ring_unsupported

        return ring_unsupported(args["grid"], args["block"], args["text_before"], args["text_after"], args["steps"],
                                sizes)

    def ring_run(self, q, k, v, args: dict, scale: float, split) -> torch.Tensor:
        # R-step factors of this rank's blocks, gathered; L-step of its queries (kernels/monarch/ring.py)
        from ..kernels.monarch.ring import monarch_ring_attention

        return monarch_ring_attention(q, k, v, grid=args["grid"], block=args["block"], scale=scale,
                                      sizes=split.sizes, gather=split.all_gather)

    def lower(self, q, k, v, args: dict, scale: float, key_valid=None) -> torch.Tensor:
        from ..deploy.lowering import monarch_lowered

        return monarch_lowered(q, k, v, grid=args["grid"], block=args["block"], text_before=args["text_before"],
                               text_after=args["text_after"], steps=args["steps"], scale=scale,
                               recompute=args["recompute"], key_valid=key_valid)


register(MonarchMethod())
