"""``optimize(model, calib_batch)``: capture → detect → plan → rewrite → report."""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .batch import as_batches, batch_device, run_calibration_call
from .config import METHODS, SitePlan
from .errors import VMonarchError
from .passes.capture import capture as capture_graphs
from .passes.census import attention_census, uncaptured
from .passes.detect import DetectedSite, detect
from .passes.grid import assign_grids, check_grid_spec, grid_modules, lookup_user_grid
from .passes.normalize import NormalizeError, normalize_module
from .passes.regrid import GridTracker
from .passes.rewrite import install, plan_handler, prepare_qkv, run_site, runtime_mismatch, uninstall
from .passes.siblings import add_sibling_sites
from .planner import plan_sites
from .report import Report
from .site import AttentionSite
from .switch import AttentionSwitch, set_original_attention


@dataclass
class OptimizationState:
    """Attached to the optimized model as ``model.vmonarch``."""

    sites: list[AttentionSite]
    plans: dict[str, SitePlan]
    report: Report
    modules: list[str] = field(default_factory=list)
    profile: Any = None
    normalized: dict = field(default_factory=dict)  # module path -> fx.GraphModule
    tracker: Any = None  # passes.regrid.GridTracker: the input's token grid, for other video sizes
    switch: Any = None  # switch.AttentionSwitch: run the model's own attention (set_original_attention)


def _owning_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path) if path else model


def _record_inputs(model, paths: set[str], batch) -> dict:
    """Run the batch once, remembering the (args, kwargs) each module in ``paths`` was called with."""
    seen: dict = {}
    hooks = []
    for p in paths:
        mod = _owning_module(model, p)

        def pre(m, args, kwargs, p=p):
            seen.setdefault(p, (args, kwargs))

        hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            run_calibration_call(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _normalize_handwritten(model, detected: list[DetectedSite], plans: dict, batch) -> dict:
    """Turn rewritable hand-written sites into SDPA calls; mark the others as left dense."""
    by_module: dict[str, list[DetectedSite]] = {}
    for ds in detected:
        if ds.site.form == "handwritten":
            by_module.setdefault(ds.site.module_path, []).append(ds)
    wanted = {p for p, lst in by_module.items() if any(plans[d.site.site_id].method != "original" for d in lst)}
    if not wanted:
        return {}
    inputs = _record_inputs(model, wanted, batch)
    forwards = {}
    for path in wanted:
        lst = by_module[path]
        rewrite = [plans[d.site.site_id].method != "original" for d in lst]
        mod = _owning_module(model, path)
        try:
            if path not in inputs:
                raise NormalizeError("the module was not called by the calibration batch in eager mode")
            args, kwargs = inputs[path]
            fwd, gm, skipped = normalize_module(mod, args, kwargs, expected=len(lst), rewrite=rewrite)
            forwards[path] = (fwd, gm)
            for i, why in skipped.items():
                p = plans[lst[i].site.site_id]
                p.method, p.args, p.flops_after, p.reason = "original", {}, p.flops_before, why
        except NormalizeError as e:
            for d in lst:
                p = plans[d.site.site_id]
                if p.method != "original":
                    p.method, p.args, p.flops_after = "original", {}, p.flops_before
                    p.reason = f"hand-written attention could not be rewritten: {e}"
    return forwards


def _runtime_index(detected: list[DetectedSite], plans: dict, forwards: dict) -> dict[str, list]:
    """Per owning module, the plan of its k-th SDPA call at run time."""
    out: dict[str, list] = {}
    for ds in detected:
        s = ds.site
        if s.form == "handwritten" and (s.module_path not in forwards or plans[s.site_id].method == "original"):
            continue  # stays a hand-written attention: never reaches the SDPA interceptor
        out.setdefault(s.module_path, []).append(plans[s.site_id])
    return out


def _replan(sites, old: dict, methods, overrides, min_seq_len, chosen: dict) -> dict:
    """Plans with calibrated choices; sites the normalisation already left dense stay so."""
    new = plan_sites(sites, methods=methods, overrides=overrides, min_seq_len=min_seq_len, chosen=chosen)
    for sid, p in old.items():
        if p.method == "original":
            new[sid] = p
    return new


def observe(model, detected: list[DetectedSite], plans: dict, forwards: dict, batches: list,
            callback: Callable) -> None:
    """Run ``batches`` through ``model`` with its own attention, calling
    ``callback(site, plan, q, k, v, scale, mask)`` at every site whose plan is not "original".

    q/k/v are 4-D ``[B, H, N, D]`` with GQA expanded — what our ops receive; ``mask`` is the
    call's text key-padding mask (sites planned with ``key_padding``) or None. ``forwards`` maps
    module paths to normalised forwards (hand-written attention as SDPA). The model is restored
    afterwards.
    """
    site_of = {d.site.site_id: d.site for d in detected}
    runtime = _runtime_index(detected, plans, {p: (f, None) for p, f in forwards.items()})

    def make(plan):
        site = site_of[plan.site_id]

        def handler(a, original):
            if plan.method != "original" and runtime_mismatch(plan, a) is None:
                q, k, v, scale = prepare_qkv(a)
                callback(site, plan, q, k, v, scale, a["attn_mask"])
            return original()
        return handler

    mods = []
    try:
        for path, plist in runtime.items():
            mod = _owning_module(model, path)
            install(mod, [make(p) for p in plist], forward=forwards.get(path))
            mods.append(mod)
        with torch.no_grad():
            for b in batches:
                run_calibration_call(model, b)
    finally:
        for mod in mods:
            uninstall(mod)


def _rel_error(a, b) -> Optional[float]:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and a and b:
        return _rel_error(a[0], b[0])
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k in b:
                return _rel_error(a[k], b[k])
    if hasattr(a, "sample") and hasattr(b, "sample"):
        return _rel_error(a.sample, b.sample)
    return None


def _measure_vmoba(plan: SitePlan, q, k, v, scale: float, mask=None) -> None:
    """Fill a VMoBA plan's density and executed FLOPs from its block selection on real q/k (under a
    text padding ``mask``: per batch element on the tokens the op keeps, as it runs)."""
    from .kernels.dispatch import vmoba_select
    from .kernels.vmoba.reference import vmoba_flops
    from .passes.keypad import run_key_padded

    a = plan.args
    flops, dens = [], []

    def measure(qq, kk, vv, tb, ta):
        sel = vmoba_select(qq, kk, grid=tuple(a["grid"]), chunk=tuple(a["chunk"]), text_before=tb,
                           text_after=ta, partition=a["partition"], threshold=a["threshold"],
                           topk=a["topk"], scale=scale)
        flops.append(vmoba_flops(sel, qq.shape[-1], a.get("pooled_rest", False)))
        dens.append(sel.density)
        return torch.zeros_like(qq)  # only the selection is wanted

    if mask is None:
        measure(q, k, v, a["text_before"], a["text_after"])
    elif run_key_padded(q, k, v, mask, a["text_before"], a["text_after"], scale, measure) is None:
        return  # not a padding mask: the call ran the model's attention
    plan.density = sum(dens) / len(dens)
    plan.flops_after = int(sum(flops))


def _validate(model, runtime: dict, forwards: dict, batch, reference) -> tuple[dict, Optional[float], set]:
    """Run the optimized model once, measuring each site's error vs dense and the output error;
    also returns the ids of the sites whose planned method really ran."""
    errors: dict[str, float] = {}
    ran: set = set()

    def measuring(plan):
        def handler(a, original):
            out = run_site(plan, a, original)
            if plan.method != "original":
                if runtime_mismatch(plan, a) is None:
                    ran.add(plan.site_id)
                ref = original()
                errors[plan.site_id] = max(errors.get(plan.site_id, 0.0), _rel_error(out, ref) or 0.0)
                if plan.method == "vmoba" and plan.density is None:
                    _measure_vmoba(plan, *prepare_qkv(a), mask=a["attn_mask"])
            return out
        return handler

    for path, plans in runtime.items():
        install(_owning_module(model, path), [measuring(p) for p in plans], forward=forwards.get(path))
    with torch.no_grad():
        out = run_calibration_call(model, batch)
    return errors, _rel_error(out, reference), ran


def _on_cuda(batch) -> bool:
    dev = batch_device([batch])
    return dev is not None and dev.type == "cuda"


def _time_forwards(model, batch) -> dict:
    """Milliseconds of one eager forward on ``batch``, optimized and with the model's own attention
    (median of 3 after a warm-up; 1 when a forward takes over a second)."""
    def once() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            run_calibration_call(model, batch)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    out = {}
    for name, original in (("optimized", False), ("original", True)):
        with set_original_attention(model, original):
            first = once()  # warm-up: kernel tuning, allocator, caches
            out[name] = statistics.median([once() for _ in range(3 if first < 1000 else 1)])
    return out


def _never_ran(plans: dict, ran: set) -> None:
    """Sites planned for a kernel that the validation run never routed to it: the report must not
    claim them. They keep the model's own attention."""
    for sid, p in plans.items():
        if p.method != "original" and sid not in ran:
            p.reason = (f"planned {p.method}, but the validation run never reached this site with the detected "
                        f"shape and module: kept the model's own attention")
            p.method, p.args, p.flops_after = "original", {}, p.flops_before


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


def _check_evaluate(evaluate, profile, budget) -> None:
    if evaluate is None:
        return
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a function evaluate(model) -> tensor(s), got {type(evaluate).__name__}")
    if profile is not None:
        raise ValueError("evaluate= is used while calibrating; with profile= nothing is calibrated (drop one)")
    if getattr(budget, "output_rel_error", None) is None:
        raise ValueError("evaluate= is what an output budget is measured on: pass "
                         "budget=Budget(max_rel_error=0.5, output_rel_error=e) with it")


def optimize(model: torch.nn.Module, calib_batch: Any, *, profile=None, methods=METHODS,
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
        methods: allowed methods, a subset of ``("monarch", "vmoba", "dense")``.
        budget: quality budget for calibration: ``"auto"`` (default) calibrates under ``Budget()``
            (each site's attention error ≤ 5 %), a ``Budget`` calibrates under it, ``None`` skips
            calibration and uses the default policy (Monarch frame blocks, then VMoBA, then dense,
            as ``methods`` allow). Ignored when ``profile`` is given.
        grid: ``(T, H, W)`` latent token grid, or ``{site_glob: (T, H, W)}``, overriding inference.
        overrides: ``{site_glob: "dense" | "monarch" | "vmoba" | "original" | Config}`` pins.
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
    plan_sites([], methods=methods)  # option errors before any model run
    _check_evaluate(evaluate, profile, budget)
    if profile is not None:
        from .profiles.profile import as_profile
        profile = as_profile(profile)
    if min_seq_len is None:  # with a profile: the threshold it was calibrated with
        recorded = profile.data.get("min_seq_len") if profile is not None else None
        min_seq_len = 1024 if recorded is None else int(recorded)
    check_grid_spec(grid)
    batches = as_batches(calib_batch)
    target = model if inplace else copy.deepcopy(model)
    if getattr(target, "vmonarch", None) is not None:
        raise VMonarchError("this model is already optimized; call optimize() on the original model")
    with torch.no_grad(), attention_census(target) as calls:
        reference = run_calibration_call(target, batches[0])
    graphs = capture_graphs(target, batches[0], capture)
    detected = add_sibling_sites(detect(graphs, target), calls, target)
    assign_grids(detected, graphs, target, batches[0], grid)
    sites = [d.site for d in detected]
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
    if missed:
        warnings.warn(f"vmonarch_opt: {_uncaptured_text(missed, unrouted)}", RuntimeWarning, stacklevel=2)
    if calls.flex:
        warnings.warn(f"vmonarch_opt: {_flex_text(calls.flex)}", RuntimeWarning, stacklevel=2)

    # Eligibility and default choices first: hand-written attention that may be rewritten is
    # normalised to SDPA before calibration, so calibration observes every candidate site.
    plans = plan_sites(sites, methods=methods, overrides=overrides, min_seq_len=min_seq_len)
    forwards = _normalize_handwritten(target, detected, plans, batches[0])
    fwd_by_path = {p: f for p, (f, _) in forwards.items()}
    if profile is not None:
        from .profiles.profile import annotate_plans, apply_profile
        chosen = apply_profile(profile, sites, model=model)
        plans = _replan(sites, plans, methods, overrides, min_seq_len, chosen)
        annotate_plans(plans, sites, profile)
    elif budget is not None:
        from .profiles.budget import Budget
        from .profiles.calibrate import calibrate_sites
        from .profiles.profile import annotate_plans
        if isinstance(budget, str) and budget == "auto":
            budget = Budget()
        profile = calibrate_sites(target, batches, detected, plans, fwd_by_path, methods=methods,
                                  budget=budget, overrides=overrides)
        if budget.output_rel_error is not None:  # re-choose by the model's output error
            from .profiles.output_budget import allocate_by_output
            allocate_by_output(target, detected, plans, fwd_by_path, batches, profile, budget, evaluate)
        profile.data["min_seq_len"] = min_seq_len  # optimize(profile=...) reuses it
        plans = _replan(sites, plans, methods, overrides, min_seq_len, profile.choices())
        annotate_plans(plans, sites, profile)
    runtime = _runtime_index(detected, plans, forwards)

    site_errors, out_error = {}, None
    if validate:
        site_errors, out_error, ran = _validate(target, runtime, fwd_by_path, batches[0], reference)
        _never_ran(plans, ran)
    switch = AttentionSwitch()
    for p in plans.values():
        p.__dict__["_switch"] = switch  # not a dataclass field: never serialised
    for path, plist in runtime.items():
        install(_owning_module(target, path), [plan_handler(p) for p in plist], forward=fwd_by_path.get(path))
    tracker = None
    if any(p.method in ("monarch", "vmoba", "dense") for p in plans.values()):
        tracker = GridTracker(target, grid_modules(graphs, target))
        user_grid = {s.site_id for s in sites if lookup_user_grid(grid, s.site_id) is not None}
        by_id = {s.site_id: s for s in sites}
        for p in plans.values():
            p.__dict__["_tracker"] = tracker  # not dataclass fields: never serialised
            p.__dict__["_grid_inferred"] = p.site_id not in user_grid
            p.__dict__["_grid_module"] = by_id[p.site_id].grid_module
            p.__dict__["_prefix_modules"] = tuple(by_id[p.site_id].text_before_from)

    meta = {"capture": graphs[0].source if graphs else "none", "graphs": len(graphs),
            "methods": list(methods), "min_seq_len": min_seq_len,
            "optimize_seconds": round(time.perf_counter() - t0, 3),
            "torch": torch.__version__}
    if missed:
        meta["uncaptured"] = {"calls": missed, "note": _uncaptured_text(missed, unrouted)}
    if calls.flex:
        meta["flex_attention"] = {"calls": dict(calls.flex), "note": _flex_text(calls.flex)}
    report = Report.build(type(model).__name__, sites, plans, meta=meta, site_errors=site_errors,
                          output_error=out_error)
    state = OptimizationState(sites=sites, plans=plans, report=report, modules=sorted(runtime),
                              profile=profile, normalized={p: g for p, (_, g) in forwards.items()},
                              tracker=tracker, switch=switch)
    target.__dict__["vmonarch"] = state
    target.__dict__["report"] = report
    if validate and _on_cuda(batches[0]) and _uses_structured(plans):
        report.totals["forward_ms"] = _time_forwards(target, batches[0])
        slower = report.slower_note()
        if slower:
            warnings.warn(f"vmonarch_opt: {slower}", RuntimeWarning, stacklevel=2)
    return target


def _uses_structured(plans: dict) -> bool:
    """Some site runs one of our structured kernels (not only dense / the model's own)."""
    return any(p.method in ("monarch", "vmoba") for p in plans.values())


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``optimize(..., inplace=True)``: the model's own attention everywhere again."""
    state = model.__dict__.pop("vmonarch", None)
    model.__dict__.pop("report", None)
    if state is None:
        return model
    for path in state.modules:
        uninstall(_owning_module(model, path))
    if state.tracker is not None:
        state.tracker.remove()
    return model
