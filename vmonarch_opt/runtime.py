"""What a rewritten site does at run time, and the state it keeps there.

A plan (``plan.py``) is fixed once ``optimize`` has made it. What changes while the optimized
model runs lives in one :class:`SiteRuntime` per site: the plans re-derived for other token grids
(``passes/regrid.py``), the reasons already warned about, and the shared switch back to the
model's own attention (``switch.py``). :func:`run_site` is the handler body of every rewritten
site: the planned op, or the model's own attention when the call does not fit the plan (another
sequence length without a grid to follow, a mask, causal, dropout): a wrong result is never
returned.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import methods as registry
from .passes.causal import block_causal_ok, check_block_causal
from .passes.keypad import run_key_padded
from .passes.regrid import adapt_plan, exporting
from .plan import SitePlan

__all__ = ["AttentionSwitch", "SiteRuntime", "run_site", "runtime_mismatch", "prepare_qkv", "call_method", "lowering",
           "executed_cost", "RAN", "FALLBACKS", "mismatch"]

RAN = "ran"  # the outcome of a call that ran the site's method
#: why a call ran the model's own attention instead, by kind (a fixed list: compiled graphs count
#: each kind in its own slot of a counter tensor, slot 0 being RAN)
FALLBACKS = {
    "switched": "set_original_attention() was on",
    "mask": "an attention mask was passed",
    "causal": "is_causal=True",
    "dropout": "attention dropout",
    "rank": "q is not 3-D or 4-D",
    "shape": "another shape, and no token grid of the input to follow",
    "value_dim": "value head_dim differs",
    "dtype": "unsupported dtype",
    "not_padding": "the mask is not a padding mask on text tokens",
    "not_causal": "the mask is not the block-causal mask the site was planned for",
    "handwritten": "hand-written attention called unlike when traced (dtype, device, rank or an argument)",
    "context_parallel": "under context parallelism the method cannot take this call (parallel/)",
}
_SLOT = {RAN: 0, **{k: i + 1 for i, k in enumerate(FALLBACKS)}}


class AttentionSwitch:
    """The flag ``set_original_attention`` flips (``switch.py``), shared by every site of one
    optimized model (``SiteRuntime.switch``): while ``original`` is on, sites run the model's own
    attention."""

    def __init__(self) -> None:
        self.original = False

    def __repr__(self) -> str:
        return f"AttentionSwitch(original={self.original})"


@dataclass(eq=False)
class SiteRuntime:
    """One rewritten site of one optimized model while it runs."""

    plan: SitePlan
    switch: object = None  # AttentionSwitch shared by the model's sites (set_original_attention)
    tracker: object = None  # passes.regrid.GridTracker: the input's token grid, for other video sizes
    grid_inferred: bool = True  # False: the user gave the grid (grid=): not re-derived at the same token count
    grid_module: str = ""  # the patch embedding whose output gave the grid at optimize time
    prefix_modules: tuple = ()  # patch embeddings of the tokens before the video (FramePack's history)
    adapted: dict = field(default_factory=dict)  # re-derived plans, per (n_q, n_k, grid, text_before)
    warned: set = field(default_factory=set)  # reasons this site has already warned about
    counts: Counter = field(default_factory=Counter)  # eager calls per outcome (RAN or a FALLBACKS kind)
    tally: Optional[torch.Tensor] = None  # int64, one slot per outcome: calls counted inside compiled graphs
    last_fallback: dict = field(default_factory=dict)  # kind -> the message of its latest eager fallback

    @property
    def site_id(self) -> str:
        return self.plan.site_id

    def counter(self, device) -> torch.Tensor:
        """This site's tally of compiled calls, on ``device`` (made or moved in eager code: compiled
        code only adds to it; moving keeps what it counted)."""
        t = self.tally
        if t is None or t.device != torch.device(device):
            new = torch.zeros(len(_SLOT), dtype=torch.int64, device=device)
            if t is not None:
                new += t.to(device)
            torch._dynamo.mark_static_address(new)  # a fixed buffer: CUDA graphs replay the adds in place
            self.tally = t = new
        return t

    def record(self, outcome: str, like: torch.Tensor, message: str = "") -> None:
        """Count one call's outcome (RAN or a FALLBACKS kind). Eager calls count on the host; in a
        torch.compile graph the outcome is decided while tracing and the graph adds 1 to a counter
        tensor on ``like``'s device on every run (no graph break; CUDA graphs replay it). Not
        counted while exporting, nor in compiled code on a device this site never ran on eagerly."""
        if not torch.compiler.is_compiling():
            self.counts[outcome] += 1
            if message:
                self.last_fallback[outcome] = message
            if self.switch is not None and (self.tally is None or self.tally.device != like.device):
                self.counter(like.device)  # an applied site: compiled code on this device counts from now
            return
        if exporting():
            return
        t = self.tally
        if t is not None and t.device == like.device:
            t[_SLOT[outcome]] += 1

    def record_split(self, ok: torch.Tensor, like: torch.Tensor, kind: str) -> None:
        """In compiled code: count RAN where the 0-d bool ``ok`` holds, ``kind`` where it does not
        (the outcome is a tensor, decided in the graph)."""
        if not torch.compiler.is_compiling() or exporting():
            return
        t = self.tally
        if t is not None and t.device == like.device:
            t[_SLOT[RAN]] += ok.to(t.dtype)
            t[_SLOT[kind]] += (~ok).to(t.dtype)

    def fall_back(self, kind: str, like, message: str) -> None:
        """This site's call runs the model's own attention for ``message``: warn once, count it."""
        _warn_once(self, message, f"vmonarch_opt: site {self.site_id} ran the model's own attention: {message}")
        if like is not None:
            self.record(kind, like, message)
        elif not torch.compiler.is_compiling():
            self.counts[kind] += 1
            self.last_fallback[kind] = message

    def calls(self) -> Counter:
        """Calls per outcome so far, eager and compiled (reads the counter tensors: a device sync)."""
        out = Counter(self.counts)
        names = list(_SLOT)
        if self.tally is not None:
            for i, n in enumerate(self.tally.tolist()):
                if n:
                    out[names[i]] += n
        return out

    def reset_calls(self) -> None:
        self.counts.clear()
        if self.tally is not None:
            self.tally.zero_()

    def __call__(self, a: dict, original: Callable) -> torch.Tensor:
        """The site's handler (``router.SiteMode``): an object, not a closure, so that a copy or a
        pickle of the optimized model gets its own runtime."""
        return run_site(self, a, original)

    def handler(self) -> Callable:
        return self


def _to_bhnd(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def call_method(plan: SitePlan, q, k, v, scale: float) -> torch.Tensor:
    """Run ``plan``'s op on 4-D q/k/v (GQA already expanded)."""
    return registry.get(plan.method).apply(q, k, v, plan.args, scale)


def mismatch(plan: SitePlan, a: dict, read_mask: bool = True) -> Optional[tuple[str, str]]:
    """``(kind, message)`` of why this call cannot take the calibrated path (None if it can);
    ``kind`` is a key of FALLBACKS. ``read_mask=False``: a block-causal plan's mask values are not
    read (compiled code decides in the graph: ``run_site``)."""
    q, k, v = a["query"], a["key"], a["value"]
    if a["attn_mask"] is not None and not plan.args.get("key_padding") and not plan.args.get("causal_chunk"):
        return "mask", "an attention mask was passed"
    if plan.args.get("causal_chunk") and a["attn_mask"] is None:
        return "not_causal", "no mask was passed to a site planned block-causal: its attention is bidirectional now"
    if a["is_causal"]:
        return "causal", "is_causal=True"
    if a["dropout_p"]:  # honoured by the model's own call: never dropped
        return "dropout", (f"attention dropout_p={a['dropout_p']} (the model's own attention ran, with its dropout; in "
                           f"eval mode, or with dropout_p=0, the optimized attention runs)")
    if q.dim() not in (3, 4):
        return "rank", f"q has {q.dim()} dims"
    if q.shape[-2] != plan.seq_q or k.shape[-2] != plan.seq_k or q.shape[-1] != plan.head_dim:
        return "shape", (f"shape (N_q={q.shape[-2]}, N_k={k.shape[-2]}, D={q.shape[-1]}) differs from the calibrated "
                         f"(N_q={plan.seq_q}, N_k={plan.seq_k}, D={plan.head_dim}); re-run optimize() for this shape")
    if v.shape[-1] != q.shape[-1]:
        return "value_dim", "value head_dim differs"
    if not torch.is_floating_point(q) or q.dtype == torch.float64:
        return "dtype", f"dtype {q.dtype}"
    if plan.args.get("causal_chunk") and read_mask:
        T, H, W = plan.args["grid"]
        if not check_block_causal(a["attn_mask"], T, H * W, plan.args["causal_chunk"]):
            return "not_causal", (f"the mask is not block-causal over chunks of {plan.args['causal_chunk']} frames of the "
                                  f"grid {T}×{H}×{W} (what the site was planned for)")
    return None


def runtime_mismatch(plan: SitePlan, a: dict, read_mask: bool = True) -> Optional[str]:
    """Why this call cannot take the calibrated path (None if it can)."""
    m = mismatch(plan, a, read_mask)
    return None if m is None else m[1]


def _follow_grid(rt: SiteRuntime, a: dict) -> Optional[SitePlan]:
    """The plan re-derived for this call's token grid when only the video size changed (see
    ``regrid.py``), or None. At the calibrated token count too, when the input's grid is another
    one (portrait vs landscape: 30x52 and 52x30 latents have as many tokens) and the plan's grid
    was inferred, not given by the user."""
    plan, tracker = rt.plan, rt.tracker
    q, k = a["query"], a["key"]
    if tracker is None:
        return None
    if q.shape[-2] == plan.seq_q and k.shape[-2] == plan.seq_k:
        grids = tracker.grids
        if (not grids or not rt.grid_inferred or not plan.args.get("grid")
                or _query_grid(plan.args) in {tuple(g) for g in grids}):
            return None
    adapted = adapt_plan(plan, q.shape[-2], k.shape[-2], q.shape[-1], tracker.grids, tracker.by_module,
                         grid_module=rt.grid_module, prefix_modules=rt.prefix_modules, cache=rt.adapted)
    if adapted is None or runtime_mismatch(adapted, a, read_mask=not torch.compiler.is_compiling()) is not None:
        return None
    method = registry.get(plan.method)
    if adapted.args.get("cached_frames") or plan.args.get("cached_frames"):
        _warn_once(rt, "kv cache", f"vmonarch_opt: site {plan.site_id}: keys are a KV cache (cached frames, then the "
                   f"new ones; now {adapted.args.get('cached_frames', 0)} cached of {adapted.args['grid'][0]} frames); "
                   f"{plan.method} follows each cache length with its plan re-derived (its error was measured at "
                   f"the optimize() shape)")
    elif method.uses_grid:
        g, p = tuple(adapted.args["grid"]), adapted.args
        text = (p["text_before"], p["text_after"])
        params = ", ".join(f"{k} {tuple(p[k])}" for k in method.grid_params)
        if g != tuple(plan.args["grid"]):
            what = f"the input's token grid is now {g}, not the {tuple(plan.args['grid'])} it was optimized for"
        else:
            what = (f"the tokens around the video grid {g} are now {text[0]} before / {text[1]} after, not "
                    f"{plan.args['text_before']} / {plan.args['text_after']} (e.g. a prompt of another length)")
        _warn_once(rt, f"grid {g} text {text}", f"vmonarch_opt: site {plan.site_id}: {what}; running "
                   f"{plan.method} with {params} re-derived from its plan (its error was measured at the "
                   f"optimize() shape: call optimize() with a batch of this shape for a calibrated plan)")
    return adapted


def _query_grid(args: dict) -> tuple:
    """The video grid of the plan's queries: the grid, less the cached frames of a KV cache."""
    T, H, W = args["grid"]
    return (T - int(args.get("cached_frames") or 0), H, W)


def _warn_once(rt: SiteRuntime, key: str, msg: str) -> None:
    """Warn the first time this site (of this optimized model) falls back for this reason. Not
    inside a torch.compile trace: warnings.warn would break the graph (an error with fullgraph)."""
    if torch.compiler.is_compiling():
        return
    if key not in rt.warned:
        rt.warned.add(key)
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


def run_site(rt: SiteRuntime, a: dict, original: Callable) -> torch.Tensor:
    """One intercepted SDPA call: the planned op, or the model's own attention if it does not fit."""
    plan = rt.plan
    if not plan.rewritten:
        return original()
    if rt.switch is not None and rt.switch.original:
        rt.record("switched", a["query"])
        return original()
    if _lowering is not None:
        return _lowering(plan, a, original)
    compiling = torch.compiler.is_compiling()
    why = mismatch(plan, a, read_mask=not compiling)
    # only another shape (or another grid at this one) can be followed; masks, dtype, ... cannot
    adapted = _follow_grid(rt, a) if why is None or why[0] == "shape" else None
    if why is not None and adapted is None:
        rt.fall_back(why[0], a["query"], why[1])
        return original()
    plan = adapted or plan
    q, v = a["query"], a["value"]
    q4, k4, v4, scale = prepare_qkv(a)
    if a["attn_mask"] is not None and plan.args.get("key_padding"):  # a text key-padding mask
        def call(qq, kk, vv, tb, ta):
            return call_method(plan.replace(args={**plan.args, "text_before": tb, "text_after": ta}),
                               qq, kk, vv, scale)

        out = run_key_padded(q4, k4, v4, a["attn_mask"], plan.args["text_before"], plan.args["text_after"],
                             scale, call)
        if out is None:
            rt.fall_back("not_padding", q, "its mask is not a padding mask on text tokens")
            return original()
    elif compiling and plan.args.get("causal_chunk"):
        return _block_causal_in_graph(rt, plan, a, scale)
    else:
        out = call_method(plan, q4, k4, v4, scale)
    rt.record(RAN, q)
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def _block_causal_in_graph(rt: SiteRuntime, plan: SitePlan, a: dict, scale: float) -> torch.Tensor:
    """A block-causal site inside a compiled graph: the mask check is a tensor, and ``torch.cond``
    runs our op when it holds, the model's masked SDPA otherwise (no graph break, fullgraph works;
    the counters add the outcome in the graph)."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    T, H, W = plan.args["grid"]
    ok = block_causal_ok(mask, T, H * W, plan.args["causal_chunk"])
    extra = {"enable_gqa": True} if a.get("enable_gqa") else {}
    if ok is None:  # the mask's shape rules it out (static): the model's own attention
        rt.record("not_causal", q)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a["scale"], **extra)
    shape = q.shape[:-1] + (v.shape[-1],)

    def ours(q, k, v, mask):
        q4, k4, v4, _ = prepare_qkv({**a, "query": q, "key": k, "value": v})
        return call_method(plan, q4, k4, v4, scale).reshape(shape).contiguous()

    def model_own(q, k, v, mask):  # (both branches must agree on strides)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a["scale"],
                                                                **extra).contiguous()

    # cond refuses operands that alias each other, and q/k/v are often views of one projection:
    # k and v are copied (a few MB against the attention itself)
    out = torch.cond(ok, ours, model_own, (q, k.clone(), v.clone(), mask))
    rt.record_split(ok, q, "not_causal")
    return out


def executed_cost(plan: SitePlan, q, k, v, scale: float, mask=None) -> Optional[tuple[int, float]]:
    """``(FLOPs, density)`` this call executes under ``plan``, for methods whose cost depends on
    the data (``Method.measured_flops``; under a text padding ``mask``: per batch element on the
    tokens the op keeps, as it runs). None when the mask is not a padding mask (the call ran the
    model's attention)."""
    method = registry.get(plan.method)
    a = plan.args
    flops, dens = [], []

    def measure(qq, kk, vv, tb, ta):
        f, d = method.executed(qq, kk, vv, {**a, "text_before": tb, "text_after": ta}, scale)
        flops.append(f)
        dens.append(d)
        return torch.zeros_like(qq)  # only the cost is wanted

    if mask is None:
        measure(q, k, v, a["text_before"], a["text_after"])
    elif run_key_padded(q, k, v, mask, a["text_before"], a["text_after"], scale, measure) is None:
        return None
    return int(sum(flops)), sum(dens) / len(dens)
