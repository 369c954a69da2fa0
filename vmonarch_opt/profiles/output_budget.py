"""Output-error budget: choose each site's method by what it does to the model's output.

A site's attention error (what ``calibrate_sites`` measures) does not say how much the site
matters. On our tiny video DiT, frame-block Monarch is 8-18 % off on layers 0-2 and 13-14 % on
layers 3-4 at mid noise, yet structuring layer 0 alone changes the model's output by 1.2 % and its
sampled videos by 34 dB PSNR, layer 3 alone by 17 % and 15 dB (BENCHMARKS.md, 2026-11-30).

With ``Budget(output_rel_error=e)``, after the per-site calibration every candidate that meets its
site's attention-error cap (``max_rel_error`` / ``per_site``) and is cheaper than dense is run once
per calibration batch *in the model*, alone (every other site keeps the model's own attention),
and its relative error on the model output is recorded. The allocation then picks per site the
candidate (or dense) that minimises the total cost subject to the estimated output error
``sqrt(sum over sites of e_site^2)`` (independent errors) ≤ ``e``; one more forward measures the
real error of that combination, and while it is over ``e`` the estimate's target is tightened and
the allocation repeated (at most ``_ROUNDS`` times; then every site stays dense). Costs one forward
per (candidate, batch) plus one per round.

One forward ranks sites only roughly: in a diffusion sampler the errors of every step compound,
and a site's share of them depends on the noise level. With ``evaluate=fn`` the output error is
measured on what ``fn(model)`` returns instead — typically the user's sampler on a few fixed seeds
— so the budget is spent on the sampled videos themselves. ``fn`` runs once per candidate and per
round (plus twice for the reference, which also checks that it is deterministic).
"""
from __future__ import annotations

import math
import torch

from .. import methods as registry
from ..errors import VMonarchError
from .allocation import _choice_entry, _eligible, lagrangian_allocation
from .budget import config_from_dict

__all__ = ["allocate_by_output", "check_evaluate", "output_why"]

_ROUNDS = 6


def check_evaluate(evaluate, profile, budget) -> None:
    if evaluate is None:
        return
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a function evaluate(model) -> tensor(s), got {type(evaluate).__name__}")
    if profile is not None:
        raise ValueError("evaluate= is used while calibrating; with profile= nothing is calibrated (drop one)")
    if getattr(budget, "output_rel_error", None) is None:
        raise ValueError("evaluate= is what an output budget is measured on: pass "
                         "budget=Budget(max_rel_error=0.5, output_rel_error=e) with it")


def _as_outputs(out, name: str = "evaluate(model)") -> list:
    """What ``evaluate`` returned, as a list of tensors to compare."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
    if isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise TypeError(f"{name} must return a tensor, or a non-empty list/tuple/dict of tensors (e.g. the "
                    f"sampled latents of a few fixed seeds); got {type(out).__name__}")


def _estimate(picks: dict, out_err: dict) -> float:
    """Output error of a combination, estimated from the sites' errors alone (independent)."""
    return math.sqrt(sum(out_err[(s, i)] ** 2 for s, i in picks.items() if i is not None))


def allocate_by_output(model, detected: list, plans: dict, routing, batches: list, profile,
                       budget, evaluate=None) -> None:
    """Re-choose the calibrated sites of ``profile`` under ``budget.output_rel_error`` (see the
    module docstring), measuring the output on the calibration batches or, if given, on
    ``evaluate(model)``. Updates the profile's rows in place (``choice``, each measured candidate's
    ``output_error``) and records the verified output error in ``profile.data["output_budget"]``."""
    from .. import runtime
    from ..batch import run_calibration_call
    from ..metrics import rel_error
    from ..router import Route

    target = float(budget.output_rel_error)
    rows = {sid: r for sid, r in profile.data["sites"].items() if r["status"] == "calibrated"}
    sites = {d.site.site_id: d.site for d in detected}
    cand_plans = {}
    for sid, r in rows.items():
        for i, c in enumerate(r["candidates"]):
            if _eligible(c, r["dense"], budget.cost):
                cfg = config_from_dict(c["config"])
                method = registry.of(cfg)
                cand_plans[(sid, i)] = runtime.SiteRuntime(plans[sid].replace(
                    method=method.name, args=method.site_args(cfg, sites[sid], r["layer"])))

    assignment: dict = {}
    ran: set = set()  # sites that ran a candidate during the last evaluation

    def handler(sid):
        def run(a, original):
            rt = assignment.get(sid)
            if rt is None:
                return original()
            why = runtime.runtime_mismatch(rt.plan, a) if evaluate is not None else None
            if why is not None:  # the kernel would fall back to dense: the measurement would be void
                raise VMonarchError(f"evaluate(model) called site {sid} in a way its calibrated plan "
                                    f"cannot run ({why}); evaluate must call the model like the calibration "
                                    f"batches (same video size, no mask changes)")
            ran.add(sid)
            return runtime.run_site(rt, a, original)
        return run

    route = Route(model, routing, handler).install()
    forwards_run = 0
    try:
        def outputs():
            nonlocal forwards_run
            with torch.no_grad():
                if evaluate is None:
                    forwards_run += len(batches)
                    return [run_calibration_call(model, b) for b in batches]
                forwards_run += 1
                return _as_outputs(evaluate(model))

        refs = outputs()

        def error(outs) -> float:  # worst output; NaN/inf (a candidate that blew up) counts as inf
            errs = [rel_error(o, r) for o, r in zip(outs, refs)]
            if any(e is None for e in errs):
                raise VMonarchError("the output budget cannot compare the model's outputs (no tensor in what "
                                    f"it returns: {type(outs[0]).__name__}); pass evaluate= returning tensors")
            return max(errs)

        if evaluate is not None:
            drift = error(outputs())
            if drift > 0.1 * target:
                raise VMonarchError(
                    f"evaluate(model) is not deterministic: two runs of the unchanged model differ by "
                    f"{drift:.2e} (relative), too much to budget an output error of {target:.2g}; draw its "
                    f"noise from fixed seeds (e.g. torch.Generator().manual_seed(s)) on every call")

        out_err = {}
        for key, p in cand_plans.items():
            assignment.clear()
            assignment[key[0]] = p
            ran.clear()
            out_err[key] = error(outputs())
            if evaluate is not None and key[0] not in ran:
                raise VMonarchError(f"evaluate(model) never called site {key[0]}: it must run the model the "
                                    f"calibration batches describe (its output error would read as 0)")
        goal, measured, picks = target, 0.0, {sid: None for sid in rows}
        for _ in range(_ROUNDS):
            # least cost with the estimated error ≤ goal; the objective weighs squared output errors
            picks = lagrangian_allocation(rows, goal, budget.cost, lambda ch: _estimate(ch, out_err),
                                          lambda sid, i, c: out_err[(sid, i)] ** 2 if (sid, i) in out_err else None)
            assignment.clear()
            assignment.update({sid: cand_plans[(sid, i)] for sid, i in picks.items() if i is not None})
            measured = error(outputs()) if assignment else 0.0
            if measured <= target:
                break
            goal *= 0.9 * target / measured  # the errors added up worse than independent: aim lower
        else:
            picks, measured = {sid: None for sid in rows}, 0.0
    finally:
        assignment.clear()
        route.remove()

    for (sid, i), e in out_err.items():
        rows[sid]["candidates"][i]["output_error"] = e
    profile.data["output_budget"] = {"target": target, "measured": measured, "forwards": forwards_run,
                                     "candidates_measured": len(out_err),
                                     "measured_on": "calibration batches" if evaluate is None else
                                     f"evaluate ({getattr(evaluate, '__name__', 'callable')})"}
    for sid, r in rows.items():
        i = picks[sid]
        choice = _choice_entry(r, i, budget)
        if i is not None:
            choice["output_error"] = out_err[(sid, i)]
        choice["why"] = output_why(r, i, profile.data["output_budget"]) or choice["why"]
        r["choice"] = choice


def output_why(row: dict, i, output_budget: dict):
    """The "why" of an output-budget choice (candidate ``i`` of the profile row, None: dense) from
    what the row and ``profile.data["output_budget"]`` record; None where no candidate of the site
    was run in the model (the attention-budget reason stands)."""
    target, measured = output_budget["target"], output_budget["measured"]
    what = "model output" if output_budget.get("measured_on") == "calibration batches" else "evaluate() output"
    if i is not None:
        c = row["candidates"][i]
        if c.get("output_error") is None:
            return None
        return (f"output budget {target:.2g}: {what} {c['output_error']:.2e} off with only this site structured "
                f"(attention error {c['error']:.2e}); all sites together {measured:.2e}; "
                f"{row['dense']['flops'] / c['flops']:.1f}× fewer attention FLOPs")
    alone = [c["output_error"] for c in row["candidates"] if c.get("output_error") is not None]
    if not alone:
        return None
    best = min(alone)
    return f"output budget {target:.2g}: " + (
        f"every candidate alone puts the {what} over it (best {best:.2e})" if best > target else
        f"spent on other sites, where it buys more (best here alone: {best:.2e})")

