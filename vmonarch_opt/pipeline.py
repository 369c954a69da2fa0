"""The stages of ``optimize``: analyse → plan → (calibrate) → validate → apply → report.

Each stage takes values and returns values; ``optimize.py`` strings them together, and
``profiles/calibrate.py`` runs analyse → plan → calibrate on its own. Every stage that runs the
model with something at its sites goes through the router (``router.Route``).
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import methods as registry
from . import runtime
from .batch import batch_device, run_calibration_call
from .metrics import rel_error
from .passes.capture import capture as capture_graphs
from .passes.census import Census, attention_census, uncaptured
from .passes.detect import DetectedSite, detect, unrecognised_attention
from .passes.causal import mark_structure
from .passes.grid import assign_grids, grid_modules, lookup_user_grid
from .passes.normalize import NormalizeError, normalize_module
from .passes.regrid import GridTracker
from .passes.siblings import add_sibling_sites
from .planner import plan_sites, warn_unmatched_overrides
from .router import Route, Routing, owning_module
from .runtime import AttentionSwitch, SiteRuntime, executed_cost, prepare_qkv, runtime_mismatch
from .site import AttentionSite

__all__ = ["Analysis", "Applied", "Validation", "analyse", "plan", "replan", "observe", "validate",
           "validated_plans", "apply", "on_cuda", "time_forwards", "gpu_busy_fraction"]


# ------------------------------------------------------------------------------------- analyse
@dataclass
class Analysis:
    """What the model is: its attention sites, the graphs they were found in, and what was missed."""

    reference: Any  # the model's output on the first calibration batch
    graphs: list
    detected: list[DetectedSite]
    census: Census
    missed: dict  # {module path: SDPA calls per invocation that no site accounts for}
    unrouted: bool  # some attention was captured in graphs that do not say which module runs it
    unrecognised: dict = field(default_factory=dict)  # {module path: softmax·V attention in a form not detected}

    @property
    def sites(self) -> list[AttentionSite]:
        return [d.site for d in self.detected]


def analyse(model: torch.nn.Module, batches: list, *, grid=None, capture: str = "auto") -> Analysis:
    """Run the model once (the reference output, SDPA calls counted per module), capture its
    graphs, detect every attention site and find the video grid each one runs over."""
    with torch.no_grad(), attention_census(model) as calls:
        reference = run_calibration_call(model, batches[0])
    graphs = capture_graphs(model, batches[0], capture)
    detected = add_sibling_sites(detect(graphs, model), calls, model)
    assign_grids(detected, graphs, model, batches[0], grid)
    sites = [d.site for d in detected]
    mark_structure(sites, calls.staircases)
    if not calls.get("") and uncaptured(calls, [s for s in sites if s.module_path]):
        # A graph Dynamo resumed after a graph break inside a function (not a module) carries no
        # module stack: its SDPA looks like the root's own. Routed at the root it would take the
        # first same-shaped call of the whole forward. The eager census says the root calls no
        # attention itself while some module's calls are unaccounted for: these are those.
        for s in sites:
            if s.form == "sdpa" and s.module_path == "":
                s.module_resolved = False
    missed = uncaptured(calls, sites)
    unrouted = any(not s.module_resolved and not s.module_path for s in sites)
    return Analysis(reference=reference, graphs=graphs, detected=detected, census=calls, missed=missed,
                    unrouted=unrouted, unrecognised=unrecognised_attention(graphs, model, detected))


def _calls_where(calls: dict) -> str:
    return ", ".join(f"{p or '<root>'} ({n} call{'s' if n > 1 else ''})" for p, n in sorted(calls.items()))


def _uncaptured_text(missed: dict, unrouted: bool = False) -> str:
    where = _calls_where(missed)
    if unrouted:  # some of it was captured, in graphs without module information (see optimize())
        return (f"attention in {where} ran outside the captured graphs or in graphs resumed after a graph "
                f"break inside a function (e.g. an attention processor) that do not say which module runs "
                f"it, so it keeps the model's own attention. Try capture='fx', or remove the graph break "
                f"(the torch.compile warning names it).")
    return (f"attention ran outside the captured graphs in {where} — Dynamo skipped that code (a graph "
            f"break in a loop or data-dependent Python), so it keeps the model's own attention. "
            f"Try capture='fx', or rewrite the loop so that torch.compile can trace it.")


def _flex_text(flex: dict) -> str:
    where = _calls_where(flex)
    return (f"flex_attention ran in {where}: its score/mask functions and BlockMask are not rewritten, "
            f"so it keeps the model's own attention.")


def _unrecognised_text(found: dict) -> str:
    where = _calls_where(found)
    return (f"attention written in a form that detection does not recognise (a softmax over a product of two "
            f"activations feeding another product) in {where}: it keeps the model's own attention. Write it "
            f"with F.scaled_dot_product_attention (or as softmax(q @ k.transpose(-2, -1) * scale + bias) @ v) "
            f"to have it optimized.")


def analysis_notes(analysis: Analysis, model_name: str) -> dict:
    """What analysis could not see or route, as messages (``optimize`` and ``calibrate`` warn with
    them; the report lists them under "not optimized"): ``uncaptured``, ``flex_attention``,
    ``unrecognised``, or ``no_sites`` when the model shows no attention at all."""
    notes = {}
    if analysis.missed:
        notes["uncaptured"] = _uncaptured_text(analysis.missed, analysis.unrouted)
    if analysis.census.flex:
        notes["flex_attention"] = _flex_text(analysis.census.flex)
    if analysis.unrecognised:
        notes["unrecognised"] = _unrecognised_text(analysis.unrecognised)
    if not analysis.sites and not notes:
        notes["no_sites"] = (f"0 attention sites found in {model_name}: no F.scaled_dot_product_attention call and "
                             f"no softmax(q·kᵀ)·v ran on the calibration batch ({len(analysis.graphs)} captured "
                             f"graph(s)); the model is returned unchanged. If it has attention, check that the batch "
                             f"reaches it, or try capture='fx'")
    return notes


# ------------------------------------------------------------------------------------- plan
def _record_inputs(model, paths: set[str], batch) -> dict:
    """Run the batch once, remembering the (args, kwargs) each module in ``paths`` was called with."""
    seen: dict = {}
    hooks = []
    for p in paths:
        def pre(m, args, kwargs, p=p):
            seen.setdefault(p, (args, kwargs))

        hooks.append(owning_module(model, p).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            run_calibration_call(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _normalize_handwritten(model, detected: list[DetectedSite], plans: dict, batch) -> tuple[dict, dict]:
    """Hand-written sites that may be rewritten become SDPA calls: ``(forwards, plans)`` with
    ``forwards[module path] = (normalised forward, fx graph)`` and the plans of the sites that
    could not be normalised changed to keep the model's own attention."""
    plans = dict(plans)
    by_module: dict[str, list[DetectedSite]] = {}
    for ds in detected:
        if ds.site.form == "handwritten":
            by_module.setdefault(ds.site.module_path, []).append(ds)
    wanted = {p for p, lst in by_module.items() if any(plans[d.site.site_id].rewritten for d in lst)}
    if not wanted:
        return {}, plans
    inputs = _record_inputs(model, wanted, batch)
    forwards = {}
    for path in wanted:
        lst = by_module[path]
        rewrite = [plans[d.site.site_id].rewritten for d in lst]
        try:
            if path not in inputs:
                raise NormalizeError("the module was not called by the calibration batch in eager mode")
            args, kwargs = inputs[path]
            fwd, gm, skipped = normalize_module(owning_module(model, path), args, kwargs, expected=len(lst),
                                                rewrite=rewrite)
            forwards[path] = (fwd, gm)
            for i, why in skipped.items():
                sid = lst[i].site.site_id
                plans[sid] = plans[sid].left_original(why)
        except NormalizeError as e:
            for d in lst:
                sid = d.site.site_id
                if plans[sid].rewritten:
                    plans[sid] = plans[sid].left_original(f"hand-written attention could not be rewritten: {e}")
    return forwards, plans


def plan(model, analysis: Analysis, batch, *, methods=None, overrides: Optional[dict] = None,
         min_seq_len: int = 1024) -> tuple[dict, Routing]:
    """Eligibility and default choice per site, then hand-written attention that may be rewritten
    normalised to SDPA (so that calibration observes every candidate site): ``(plans, routing)``."""
    warn_unmatched_overrides(overrides, analysis.sites)
    plans = plan_sites(analysis.sites, methods=methods, overrides=overrides, min_seq_len=min_seq_len)
    normalised, plans = _normalize_handwritten(model, analysis.detected, plans, batch)
    return plans, Routing.build(analysis.detected, plans, normalised)


def replan(sites, old: dict, *, methods, overrides, min_seq_len, chosen: dict) -> dict:
    """Plans with calibrated choices; sites the normalisation already left dense stay so."""
    new = plan_sites(sites, methods=methods, overrides=overrides, min_seq_len=min_seq_len, chosen=chosen)
    return {sid: (old[sid] if sid in old and not old[sid].rewritten else p) for sid, p in new.items()}


# ------------------------------------------------------------------------------------- observe
def observe(model, detected: list[DetectedSite], plans: dict, routing: Routing, batches: list,
            callback: Callable) -> None:
    """Run ``batches`` through ``model`` with its own attention, calling
    ``callback(site, plan, q, k, v, scale, mask)`` at every rewritten site.

    q/k/v are 4-D ``[B, H, N, D]`` with GQA expanded — what our ops receive; ``mask`` is the
    call's text key-padding mask (sites planned with ``key_padding``) or None.
    """
    site_of = {d.site.site_id: d.site for d in detected}

    def make(sid: str):
        site, plan = site_of[sid], plans[sid]

        def handler(a, original):
            if plan.rewritten and runtime_mismatch(plan, a) is None:
                q, k, v, scale = prepare_qkv(a)
                callback(site, plan, q, k, v, scale, a["attn_mask"])
            return original()
        return handler

    with Route(model, routing, make), torch.no_grad():
        for b in batches:
            run_calibration_call(model, b)


# ------------------------------------------------------------------------------------- validate
@dataclass
class Validation:
    errors: dict = field(default_factory=dict)  # site id -> worst relative error vs dense on the batch
    output_error: Optional[float] = None
    ran: set = field(default_factory=set)  # sites whose planned method really ran
    executed: dict = field(default_factory=dict)  # site id -> (FLOPs, density) of data-dependent methods
    fell_back: dict = field(default_factory=dict)  # site id -> why its call ran the model's own attention


def validate(model, plans: dict, routing: Routing, batch, reference) -> Validation:
    """Run the model once with the plans in place, measuring each site's error vs the model's own
    attention and the output error; record which sites ran their method, and what the methods
    whose cost depends on the data executed."""
    val = Validation()

    def make(sid: str):
        plan = plans[sid]
        rt = SiteRuntime(plan)

        def handler(a, original):
            before = rt.counts[runtime.RAN]
            out = runtime.run_site(rt, a, original)
            if plan.rewritten:
                if rt.counts[runtime.RAN] > before:  # this call ran the method (no fallback)
                    val.ran.add(plan.site_id)
                elif rt.last_fallback:
                    val.fell_back[plan.site_id] = "; ".join(rt.last_fallback.values())
                ref = original()
                val.errors[plan.site_id] = max(val.errors.get(plan.site_id, 0.0), rel_error(out, ref))
                if registry.get(plan.method).measured_flops and plan.site_id not in val.executed:
                    cost = executed_cost(plan, *prepare_qkv(a),
                                         mask=a["attn_mask"] if plan.args.get("key_padding") else None)
                    if cost is not None:
                        val.executed[plan.site_id] = cost
            return out
        return handler

    with Route(model, routing, make), torch.no_grad():
        out = run_calibration_call(model, batch)
    val.output_error = rel_error(out, reference)
    return val


def validated_plans(plans: dict, val: Validation) -> dict:
    """Plans after validation: measured costs recorded; sites planned for a kernel that the
    validation run never routed to it keep the model's own attention (the report must not claim them)."""
    out = {}
    for sid, p in plans.items():
        if p.rewritten and sid in val.fell_back and sid not in val.ran:
            p = p.left_original(f"planned {p.method}, but on the validation run its call fell back to the model's "
                                f"own attention ({val.fell_back[sid]}): kept the model's own attention")
        elif p.rewritten and sid not in val.ran:
            p = p.left_original(f"planned {p.method}, but the validation run never reached this site with the "
                                f"detected shape and module: kept the model's own attention")
        elif sid in val.executed:
            flops, density = val.executed[sid]
            p = p.replace(density=density, flops_after=flops)
        out[sid] = p
    return out


# ------------------------------------------------------------------------------------- apply
@dataclass
class Applied:
    """What ``apply`` installed on the model."""

    route: Route
    runtimes: dict  # site id -> SiteRuntime
    switch: AttentionSwitch
    tracker: Optional[GridTracker]
    guards: Any = None  # parallel.guard.Guards: diffusers attention modules under context parallelism


def apply(model, analysis: Analysis, plans: dict, routing: Routing, grid=None, device=None) -> Applied:
    """Install the plans on ``model`` for good: one runtime per site, routed by the router; a grid
    tracker when a rewritten site may follow the input's video size. Call counters are made on
    ``device`` (the calibration batch's), so that compiled code counts from its first call."""
    switch = AttentionSwitch()
    tracker = None
    if any(p.rewritten for p in plans.values()):
        tracker = GridTracker(model, grid_modules(analysis.graphs, model))
    by_id = {s.site_id: s for s in analysis.sites}
    runtimes = {}
    for sid, p in plans.items():
        s = by_id[sid]
        runtimes[sid] = SiteRuntime(p, switch=switch, tracker=tracker,
                                    grid_inferred=lookup_user_grid(grid, sid) is None,
                                    grid_module=s.grid_module, prefix_modules=tuple(s.text_before_from))
        if p.rewritten and device is not None:
            runtimes[sid].counter(device)
    for path, fwd in routing.forwards.items():  # normalised hand-written attention: tell its sites
        fwd.sites = [runtimes[sid] for sid in routing.index.get(path, ())
                     if by_id[sid].form == "handwritten" and plans[sid].rewritten]
    route = Route(model, routing, functools.partial(_runtime_handler, runtimes)).install()
    from .parallel.guard import attach  # diffusers' enable_parallelism, before or after optimize
    guards = attach(model, route, runtimes, routing, analysis.sites, analysis.missed)
    return Applied(route=route, runtimes=runtimes, switch=switch, tracker=tracker, guards=guards)


def _runtime_handler(runtimes: dict, sid: str):
    """``Route.make`` of the applied route: a module-level function (through ``functools.partial``)
    so that the route, kept in ``model.vmonarch``, copies and pickles with the model."""
    return runtimes[sid].handler()


# ------------------------------------------------------------------------------------- progress
class Progress:
    """What ``optimize`` is doing, stage by stage: a tqdm bar on a terminal, ``logging`` (logger
    ``vmonarch_opt``, level INFO: each stage with its seconds) always."""

    STAGES = ("analyse", "plan", "calibrate", "validate", "apply", "time")

    def __init__(self, model_name: str, enabled: Optional[bool] = None):
        import logging
        import sys

        from tqdm.auto import tqdm

        self.log = logging.getLogger("vmonarch_opt")
        self.model = model_name
        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=len(self.STAGES), desc=f"vmonarch_opt {model_name}", unit="stage", disable=not show,
                        leave=False)
        self.current, self.t0 = None, time.perf_counter()

    def step(self, stage: str) -> None:
        """``stage`` begins (the previous one, if any, is done)."""
        self._close()
        self.current, self.t0 = stage, time.perf_counter()
        self.bar.set_postfix_str(stage, refresh=True)
        self.log.info("vmonarch_opt: %s: %s ...", self.model, stage)

    def _close(self) -> None:
        if self.current is not None:
            self.log.info("vmonarch_opt: %s: %s done in %.2f s", self.model, self.current, time.perf_counter() - self.t0)
            self.bar.update(1)
            self.current = None

    def done(self) -> None:
        self._close()
        self.bar.close()


# ------------------------------------------------------------------------------------- timing
def on_cuda(batch) -> bool:
    dev = batch_device([batch])
    return dev is not None and dev.type == "cuda"


@contextlib.contextmanager
def detached(applied: "Applied"):
    """The model exactly as it was before ``apply``: routed forwards and grid hooks removed for the
    block, installed again after it."""
    applied.route.remove()
    if applied.tracker is not None:
        applied.tracker.remove()
    if applied.guards is not None:
        applied.guards.remove_hooks()
    try:
        yield
    finally:
        if applied.guards is not None:
            applied.guards.install_hooks()
        if applied.tracker is not None:
            applied.tracker.install()
        applied.route.install()


SLOW_FORWARD_MS = 1000.0  # time_forwards: a warm-up forward this long is timed once more, not three times


def gpu_busy_fraction(fn: Callable[[], Any]) -> Optional[float]:
    """Fraction of ``fn``'s wall time during which some GPU kernel ran (the union of the CUDA
    kernel intervals that ``torch.profiler`` records, over the host wall time), or None when the
    profiler records no device activity (no CUDA, or a profiler that cannot trace kernels).
    Far below 1 means the forward waits on kernel launches and host work, not on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - t0) * 1e6
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    except (RuntimeError, AttributeError):  # a profiler without CUDA support: not measured
        return None
    if not spans or wall_us <= 0:
        return None
    return min(1.0, union_length(spans) / wall_us)


def union_length(spans) -> float:
    """Total length covered by the sorted ``(start, end)`` intervals (overlaps counted once)."""
    busy, cur_s, cur_e = 0.0, *spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return busy + cur_e - cur_s


def time_forwards(model, batch, applied: "Applied") -> tuple[dict, dict]:
    """Milliseconds of one eager forward on ``batch``, optimized and of the original model (routing
    and grid hooks detached: nothing of ours runs), median of 3 after a warm-up (1 when a forward
    takes over a second); and for each, the measured fraction of the forward the GPU was busy
    (:func:`gpu_busy_fraction`, None where it could not be measured)."""
    def once() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            run_calibration_call(model, batch)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def forward():
        with torch.no_grad():
            run_calibration_call(model, batch)

    out, busy = {}, {}
    for name, context in (("optimized", contextlib.nullcontext()), ("original", detached(applied))):
        with context:
            first = once()  # warm-up: kernel tuning, allocator, caches
            out[name] = statistics.median([once() for _ in range(3 if first < SLOW_FORWARD_MS else 1)])
            busy[name] = gpu_busy_fraction(forward)
    return out, busy
