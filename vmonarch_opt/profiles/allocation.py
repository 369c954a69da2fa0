"""Choosing per site under a budget: the cheapest candidate within its error cap (or dense), or
the least total cost under a global error target (bisection on a Lagrange multiplier). Used by
calibration (``calibrate.py``) and the output budget (``output_budget.py``)."""
from __future__ import annotations

import math
from typing import Callable, Optional

from .budget import Budget

__all__ = ["lagrangian_allocation", "choose_calibrated"]


def _cost(x: dict, dense: dict, cost: str) -> float:
    """A candidate's cost in dense-FLOP units: its FLOPs, or with ``cost="time"`` its measured
    time relative to dense SDPA times the dense FLOPs (FLOPs where no time was measured)."""
    if cost == "time" and x.get("time_ms") is not None and dense.get("time_ms"):
        return x["time_ms"] / dense["time_ms"] * dense["flops"]
    return float(x["flops"])


def _eligible(x: dict, dense: dict, cost: str) -> bool:
    """A candidate that may replace dense: within its error budget and cheaper than dense."""
    return x["meets_budget"] and math.isfinite(x["error"]) and _cost(x, dense, cost) < float(dense["flops"])


def _choose(cands: list[dict], dense: dict, cost: str, lam: Optional[float] = None,
            error_of: Optional[Callable] = None) -> Optional[int]:
    """Index of the cheapest candidate that meets its budget and is cheaper than dense (None =
    dense). With ``lam`` the objective is ``cost + lam * error * dense_flops`` (global trade-off);
    ``error_of(i, candidate)`` replaces the candidate's attention error there (None: not eligible)."""
    dense_cost = float(dense["flops"])
    best, best_obj, best_err = None, dense_cost, None
    for i, x in enumerate(cands):
        e = x["error"] if error_of is None else error_of(i, x)
        if e is None or not _eligible(x, dense, cost):
            continue
        obj = _cost(x, dense, cost) + (lam * e * dense["flops"] if lam else 0.0)
        if obj < best_obj or (obj == best_obj and best is not None and e < best_err):
            best, best_obj, best_err = i, obj, e
    return best


def lagrangian_allocation(rows: dict, target: float, cost: str, measure: Callable[[dict], float],
                          error_of: Optional[Callable] = None) -> dict:
    """Per site choice (``{site_id: candidate index or None}``) of least total cost with
    ``measure(choice) ≤ target``: bisection on the multiplier of the error term of
    :func:`_choose` (``error_of(site_id, i, candidate)`` as there, per site)."""
    def pick(lam):
        return {sid: _choose(r["candidates"], r["dense"], cost, lam,
                             None if error_of is None else (lambda i, x, sid=sid: error_of(sid, i, x)))
                for sid, r in rows.items()}

    lo_choice = pick(0.0)
    if measure(lo_choice) <= target:
        return lo_choice
    lo, hi = 1e-6, 1.0
    while measure(pick(hi)) > target and hi < 1e12:
        hi *= 10
    best = pick(hi)
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        ch = pick(mid)
        if measure(ch) <= target:
            hi, best = mid, ch
        else:
            lo = mid
    return best


def _global_allocation(rows: dict, target: float, cost: str) -> dict:
    """Per site choice minimising total cost with FLOP-weighted mean error ≤ ``target``."""
    def mean_err(ch):
        w = sum(r["dense"]["flops"] for r in rows.values()) or 1
        return sum(rows[s]["dense"]["flops"] * (rows[s]["candidates"][i]["error"] if i is not None else 0.0)
                   for s, i in ch.items()) / w

    return lagrangian_allocation(rows, target, cost, mean_err)


def _choice_entry(row: dict, i: Optional[int], budget: Budget) -> dict:
    cands, dense, limit = row["candidates"], row["dense"], row["limit"]
    if i is None:
        ok = [c for c in cands if c["meets_budget"]]
        if not cands:
            why = "no structured candidate applies to this site (methods= or grid) or is cheaper than dense" + (
                f" ({row['not_applicable']})" if row.get("not_applicable") else "")
        elif not ok:
            b = min(cands, key=lambda c: c["error"])
            why = f"no candidate meets the error budget {limit:.2g} (best: {b['label']} at {b['error']:.2e})"
        else:
            why = "no candidate within the budget is cheaper than dense" + (
                " under the global mean-error budget" if budget.mean_rel_error is not None else "")
        return {"config": {"method": "dense"}, "label": "dense", "layout": "dense", "error": 0.0,
                "flops": dense["flops"], "time_ms": dense.get("time_ms"), "density": None, "why": why}
    c = cands[i]
    cut = dense["flops"] / c["flops"] if c["flops"] else float("inf")
    why = f"cheapest within the budget: error {c['error']:.2e} ≤ {limit:.2g}, {cut:.1f}× fewer attention FLOPs"
    if budget.cost == "time" and c.get("time_ms") and dense.get("time_ms"):
        why += f", {dense['time_ms'] / c['time_ms']:.1f}× faster than SDPA"
    return {"config": c["config"], "label": c["label"], "layout": c["layout"], "error": c["error"],
            "flops": c["flops"], "time_ms": c.get("time_ms"), "density": c.get("density"), "why": why}


def choose_calibrated(rows: dict, budget: Budget) -> None:
    """Set ``row["choice"]`` of every calibrated site row from its measured candidates under
    ``budget`` (per site, or the global allocation under ``mean_rel_error``). Also used after the
    ranks of a context-parallel model merged their rows (``parallel/calibration.py``)."""
    calibrated = {sid: r for sid, r in rows.items() if r["status"] == "calibrated"}
    if budget.mean_rel_error is not None and calibrated:
        picks = _global_allocation(calibrated, budget.mean_rel_error, budget.cost)
    else:
        picks = {sid: _choose(r["candidates"], r["dense"], budget.cost) for sid, r in calibrated.items()}
    for sid, row in calibrated.items():
        row["choice"] = _choice_entry(row, picks[sid], budget)
