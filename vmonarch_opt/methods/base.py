"""``Method``: everything the optimizer knows about one way of computing a site's attention.

A method is one module in this package that defines a config dataclass, a ``Method`` subclass and
(usually) a ``torch.library`` custom op, and registers one instance with
:func:`vmonarch_opt.methods.register`. The rest of the optimizer asks the registry and calls
these hooks; nothing else knows method names:

=====================  ==========================================================================
planning               ``resolve_args`` (config → op arguments at a site), ``unsupported`` (a
                       site this method cannot take), ``check_config`` (a config's values at a
                       site, for profiles edited by hand), ``flops`` (attention FLOPs of the
                       plan), ``plan_note`` (what the report adds to the plan's reason)
calibration            ``candidates`` (configs tried at a site), ``calibration_run`` (output,
                       FLOPs and density of one candidate on real q/k/v), ``config_from_args``,
                       ``rederive`` (a calibrated choice at another shape)
running                ``run`` (the op on ``[B, H, N, D]`` q/k/v), ``adapt_args`` (the plan at
                       another token grid), ``executed`` (FLOPs and density measured on a call,
                       for methods whose cost depends on the data)
causal video           ``cached_unsupported`` / ``run_cached`` / ``cached_flops`` (queries = the last
                       frames of a KV cache), ``causal_unsupported`` and ``causal_mode`` (a
                       block-causal mask): ``methods/causal.py``; ``apply`` / ``cost`` run and
                       count a plan of any structure
context parallel       ``ring_unsupported`` / ``ring_run`` (the site's sequence split across ranks;
                       ``parallel/ring.py``)
deployment             ``lower`` (an ONNX-exportable decomposition)
report                 ``describe`` (short label of a config), ``params`` (the plan's parameters)
=====================  ==========================================================================

Class attributes say what kind of method it is: ``name``, ``config_cls``, ``default_rank`` (its
place in the default choice without calibration), ``opt_in`` (left out of the default methods),
``structured`` (cuts attention FLOPs),
``uses_grid`` (its arguments depend on the video grid), ``grid_params`` (the arguments
``adapt_args`` re-derives), ``measured_flops`` (its cost depends on the data), ``lowered_as``
(what ONNX export turns it into).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import torch

__all__ = ["Method", "Shape", "check_tile"]


@dataclass(frozen=True)
class Shape:
    """The attention problem of a site or a call: what FLOP counts need."""

    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int

    @classmethod
    def of(cls, site) -> "Shape":
        return cls(site.batch, site.heads, site.seq_q, site.seq_k, site.head_dim)

    @classmethod
    def of_qk(cls, q: torch.Tensor, k: torch.Tensor) -> "Shape":
        B, H, N, D = q.shape
        return cls(B, H, N, k.shape[-2], D)

    @property
    def dense_flops(self) -> int:
        return 4 * self.batch * self.heads * self.seq_q * self.seq_k * self.head_dim


def _count(x, least: int = 1) -> bool:
    """An integer ≥ ``least`` (``True`` is not a count)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= least


def check_tile(name: str, value, site) -> Optional[str]:
    """What is wrong with a ``(t, h, w)`` tile of the site's video grid (``name``: ``block``,
    ``chunk``), or None: three positive integers, none larger than the grid (a site without a grid
    is ``(1, 1, video tokens)``, and a tile there may be given as its length)."""
    nv = site.seq_q - site.text_before - site.text_after
    grid = tuple(site.grid) if site.grid else (1, 1, nv)
    t = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not site.grid and len(t) in (1, 3) and all(_count(x) for x in t):
        t = (1, 1, math.prod(t))
    if len(t) != 3 or not all(_count(x) for x in t):
        return f"{name}={value!r}: three positive integers (t, h, w)"
    if any(b > g for b, g in zip(t, grid)):
        return (f"{name} {'×'.join(map(str, t))} does not fit the site's grid {'×'.join(map(str, grid))}: "
                f"no dimension may exceed the grid's")
    return None


class Method:
    """Base class of a registered method; subclasses set the class attributes and override hooks."""

    name: str = ""
    config_cls: type = type(None)
    #: preference when no calibration chooses (lower first); None: only used when asked for
    default_rank: Optional[int] = None
    #: not among the default methods: planned and calibrated only when ``methods=`` names it
    opt_in: bool = False
    #: cuts attention FLOPs (dense does not): the report times the optimized forward only then
    structured: bool = True
    #: its op arguments depend on the video grid: re-derived when the input's grid changes
    uses_grid: bool = True
    #: its FLOPs depend on the data (measured on calls, e.g. a block selection)
    measured_flops: bool = False
    #: how the report's FLOPs of this method are obtained
    flops_source: str = "analytic: counted from the plan"
    #: how ONNX export lowers it (shown by ``export_onnx``); empty: no lowering
    lowered_as: str = ""
    #: op arguments that ``adapt_args`` re-derives for another grid (named in its warning)
    grid_params: tuple = ()
    #: how a block-causal plan runs chunk by chunk (``methods/causal.py``): "cached" (each chunk's
    #: queries against its visible keys, through ``run_cached``) or "prefix" (the method on the
    #: prefix of visible chunks, keeping the last chunk's rows)
    causal_mode: str = "prefix"
    #: ``lower`` also takes a KV-cache plan (``args["cached_frames"]``): ONNX export of KV-cache
    #: sites and of block-causal plans in "cached" mode
    lowers_cached: bool = False

    # ------------------------------------------------------------------------------ configs
    def config(self, **kw):
        return self.config_cls(**kw)

    def config_to_dict(self, cfg) -> dict:
        d = {"method": self.name}
        for k, v in asdict(cfg).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return d

    def config_from_dict(self, d: dict, strict: bool = False):
        """The config saved as ``d``; ``strict``: every field must be there (a saved profile writes
        them all, so a missing one was edited out, and its default would change the choice)."""
        d = dict(d)
        d.pop("method", None)
        names = {f.name for f in fields(self.config_cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"saved {self.name} config has unknown fields {unknown}")
        missing = [f.name for f in fields(self.config_cls) if f.name not in d]
        if strict and missing:
            raise ValueError(f"saved {self.name} config lacks its parameters {missing}")
        for f in fields(self.config_cls):
            if isinstance(d.get(f.name), list):
                d[f.name] = tuple(d[f.name])
        return self.config_cls(**d)

    def describe(self, cfg) -> str:
        """Short human label of a config (profiles, tables)."""
        return self.name

    def config_from_args(self, args: dict):
        """The config that resolves to these op arguments (a pinned plan's config)."""
        return self.config_cls()

    # ------------------------------------------------------------------------------ planning
    def unsupported(self, site) -> Optional[str]:
        """Why this method cannot run ``site`` (beyond the optimizer's own checks), or None."""
        return None

    def check_config(self, cfg, site) -> Optional[str]:
        """What is wrong with ``cfg`` at ``site`` (a value out of range, a block that does not fit
        the grid), or None. A profile edited by hand is checked with it on load."""
        return None

    def resolve_args(self, cfg, site, layer: int) -> dict:
        """Op arguments of ``cfg`` at ``site`` (``layer``: index among the rewritten sites)."""
        return {}

    def flops(self, shape: Shape, args: dict, density: Optional[float] = None) -> Optional[int]:
        """Attention FLOPs of a plan with ``args`` (None when it depends on data not yet measured)."""
        return shape.dense_flops

    def plan_note(self, site, args: dict) -> str:
        """Appended to the plan's reason in the report (e.g. why 1D blocks)."""
        return ""

    def params(self, args: dict) -> str:
        """The plan's parameters for the report's ``params`` column."""
        return ""

    # ------------------------------------------------------------------------------ calibration
    def candidates(self, site, budget, layer: int) -> list[tuple[str, Any]]:
        """``[(layout name, config)]`` calibration tries at ``site`` under ``budget``."""
        return []

    def calibration_run(self, q, k, v, args: dict, scale: float) -> tuple[torch.Tensor, int, Optional[float]]:
        """``(output, FLOPs, density or None)`` of one candidate on one site's q/k/v."""
        flops = self.cost(Shape.of_qk(q, k), args)
        if flops is None:
            raise NotImplementedError(f"method {self.name!r}: its FLOPs depend on the data; override "
                                      f"calibration_run() to measure them")
        return self.apply(q, k, v, args, scale), int(flops), None

    def rederive(self, cfg, layout: Optional[str], site):
        """A calibrated choice (``cfg``, made with named ``layout``) for ``site`` at another shape."""
        return cfg

    # ------------------------------------------------------------------------------ running
    def run(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        """The method's op on ``[B, H, N, D]`` q/k/v (GQA expanded)."""
        raise NotImplementedError(f"method {self.name!r} defines no run()")

    def adapt_args(self, args: dict, old_grid: tuple, new_grid: tuple) -> dict:
        """``args`` for the video grid ``new_grid`` (the plan was made for ``old_grid``)."""
        return {**args, "grid": list(new_grid)}

    def executed(self, q, k, v, args: dict, scale: float) -> Optional[tuple[int, float]]:
        """``(FLOPs, density)`` of this call, for ``measured_flops`` methods; None otherwise."""
        return None

    # ------------------------------------------------------------------------------ causal video
    def site_args(self, cfg, site, layer: int) -> dict:
        """Op arguments of ``cfg`` at ``site`` with the site's block-causal / KV-cache structure:
        what planning and calibration use (``resolve_args`` plus ``methods/causal.py``)."""
        from . import causal

        return causal.structure_args(self, self.resolve_args(cfg, site, layer), site)

    def site_unsupported(self, site) -> Optional[str]:
        """``unsupported``, and why the site's block-causal / KV-cache structure cannot run with
        this method's default config (None when it can)."""
        why = self.unsupported(site)
        if why is not None or not (getattr(site, "causal_chunk", 0) or getattr(site, "cached_frames", 0)):
            return why
        from . import causal

        try:
            args = self.site_args(self.config(), site, 0)
        except ValueError as e:
            return str(e)
        return causal.unsupported(self, args)

    def apply(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        """The plan's output: ``run``, or its block-causal / KV-cache form (``methods/causal.py``).
        What the runtime and calibration call; methods override the hooks, not this."""
        from . import causal

        return causal.apply(self, q, k, v, args, scale)

    def cost(self, shape: Shape, args: dict, density: Optional[float] = None) -> Optional[int]:
        """Attention FLOPs of a plan of any structure (``flops`` summed over what ``apply`` runs)."""
        from . import causal

        return causal.cost(self, shape, args, density)

    def cached_unsupported(self, args: dict) -> Optional[str]:
        """Why a KV-cache plan (``args["grid"]`` the key grid, ``args["cached_frames"]`` the frames
        before the queries) cannot run with this method, or None when ``run_cached`` takes it."""
        return f"{self.name} has no KV-cache form"

    def run_cached(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        """The method with queries ``[B, H, N_q, D]`` = the last frames of the key grid."""
        raise NotImplementedError(f"method {self.name!r} has no KV-cache form")

    def cached_flops(self, shape: Shape, args: dict, density: Optional[float] = None) -> Optional[int]:
        """FLOPs of one ``run_cached`` call (``shape.seq_q`` queries, ``shape.seq_k`` keys)."""
        raise NotImplementedError(f"method {self.name!r} has no KV-cache form")

    def causal_unsupported(self, args: dict) -> Optional[str]:
        """Why a block-causal plan (``args["causal_chunk"]`` frames per chunk) cannot run with this
        method, or None (the default: ``causal_mode`` "prefix" runs any method causally)."""
        return None

    # ------------------------------------------------------------------------------ context parallel
    def ring_unsupported(self, args: dict, sizes: tuple) -> Optional[str]:
        """Why a plan with ``args`` cannot run when the site's sequence is split across ranks in
        contiguous runs of ``sizes`` tokens (rank order; ring context parallelism), or None when
        ``ring_run`` takes it. The caller then runs exact dense ring attention and reports this
        reason. Default: no sequence-split form."""
        return f"{self.name} has no sequence-split (ring) form"

    def ring_run(self, q, k, v, args: dict, scale: float, split) -> torch.Tensor:
        """The output rows of this rank's queries (``q/k/v [B, H, n_r, D]``: this rank's run of the
        sequence) over the whole sequence. ``split`` (``parallel.ring.SequenceSplit``) has the runs'
        ``sizes``, this ``rank`` and ``all_gather(t, dim, sizes=None)``. Only called when
        ``ring_unsupported`` returned None."""
        raise NotImplementedError(f"method {self.name!r} has no ring form")

    # ------------------------------------------------------------------------------ deployment
    def lower(self, q, k, v, args: dict, scale: float, key_valid=None) -> torch.Tensor:
        """A decomposition into standard torch ops that ONNX export can trace."""
        raise NotImplementedError(f"method {self.name!r} has no ONNX lowering")

    def __repr__(self) -> str:
        return f"<method {self.name}>"
