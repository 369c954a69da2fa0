"""The optimization report: one row per attention site, totals at the bottom."""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Optional

from tabulate import tabulate

from . import methods as registry
from .io import atomic_write_text
from .plan import ORIGINAL

REPORT_FORMAT = "vmonarch_opt.report/1"

LAUNCH_BOUND_BUSY = 0.5  # measured GPU-busy fraction of a forward below which launches dominate it
WHY_WIDTH = 56  # characters per line of the printed "why" column

def _tokens(s: dict) -> str:
    """N of the shape column: queries, and "→keys" where they differ (a KV cache, cross-attention)."""
    return str(s["seq_q"]) if s["seq_q"] == s["seq_k"] else f"{s['seq_q']}→{s['seq_k']}"


_HEADERS = ["site", "kind", "B×H×N×D", "grid (T×H×W +text)", "method", "params",
            "GFLOP dense→ours", "cut", "error", "ran/fell back", "why"]


def _gflop(x: Optional[int]) -> str:
    return "?" if x is None else f"{x / 1e9:.3g}"


def _params(p: dict) -> str:
    method = registry.find(p["method"])
    return method.params(p.get("args") or {}) if method is not None else ""


def _grid(s: dict) -> str:
    if not s.get("grid"):
        return "—"
    g = "×".join(map(str, s["grid"]))
    t = []
    if s.get("text_before"):
        t.append(f"{s['text_before']} text before")
    if s.get("text_after"):
        t.append(f"{s['text_after']} text after")
    return g + (" +" + ", ".join(t) if t else "")


class Report:
    """What ``optimize`` did. ``str(report)`` is a table; ``to_json``/``to_markdown`` export it."""

    def __init__(self, data: dict):
        self.data = data
        self._runtimes: dict = {}  # site id -> runtime.SiteRuntime of the optimized model (not saved)

    def attach(self, runtimes: dict) -> "Report":
        """Follow the call counters of these site runtimes (``optimize`` does this)."""
        self._runtimes = runtimes
        return self

    def refresh(self) -> "Report":
        """Read the sites' call counters into the report: per row ``calls = {"ran": n,
        "fell_back": {kind: n}, "why": {kind: message}}`` and ``totals["calls"]``. Printing or
        saving the report of an optimized model refreshes it."""
        if not self._runtimes:
            return self
        from .runtime import FALLBACKS, RAN

        ran = fell = 0
        for r in self.rows:
            rt = self._runtimes.get(r["site"]["site_id"])
            if rt is None or not rt.plan.rewritten:
                continue
            calls = rt.calls()
            back = {k: n for k, n in calls.items() if k != RAN and n}
            r["calls"] = {"ran": calls.get(RAN, 0), "fell_back": back,
                          "why": {k: rt.last_fallback.get(k, FALLBACKS.get(k, k)) for k in back}}
            ran += r["calls"]["ran"]
            fell += sum(back.values())
        self.totals["calls"] = {"ran": ran, "fell_back": fell}
        return self

    @classmethod
    def build(cls, model_name: str, sites: list, plans: dict, *, meta: Optional[dict] = None,
              site_errors: Optional[dict] = None, output_error: Optional[float] = None) -> "Report":
        rows = []
        for s in sites:
            p = plans[s.site_id].to_dict()
            err = (site_errors or {}).get(s.site_id, p.get("calibrated_error"))
            rows.append({"site": s.to_dict(), "plan": p, "error": err})
        before = sum(r["plan"]["flops_before"] for r in rows)
        afters = [r["plan"]["flops_after"] for r in rows]
        after = None if any(a is None for a in afters) else sum(afters)  # one unknown: the total is unknown
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["plan"]["method"]] = counts.get(r["plan"]["method"], 0) + 1
        totals = {"sites": len(rows), "by_method": counts, "flops_before": before, "flops_after": after,
                  "flop_cut": (before / after) if after else None, "output_error": output_error}
        data = {"format": REPORT_FORMAT, "model": model_name,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "meta": meta or {}, "rows": rows, "totals": totals}
        return cls(data)

    # -- access ---------------------------------------------------------------------------------
    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    @property
    def totals(self) -> dict:
        return self.data["totals"]

    def site(self, site_id: str) -> dict:
        for r in self.rows:
            if r["site"]["site_id"] == site_id:
                return r
        raise KeyError(f"no site {site_id!r} in the report; sites: {[r['site']['site_id'] for r in self.rows]}")

    def why(self, site_id: str) -> str:
        """The report's "why" text of one site, unwrapped (the printed table wraps it)."""
        return self._why(self.site(site_id))

    @staticmethod
    def _why(r: dict) -> str:
        s, p = r["site"], r["plan"]
        why = p["reason"]
        if s.get("grid_source") and p["method"] != ORIGINAL:
            why += f"; grid from {s['grid_source']}" if s.get("grid") else ""
        calls = r.get("calls")
        if calls and calls["fell_back"]:
            why += "; fell back to the model's own attention: " + "; ".join(
                f"{n}× {calls['why'][k]}" for k, n in calls["fell_back"].items())
        return why

    def table_rows(self) -> list[list[Any]]:
        out = []
        for r in self.rows:
            s, p = r["site"], r["plan"]
            b, a = p["flops_before"], p["flops_after"]
            cut = f"{b / a:.1f}×" if a else "?"
            err = "" if r["error"] is None else f"{r['error']:.2e}"
            method = "dense (model's own)" if p["method"] == ORIGINAL else p["method"]
            calls = r.get("calls")
            runs = "" if not calls else f"{calls['ran']}/{sum(calls['fell_back'].values())}"
            out.append([s["site_id"], s["kind"], "×".join(map(str, (s["batch"], s["heads"], _tokens(s), s["head_dim"]))),
                        _grid(s), method, _params(p), f"{_gflop(b)}→{_gflop(a)}", cut, err, runs, self._why(r)])
        return out

    def _totals_line(self) -> str:
        t = self.totals
        by = ", ".join(f"{k}: {v}" for k, v in sorted(t["by_method"].items()))
        cut = f"{t['flop_cut']:.2f}×" if t["flop_cut"] else "?"
        calls = t.get("calls")
        line = "" if calls is None else (f"calls since optimize(): {calls['ran']} ran our kernels, "
                                         f"{calls['fell_back']} fell back to the model's own attention\n")
        line += (f"{t['sites']} attention sites ({by}); attention GFLOP {_gflop(t['flops_before'])} → "
                 f"{_gflop(t['flops_after'])} ({cut} fewer)")
        if t.get("output_error") is not None:
            line += f"; model output rel. error on the calibration batch {t['output_error']:.2e}"
        fm = t.get("forward_ms")
        if fm:
            line += (f"\none eager forward on the calibration batch: {fm['original']:.3g} ms → "
                     f"{fm['optimized']:.3g} ms (speed-up {fm['original'] / fm['optimized']:.2f}×")
            busy = t.get("forward_gpu_busy") or {}
            if busy.get("original") is not None and busy.get("optimized") is not None:
                line += f"; GPU busy {busy['original']:.0%} → {busy['optimized']:.0%} of the forward"
            line += ")"
            slower = self.slower_note()
            if slower:
                line += f"\n{slower}"
        return line

    def slower_note(self) -> Optional[str]:
        """Why the optimized model is slower than the original and what to do, if its timed
        forward is over 5 % slower (None otherwise, or when nothing was timed). Whether kernel
        launches dominate is said only when measured: ``totals["forward_gpu_busy"]`` (the
        fraction of the optimized forward during which the GPU ran kernels, from
        ``torch.profiler``) below ``LAUNCH_BOUND_BUSY``."""
        fm = self.totals.get("forward_ms")
        if not fm or fm["optimized"] <= 1.05 * fm["original"]:
            return None
        head = (f"the optimized model is slower than the original at this size ({fm['optimized']:.3g} vs "
                f"{fm['original']:.3g} ms per eager forward)")
        busy = (self.totals.get("forward_gpu_busy") or {}).get("optimized")
        launches = ("run it under torch.compile(..., mode=\"reduce-overhead\") (CUDA graphs), or leave short "
                    "sequences dense (optimize(..., min_seq_len=...))")
        kernels = ("calibrate with Budget(cost=\"time\") (every candidate is timed per site and the fastest within "
                   "the error budget kept), or pin another method (methods=... / overrides=...)")
        if busy is None:
            return (f"{head}; whether kernel launches or the kernels themselves dominate was not measured (no "
                    f"GPU profile): if launches, {launches}; if kernels, {kernels}")
        if busy < LAUNCH_BOUND_BUSY:
            return (f"{head}: the GPU was busy only {busy:.0%} of the optimized forward (measured), so kernel "
                    f"launches and host work, not attention FLOPs, dominate. To fix: {launches}")
        return (f"{head}: the GPU was busy {busy:.0%} of the optimized forward (measured), so this is not launch "
                f"overhead — the kernels chosen are slower than the dense attention they replace at these shapes "
                f"(e.g. much of each sequence is text or other tokens attended densely, or little is cut). To "
                f"fix: {kernels}")

    def legend(self) -> str:
        """How the FLOP figures were obtained, per method in the report."""
        parts = ["dense: 4·B·H·N_q·N_k·D"]
        for name in dict.fromkeys(r["plan"]["method"] for r in self.rows):
            m = registry.find(name)
            if m is not None and m.structured:
                parts.append(f"{name}: {m.flops_source}")
        text = "attention FLOPs — " + "; ".join(parts)
        if any(r["plan"]["flops_after"] is None for r in self.rows):
            text += "; '?': not known (data-dependent and not measured: optimize(validate=True) measures it)"
        return text

    def _notes(self) -> str:
        meta = self.data.get("meta") or {}
        return "".join(f"\nnot optimized: {meta[k]['note']}" for k in ("uncaptured", "flex_attention", "unrecognised")
                       if meta.get(k))

    def __str__(self) -> str:
        self.refresh()
        head = f"vmonarch_opt report — {self.data['model']}"
        # the "why" column wraps at a readable width (``why(site_id)`` gives it unwrapped)
        widths = [None] * (len(_HEADERS) - 1) + [WHY_WIDTH]
        table = tabulate(self.table_rows(), headers=_HEADERS, tablefmt="simple", disable_numparse=True,
                         maxcolwidths=widths)
        return f"{head}\n{table}\n{self.legend()}\n{self._totals_line()}{self._notes()}"

    def __repr__(self) -> str:
        return str(self)

    def to_markdown(self) -> str:
        self.refresh()
        table = tabulate(self.table_rows(), headers=_HEADERS, tablefmt="github", disable_numparse=True)
        return (f"### vmonarch_opt report — {self.data['model']}\n\n{table}\n\n{self.legend()}\n\n"
                f"{self._totals_line()}{self._notes()}\n")

    def to_json(self, path=None) -> str:
        self.refresh()
        text = json.dumps(self.data, indent=2, default=str)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def load(cls, path) -> "Report":
        data = json.loads(Path(path).read_text())
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"{path}: not a vmonarch_opt report (format {data.get('format')!r})")
        return cls(data)
