"""Route attention sites to ``vmonarch::*`` ops.

Each owning module (the innermost module that computes a site) gets its ``forward`` wrapped so
that, while it runs, a ``TorchFunctionMode`` intercepts its ``F.scaled_dot_product_attention``
calls — the k-th call is site ``k`` of that module — and sends them to our custom op with the
site's config as arguments. Hand-written attention is first normalised to an SDPA call (see
``normalize.py``). Because the interception is plain Python around torch ops, the rewritten model
still works under ``torch.compile`` (the mode is traced), ``torch.export`` and CUDA graphs, and its
parameters, buffers and ``state_dict`` keys are untouched.

At run time a call that does not match what was calibrated (another sequence length, a mask,
causal, dropout) runs the model's own attention instead: a wrong result is never returned.
"""
from __future__ import annotations

import contextlib
import functools
import types
import warnings
from dataclasses import replace
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from .. import ops  # noqa: F401  (registers torch.ops.vmonarch.*)
from ..config import SitePlan
from .detect import SDPA_TARGETS, _SDPA_ARGS
from .keypad import run_key_padded
from .regrid import adapt_plan

_WRAPPED_ATTR = "_vmonarch_original_forward"


def _bind_sdpa(args, kwargs) -> dict:
    a = dict(zip(_SDPA_ARGS, args))
    a.update(kwargs)
    a.setdefault("attn_mask", None)
    a.setdefault("dropout_p", 0.0)
    a.setdefault("is_causal", False)
    a.setdefault("scale", None)
    a.setdefault("enable_gqa", False)
    return a


def _to_bhnd(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def call_method(plan: SitePlan, q, k, v, scale: float) -> torch.Tensor:
    """Run ``plan``'s op on 4-D q/k/v (GQA already expanded)."""
    a = plan.args
    if plan.method == "monarch":
        return torch.ops.vmonarch.monarch_attention(q, k, v, a["grid"], a["block"], a["text_before"],
                                                    a["text_after"], a["steps"], scale, a["recompute"])
    if plan.method == "vmoba":
        return torch.ops.vmonarch.vmoba_attention(q, k, v, a["grid"], a["chunk"], a["text_before"],
                                                  a["text_after"], a["partition"], a["threshold"],
                                                  a["topk"], scale, a.get("pooled_rest", False))
    if plan.method == "dense":
        return torch.ops.vmonarch.dense_attention(q, k, v, scale)
    raise ValueError(f"site {plan.site_id}: cannot run method {plan.method!r}")


def runtime_mismatch(plan: SitePlan, a: dict) -> Optional[str]:
    """Why this call cannot take the calibrated path (None if it can)."""
    q, k, v = a["query"], a["key"], a["value"]
    if a["attn_mask"] is not None and not plan.args.get("key_padding"):
        return "an attention mask was passed"
    if a["is_causal"]:
        return "is_causal=True"
    if a["dropout_p"]:
        return f"dropout_p={a['dropout_p']}"
    if q.dim() not in (3, 4):
        return f"q has {q.dim()} dims"
    if q.shape[-2] != plan.seq_q or k.shape[-2] != plan.seq_k or q.shape[-1] != plan.head_dim:
        return (f"shape (N_q={q.shape[-2]}, N_k={k.shape[-2]}, D={q.shape[-1]}) differs from the calibrated "
                f"(N_q={plan.seq_q}, N_k={plan.seq_k}, D={plan.head_dim}); re-run optimize() for this shape")
    if v.shape[-1] != q.shape[-1]:
        return "value head_dim differs"
    if not torch.is_floating_point(q) or q.dtype == torch.float64:
        return f"dtype {q.dtype}"
    return None


def _follow_grid(plan: SitePlan, a: dict) -> Optional[SitePlan]:
    """The plan re-derived for this call's token grid when only the video size changed (see
    ``regrid.py``), or None. At the calibrated token count too, when the input's grid is another
    one (portrait vs landscape: 30x52 and 52x30 latents have as many tokens) and the plan's grid
    was inferred, not given by the user."""
    tracker = plan.__dict__.get("_tracker")  # set by optimize(); not a dataclass field
    q, k = a["query"], a["key"]
    if tracker is None:
        return None
    if q.shape[-2] == plan.seq_q and k.shape[-2] == plan.seq_k:
        grids = tracker.grids
        if (not grids or not plan.__dict__.get("_grid_inferred") or not plan.args.get("grid")
                or tuple(plan.args["grid"]) in {tuple(g) for g in grids}):
            return None
    adapted = adapt_plan(plan, q.shape[-2], k.shape[-2], q.shape[-1], tracker.grids, tracker.by_module)
    if adapted is None or runtime_mismatch(adapted, a) is not None:
        return None
    if plan.method != "dense":
        g, p = tuple(adapted.args["grid"]), adapted.args
        params = (f"block {tuple(p['block'])}" if plan.method == "monarch" else f"chunk {tuple(p['chunk'])}")
        text = (p["text_before"], p["text_after"])
        if g != tuple(plan.args["grid"]):
            what = f"the input's token grid is now {g}, not the {tuple(plan.args['grid'])} it was optimized for"
        else:
            what = (f"the tokens around the video grid {g} are now {text[0]} before / {text[1]} after, not "
                    f"{plan.args['text_before']} / {plan.args['text_after']} (e.g. a prompt of another length)")
        _warn_once(plan, f"grid {g} text {text}", f"vmonarch_opt: site {plan.site_id}: {what}; running "
                   f"{plan.method} with {params} re-derived from its plan (its error was measured at the optimize() "
                   f"shape: call optimize() with a batch of this shape for a calibrated plan)")
    return adapted


def _warn_once(plan: SitePlan, key: str, msg: str) -> None:
    """Warn the first time this site (of this optimized model) falls back for this reason. Not
    inside a torch.compile trace: warnings.warn would break the graph (an error with fullgraph)."""
    if torch.compiler.is_compiling():
        return
    seen = plan.__dict__.setdefault("_warned", set())  # not a dataclass field: never serialised
    if key not in seen:
        seen.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def prepare_qkv(a: dict) -> tuple:
    """q, k, v of an SDPA call as ``[B, H, N, D]`` with GQA expanded, and the scale — what our
    ops take."""
    q4, k4, v4 = _to_bhnd(a["query"]), _to_bhnd(a["key"]), _to_bhnd(a["value"])
    if k4.shape[-3] != q4.shape[-3]:  # GQA: query head i uses kv head i // group
        rep = q4.shape[-3] // k4.shape[-3]
        k4, v4 = k4.repeat_interleave(rep, dim=-3), v4.repeat_interleave(rep, dim=-3)
    scale = float(a["scale"] if a["scale"] is not None else q4.shape[-1] ** -0.5)
    return q4, k4, v4, scale


_lowering: Optional[Callable] = None


@contextlib.contextmanager
def lowering(fn: Callable):
    """While active, every rewritten site returns ``fn(plan, a, original)`` (``a``: the bound SDPA
    arguments) instead of calling a ``vmonarch::*`` op. ONNX export (``deploy/onnx.py``) traces
    pure-torch decompositions of the ops through this."""
    global _lowering
    previous, _lowering = _lowering, fn
    try:
        yield
    finally:
        _lowering = previous


def run_site(plan: SitePlan, a: dict, original: Callable) -> torch.Tensor:
    """One intercepted SDPA call: the planned op, or the model's own attention if it does not fit."""
    if plan.method == "original":
        return original()
    switch = plan.__dict__.get("_switch")  # set by optimize(): set_original_attention()
    if switch is not None and switch.original:
        return original()
    if _lowering is not None:
        return _lowering(plan, a, original)
    why = runtime_mismatch(plan, a)
    adapted = _follow_grid(plan, a)
    if why is not None and adapted is None:
        _warn_once(plan, why, f"vmonarch_opt: site {plan.site_id} ran dense attention: {why}")
        return original()
    plan = adapted or plan
    q, v = a["query"], a["value"]
    q4, k4, v4, scale = prepare_qkv(a)
    if a["attn_mask"] is not None:  # a text key-padding mask (plan.args["key_padding"])
        def call(qq, kk, vv, tb, ta):
            return call_method(replace(plan, args={**plan.args, "text_before": tb, "text_after": ta}),
                               qq, kk, vv, scale)

        out = run_key_padded(q4, k4, v4, a["attn_mask"], plan.args["text_before"], plan.args["text_after"],
                             scale, call)
        if out is None:
            _warn_once(plan, "mask", f"vmonarch_opt: site {plan.site_id} ran dense attention: "
                       "its mask is not a padding mask on text tokens")
            return original()
    else:
        out = call_method(plan, q4, k4, v4, scale)
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


class SiteMode(TorchFunctionMode):
    """Active while one owning module runs: sends its k-th SDPA call to ``handlers[k]``."""

    def __init__(self, handlers: list):
        super().__init__()
        self.handlers = handlers
        self.calls = 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SDPA_TARGETS:
            i = self.calls
            self.calls = i + 1
            if i < len(self.handlers) and self.handlers[i] is not None:
                a = _bind_sdpa(args, kwargs)
                return self.handlers[i](a, lambda: func(*args, **kwargs))
        # Everything else runs unchanged. Tensor methods are re-issued as method calls so that
        # Dynamo, which inlines this handler, sees them as it would without the mode.
        if args and isinstance(args[0], torch.Tensor) and getattr(torch.Tensor, getattr(func, "__name__", ""), None) is func:
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)


def install(module: torch.nn.Module, handlers: list, forward: Optional[Callable] = None) -> None:
    """Wrap ``module.forward`` so that ``SiteMode(handlers)`` is active while it runs.

    ``forward`` replaces the module's own forward (used for normalised hand-written attention).
    Wrapping again replaces the previous wrapper; ``uninstall`` restores the original.
    """
    original = module.__dict__.get(_WRAPPED_ATTR)
    if original is None:
        original = module.__dict__.get("forward", None) or module.forward
        module.__dict__[_WRAPPED_ATTR] = original
    inner = forward if forward is not None else original

    @functools.wraps(inner)
    def wrapped(*args, **kwargs):
        with SiteMode(handlers):
            return inner(*args, **kwargs)

    module.__dict__["forward"] = wrapped


def uninstall(module: torch.nn.Module) -> None:
    original = module.__dict__.pop(_WRAPPED_ATTR, None)
    if original is None:
        return
    if isinstance(original, types.MethodType) and original.__self__ is module and original.__func__ is type(module).forward:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = original


def plan_handler(plan: SitePlan) -> Callable:
    return lambda a, original: run_site(plan, a, original)
