"""``optimize(model, calib_batch)``: analyse → plan → calibrate → validate → apply → report.

Each stage is a function of ``pipeline.py`` (calibration: ``profiles/``) that takes values and
returns values; this module strings them together and attaches the result to the model.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import methods as registry
from . import pipeline
from .batch import as_batches, batch_device, check_finite
from .errors import VMonarchError
from .parallel.session import Session
from .passes.grid import check_grid_spec
from .planner import check_min_seq_len, check_overrides
from .profiles.output_budget import check_evaluate
from .report import Report
from .site import AttentionSite

__all__ = ["optimize", "restore", "stats", "OptimizationState"]


@dataclass
class OptimizationState:
    """Attached to the optimized model as ``model.vmonarch``."""

    sites: list[AttentionSite]
    plans: dict  # site id -> SitePlan (immutable)
    report: Report
    modules: list[str] = field(default_factory=list)  # owning modules with routed sites
    profile: Any = None
    normalized: dict = field(default_factory=dict)  # module path -> fx.GraphModule
    runtimes: dict = field(default_factory=dict)  # site id -> runtime.SiteRuntime (what changes while it runs)
    route: Any = None  # router.Route installed on the model
    tracker: Any = None  # passes.regrid.GridTracker: the input's token grid, for other video sizes
    switch: Any = None  # runtime.AttentionSwitch: run the model's own attention (set_original_attention)
    parallel: Any = None  # parallel.guard.Guards: the sites under diffusers' context parallelism


def optimize(model: torch.nn.Module, calib_batch: Any, *, profile=None, methods=None,
             budget="auto", grid=None, inplace: bool = False, overrides: Optional[dict] = None,
             min_seq_len: Optional[int] = None, capture: str = "auto", validate: bool = True,
             evaluate: Optional[Callable] = None) -> torch.nn.Module:
    """Rewrite every attention site of ``model`` to a structured kernel and report what was done.

    Returns the optimized model — a copy of ``model`` unless ``inplace=True`` — with the same
    class, call signature and ``state_dict``; ``optimized.report`` says what was rewritten and why,
    ``optimized.vmonarch`` holds the sites and plans.

    Args:
        calib_batch: what the model is called with: a dict (``model(**b)``), a tuple/list
            (``model(*b)``) or a tensor; a list of dicts for several batches (timesteps).
        profile: a calibration profile (``load_profile(path)``) whose per-site choices are reused.
        methods: allowed methods: names of registered methods (``"monarch"``, ``"vmoba"``,
            ``"dense"``, ``"monarch_rt"``, …); default: every registered method except the opt-in
            ones (``monarch_rt``), which run only when named here.
        budget: quality budget for calibration: ``"auto"`` (default) calibrates under ``Budget()``
            (each site's attention error ≤ 5 %), a ``Budget`` calibrates under it, ``None`` skips
            calibration and uses the default policy (Monarch frame blocks, then VMoBA, then dense,
            as ``methods`` allow). Ignored when ``profile`` is given.
        grid: ``(T, H, W)`` latent token grid, or ``{site_glob: (T, H, W)}``, overriding inference.
        overrides: ``{site_glob: method name | "original" | config}`` pins.
        min_seq_len: sites with fewer tokens stay dense (unless pinned by ``overrides``); default
            1024, or with ``profile`` the value the profile was calibrated with.
        capture: "auto" (torch.compile, then torch.fx), "dynamo" or "fx".
        validate: run the batch once more to measure per-site and output error; on CUDA also time
            one eager forward with and without the rewrite (in the report; a warning when slower).
        evaluate: with ``Budget(output_rel_error=e)``, what the output error is measured on:
            ``evaluate(model)`` returning a tensor (or a list/tuple/dict of tensors), typically your
            sampler on a few fixed seeds at the calibration shape, e.g.
            ``lambda m: pipe_latents(m, seeds=[0, 1], steps=20)``. It runs with one candidate in place
            per call (once per candidate and per allocation round), so the budget is spent on what
            users see — sampled videos, where the errors of every step compound — rather than on one
            forward per calibration batch (the default). Must be deterministic.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}; "
                        f"wrap your function in an nn.Module")
    t0 = time.perf_counter()
    methods = registry.check_methods(methods)  # option errors before any model run
    check_evaluate(evaluate, profile, budget)
    if profile is not None:
        from .profiles.profile import as_profile
        profile = as_profile(profile)
    if min_seq_len is None:  # with a profile: the threshold it was calibrated with
        recorded = profile.data.get("min_seq_len") if profile is not None else None
        min_seq_len = 1024 if recorded is None else check_min_seq_len(recorded, "the profile's min_seq_len")
    min_seq_len = check_min_seq_len(min_seq_len)
    check_grid_spec(grid)
    check_overrides(overrides)
    batches = as_batches(calib_batch)
    check_finite(batches)
    session = Session.start(model, inplace)  # ranks of a context-parallel model agree (parallel/)
    target = model if inplace else copy.deepcopy(model)
    if getattr(target, "vmonarch", None) is not None:
        raise VMonarchError("this model is already optimized; call optimize() on the original model")

    # analyse: sites, grids, what capture missed
    progress = pipeline.Progress(type(model).__name__)
    progress.step("analyse")
    analysis = pipeline.analyse(target, batches, grid=grid, capture=capture)
    sites = analysis.sites
    for note in pipeline.analysis_notes(analysis, type(model).__name__).values():
        warnings.warn(f"vmonarch_opt: {note}", RuntimeWarning, stacklevel=2)

    # plan: eligibility and default choices (hand-written attention normalised to SDPA)
    choose = dict(methods=methods, overrides=overrides, min_seq_len=min_seq_len)
    progress.step("plan")
    plans, routing = pipeline.plan(target, analysis, batches[0], **choose)
    plans = session.restrict(sites, plans)

    # calibrate: a profile's choices, or measured under the budget
    progress.step("calibrate")
    if profile is not None:
        from .profiles.profile import annotate_plans, apply_profile
        chosen = apply_profile(profile, sites, model=model)
        plans = annotate_plans(pipeline.replan(sites, plans, chosen=chosen, **choose), sites, profile)
    elif budget is not None:
        from .profiles.budget import Budget
        from .profiles.calibrate import calibrate_sites
        from .profiles.profile import annotate_plans
        if isinstance(budget, str) and budget == "auto":
            budget = Budget()
        profile = calibrate_sites(target, batches, analysis.detected, plans, routing, methods=methods,
                                  budget=budget, overrides=overrides)
        profile = session.agree_profile(profile, budget)  # context parallel: one choice on every rank
        if budget.output_rel_error is not None:  # re-choose by the model's output error
            from .profiles.output_budget import allocate_by_output
            allocate_by_output(target, analysis.detected, plans, routing, batches, profile, budget, evaluate)
        profile.data["min_seq_len"] = min_seq_len  # optimize(profile=...) reuses it
        plans = annotate_plans(pipeline.replan(sites, plans, chosen=profile.choices(), **choose), sites, profile)

    # validate: error per site and of the output; sites that never ran their method are not claimed
    site_errors, out_error = {}, None
    progress.step("validate")
    if validate:
        val = pipeline.validate(target, plans, routing, batches[0], analysis.reference)
        plans = pipeline.validated_plans(plans, val)
        site_errors, out_error = val.errors, val.output_error

    # apply: the plans installed for good
    progress.step("apply")
    session.check_plans(plans)
    applied = pipeline.apply(target, analysis, plans, routing, grid, device=batch_device(batches))

    # report
    meta = {"capture": analysis.graphs[0].source if analysis.graphs else "none", "graphs": len(analysis.graphs),
            "methods": list(methods), "min_seq_len": min_seq_len,
            "optimize_seconds": round(time.perf_counter() - t0, 3),
            "torch": torch.__version__}
    notes = pipeline.analysis_notes(analysis, type(model).__name__)
    if "uncaptured" in notes:
        meta["uncaptured"] = {"calls": analysis.missed, "note": notes["uncaptured"]}
    if "flex_attention" in notes:
        meta["flex_attention"] = {"calls": dict(analysis.census.flex), "note": notes["flex_attention"]}
    if "unrecognised" in notes:
        meta["unrecognised"] = {"softmaxes": analysis.unrecognised, "note": notes["unrecognised"]}
    report = Report.build(type(model).__name__, sites, plans, meta=meta, site_errors=site_errors,
                          output_error=out_error).attach(applied.runtimes)
    state = OptimizationState(sites=sites, plans=plans, report=report, modules=sorted(applied.route.paths),
                              profile=profile, normalized=dict(routing.graphs),
                              runtimes=applied.runtimes, route=applied.route, tracker=applied.tracker,
                              switch=applied.switch, parallel=applied.guards)
    target.__dict__["vmonarch"] = state
    target.__dict__["report"] = report
    progress.step("time")
    if validate and pipeline.on_cuda(batches[0]) and _uses_structured(plans):
        report.totals["forward_ms"], report.totals["forward_gpu_busy"] = pipeline.time_forwards(
            target, batches[0], applied)
        for rt in applied.runtimes.values():
            rt.reset_calls()  # the report counts the calls of the user's own forwards
        slower = report.slower_note()
        if slower:
            warnings.warn(f"vmonarch_opt: {slower}", RuntimeWarning, stacklevel=2)
    progress.done()
    return target


def _uses_structured(plans: dict) -> bool:
    """Some site runs a method that cuts attention FLOPs (not only dense / the model's own)."""
    return any(p.rewritten and registry.get(p.method).structured for p in plans.values())


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``optimize(..., inplace=True)``: the model's own attention everywhere again."""
    state = model.__dict__.pop("vmonarch", None)
    model.__dict__.pop("report", None)
    if state is None:
        return model
    if state.parallel is not None:
        state.parallel.remove()
    if state.route is not None:
        state.route.remove()
    if state.tracker is not None:
        state.tracker.remove()
    return model


def stats(model: torch.nn.Module) -> dict:
    """Per rewritten site of an optimized ``model``, the calls since ``optimize``:
    ``{site_id: {"ran": n, "fell_back": {kind: n}, "why": {kind: message}}}`` (eager and compiled
    calls; the report shows the same in its "ran/fell back" column)."""
    state = model.__dict__.get("vmonarch")
    if state is None:
        raise VMonarchError(f"stats(): this {type(model).__name__} was not optimized by vmonarch_opt.optimize; pass "
                            f"the module optimize() returned")
    state.report.refresh()
    return {r["site"]["site_id"]: r["calls"] for r in state.report.rows if r.get("calls") is not None}
