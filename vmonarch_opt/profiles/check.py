"""Re-validating a profile on load: a file edited by hand must still hold together.

``profile_problems(data)`` lists what no calibration could have written: a status without its
choice, a config that lacks parameters or has values its method refuses at the site
(``Method.check_config``: a Monarch block larger than the grid, …), FLOPs that are not those of
the plan (recomputed from the config at the site's shape, never taken from the file), a
calibrated choice that is no cheaper than dense or is not one of the measured candidates, an
error budget or "within budget" flag that does not follow from the budget, and a "why" that is
not the one calibration writes for the choice. ``profile.Profile.check`` raises ``ProfileError``
with the list.
"""
from __future__ import annotations

from typing import Optional

from .. import methods as registry
from ..methods import Shape
from ..site import AttentionSite
from .allocation import _choice_entry
from .budget import Budget
from .output_budget import output_why

__all__ = ["STATUSES", "profile_problems"]

STATUSES = ("calibrated", "pinned", "original", "not observed")
SHAPE_KEYS = ("kind", "heads", "seq_q", "seq_k", "head_dim", "grid", "text_before", "text_after", "causal_chunk",
              "cached_frames")
#: shape keys that profiles written before they existed lack: read as their value then
_SHAPE_DEFAULTS = {"causal_chunk": 0, "cached_frames": 0}


def shape_value(d: dict, key: str):
    """A site's shape entry ``key`` in a saved profile (its default where an older profile lacks it)."""
    return d.get(key, _SHAPE_DEFAULTS.get(key))


def _norm(x):
    return list(x) if isinstance(x, tuple) else x


def profile_problems(data: dict) -> list[str]:
    """Everything that does not hold together in a profile's data (empty: it does)."""
    problems: list[str] = []
    budget = None
    try:
        budget = Budget.from_dict(data.get("budget") or {})
    except (TypeError, ValueError) as e:
        problems.append(f"budget: {e}")
    fp_sites = {d.get("site_id"): d for d in data["fingerprint"]["sites"] if isinstance(d, dict)}
    for sid, row in data["sites"].items():
        problems += [f"site {sid}: {p}" for p in _row_problems(sid, row, fp_sites.get(sid), budget,
                                                               data.get("output_budget"))]
    return problems


def _entry(entry: dict, site, layer: int, what: str, check: bool = True) -> tuple:
    """``(config, FLOPs of its plan, problems)`` of a choice or candidate record; ``check``: its
    values too (``Method.check_config``; candidates given by ``Budget(candidates=...)`` are
    recorded as given, and run clipped to the grid)."""
    try:
        cfg = registry.config_from_dict(entry["config"], strict=True)
    except (KeyError, TypeError, ValueError) as e:
        return None, None, [f"{what}: {e}"]
    method, label = registry.of(cfg), registry.describe(cfg)
    what = f"{what} {label}"
    out = []
    if entry.get("label") != label:
        out.append(f"{what}: labelled {entry.get('label')!r}, which is not its config")
    bad = method.check_config(cfg, site) if check else None
    if bad is not None:
        return cfg, None, out + [f"{what}: {bad}"]
    try:
        args = method.site_args(cfg, site, layer)
    except (TypeError, ValueError) as e:
        return cfg, None, out + [f"{what}: {e}"]
    flops = method.cost(Shape.of(site), args, entry.get("density"))
    have = entry.get("flops")
    if flops is None:
        out.append(f"{what}: no measured density, so its FLOPs are unknown")
    elif have != flops and not (site.has_mask and isinstance(have, int) and 0 < have <= flops) and not (
            method.measured_flops and isinstance(have, int) and abs(have - flops) <= max(1, flops * 1e-9)):
        # (a measured method's file FLOPs are a mean over batches; from the mean density they round alike)
        # (with a text padding mask, calibration counts what ran: the padded tokens dropped)
        out.append(f"{what}: {have} attention FLOPs in the file, but its plan at this site does {flops}")
    return cfg, flops, out


def _expected_why(row: dict, i: Optional[int], budget: Budget, output_budget: Optional[dict]) -> str:
    why = _choice_entry(row, i, budget)["why"]
    if output_budget:
        why = output_why(row, i, output_budget) or why
    return why


def _row_problems(sid: str, row: dict, fp_site: Optional[dict], budget: Optional[Budget],
                  output_budget: Optional[dict]) -> list[str]:
    status = row.get("status")
    if status not in STATUSES:
        return [f"status {status!r} is not one of {STATUSES}"]
    out = []
    if fp_site is None:
        out.append("not among the sites of the profile's fingerprint")
    else:
        differ = [k for k in SHAPE_KEYS if _norm(shape_value(row["site"], k)) != _norm(shape_value(fp_site, k))]
        if differ:
            out.append(f"its site record differs from the fingerprint in {differ}")
    try:
        site = AttentionSite.from_dict(row["site"])
        dense = Shape.of(site).dense_flops
    except (TypeError, ValueError) as e:
        return out + [f"incomplete site record ({e})"]
    if (row.get("dense") or {}).get("flops") != dense:
        out.append(f"{(row.get('dense') or {}).get('flops')} dense attention FLOPs in the file, but {dense} at "
                   f"its shape")
        return out
    choice = row.get("choice")
    if status == "original":
        if choice is not None:
            out.append(f"left to the model's own attention ({row.get('reason')}) but given a choice")
        return out
    if not isinstance(choice, dict):
        return out + [f"status {status!r} without a choice"]
    layer = row.get("layer") or 0
    cands = row.get("candidates") or []
    cfgs = []
    for c in cands:
        cfg, _, bad = _entry(c, site, layer, "candidate", check=False)
        cfgs.append(cfg)
        out += bad
    cfg, flops, bad = _entry(choice, site, layer, "choice")
    out += bad
    if cfg is None or flops is None:
        return out
    method, label = registry.of(cfg), registry.describe(cfg)
    if status == "not observed":
        if method.structured or choice.get("why") != row.get("reason"):
            out.append(f"not observed by calibration, but its choice is {label} ({choice.get('why')!r})")
        return out
    if status == "pinned":
        if choice.get("why") != "pinned by overrides=":
            out.append(f"pinned by overrides=, but its why says {choice.get('why')!r}")
        return out
    # calibrated: the choice is dense or one of the measured candidates, within the budget, cheaper than dense
    if budget is not None:
        limit = budget.limit_for(sid)
        if row.get("limit") != limit:
            out.append(f"error budget {row.get('limit')} in the file, but the profile's budget gives {limit}")
            return out
        wrong = [c.get("label") for c in cands if c.get("meets_budget") != (c.get("error", 1e300) <= limit)]
        if wrong:
            out.append(f"'within budget' does not follow from the errors and the budget {limit:.2g} for {wrong}")
            return out
    i = None
    if method.structured:
        if flops >= dense:
            out.append(f"choice {label} costs {flops} attention FLOPs, not fewer than dense attention's {dense}; "
                       f"calibration never chooses it")
        hits = [j for j, c in enumerate(cfgs) if c == cfg]
        if not hits:
            return out + [f"choice {label} is not one of the measured candidates, so its error is unknown"]
        i = hits[0]
        c = cands[i]
        if choice.get("error") != c.get("error"):
            out.append(f"choice {label}: error {choice.get('error')} in the file, but {c.get('error')} measured")
        if not c.get("meets_budget"):
            out.append(f"choice {label} is over its error budget ({c.get('error'):.2e} > {row.get('limit')})")
    if budget is not None and not out:
        expected = _expected_why(row, i, budget, output_budget)
        if choice.get("why") != expected:
            out.append(f"its why {choice.get('why')!r} does not match its choice {label} (calibration writes "
                       f"{expected!r})")
    return out
