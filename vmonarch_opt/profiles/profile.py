"""``Profile``: what calibration measured and chose, as versioned JSON keyed by site (module path).

Layout of the file (``"format": "vmonarch_opt.profile/1"``)::

    fingerprint  model class, its config, a digest of its parameter names and shapes, and every
                 attention site with its shape (heads, N_q, N_k, head_dim, grid, text tokens)
    budget       the Budget used; methods, overrides, number of batches, device, seconds
    sites        {site_id: {site, layer, status, reason, stats, dense, candidates, limit, choice}}

``status`` is "calibrated" (choice made by the budget), "pinned" (``overrides=``), "original"
(the optimizer leaves the model's own attention: cross-attention, masks, short sequences, …) or
"not observed". Each candidate records its config, measured error (worst batch, mean, per head),
FLOPs, VMoBA density and kernel time when measured on a GPU.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

from tabulate import tabulate

from ..errors import ProfileError
from ..io import atomic_write_text
from .budget import config_from_dict
from .check import SHAPE_KEYS as _SHAPE_KEYS
from .check import shape_value
from .check import _norm, profile_problems

__all__ = ["PROFILE_FORMAT", "Profile", "load_profile", "apply_profile", "annotate_plans", "as_profile", "fingerprint"]

PROFILE_FORMAT = "vmonarch_opt.profile/1"
_PREFIX = "vmonarch_opt.profile/"
_RECALIBRATE = ("recalibrate this model (vmonarch_opt.calibrate(model, batch).save(path), or "
                "`vmonarch-opt calibrate`)")


# --------------------------------------------------------------------------------- fingerprint
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    return repr(x)


def _model_config(model) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "items"):
        return None
    return {k: _jsonable(v) for k, v in sorted(cfg.items()) if not str(k).startswith("_")}


def _site_shape(site) -> dict:
    d = site.to_dict() if hasattr(site, "to_dict") else dict(site)
    out = {"site_id": d["site_id"], "batch": d.get("batch"), "dtype": d.get("dtype")}
    out.update({k: d.get(k) for k in _SHAPE_KEYS})
    return out


def fingerprint(model, sites: list) -> dict:
    """Model class, config, parameter-shape digest and the site list with shapes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
    cls = type(model)
    return {"model": f"{cls.__module__}.{cls.__qualname__}", "config": _model_config(model),
            "params": h.hexdigest()[:16], "sites": [_site_shape(s) for s in sites]}


# --------------------------------------------------------------------------------- profile
class Profile:
    """A calibration profile. ``print(profile)`` shows the per-site table; ``save``/``load_profile``
    round-trip it; ``choices()`` gives ``{site_id: config}``; ``plot(path)`` draws it."""

    def __init__(self, data: dict, *, allow_shape_change: bool = False, source: str = "<profile>"):
        _check_structure(data, source)
        self.data = data
        self.allow_shape_change = bool(allow_shape_change)
        self.source = source
        data.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    # -- access -------------------------------------------------------------------------------
    @property
    def sites(self) -> dict:
        return self.data["sites"]

    @property
    def model(self) -> str:
        return self.data["fingerprint"]["model"]

    def site(self, site_id: str) -> dict:
        try:
            return self.sites[site_id]
        except KeyError:
            raise KeyError(f"no site {site_id!r} in this profile; sites: {list(self.sites)}") from None

    def choices(self) -> dict:
        """``{site_id: MonarchConfig | VMoBAConfig | DenseConfig}`` for every site with a choice."""
        return {sid: config_from_dict(r["choice"]["config"]) for sid, r in self.sites.items() if r.get("choice")}

    def error(self, site_id: str) -> Optional[float]:
        ch = self.site(site_id).get("choice")
        return None if ch is None else ch.get("error")

    def totals(self) -> dict:
        before = sum(int(r["dense"]["flops"] or 0) for r in self.sites.values())
        after = sum(int((r["choice"] or {}).get("flops") or r["dense"]["flops"] or 0) for r in self.sites.values())
        counts: dict = {}
        for r in self.sites.values():
            m = (r["choice"] or {}).get("config", {}).get("method", "original") if r.get("choice") else "original"
            counts[m] = counts.get(m, 0) + 1
        return {"sites": len(self.sites), "by_method": counts, "flops_before": before, "flops_after": after,
                "flop_cut": before / after if after else None}

    def check(self) -> "Profile":
        """Raise ``ProfileError`` listing what does not hold together (a file edited by hand: a
        config its method refuses at the site, FLOPs that are not its plan's, a calibrated choice
        that is no cheaper than dense or was never measured, a "why" that is not its choice's)."""

        problems = profile_problems(self.data)
        if problems:
            more = f"\n  - … {len(problems) - 10} more" if len(problems) > 10 else ""
            raise ProfileError(f"{self.source}: the profile does not hold together (edited by hand?):\n  - "
                               + "\n  - ".join(problems[:10]) + more
                               + f"\nUndo the edit, or {_RECALIBRATE}.")
        return self

    # -- I/O ----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.data, indent=1, default=str)

    def save(self, path) -> Path:
        """Write atomically (a crash never leaves a half-written profile)."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path, *, allow_shape_change: bool = False) -> "Profile":
        return load_profile(path, allow_shape_change=allow_shape_change)

    # -- display ------------------------------------------------------------------------------
    def table_rows(self) -> list:
        rows = []
        for sid, r in self.sites.items():
            s, st = r["site"], r.get("stats") or {}
            ch = r.get("choice")
            grid = "×".join(map(str, s["grid"])) if s.get("grid") else "—"
            if s.get("text_before") or s.get("text_after"):
                grid += f" +{s.get('text_before', 0) + s.get('text_after', 0)}t"
            ok = sum(c["meets_budget"] for c in r.get("candidates", []))
            cut = ""
            if ch and ch.get("flops"):
                cut = f"{r['dense']['flops'] / ch['flops']:.1f}×"
            rows.append([
                sid, s["kind"], "×".join(map(str, (s["batch"], s["heads"], s["seq_q"], s["head_dim"]))), grid,
                _mean_spread(st.get("entropy_norm")), _mean_spread(st.get("concentration")),
                _mean_spread(st.get("own_frame_mass")),
                f"{ok}/{len(r.get('candidates', []))}" if r["status"] in ("calibrated", "pinned") else "",
                ch["label"] if ch else "model's own", "" if not ch else f"{ch['error']:.2e}",
                "" if r.get("limit") is None else f"{r['limit']:.2g}", cut,
                ch["why"] if ch else r.get("reason", ""),
            ])
        return rows

    _HEADERS = ["site", "kind", "B×H×N×D", "grid", "entropy/logN", "top-blocks mass", "own-frame mass",
                "ok/cands", "choice", "error", "budget", "FLOP cut", "why"]

    def _footer(self) -> str:
        t = self.totals()
        b = self.data.get("budget") or {}
        by = ", ".join(f"{k}: {v}" for k, v in sorted(t["by_method"].items()))
        cut = f"{t['flop_cut']:.2f}×" if t["flop_cut"] else "?"
        line = (f"{t['sites']} sites ({by}); attention GFLOP {t['flops_before'] / 1e9:.3g} → "
                f"{t['flops_after'] / 1e9:.3g} ({cut} fewer); budget max_rel_error={b.get('max_rel_error')}")
        if b.get("mean_rel_error") is not None:
            line += f", mean_rel_error={b['mean_rel_error']}"
        ob = self.data.get("output_budget")
        if ob:
            on = ob.get("measured_on", "calibration batches")
            line += (f", output_rel_error={ob['target']} (model output error of the choice "
                     f"{ob['measured']:.2e}, {ob['candidates_measured']} candidates run in the model"
                     + ("" if on == "calibration batches" else f"; measured on {on}") + ")")
        line += (f"; {self.data.get('batches', '?')} batch(es) on {self.data.get('device', '?')}, "
                 f"{self.data.get('seconds', '?')} s")
        top = next((r["stats"].get("top_fraction") for r in self.sites.values() if r.get("stats", {}).get("top_fraction")), None)
        if top:
            line += f"\n(top-blocks mass: attention mass in the top {top:.0%} of key blocks, mean ± spread over heads)"
        return line

    def __str__(self) -> str:
        table = tabulate(self.table_rows(), headers=self._HEADERS, tablefmt="simple", disable_numparse=True)
        return f"vmonarch_opt calibration profile — {self.model}\n{table}\n{self._footer()}"

    def __repr__(self) -> str:
        t = self.totals()
        return f"<Profile {self.model}: {t['sites']} sites, {t['by_method']}>"

    def to_markdown(self) -> str:
        table = tabulate(self.table_rows(), headers=self._HEADERS, tablefmt="github", disable_numparse=True)
        return f"### vmonarch_opt calibration profile — {self.model}\n\n{table}\n\n{self._footer()}\n"

    def candidates_table(self, site_id: Optional[str] = None) -> str:
        """Every candidate of every (or one) site: error, FLOPs, density, time, within budget."""
        rows = []
        for sid, r in self.sites.items():
            if site_id is not None and sid != site_id:
                continue
            chosen = (r.get("choice") or {}).get("label")
            for c in r.get("candidates", []):
                rows.append([sid, c["label"], f"{c['error']:.2e}", f"{c['error_mean']:.2e}",
                             "" if c.get("output_error") is None else f"{c['output_error']:.2e}",
                             f"{r['dense']['flops'] / c['flops']:.1f}×" if c["flops"] else "?",
                             "" if c.get("density") is None else f"{c['density']:.3f}",
                             "" if c.get("time_ms") is None else f"{c['time_ms']:.3f}",
                             "yes" if c["meets_budget"] else "no", "◀" if c["label"] == chosen else ""])
        # "model output": the model's output error with only this candidate in place (output budgets)
        return tabulate(rows, headers=["site", "candidate", "error (worst)", "error (mean)", "model output",
                                       "FLOP cut", "density", "ms", "in budget", "chosen"], tablefmt="simple",
                        disable_numparse=True)

    def plot(self, path, **kw) -> Path:
        """Per-layer entropy, block concentration, error and FLOP cut as a PNG/PDF/SVG (matplotlib)."""
        from .plot import plot_profile

        return plot_profile(self, path, **kw)

    def diff(self, other: "Profile") -> str:
        """What differs between two profiles: fingerprint, and per site the choice and its error."""
        lines = []
        fa, fb = self.data["fingerprint"], other.data["fingerprint"]
        for key in ("model", "params"):
            if fa.get(key) != fb.get(key):
                lines.append(f"{key}: {fa.get(key)} ≠ {fb.get(key)}")
        cd = _dict_diff(fa.get("config") or {}, fb.get("config") or {})
        if cd:
            lines.append("config: " + "; ".join(cd))
        rows = []
        for sid in list(self.sites) + [s for s in other.sites if s not in self.sites]:
            a, b = self.sites.get(sid), other.sites.get(sid)
            la = (a.get("choice") or {}).get("label", "model's own") if a else "—"
            lb = (b.get("choice") or {}).get("label", "model's own") if b else "—"
            ea = (a.get("choice") or {}).get("error") if a else None
            eb = (b.get("choice") or {}).get("error") if b else None
            ca = _mean((a or {}).get("stats", {}).get("concentration"))
            cb = _mean((b or {}).get("stats", {}).get("concentration"))
            if la != lb or _differs(ea, eb) or _differs(ca, cb, 0.02):
                rows.append([sid, la, lb, _fmt(ea), _fmt(eb), _fmt(ca, ".3f"), _fmt(cb, ".3f")])
        if rows:
            lines.append(tabulate(rows, headers=["site", "choice A", "choice B", "error A", "error B",
                                                 "top-blocks A", "top-blocks B"], tablefmt="simple",
                                  disable_numparse=True))
        ta, tb = self.totals(), other.totals()
        lines.append(f"FLOP cut: A {ta['flop_cut'] or 0:.2f}× ({ta['by_method']}), "
                     f"B {tb['flop_cut'] or 0:.2f}× ({tb['by_method']})")
        return "\n".join(lines) if len(lines) > 1 or rows else "profiles choose the same configs\n" + lines[-1]


def _mean(xs) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _mean_spread(xs) -> str:
    if not xs:
        return ""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
    return f"{m:.2f}±{sd:.2f}"


def _fmt(x, spec=".2e") -> str:
    return "" if x is None else format(x, spec)


def _differs(a, b, tol=0.0) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    return abs(a - b) > tol * max(1.0, abs(a))


def _dict_diff(a: dict, b: dict, limit: int = 6) -> list:
    keys = sorted(set(a) | set(b))
    out = [f"{k}={a.get(k, '—')!r}→{b.get(k, '—')!r}" for k in keys if a.get(k) != b.get(k)]
    return out[:limit] + ([f"… {len(out) - limit} more"] if len(out) > limit else [])


# --------------------------------------------------------------------------------- loading
def _check_structure(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: not a vmonarch_opt profile (top level is {type(data).__name__}); {_RECALIBRATE}")
    fmt = data.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(_PREFIX):
        raise ProfileError(f"{source}: not a vmonarch_opt profile (format {fmt!r}, expected {PROFILE_FORMAT!r}); "
                           f"pass a file written by Profile.save()")
    if fmt != PROFILE_FORMAT:
        raise ProfileError(f"{source}: profile format {fmt!r} is not the one this version reads ({PROFILE_FORMAT!r}); "
                           f"it was written by another vmonarch_opt version: {_RECALIBRATE}")
    try:
        fp = data["fingerprint"]
        assert isinstance(fp["model"], str) and isinstance(fp["sites"], list)
        assert isinstance(data["sites"], dict)
        for sid, r in data["sites"].items():
            assert isinstance(r["site"], dict) and "dense" in r and "status" in r
            if r.get("choice") is not None:
                config_from_dict(r["choice"]["config"])
    except (KeyError, TypeError, AssertionError, ValueError) as e:
        raise ProfileError(f"{source}: corrupt vmonarch_opt profile ({type(e).__name__}: {e}); the file was "
                           f"edited or damaged: {_RECALIBRATE}") from None


def load_profile(path, *, allow_shape_change: bool = False) -> Profile:
    """Read a profile written by ``Profile.save``. ``allow_shape_change=True`` lets it be applied to
    the same model at other shapes (the choices' layouts are re-derived for the new grid)."""
    p = Path(path)
    if not p.exists():
        raise ProfileError(f"{path}: no such profile file; write one with vmonarch_opt.calibrate(model, batch).save(path)")
    if p.is_dir():
        raise ProfileError(f"{path}: is a directory; give the profile's JSON file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not valid JSON ({e}); the profile is truncated or corrupt: {_RECALIBRATE}") from None
    return Profile(data, allow_shape_change=allow_shape_change, source=str(path)).check()


# --------------------------------------------------------------------------------- applying
def _compare(profile: Profile, sites: list, model) -> tuple[list, list]:
    """(fatal differences, shape differences) between the profile's fingerprint and the model."""
    fp = profile.data["fingerprint"]
    fatal, shape = [], []
    if model is not None:
        cls = type(model)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name != fp["model"]:
            fatal.append(f"model class: profile {fp['model']}, this model {name}")
        else:
            now = fingerprint(model, [])
            if fp.get("params") and now["params"] != fp["params"]:
                fatal.append("parameter names/shapes differ (another architecture or size)")
            cd = _dict_diff(fp.get("config") or {}, now["config"] or {})
            if cd:
                shape.append("model config: " + "; ".join(cd))
    have = {d["site_id"]: d for d in fp["sites"]}
    now_sites = {s.site_id: _site_shape(s) for s in sites}
    missing = [s for s in have if s not in now_sites]
    extra = [s for s in now_sites if s not in have]
    if missing or extra:
        fatal.append(f"attention sites differ: in the profile only {missing[:5]}, in the model only {extra[:5]}")
    for sid, d in now_sites.items():
        if sid in have:
            diffs = [f"{k} {shape_value(have[sid], k)}→{d.get(k)}" for k in _SHAPE_KEYS
                     if _norm(shape_value(have[sid], k)) != _norm(d.get(k))]
            if diffs:
                shape.append(f"{sid}: " + ", ".join(diffs))
    return fatal, shape


def _rederive(choice: dict, site):
    """A choice's config at another shape: named layouts re-derived for the site's grid."""
    from .. import methods as registry

    cfg = config_from_dict(choice["config"])
    return registry.of(cfg).rederive(cfg, choice.get("layout"), site)


def as_profile(profile) -> Profile:
    """A ``Profile`` (checked again: it may have been changed since it was loaded), or a path to one
    (loaded and checked)."""
    if isinstance(profile, Profile):
        return profile.check()
    if isinstance(profile, (str, Path)):
        return load_profile(profile)
    raise TypeError(f"profile must be a vmonarch_opt Profile (load_profile(path)) or a path, got {type(profile).__name__}")


def apply_profile(profile: Profile, sites: list, *, model=None, allow_shape_change: Optional[bool] = None) -> dict:
    """Check ``profile`` against ``model``/``sites`` and return ``{site_id: config}``.

    Raises ``ProfileError`` naming what differs: another model class or architecture or other
    attention sites always; other shapes (sequence length, grid, heads, text tokens, model
    config) unless ``allow_shape_change`` (argument, or ``load_profile(..., allow_shape_change=True)``).
    """
    profile = as_profile(profile)
    allow = profile.allow_shape_change if allow_shape_change is None else bool(allow_shape_change)
    fatal, shape = _compare(profile, sites, model)
    if fatal:
        raise ProfileError(f"profile {profile.source} does not fit this model:\n  - " + "\n  - ".join(fatal)
                           + f"\nThe profile was calibrated for another model: {_RECALIBRATE}.")
    if shape and not allow:
        more = f"\n  - … {len(shape) - 8} more" if len(shape) > 8 else ""
        raise ProfileError(f"profile {profile.source} was calibrated at other shapes:\n  - " + "\n  - ".join(shape[:8])
                           + more + f"\nEither {_RECALIBRATE} at these shapes, or reuse its choices with "
                           f"load_profile(path, allow_shape_change=True) (layouts are re-derived for the new grid; "
                           f"the calibrated errors no longer apply).")
    by_id = {s.site_id: s for s in sites}
    out = {}
    for sid, r in profile.sites.items():
        ch = r.get("choice")
        if ch is None or sid not in by_id:
            continue
        same = all(_norm(shape_value(r["site"], k)) == _norm(getattr(by_id[sid], k)) for k in _SHAPE_KEYS)
        out[sid] = config_from_dict(ch["config"]) if same else _rederive(ch, by_id[sid])
    return out


def annotate_plans(plans: dict, sites: list, profile: Profile) -> dict:
    """The plans with the profile's calibrated error (and measured density, for methods whose cost
    depends on the data) on those it chose, for the report."""
    from .. import methods as registry
    from ..planner import method_flops, structure_note

    by_id = {s.site_id: s for s in sites}
    out = dict(plans)
    for sid, plan in plans.items():
        r = profile.sites.get(sid)
        if r is None or not r.get("choice") or plan.source not in ("profile", "override") or sid not in by_id:
            continue
        ch, site = r["choice"], by_id[sid]
        same = all(_norm(shape_value(r["site"], k)) == _norm(getattr(site, k)) for k in _SHAPE_KEYS)
        if not same:
            out[sid] = plan.replace(reason="chosen by calibration at another shape (allow_shape_change=True); "
                                           "error not calibrated here")
            continue
        if registry.find(plan.method) is registry.find(ch["config"]["method"]):  # the profile's choice runs
            plan = plan.replace(calibrated_error=ch.get("error"))
            if ch.get("density") is not None:
                plan = plan.replace(density=float(ch["density"]))
                f = method_flops(site, plan)
                if f is not None:
                    plan = plan.replace(flops_after=f)
        if plan.source == "profile":
            plan = plan.replace(reason=f"calibrated: {ch['why']}{structure_note(plan.args)}")
        out[sid] = plan
    return out
