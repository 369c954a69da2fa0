"""Calibration: measure every candidate site on the user's data and choose its method under a budget.

For each calibration batch the model runs once with its own attention; ``optimize.observe`` hands
us q/k/v of one site at a time, and everything is measured right there (nothing of the site is
kept afterwards): the dense output with per-row entropy (flash kernel with statistics), block
concentration on the video grid, and for every candidate config its relative output error
against that dense output and its cost (FLOPs; kernel time on CUDA). Then each site gets the
cheapest candidate whose worst-batch error meets its budget, or dense.

Limits: errors are measured on the original model's activations (every site sees dense
upstream attention); inside the optimized model later sites see slightly different inputs, which
the report's re-measured error shows. Joint sites with a text key-padding mask (HunyuanVideo) are
measured as they run: the reference is the model's masked dense attention and every candidate
goes through the same key-padding path as the rewritten op (padded text tokens dropped); the
entropy is that of the masked attention (same dense pass), and the block statistics look at
video keys only, which the text mask does not touch.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, Callable, Optional

import torch

from ..config import METHODS, DenseConfig, MonarchConfig, VMoBAConfig, default_monarch_block, resolve_args
from ..kernels.tuning import untuned
from .budget import Budget, config_to_dict, describe_config
from .profile import PROFILE_FORMAT, Profile, fingerprint
from .stats import block_concentration, dense_with_stats, entropy_stats, masked_dense_with_stats

__all__ = ["calibrate", "calibrate_sites", "candidate_configs", "layout_config"]


# --------------------------------------------------------------------------------- candidates
def layout_config(layout: str, site, steps: int = 1) -> Optional[MonarchConfig]:
    """The Monarch config of a named layout at ``site``'s grid (None where it does not apply)."""
    nv = site.seq_q - site.text_before - site.text_after
    rec = steps > 1
    if site.grid is None:
        if layout != "1d" or nv < 4:
            return None
        return MonarchConfig(block=(1, 1, math.isqrt(nv - 1) + 1), steps=steps, recompute=rec)
    T, H, W = site.grid
    if layout == "frame":
        block = default_monarch_block(site.grid)
    elif layout == "frame_group":
        if T < 4:
            return None
        block = (2, H, W)
    elif layout == "tile":
        if H * W < 4:
            return None
        block = (1, -(-H // 2), -(-W // 2))
    elif layout == "1d":
        return None  # 1D blocks are for sites without a grid; with one, the layouts above apply
    else:
        raise ValueError(f"unknown layout {layout!r}")
    block = tuple(min(b, g) for b, g in zip(block, site.grid))
    if block == tuple(site.grid):
        return None  # one block: exactly dense, never cheaper
    return MonarchConfig(block=block, steps=steps, recompute=rec)


def vmoba_config(site, threshold: float, layer: int, pooled_rest: bool = False,
                 topk_fraction: Optional[float] = None) -> Optional[VMoBAConfig]:
    """The VMoBA candidate of ``site``: threshold selection, or global top-k keeping
    ``topk_fraction`` of the key blocks per query group (then ``None`` if that is every block)."""
    from ..config import default_vmoba_chunk
    from ..kernels.vmoba.layout import vmoba_layout, vmoba_partition_for_layer

    nv = site.seq_q - site.text_before - site.text_after
    if site.grid is None:
        if nv < 16:
            return None
        grid, chunk, part = (1, 1, nv), (1, 1, -(-nv // 8)), "3d"
    else:
        grid, chunk, part = tuple(site.grid), default_vmoba_chunk(site.grid), vmoba_partition_for_layer(layer)
    topk = 0
    if topk_fraction is not None:
        blocks = vmoba_layout(grid, chunk, part).num_blocks
        topk = max(1, round(topk_fraction * blocks))
        if topk >= blocks:
            return None  # every block: exactly dense
    return VMoBAConfig(chunk=chunk, partition=part, threshold=threshold, topk=topk, pooled_rest=pooled_rest)


def candidate_configs(site, budget: Budget, methods=METHODS, layer: int = 0) -> list[tuple[str, Any]]:
    """``[(layout name, config)]`` tried at ``site``: Monarch layouts × steps, VMoBA thresholds."""
    if budget.candidates is not None:
        cands = budget.candidates(site) if callable(budget.candidates) else list(budget.candidates)
        return [("given", c) for c in cands if c.method in methods and c.method != "dense"]
    out, seen = [], set()
    if "monarch" in methods:
        for layout in budget.layouts:
            for steps in budget.monarch_steps:
                cfg = layout_config(layout, site, steps)
                if cfg is not None and cfg not in seen:
                    seen.add(cfg)
                    out.append((layout, cfg))
    if "vmoba" in methods:
        rules = [(thr, None) for thr in budget.vmoba_thresholds if thr < 1.0]  # 1.0: exactly dense
        rules += [(0.25, frac) for frac in budget.vmoba_topk]
        for thr, frac in rules:
            for pooled in budget.vmoba_pooled:
                cfg = vmoba_config(site, thr, layer, pooled, frac)
                if cfg is not None and cfg not in seen:
                    seen.add(cfg)
                    out.append(("vmoba", cfg))
    return out


# --------------------------------------------------------------------------------- measurement
def _rel(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, list]:
    d = (a.float() - ref.float())
    r = ref.float()
    tot = (d.norm() / r.norm().clamp_min(1e-30)).item()
    per_head = (d.pow(2).sum(dim=(0, 2, 3)).sqrt() / r.pow(2).sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-30)).tolist()
    if not math.isfinite(tot):
        tot = float("inf")
    return tot, per_head


def _timed(fn: Callable, cuda: bool):
    """(result, milliseconds or None): the second of two calls is timed with CUDA events."""
    out = fn()
    if not cuda:
        return out, None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, float(start.elapsed_time(end))


def _run_candidate_padded(cfg, args: dict, q, k, v, scale: float, timed: bool, mask: torch.Tensor):
    """``_run_candidate`` under a text key-padding ``mask``, through the op's own padding path
    (``passes/keypad.py``): per batch element, padded text tokens dropped."""
    from ..passes.keypad import run_key_padded

    acc: dict = {}

    def fn():
        acc.update(flops=0, density=[])

        def call(qq, kk, vv, tb, ta):
            o, f, d, _ = _run_candidate(cfg, {**args, "text_before": tb, "text_after": ta}, qq, kk, vv, scale, False)
            acc["flops"] += f
            if d is not None:
                acc["density"].append(d)
            return o
        out = run_key_padded(q, k, v, mask, args["text_before"], args["text_after"], scale, call)
        if out is None:  # the planner only keeps key-padding masks; anything else runs dense
            raise ValueError("calibration: the site's mask is not a text padding mask")
        return out

    out, ms = _timed(fn, timed)
    dens = acc["density"]
    return out, int(acc["flops"]), (sum(dens) / len(dens) if dens else None), ms


def masked_dense(q, k, v, scale: float, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The model's dense attention under a text padding mask, the entropy of that attention
    (one dense pass) and the mean number of visible keys."""
    from ..passes.keypad import padded_query_rows, valid_keys

    valid = valid_keys(mask, q.shape[0])
    if valid is None:
        raise ValueError("calibration: the site's mask is not a text padding mask")
    out, _, ent = masked_dense_with_stats(q, k, v, scale, valid.to(q.device))
    for i in range(q.shape[0]):  # padded queries: what the model gives them (no key under valid × valid)
        drop = (~valid[i]).nonzero().squeeze(-1).to(q.device)
        if drop.numel():
            out[i:i + 1].index_copy_(-2, drop, padded_query_rows(q, k, v, mask, i, drop, scale).to(out.dtype))
    return out, ent, max(1, round(valid.sum(-1).float().mean().item()))


def _run_candidate(cfg, args: dict, q, k, v, scale: float, timed: bool, mask: Optional[torch.Tensor] = None):
    """(out, flops, density, time_ms) of one candidate on one site's q/k/v."""
    if mask is not None:
        return _run_candidate_padded(cfg, args, q, k, v, scale, timed, mask)
    B, H, N, D = q.shape
    if cfg.method == "monarch":
        from ..kernels.monarch.reference import monarch_flops

        def fn():
            return torch.ops.vmonarch.monarch_attention(q, k, v, args["grid"], args["block"], args["text_before"],
                                                        args["text_after"], args["steps"], scale, args["recompute"])
        out, ms = _timed(fn, timed)
        flops = monarch_flops(B, H, N, D, grid=tuple(args["grid"]), block=tuple(args["block"]),
                              text_before=args["text_before"], text_after=args["text_after"], steps=args["steps"])
        return out, int(flops), None, ms
    if cfg.method == "vmoba":
        from ..kernels.dispatch import vmoba_attention_with_selection, vmoba_select
        from ..kernels.vmoba.reference import vmoba_flops

        pooled = args.get("pooled_rest", False)

        def fn():
            sel = vmoba_select(q, k, grid=tuple(args["grid"]), chunk=tuple(args["chunk"]),
                               text_before=args["text_before"], text_after=args["text_after"],
                               partition=args["partition"], threshold=args["threshold"], topk=args["topk"],
                               scale=scale)
            return vmoba_attention_with_selection(q, k, v, sel, scale, pooled_rest=pooled), sel
        (out, sel), ms = _timed(fn, timed)
        return out, int(vmoba_flops(sel, D, pooled)), float(sel.density), ms
    raise ValueError(f"cannot calibrate method {cfg.method!r}")


def _costlier_than_dense(cand, site, dense_flops: int) -> bool:
    """Monarch layouts whose FLOPs (known before measuring) are not below dense: never chosen."""
    _, cfg, a = cand
    if cfg.method != "monarch":
        return False
    from ..kernels.monarch.reference import monarch_flops

    f = monarch_flops(site.batch, site.heads, site.seq_q, site.head_dim, grid=tuple(a["grid"]), block=tuple(a["block"]),
                      text_before=a["text_before"], text_after=a["text_after"], steps=a["steps"])
    return f >= dense_flops


class _SiteRecord:
    """Streams one site's statistics and candidate results over the calibration batches."""

    def __init__(self, site, plan, layer: int, budget: Budget, cands: list, pinned):
        self.site, self.plan, self.layer = site, plan, layer
        self.limit = budget.limit_for(site.site_id)
        self._budget = budget
        self.cands = cands  # [(layout, cfg, args)]
        self.pinned = pinned  # (cfg, args) or None
        self.batches = 0
        self.stats: dict = {}
        self.results: list = [dict(errors=[], per_head=None, flops=[], density=[], time_ms=None) for _ in cands]
        self.dense_flops = 0
        self.dense_ms = None
        self.seconds = 0.0

    def observe(self, q, k, v, scale: float, mask: Optional[torch.Tensor] = None) -> None:
        t_site = time.perf_counter()
        s = self.site
        timed = q.is_cuda and self.batches == 0
        if mask is None:
            (ref, _, ent), n_keys = dense_with_stats(q, k, v, scale), k.shape[2]
        else:  # what the model computes: its masked dense attention
            ref, ent, n_keys = masked_dense(q, k, v, scale, mask)
        if timed:  # the dense baseline is what the dense op runs: torch SDPA (cuDNN / FlashAttention)
            _, self.dense_ms = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), True)
        B, H, N, D = q.shape
        self.dense_flops = 4 * B * H * N * k.shape[2] * D
        st = entropy_stats(ent, n_keys)
        st.update(block_concentration(q, k, scale, s.grid, s.text_before, s.text_after,
                                      top_fraction=self._budget.top_fraction, sample_rows=self._budget.sample_rows))
        self._accumulate(st)
        for res, (_, cfg, args) in zip(self.results, self.cands):
            t0 = time.perf_counter()
            out, flops, density, ms = _run_candidate(cfg, args, q, k, v, scale, timed, mask)
            if q.is_cuda:
                torch.cuda.synchronize(q.device)
            # wall time of the measurement (kernel compilation and tuning on first use included)
            res["wall_s"] = res.get("wall_s", 0.0) + time.perf_counter() - t0
            err, per_head = _rel(out, ref)
            del out
            res["errors"].append(err)
            res["per_head"] = per_head if res["per_head"] is None else [max(a, b) for a, b in zip(res["per_head"], per_head)]
            res["flops"].append(flops)
            if density is not None:
                res["density"].append(density)
            if ms is not None:
                res["time_ms"] = ms
        self.batches += 1
        self.seconds += time.perf_counter() - t_site

    def _accumulate(self, st: dict) -> None:
        n = self.batches
        for key, val in st.items():
            if isinstance(val, list) and key in self.stats:
                self.stats[key] = [(a * n + b) / (n + 1) for a, b in zip(self.stats[key], val)]
            else:
                self.stats[key] = val

    def candidates_json(self) -> list[dict]:
        out = []
        for (layout, cfg, args), res in zip(self.cands, self.results):
            if not res["errors"]:
                continue
            err = max(res["errors"])
            d = {"label": describe_config(cfg), "layout": layout, "config": config_to_dict(cfg),
                 "error": err, "error_mean": sum(res["errors"]) / len(res["errors"]),
                 "error_per_head": res["per_head"], "flops": int(sum(res["flops"]) / len(res["flops"])),
                 "time_ms": res["time_ms"], "meets_budget": err <= self.limit,
                 "measure_s": round(res.get("wall_s", 0.0), 4)}
            if res["density"]:
                d["density"] = sum(res["density"]) / len(res["density"])
            out.append(d)
        return out


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


# --------------------------------------------------------------------------------- progress
_progress_override: Optional[bool] = None


@contextlib.contextmanager
def _progress(enabled: Optional[bool]):
    global _progress_override
    prev, _progress_override = _progress_override, enabled
    try:
        yield
    finally:
        _progress_override = prev


def _bar(total: int):
    from tqdm.auto import tqdm

    enabled = _progress_override
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc="vmonarch_opt calibrate", unit="site", disable=not enabled, leave=False)


# --------------------------------------------------------------------------------- entry points
def calibrate_sites(model, batches: list, detected: list, plans: dict, forwards: dict, *, methods=METHODS,
                    budget: Optional[Budget] = None, overrides: Optional[dict] = None) -> Profile:
    """Measure every candidate site of ``model`` on ``batches`` and choose per site (the spine's hook).

    ``plans`` are the default plans (sites already left to the model's own attention have
    ``method == "original"`` and are recorded with their reason). Sites pinned by ``overrides``
    keep their pinned config; their statistics and its error are still measured.
    """
    from ..optimize import observe

    budget = Budget() if budget is None else budget
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a vmonarch_opt.Budget (or None for no calibration), got {type(budget).__name__}")
    t0 = time.perf_counter()
    sites = [d.site for d in detected]
    records: dict[str, _SiteRecord] = {}
    layer = 0
    for s in sites:
        p = plans[s.site_id]
        if p.method == "original":
            continue
        if p.source == "override":
            cfg = _config_from_plan(p)
            pinned = (cfg, dict(p.args))
            cands = [("pinned", cfg, dict(p.args))] if cfg.method != "dense" else []
        else:
            pinned = None
            cands = [(lay, c, resolve_args(c, s, layer)) for lay, c in candidate_configs(s, budget, methods, layer)]
            cands = [x for x in cands if not _costlier_than_dense(x, s, p.flops_before)]
        rec = _SiteRecord(s, p, layer, budget, cands, pinned)
        records[s.site_id] = rec
        layer += 1

    bar = _bar(len(records) * len(batches))

    def callback(site, plan, q, k, v, scale, mask=None):
        rec = records.get(site.site_id)
        if rec is None:
            return
        bar.set_postfix_str(site.site_id, refresh=False)
        # Our kernels run one default launch config here instead of compiling and timing every
        # tile config for every candidate variant (minutes on a cold machine); the chosen method is
        # tuned when the optimized model first runs. cost="time" needs real times: tuned.
        with untuned(budget.cost != "time"):
            rec.observe(q, k, v, scale, mask)
        bar.update(1)

    try:
        if records:
            observe(model, detected, plans, forwards, batches, callback)
    finally:
        bar.close()

    rows: dict[str, dict] = {}
    for s in sites:
        p = plans[s.site_id]
        row = {"site": s.to_dict(), "layer": None, "status": "original", "reason": p.reason, "stats": {},
               "dense": {"flops": p.flops_before, "time_ms": None}, "candidates": [], "limit": None,
               "choice": None}
        rec = records.get(s.site_id)
        if rec is not None:
            row.update(layer=rec.layer, stats=rec.stats, limit=rec.limit, candidates=rec.candidates_json(),
                       dense={"flops": rec.dense_flops or p.flops_before, "time_ms": rec.dense_ms},
                       batches=rec.batches, seconds=round(rec.seconds, 4))
            if rec.batches == 0:
                row.update(status="not observed",
                           reason="the calibration batch never reached this site with the calibrated shape; left dense")
            elif rec.pinned is not None:
                row["status"] = "pinned"
            else:
                row["status"] = "calibrated"
        rows[s.site_id] = row

    calibrated = {sid: r for sid, r in rows.items() if r["status"] == "calibrated"}
    if budget.mean_rel_error is not None and calibrated:
        picks = _global_allocation(calibrated, budget.mean_rel_error, budget.cost)
    else:
        picks = {sid: _choose(r["candidates"], r["dense"], budget.cost) for sid, r in calibrated.items()}
    for sid, row in rows.items():
        if row["status"] == "calibrated":
            row["choice"] = _choice_entry(row, picks[sid], budget)
        elif row["status"] == "pinned":
            rec = records[sid]
            cand = row["candidates"][0] if row["candidates"] else None
            row["choice"] = {"config": config_to_dict(rec.pinned[0]), "label": describe_config(rec.pinned[0]),
                             "layout": "pinned", "error": cand["error"] if cand else 0.0,
                             "flops": cand["flops"] if cand else row["dense"]["flops"],
                             "density": cand.get("density") if cand else None,
                             "why": "pinned by overrides="}
        elif row["status"] == "not observed":
            row["choice"] = {"config": {"method": "dense"}, "label": "dense", "layout": "dense", "error": 0.0,
                             "flops": row["dense"]["flops"], "density": None, "why": row["reason"]}

    data = {"format": PROFILE_FORMAT, "fingerprint": fingerprint(model, sites), "budget": budget.to_dict(),
            "methods": list(methods), "overrides": {k: str(v) for k, v in (overrides or {}).items()},
            "batches": len(batches), "device": _device_name(batches), "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 3), "tuned_kernel_times": budget.cost == "time", "sites": rows}
    return Profile(data)


def _choice_entry(row: dict, i: Optional[int], budget: Budget) -> dict:
    cands, dense, limit = row["candidates"], row["dense"], row["limit"]
    if i is None:
        ok = [c for c in cands if c["meets_budget"]]
        if not cands:
            why = "no structured candidate applies to this site (methods= or grid) or is cheaper than dense"
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


def _config_from_plan(p):
    a = p.args
    if p.method == "monarch":
        return MonarchConfig(block=tuple(a["block"]), steps=a["steps"], recompute=a["recompute"])
    if p.method == "vmoba":
        return VMoBAConfig(chunk=tuple(a["chunk"]), partition=a["partition"], threshold=a["threshold"],
                           topk=a["topk"], pooled_rest=a.get("pooled_rest", False))
    return DenseConfig()


def _device_name(batches) -> str:
    from ..batch import batch_device

    dev = batch_device(batches)
    if dev is None:
        return "cpu"
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def calibrate(model: torch.nn.Module, calib_batch: Any, *, budget: Optional[Budget] = None, methods=METHODS,
              grid=None, overrides: Optional[dict] = None, min_seq_len: int = 1024, capture: str = "auto",
              progress: Optional[bool] = None, evaluate: Optional[Callable] = None) -> Profile:
    """Calibrate ``model`` on ``calib_batch`` (one batch, or a list of batch dicts such as several
    diffusion timesteps) and return the :class:`Profile` of per-site choices under ``budget``
    (default ``Budget()``). The model is left as it was. ``progress``: tqdm bar (default: when
    stderr is a terminal). ``evaluate``: what an output budget is measured on (see ``optimize``)."""
    from ..optimize import optimize, restore

    if budget is None:
        budget = Budget()
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a vmonarch_opt.Budget, got {type(budget).__name__}")
    with _progress(progress):
        opt = optimize(model, calib_batch, budget=budget, methods=methods, grid=grid, overrides=overrides,
                       min_seq_len=min_seq_len, capture=capture, validate=False, inplace=True,
                       evaluate=evaluate)
    try:
        return opt.vmonarch.profile
    finally:
        restore(model)
