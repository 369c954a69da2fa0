"""MonarchRT attention: a Monarch factorisation per query tile on the site's video grid.

The grid (T, H, W) is cut into tiles of ``f_tied`` frames x ``H/h_reduce`` rows x ``W/w_reduce``
columns (MonarchRT's three parameters, which must divide the grid). Every row segment of every tile
is a Monarch block of ``W/w_reduce`` keys. A query in tile a picks a key row with its L-step
softmax, then a key in that row with the R-step softmax of *its own tile's* token at that row and
column: unlike Monarch (one R per block, shared by every query), R depends on the query tile.
With the default ``(1, 1, 1)`` each frame is a query tile and each frame row a block (MonarchRT's
Self-Forcing setting). Kernels: ``kernels/monarch_rt/`` (Triton forward and backward at one step;
more steps run the reference).

KV cache (MonarchRT's streaming form, ``run_cached``): the plan's grid is the key grid (cached
frames, then the new ones) and q holds the new frames; query tiles are the new frames' tiles, key
tiles every tile (``f_tied`` must divide the cached and new frame counts; no text tokens).
Block-causal plans run chunk by chunk in that form (``causal_mode = "cached"``): chunk c's queries
against the keys of chunks <= c with ``cached_frames = c * chunk``, no recomputed prefix.

Opt-in: ``monarch_rt`` is calibrated and planned only when ``methods=`` names it (``opt_in``).
Added to the defaults, every calibration would measure its candidates too (a slower calibration
of every existing model, and choices that could change under the same budget). On an H200
(BENCHMARKS.md, 2026-12-05) its forward runs 2.3-4.3x cuDNN where frame-block Monarch runs 10-16x
at a similar FLOP cut, with a lower error on structured inputs: worth naming for its accuracy and
for KV-cache streaming (which Monarch cannot do), not yet a default. When named, it ranks after
Monarch and ties with VMoBA in the choice without calibration (``default_rank = 1``: the order of
``methods=`` decides the tie).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels import dispatch
from ..ops import OP_TAGS, empty_attention_out, in_q_layout, register_autograd
from .base import Method, Shape
from .registry import register

__all__ = ["MonarchRTConfig", "MonarchRTMethod", "monarch_rt_attention", "monarch_rt_attention_backward",
           "RT_CANDIDATES"]

#: (f_tied, h_reduce, w_reduce) that calibration tries at a site, where they divide its grid
RT_CANDIDATES = ((1, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 1))


@dataclass(frozen=True)
class MonarchRTConfig:
    """MonarchRT attention. Tiles of ``f_tied`` frames x ``H/h_reduce`` rows x ``W/w_reduce``
    columns of the (T, H, W) video grid (each must divide its dimension); ``steps`` alternating
    updates (the kernels run 1; more run the pure-PyTorch reference)."""

    f_tied: int = 1
    h_reduce: int = 1
    w_reduce: int = 1
    steps: int = 1
    method = "monarch_rt"

    @property
    def tiling(self) -> tuple:
        return (self.f_tied, self.h_reduce, self.w_reduce)


@torch.library.custom_op("vmonarch::monarch_rt_attention", mutates_args=(), tags=OP_TAGS)
def monarch_rt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], tiling: list[int],
                         text_before: int, text_after: int, steps: int, scale: float,
                         cached_frames: int) -> torch.Tensor:
    """MonarchRT attention; ``cached_frames > 0``: KV cache (``grid`` the key grid, q its last
    ``T - cached_frames`` frames), 0: self-attention on ``grid``."""
    return in_q_layout(q, dispatch.monarch_rt_attention(q, k, v, grid=tuple(grid), tiling=tuple(tiling),
                                                        text_before=text_before, text_after=text_after,
                                                        steps=steps, scale=scale, cached_frames=cached_frames))


@monarch_rt_attention.register_fake
def _(q, k, v, grid, tiling, text_before, text_after, steps, scale, cached_frames):
    return empty_attention_out(q)  # the layout of every real path (in_q_layout): q's shape


def _reference(q, k, v, grid, tiling, text_before, text_after, steps, scale, cached_frames):
    from ..kernels.monarch_rt.reference import monarch_rt_reference

    return monarch_rt_reference(q, k, v, grid=tuple(grid), tiling=tuple(tiling), text_before=text_before,
                                text_after=text_after, steps=steps, scale=scale, cached_frames=cached_frames)


@torch.library.custom_op("vmonarch::monarch_rt_attention_backward", mutates_args=())
def monarch_rt_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                  grad_out: torch.Tensor, grid: list[int], tiling: list[int], text_before: int,
                                  text_after: int, steps: int, scale: float,
                                  cached_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by the Triton backward kernels (``kernels/monarch_rt/backward.py``, steps = 1)."""
    if not dispatch.use_triton(q):
        raise RuntimeError("vmonarch::monarch_rt_attention_backward runs the Triton kernels (CUDA tensors); on "
                           "other devices monarch_rt_attention's autograd differentiates the reference")
    return dispatch.monarch_rt_attention_backward(q, k, v, out, grad_out, grid=tuple(grid), tiling=tuple(tiling),
                                                  text_before=text_before, text_after=text_after, steps=steps,
                                                  scale=scale, cached_frames=cached_frames)


@monarch_rt_attention_backward.register_fake
def _(q, k, v, out, grad_out, grid, tiling, text_before, text_after, steps, scale, cached_frames):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _kernel_backward_covers(q, grid, tiling, text_before, text_after, steps, scale, cached_frames) -> bool:
    """The backward kernels cover one step, fp16/bf16/fp32 and head_dim <= 256 (as the forward's)."""
    return steps == 1 and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256


register_autograd(monarch_rt_attention, _reference, monarch_rt_attention_backward, _kernel_backward_covers)


def _is_count(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1


def _fit(tiling, grid) -> tuple:
    """``tiling`` at ``grid``: each parameter kept where it divides its grid dimension, else 1."""
    return tuple(int(p) if g % p == 0 else 1 for p, g in zip(tiling, grid))


def _cached(args: dict) -> int:
    return int(args.get("cached_frames", 0) or 0)


def _always_exact(grid) -> bool:
    """Every tiling of ``grid`` is exactly dense: one column per row (W = 1), or a single frame of
    a single row (every row of a tile is then the query's own row)."""
    T, H, W = grid
    return W == 1 or (T == 1 and H == 1)


class MonarchRTMethod(Method):
    name = "monarch_rt"
    config_cls = MonarchRTConfig
    default_rank = 1
    opt_in = True
    lowered_as = "tile reshape/transpose + broadcast MatMul/Softmax (per-tile R step, L step over key rows)"
    lowers_cached = True
    grid_params = ("tiling",)

    def describe(self, cfg) -> str:
        return f"monarch_rt {cfg.f_tied}×{cfg.h_reduce}×{cfg.w_reduce} s{cfg.steps}"

    def config_from_args(self, args: dict):
        f, h, w = args["tiling"]
        return MonarchRTConfig(f_tied=f, h_reduce=h, w_reduce=w, steps=args["steps"])

    def unsupported(self, site) -> Optional[str]:
        if site.grid is None:
            return ("no video grid: MonarchRT tiles are frames × rows × columns of the (T, H, W) token grid "
                    "(give optimize(grid=(T, H, W)) if the model's patch embedding does not tell it)")
        if _always_exact(site.grid):
            return (f"grid {'×'.join(map(str, site.grid))}: every MonarchRT tiling of it is exactly dense "
                    f"attention (one row per tile or one key per row) at a higher cost")
        return None

    def check_config(self, cfg, site) -> Optional[str]:
        from ..kernels.monarch_rt.layout import tiling_problem

        for name in ("f_tied", "h_reduce", "w_reduce", "steps"):
            if not _is_count(getattr(cfg, name)):
                return f"{name}={getattr(cfg, name)!r}: an integer ≥ 1"
        if site.grid is None:
            return "the site has no video grid, which MonarchRT tiles"
        return tiling_problem(tuple(site.grid), cfg.tiling)

    def resolve_args(self, cfg, site, layer: int) -> dict:
        bad = self.check_config(cfg, site)
        if bad is not None:
            raise ValueError(f"MonarchRTConfig at site {site.site_id}: {bad}")
        return dict(grid=list(site.grid), tiling=[int(x) for x in cfg.tiling], text_before=site.text_before,
                    text_after=site.text_after, steps=int(cfg.steps))

    def flops(self, shape: Shape, args: dict, density: Optional[float] = None) -> Optional[int]:
        from ..kernels.monarch_rt.reference import monarch_rt_flops

        return int(monarch_rt_flops(shape.batch, shape.heads, shape.seq_q, shape.head_dim, grid=tuple(args["grid"]),
                                    tiling=tuple(args["tiling"]), text_before=args["text_before"],
                                    text_after=args["text_after"], steps=args["steps"]))

    # ------------------------------------------------------------------------------ KV cache
    #: block-causal plans run chunk by chunk through ``run_cached`` (no recomputed prefix)
    causal_mode = "cached"

    def cached_unsupported(self, args: dict) -> Optional[str]:
        """Why the KV-cache form cannot run these args (``grid`` = key grid, ``cached_frames`` = F),
        or None: the tiling must divide the key grid and f_tied the F cached and T - F new frames;
        no text tokens; a query grid where every tiling is exactly dense is left to dense."""
        from ..kernels.monarch_rt.layout import cached_problem, tiling_problem

        grid, tiling, F = tuple(args["grid"]), tuple(args["tiling"]), _cached(args)
        why = tiling_problem(grid, tiling) or cached_problem(grid, tiling, F, args.get("text_before", 0),
                                                             args.get("text_after", 0))
        if why is not None:
            return why
        qgrid = (grid[0] - F, grid[1], grid[2])
        if _always_exact(qgrid):
            return (f"query grid {'×'.join(map(str, qgrid))} (cached_frames={F} of key grid "
                    f"{'×'.join(map(str, grid))}): every MonarchRT tiling of it is exactly dense attention at a "
                    f"higher cost")
        return None

    def causal_unsupported(self, args: dict) -> Optional[str]:
        """A block-causal plan (``causal_chunk = C`` on ``grid``) runs chunk c as ``run_cached`` on
        key grid (end_c, H, W) with ``cached_frames = c * C``: the first chunk whose KV-cache form
        cannot run is the reason (f_tied must divide C and T; no text)."""
        T, H, W = (int(x) for x in args["grid"])
        C = int(args.get("causal_chunk", 0) or 0)
        if C < 1:
            return None
        f = int(args["tiling"][0])
        if C % f:
            return (f"block-causal chunks of {C} frames: f_tied={f} must divide the chunk (a query tile lies in "
                    f"one chunk); use f_tied in {[d for d in range(1, C + 1) if C % d == 0][:8]}")
        for c, t0 in enumerate(range(0, T, C)):
            end = min(T, t0 + C)
            why = self.cached_unsupported({**args, "grid": [end, H, W], "cached_frames": t0})
            if why is not None:
                return f"block-causal chunk {c} (frames {t0}..{end - 1} of {T}, chunk {C}): {why}"
        return None

    def run_cached(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        """q ``[B, H, N_q, D]`` (the key grid's last ``T - cached_frames`` frames) against k/v
        ``[B, H, N_k, D]`` (every frame of ``args["grid"]``)."""
        return torch.ops.vmonarch.monarch_rt_attention(q, k, v, args["grid"], args["tiling"], args["text_before"],
                                                       args["text_after"], args["steps"], scale, _cached(args))

    def cached_flops(self, shape: Shape, args: dict, density: Optional[float] = None) -> Optional[int]:
        """FLOPs of one ``run_cached`` call (``shape.seq_q`` = N_q, ``shape.seq_k`` = N_k): the new
        frames' query tiles against every key tile."""
        from ..kernels.monarch_rt.reference import monarch_rt_flops

        F = _cached(args)
        n = monarch_rt_flops(shape.batch, shape.heads, shape.seq_k, shape.head_dim, grid=tuple(args["grid"]),
                             tiling=tuple(args["tiling"]), text_before=args["text_before"],
                             text_after=args["text_after"], steps=args["steps"], cached_frames=F)
        T, H, W = args["grid"]
        if shape.seq_q != (T - F) * H * W:
            raise ValueError(f"MonarchRT KV cache: seq_q {shape.seq_q} != the {T - F} new frames' "
                             f"{(T - F) * H * W} tokens of key grid {tuple(args['grid'])} (cached_frames={F})")
        return int(n)

    def params(self, args: dict) -> str:
        f, h, w = args["tiling"]
        return f"f_tied={f} h_reduce={h} w_reduce={w} steps={args['steps']}"

    def candidates(self, site, budget, layer: int) -> list:
        """The tilings of ``RT_CANDIDATES`` that divide the site's grid and are not exactly dense
        (those are never cheaper), at one step (the kernels' case)."""
        from ..kernels.monarch_rt.layout import make_rt_layout, tiling_problem

        if self.unsupported(site) is not None:
            return []
        out = []
        for tiling in RT_CANDIDATES:
            if tiling_problem(tuple(site.grid), tiling) is not None:
                continue
            if make_rt_layout(site.seq_q, site.grid, tiling, site.text_before, site.text_after).exact:
                continue
            out.append(("monarch_rt", MonarchRTConfig(*tiling, steps=1)))
        return out

    def rederive(self, cfg, layout: Optional[str], site):
        """At another grid: each parameter that still divides its dimension is kept, the others
        become 1 (``(1, 1, 1)`` always divides)."""
        if site.grid is None:
            return cfg
        f, h, w = _fit(cfg.tiling, site.grid)
        return MonarchRTConfig(f_tied=f, h_reduce=h, w_reduce=w, steps=cfg.steps)

    def run(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        return torch.ops.vmonarch.monarch_rt_attention(q, k, v, args["grid"], args["tiling"], args["text_before"],
                                                       args["text_after"], args["steps"], scale, 0)

    def adapt_args(self, args: dict, old_grid: tuple, new_grid: tuple) -> dict:
        # the parameters that divide the new grid are kept, the others fall back to 1; the runtime's
        # warning for the new grid names the tiling it runs
        return {**args, "grid": list(new_grid), "tiling": list(_fit(args["tiling"], new_grid))}

    def lower(self, q, k, v, args: dict, scale: float, key_valid=None) -> torch.Tensor:
        from ..deploy.lowering import monarch_rt_lowered

        return monarch_rt_lowered(q, k, v, grid=args["grid"], tiling=args["tiling"], text_before=args["text_before"],
                                  text_after=args["text_after"], steps=args["steps"], scale=scale,
                                  key_valid=key_valid, cached_frames=_cached(args))


register(MonarchRTMethod())
