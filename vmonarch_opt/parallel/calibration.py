"""Calibration on a context-parallel model: every rank measures its own heads, the ranks merge what
they measured, and every rank chooses from the merged measurements — so all choose the same.

Under Ulysses rank ``r`` computes the attention of heads ``[r·H/P, (r+1)·H/P)`` over all tokens, so
each rank's calibration sees a different slice of each site. The merge, per site:

* a candidate's **error** is the worst rank's. The relative error over all heads,
  ``sqrt(Σ_r ‖e_r‖² / Σ_r ‖ref_r‖²)``, never exceeds the largest ``‖e_r‖ / ‖ref_r‖``, so a choice
  that meets the budget on every rank meets it on the whole site;
* per-head lists (errors per head, entropy, concentration, …) are the ranks' lists in rank order,
  which is the model's head order;
* FLOPs and density are the ranks' mean (per-rank cost: every rank runs ``H / P`` heads), a
  measured time the slowest rank's.

The rows then go through the same choice as a single process (``choose_calibrated``). When every
rank ran all heads (``process_group(replicated=True)``: optimize before ``enable_parallelism``),
the per-head lists are rank 0's and the worst error guards against rounding differences.
"""
from __future__ import annotations

import math
from typing import Optional

from ..errors import VMonarchError
from .comm import Comm

__all__ = ["agree_profile"]

_MERGED = ("calibrated", "pinned")


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _max(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _worst(xs: list) -> float:
    """Largest error; NaN or a missing value counts as infinite (never as a pass)."""
    out = 0.0
    for x in xs:
        if x is None or not math.isfinite(x):
            return math.inf
        out = max(out, x)
    return out


def _merge_stats(stats: list[dict], split: bool) -> dict:
    out = {}
    for key, val in stats[0].items():
        if isinstance(val, list) and split:
            out[key] = [x for s in stats for x in s.get(key, [])]
        else:
            out[key] = val
    return out


def _merge_candidate(cands: list[dict], limit: float, split: bool) -> dict:
    c = dict(cands[0])
    c["error"] = _worst([x["error"] for x in cands])
    c["error_mean"] = _mean([x.get("error_mean") for x in cands])
    if split and all(x.get("error_per_head") is not None for x in cands):
        c["error_per_head"] = [e for x in cands for e in x["error_per_head"]]
    c["flops"] = round(_mean([x["flops"] for x in cands]))
    c["time_ms"] = _max([x.get("time_ms") for x in cands])
    if "density" in c:
        c["density"] = _mean([x.get("density") for x in cands])
    c["measure_s"] = _max([x.get("measure_s") for x in cands])
    c["meets_budget"] = c["error"] <= limit
    return c


def _portable(row: dict) -> dict:
    return {k: row.get(k) for k in ("status", "candidates", "dense", "stats", "seconds", "limit")}


def _check_alike(got: list[dict], comm: Comm) -> None:
    """Every rank calibrated the same sites with the same candidates."""
    first = got[0]
    for r, rows in enumerate(got[1:], start=1):
        if set(rows) != set(first):
            diff = sorted(set(rows) ^ set(first))[:4]
            raise VMonarchError(f"vmonarch_opt ({comm.origin}): rank {r} found other attention sites than rank 0 "
                                f"(e.g. {diff}); every rank must optimize the same model on the same batch")
        for sid, row in rows.items():
            a, b = first[sid], row
            labels_a = [c["label"] for c in a["candidates"] or []]
            labels_b = [c["label"] for c in b["candidates"] or []]
            if a["status"] != b["status"] or labels_a != labels_b:
                raise VMonarchError(f"vmonarch_opt ({comm.origin}): site {sid} was calibrated differently on rank {r} "
                                    f"({b['status']}, candidates {labels_b}) than on rank 0 ({a['status']}, candidates "
                                    f"{labels_a}); every rank must optimize the same model on the same batch")


def agree_profile(comm: Comm, profile, budget):
    """Merge the ranks' calibration measurements into ``profile`` (in place; returned) and choose
    from them, identically on every rank."""
    from ..profiles.allocation import choose_calibrated

    rows = profile.data["sites"]
    split = not comm.replicated  # the ranks measured different heads
    got = comm.exchange("calibration", lambda: {sid: _portable(r) for sid, r in rows.items()})
    _check_alike(got, comm)
    for sid, row in rows.items():
        if row["status"] not in _MERGED:
            continue
        per_rank = [g[sid] for g in got]
        row["stats"] = _merge_stats([p["stats"] or {} for p in per_rank], split)
        row["candidates"] = [_merge_candidate([p["candidates"][i] for p in per_rank], row["limit"], split)
                             for i in range(len(row["candidates"]))]
        row["dense"] = {"flops": round(_mean([p["dense"]["flops"] for p in per_rank])),
                        "time_ms": _max([p["dense"].get("time_ms") for p in per_rank])}
        row["seconds"] = _max([p.get("seconds") for p in per_rank])
        if row["status"] == "pinned" and row["candidates"] and row.get("choice"):
            c = row["candidates"][0]
            row["choice"] = {**row["choice"], "error": c["error"], "flops": c["flops"], "density": c.get("density")}
    choose_calibrated(rows, budget)
    profile.data["context_parallel"] = {
        "ranks": comm.world, "group": comm.origin, "heads": "replicated" if comm.replicated else "split",
        "merge": "per site: the worst rank's error, " + ("rank 0's per-head lists" if comm.replicated else
                                                         "per-head lists in rank order") + ", the ranks' mean FLOPs"}
    return profile
