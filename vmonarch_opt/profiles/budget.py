"""``Budget``: the quality budget calibration chooses under, and which candidates it measures."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

COSTS = ("flops", "time")
LAYOUTS = ("frame", "frame_group", "tile", "1d")


@dataclass(frozen=True)
class Budget:
    """How much attention error calibration may spend per site, and what it tries.

    Args:
        max_rel_error: per-site cap on the relative output error ``‖ours − dense‖ / ‖dense‖`` of
            the attention, measured on the calibration batches (the worst batch counts).
        per_site: ``{site_glob: max_rel_error}`` caps for matching sites (first match wins),
            e.g. ``{"blocks.0.*": 0.01}`` to protect the first block.
        mean_rel_error: optional global error/speed trade-off: the FLOP-weighted mean error over
            the calibrated sites may not exceed it. Calibration then spends error where it buys
            the most cost (Lagrangian allocation), each site still capped by ``max_rel_error`` /
            ``per_site``.
        output_rel_error: optional budget on the *model's* output instead: the relative error of
            the model output on the calibration batches, with every site's choice in place, may not
            exceed it. Each candidate within ``max_rel_error`` is also run in the model alone (one
            forward per candidate and batch), and the allocation spends output error where it buys
            the most cost, then checks the combination with a forward (``output_budget.py``).
            With ``optimize(..., evaluate=fn)`` the output is ``fn(model)`` instead (e.g. your
            sampler on a few fixed seeds: the budget then holds on sampled videos).
            Pair it with a loose ``max_rel_error`` (e.g. 0.5) so that candidates reach it.
        cost: what "cheapest" means: ``"flops"`` (attention FLOPs, default) or ``"time"``
            (measured kernel time, with every kernel tuned first: slower calibration on a cold
            machine; falls back to FLOPs where no time is measured, e.g. on CPU). With
            ``"flops"`` the times in the profile are of untuned launches (one default tile config).
        monarch_steps: Monarch alternating steps tried for every layout (2+ use recomputation).
        layouts: Monarch layouts tried: ``"frame"`` (1, H, W) blocks (VMonarch), ``"frame_group"``
            (2, H, W), ``"tile"`` (1, ⌈H/2⌉, ⌈W/2⌉) spatial tiles, ``"1d"`` (~√N tokens, used when
            the grid is unknown).
        vmoba_thresholds: VMoBA thresholds tried with the group rule (``selection="group"``).
        vmoba_topk: VMoBA global top-k selections tried (group rule), as fractions of the key
            blocks kept per query group on average (0.125: 8 of 64 blocks).
        vmoba_token_thresholds: VMoBA thresholds tried with the paper's per-token rule
            (``selection="token"``, ``scope="query_head"``; default: the paper's 0.25); a
            threshold keeps far more under it (0.25: ~13 % of the pairs on our benchmark inputs,
            ~2 % under the group rule). Its top-k is not tried: at a given fraction it keeps the
            group top-k's density. ``()``: the group rule alone.
        vmoba_pooled: for each threshold, VMoBA is tried with these ``pooled_rest`` settings
            (``True``: the unselected blocks stay in the softmax as one pooled key each).
        candidates: replaces the automatic candidate list: a list of configs, or
            ``f(site) -> list of configs`` (``MonarchConfig`` / ``VMoBAConfig``).
        sample_rows: query rows per head sampled for the block-concentration statistics.
        top_fraction: block concentration = attention mass in the top ``top_fraction`` of key
            blocks (0.1: the top 10 %).
    """

    max_rel_error: float = 0.05
    per_site: Optional[dict] = None
    mean_rel_error: Optional[float] = None
    output_rel_error: Optional[float] = None
    cost: str = "flops"
    monarch_steps: tuple = (1, 2)
    layouts: tuple = LAYOUTS
    vmoba_thresholds: tuple = (0.25, 0.5, 0.75)
    vmoba_topk: tuple = (0.125,)
    vmoba_token_thresholds: tuple = (0.25,)
    vmoba_pooled: tuple = (False, True)
    candidates: Union[None, list, tuple, Callable] = field(default=None, compare=False)
    sample_rows: int = 128
    top_fraction: float = 0.1

    def __post_init__(self):
        def err(v, name):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Budget({name}={v!r}): give a relative error ≥ 0, e.g. 0.05 for 5 %")

        err(self.max_rel_error, "max_rel_error")
        if self.mean_rel_error is not None:
            err(self.mean_rel_error, "mean_rel_error")
        if self.output_rel_error is not None:
            err(self.output_rel_error, "output_rel_error")
            if self.mean_rel_error is not None:
                raise ValueError("Budget: give mean_rel_error (attention error, averaged over sites) or "
                                 "output_rel_error (the model's output error), not both")
        for pat, v in (self.per_site or {}).items():
            if not isinstance(pat, str):
                raise ValueError(f"Budget(per_site=...): keys are site globs like 'blocks.0.*', got {pat!r}")
            err(v, f"per_site[{pat!r}]")
        if self.cost not in COSTS:
            raise ValueError(f"Budget(cost={self.cost!r}): use one of {COSTS}")
        bad = [x for x in self.layouts if x not in LAYOUTS]
        if bad:
            raise ValueError(f"Budget(layouts=...): unknown {bad}; choose from {LAYOUTS}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.monarch_steps):
            raise ValueError(f"Budget(monarch_steps={self.monarch_steps!r}): positive ints, e.g. (1, 2)")
        if any(not (0 < float(t) <= 1) for t in self.vmoba_thresholds):
            raise ValueError(f"Budget(vmoba_thresholds={self.vmoba_thresholds!r}): numbers in (0, 1]")
        if not (0 < self.top_fraction <= 1):
            raise ValueError(f"Budget(top_fraction={self.top_fraction!r}): a fraction in (0, 1]")
        if self.sample_rows < 1:
            raise ValueError(f"Budget(sample_rows={self.sample_rows!r}): at least 1")
        object.__setattr__(self, "monarch_steps", tuple(self.monarch_steps))
        object.__setattr__(self, "layouts", tuple(self.layouts))
        object.__setattr__(self, "vmoba_thresholds", tuple(float(t) for t in self.vmoba_thresholds))
        if any(isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= 1)
               for t in self.vmoba_token_thresholds):
            raise ValueError(f"Budget(vmoba_token_thresholds={self.vmoba_token_thresholds!r}): numbers in (0, 1], "
                             f"e.g. (0.25,); () tries the group rule alone")
        object.__setattr__(self, "vmoba_token_thresholds", tuple(float(t) for t in self.vmoba_token_thresholds))
        if any(isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f < 1) for f in self.vmoba_topk):
            raise ValueError(f"Budget(vmoba_topk={self.vmoba_topk!r}): fractions of the key blocks in (0, 1), "
                             f"e.g. (0.125,)")
        object.__setattr__(self, "vmoba_topk", tuple(float(f) for f in self.vmoba_topk))
        if not self.vmoba_pooled or any(not isinstance(x, bool) for x in self.vmoba_pooled):
            raise ValueError(f"Budget(vmoba_pooled={self.vmoba_pooled!r}): a non-empty tuple of bools, "
                             f"e.g. (False, True)")
        object.__setattr__(self, "vmoba_pooled", tuple(self.vmoba_pooled))

    def limit_for(self, site_id: str) -> float:
        """The error cap of one site."""
        for pat, v in (self.per_site or {}).items():
            if fnmatch.fnmatchcase(site_id, pat):
                return float(v)
        return float(self.max_rel_error)

    def to_dict(self) -> dict:
        d = asdict(self)
        c = self.candidates
        d["candidates"] = None if c is None else (getattr(c, "__name__", "callable") if callable(c)
                                                  else [config_to_dict(x) for x in c])
        d["monarch_steps"], d["layouts"] = list(self.monarch_steps), list(self.layouts)
        d["vmoba_thresholds"] = list(self.vmoba_thresholds)
        d["vmoba_topk"] = list(self.vmoba_topk)
        d["vmoba_token_thresholds"] = list(self.vmoba_token_thresholds)
        d["vmoba_pooled"] = list(self.vmoba_pooled)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Budget":
        d = dict(d)
        c = d.pop("candidates", None)
        cands = [config_from_dict(x) for x in c] if isinstance(c, list) else None
        for k in ("monarch_steps", "layouts", "vmoba_thresholds", "vmoba_topk", "vmoba_token_thresholds",
                  "vmoba_pooled"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d, candidates=cands)


def config_to_dict(cfg) -> dict:
    """A config (or method name) as JSON: ``{"method": ..., **fields}``."""
    from .. import methods as registry

    return registry.config_to_dict(cfg)


def config_from_dict(d: dict):
    from .. import methods as registry

    return registry.config_from_dict(d)


def describe_config(cfg) -> str:
    """Short human label: ``monarch 1×30×52 s1``, ``vmoba 3d thr0.25``, ``dense``."""
    from .. import methods as registry

    return registry.describe(cfg)
