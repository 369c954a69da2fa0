"""Calibration: measure every candidate site on the user's data and choose its method under a budget.

For each calibration batch the model runs once with its own attention; ``pipeline.observe`` hands
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
import sys
import time
import warnings
from typing import Any, Callable, Optional

import torch

from .. import methods as registry
from .. import pipeline
from ..errors import VMonarchError
from ..kernels.tuning import untuned
from ..methods import Shape, causal
from ..metrics import rel_error_with_heads
from ..planner import structured_refusals
from .allocation import choose_calibrated
from .budget import Budget, config_to_dict, describe_config
from .profile import PROFILE_FORMAT, Profile, fingerprint
from .stats import block_concentration, dense_with_stats, entropy_stats, masked_dense_with_stats

__all__ = ["calibrate", "calibrate_sites", "candidate_configs", "choose_calibrated"]


# --------------------------------------------------------------------------------- candidates
def candidate_configs(site, budget: Budget, methods=None, layer: int = 0) -> list[tuple[str, Any]]:
    """``[(layout name, config)]`` tried at ``site``: each allowed method's candidates (Monarch
    layouts × steps, VMoBA thresholds, …), or ``budget.candidates`` when given."""
    methods = registry.check_methods(methods)
    if budget.candidates is not None:
        cands = budget.candidates(site) if callable(budget.candidates) else list(budget.candidates)
        return [("given", c) for c in cands
                if registry.of(c).name in methods and registry.of(c).structured]
    out, seen = [], set()
    for name in methods:
        for layout, cfg in registry.get(name).candidates(site, budget, layer):
            if cfg not in seen:
                seen.add(cfg)
                out.append((layout, cfg))
    return out


# --------------------------------------------------------------------------------- measurement
def _rel(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, list]:
    """(relative error, per head) of a candidate against the dense output; NaN/Inf count as inf."""
    return rel_error_with_heads(a, ref)


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


def block_causal_dense(q, k, v, scale: float, args: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact block-causal attention (the model's masked attention) under a plan's ``causal_chunk``,
    its row entropy, and the mean number of keys a query sees: one dense pass per chunk over the
    keys it sees."""
    T, H, W = args["grid"]
    hw = H * W
    outs, ents, seen = [], [], 0
    for s, e in causal.chunk_calls(T, args["causal_chunk"]):
        o, _, ent = dense_with_stats(q[:, :, s * hw:e * hw], k[:, :, :e * hw], v[:, :, :e * hw], scale)
        outs.append(o), ents.append(ent)
        seen += (e - s) * hw * e * hw
    return torch.cat(outs, 2), torch.cat(ents, 2), seen / (T * hw)


def _block_causal_sdpa(q, k, v, scale: float, args: dict) -> list:
    """Exact block-causal attention by SDPA, one call per chunk (the dense baseline's time)."""
    T, H, W = args["grid"]
    hw = H * W
    return [torch.nn.functional.scaled_dot_product_attention(q[:, :, s * hw:e * hw], k[:, :, :e * hw],
                                                             v[:, :, :e * hw], scale=scale)
            for s, e in causal.chunk_calls(T, args["causal_chunk"])]


def _run_candidate(cfg, args: dict, q, k, v, scale: float, timed: bool, mask: Optional[torch.Tensor] = None):
    """(out, flops, density, time_ms) of one candidate on one site's q/k/v."""
    if mask is not None:
        return _run_candidate_padded(cfg, args, q, k, v, scale, timed, mask)
    method = registry.of(cfg)
    (out, flops, density), ms = _timed(lambda: method.calibration_run(q, k, v, args, scale), timed)
    return out, int(flops), density, ms


def _costlier_than_dense(cand, site, dense_flops: int) -> bool:
    """Candidates whose FLOPs, known before measuring, are not below dense: never chosen."""
    _, cfg, a = cand
    f = registry.of(cfg).cost(Shape.of(site), a)
    return f is not None and f >= dense_flops


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
        chunk = self.plan.args.get("causal_chunk")
        if chunk:  # block-causal: the mask was checked (runtime.mismatch); exact attention chunk by chunk
            ref, ent, n_keys = block_causal_dense(q, k, v, scale, self.plan.args)
            mask = None  # the candidates run block-causal from their plan arguments
        elif mask is None:
            (ref, _, ent), n_keys = dense_with_stats(q, k, v, scale), k.shape[2]
        else:  # what the model computes: its masked dense attention
            ref, ent, n_keys = masked_dense(q, k, v, scale, mask)
        if timed:  # the dense baseline is what the dense op runs: torch SDPA (cuDNN / FlashAttention)
            _, self.dense_ms = _timed(lambda: _block_causal_sdpa(q, k, v, scale, self.plan.args) if chunk
                                      else torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), True)
        B, H, N, D = q.shape
        self.dense_flops = 4 * B * H * N * k.shape[2] * D
        st = entropy_stats(ent, n_keys)
        st.update(block_concentration(q, k, scale, s.grid, s.text_before, s.text_after,
                                      top_fraction=self._budget.top_fraction, sample_rows=self._budget.sample_rows))
        self._accumulate(st)
        for res, (_, cfg, args) in zip(self.results, self.cands):
            if "failed" in res:
                continue
            t0 = time.perf_counter()
            try:
                out, flops, density, ms = _run_candidate(cfg, args, q, k, v, scale, timed, mask)
                if q.is_cuda:
                    torch.cuda.synchronize(q.device)
            except Exception as e:  # noqa: BLE001  e.g. a kernel that does not compile on this GPU
                # a candidate that cannot run is never chosen; the profile and a warning say why
                res["failed"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
                warnings.warn(f"vmonarch_opt: calibration candidate {describe_config(cfg)} failed at site "
                              f"{s.site_id} and is not considered there ({res['failed']}); set "
                              f"VMONARCH_FORCE_REFERENCE=1 to measure the references instead, or leave its method "
                              f"out with methods=...", RuntimeWarning, stacklevel=2)
                continue
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
            if not res["errors"] or "failed" in res:
                continue
            err = max(res["errors"])
            d = {"label": describe_config(cfg), "layout": layout, "config": config_to_dict(cfg),
                 "error": err, "error_mean": sum(res["errors"]) / len(res["errors"]),
                 "error_per_head": res["per_head"], "flops": round(sum(res["flops"]) / len(res["flops"])),
                 "time_ms": res["time_ms"], "meets_budget": err <= self.limit,
                 "measure_s": round(res.get("wall_s", 0.0), 4)}
            if res["density"]:
                d["density"] = sum(res["density"]) / len(res["density"])
            out.append(d)
        return out

    def failed_json(self) -> list[dict]:
        """Candidates that raised when run (never chosen): label and the error."""
        return [{"label": describe_config(cfg), "layout": layout, "error": res["failed"]}
                for (layout, cfg, _), res in zip(self.cands, self.results) if "failed" in res]


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
def calibrate_sites(model, batches: list, detected: list, plans: dict, routing, *, methods=None,
                    budget: Optional[Budget] = None, overrides: Optional[dict] = None) -> Profile:
    """Measure every candidate site of ``model`` on ``batches`` and choose per site.

    ``plans`` are the default plans of ``pipeline.plan`` (sites already left to the model's own
    attention are recorded with their reason), ``routing`` where their sites run. Sites pinned by
    ``overrides`` keep their pinned config; their statistics and its error are still measured.
    """
    methods = registry.check_methods(methods)
    budget = Budget() if budget is None else budget
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a vmonarch_opt.Budget (or None for no calibration), got {type(budget).__name__}")
    t0 = time.perf_counter()
    sites = [d.site for d in detected]
    records: dict[str, _SiteRecord] = {}
    layer = 0
    for s in sites:
        p = plans[s.site_id]
        if not p.rewritten:
            continue
        if p.source == "override":
            cfg = _config_from_plan(p)
            pinned = (cfg, dict(p.args))
            cands = [("pinned", cfg, dict(p.args))] if registry.of(cfg).structured else []
        else:
            pinned = None
            cands = [(lay, c, registry.of(c).site_args(c, s, layer))
                     for lay, c in candidate_configs(s, budget, methods, layer)]
            cands = [x for x in cands if causal.unsupported(registry.of(x[1]), x[2]) is None]
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
            pipeline.observe(model, detected, plans, routing, batches, callback)
    finally:
        bar.close()
    short = [f"{sid} on {rec.batches} of {len(batches)}" for sid, rec in records.items()
             if 0 < rec.batches < len(batches)]
    if short:  # batches of one shape (as_batches) that still called a site otherwise (a mask, a branch)
        warnings.warn(f"vmonarch_opt: calibration measured {'; '.join(short)} batches: the other batches called "
                      f"these sites in a way their plan does not run (another shape, mask or dtype, or not at all), "
                      f"so their choices rest on the batches measured (the profile's per-site 'batches')",
                      RuntimeWarning, stacklevel=2)

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
            if rec.failed_json():
                row["failed_candidates"] = rec.failed_json()
            if not rec.cands:
                refused = structured_refusals(s, registry.check_methods(methods))
                if refused:
                    row["not_applicable"] = refused
            if rec.batches == 0:
                row.update(status="not observed",
                           reason="the calibration batch never reached this site with the calibrated shape; left dense")
            elif rec.pinned is not None:
                row["status"] = "pinned"
            else:
                row["status"] = "calibrated"
        rows[s.site_id] = row

    choose_calibrated(rows, budget)
    for sid, row in rows.items():
        if row["status"] == "pinned":
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


def _config_from_plan(p):
    return registry.get(p.method).config_from_args(p.args)


def _device_name(batches) -> str:
    from ..batch import batch_device

    dev = batch_device(batches)
    if dev is None:
        return "cpu"
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def calibrate(model: torch.nn.Module, calib_batch: Any, *, budget: Optional[Budget] = None, methods=None,
              grid=None, overrides: Optional[dict] = None, min_seq_len: int = 1024, capture: str = "auto",
              progress: Optional[bool] = None, evaluate: Optional[Callable] = None) -> Profile:
    """Calibrate ``model`` on ``calib_batch`` (one batch, or a list of batch dicts such as several
    diffusion timesteps) and return the :class:`Profile` of per-site choices under ``budget``
    (default ``Budget()``). The model is left as it was. ``progress``: tqdm bar (default: when
    stderr is a terminal). ``evaluate``: what an output budget is measured on (see ``optimize``)."""
    from ..batch import as_batches, check_finite
    from ..passes.grid import check_grid_spec
    from ..planner import check_min_seq_len, check_overrides
    from .output_budget import check_evaluate

    if budget is None:
        budget = Budget()
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a vmonarch_opt.Budget, got {type(budget).__name__}")
    methods = registry.check_methods(methods)
    check_evaluate(evaluate, None, budget)
    check_grid_spec(grid)
    check_overrides(overrides)
    min_seq_len = check_min_seq_len(min_seq_len)
    if getattr(model, "vmonarch", None) is not None:
        raise VMonarchError("this model is already optimized; calibrate the original model")
    batches = as_batches(calib_batch)
    check_finite(batches)
    choose = dict(methods=methods, overrides=overrides, min_seq_len=min_seq_len)
    from ..parallel.session import Session
    session = Session.start(model, inplace=True, who="calibrate()")  # context parallel: ranks agree
    with _progress(progress):
        analysis = pipeline.analyse(model, batches, grid=grid, capture=capture)
        for note in pipeline.analysis_notes(analysis, type(model).__name__).values():
            warnings.warn(f"vmonarch_opt: {note}", RuntimeWarning, stacklevel=2)
        plans, routing = pipeline.plan(model, analysis, batches[0], **choose)
        plans = session.restrict(analysis.sites, plans)
        profile = calibrate_sites(model, batches, analysis.detected, plans, routing, methods=methods, budget=budget,
                                  overrides=overrides)
        profile = session.agree_profile(profile, budget)
        if budget.output_rel_error is not None:
            from .output_budget import allocate_by_output
            allocate_by_output(model, analysis.detected, plans, routing, batches, profile, budget, evaluate)
    profile.data["min_seq_len"] = min_seq_len
    return profile
