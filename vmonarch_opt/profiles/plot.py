"""``Profile.plot``: per-layer entropy, block concentration, calibrated error and FLOP cut."""
from __future__ import annotations

from pathlib import Path


def _series(profile, key):
    xs, mean, lo, hi = [], [], [], []
    for i, r in enumerate(_rows(profile)):
        v = (r.get("stats") or {}).get(key)
        if v:
            m = sum(v) / len(v)
            xs.append(i)
            mean.append(m)
            lo.append(m - min(v))
            hi.append(max(v) - m)
    return xs, mean, lo, hi


def _rows(profile):
    return [r for r in profile.sites.values() if r["status"] in ("calibrated", "pinned")]


def check_image_path(path) -> Path:
    """``path`` as an image file matplotlib can write (its suffix names the format), or a ValueError
    naming the formats (before a plot is drawn, and never written under another name)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    kinds = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in kinds:
        what = (f"{path.suffix!r} is not an image format matplotlib writes" if path.suffix else
                "no suffix to say the image format")
        more = ", ".join("." + k for k in sorted(kinds) if k not in ("png", "pdf", "svg"))
        raise ValueError(f"{path}: {what}; use .png, .pdf or .svg (or {more})")
    return path


def _method(row) -> str:
    return (row.get("choice") or {}).get("config", {}).get("method", "")


def plot_profile(profile, path, *, title=None, dpi: int = 120) -> Path:
    """Four panels, one point per calibrated site in model order; error bars span the heads."""
    path = check_image_path(path)
    fig = _figure(profile, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _figure(profile, title=None):
    # A bare Figure renders with the Agg canvas and never touches pyplot's global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from .. import methods as registry

    rows = _rows(profile)
    labels = [r["site"]["site_id"] for r in rows]
    # one colour per registered method, the same in the error and FLOP-cut panels
    colour = {name: f"C{i}" for i, name in enumerate(registry.names())}
    fig = Figure(figsize=(max(6.0, 0.35 * len(rows) + 3), 10))
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 1, sharex=True)
    ax = axes[0]
    xs, m, lo, hi = _series(profile, "entropy_norm")
    ax.errorbar(xs, m, yerr=[lo, hi], fmt="o-", ms=3, capsize=2)
    ax.set_ylabel("entropy / log N")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or f"calibration profile — {profile.model.rsplit('.', 1)[-1]}")
    ax = axes[1]
    xs, m, lo, hi = _series(profile, "concentration")
    top = next((r["stats"].get("top_fraction") for r in rows if r.get("stats", {}).get("top_fraction")), 0.1)
    ax.errorbar(xs, m, yerr=[lo, hi], fmt="o-", ms=3, capsize=2, label=f"mass in top {top:.0%} key blocks")
    xs2, m2, _, _ = _series(profile, "own_frame_mass")
    if xs2:
        ax.plot(xs2, m2, "s--", ms=3, label="mass in own frame")
    ax.axhline(top, color="gray", lw=0.8, ls=":", label="uniform attention")
    ax.set_ylabel("attention mass")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="best")
    ax = axes[2]
    structured = [name for name in registry.names() if registry.get(name).structured]
    for method, marker in zip(structured, "^vsDP*"):
        pts = [(i, min(c["error"] for c in r["candidates"] if c["config"]["method"] == method))
               for i, r in enumerate(rows) if any(c["config"]["method"] == method for c in r["candidates"])]
        if pts:
            ax.semilogy([p[0] for p in pts], [max(p[1], 1e-8) for p in pts], marker, ls="none", alpha=0.6,
                        color=colour[method], label=f"best {method}")
    ch = [(i, r["choice"]["error"]) for i, r in enumerate(rows) if r.get("choice") and r["choice"]["error"] > 0]
    if ch:
        ax.semilogy([p[0] for p in ch], [p[1] for p in ch], "ko", ms=4, label="chosen")
    lim = [(i, r["limit"]) for i, r in enumerate(rows) if r.get("limit") is not None]
    if lim:
        ax.step([p[0] for p in lim], [p[1] for p in lim], where="mid", color="r", lw=1, label="budget")
    ax.set_ylabel("rel. error vs dense")
    ax.legend(fontsize=7, loc="best")
    ax = axes[3]
    # bars rise from 1× (no cut: dense) so that their heights compare; a 1× bar is its edge line
    cuts = [r["dense"]["flops"] / r["choice"]["flops"] if r.get("choice") and r["choice"].get("flops") else 1.0
            for r in rows]
    chosen = [_method(r) for r in rows]
    ax.bar(range(len(rows)), [c - 1.0 for c in cuts], bottom=1.0, color=[colour.get(c, "k") for c in chosen],
           edgecolor=[colour.get(c, "k") for c in chosen], linewidth=1.5)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("attention FLOP cut\n(× fewer than dense, from 1×)")
    log = bool(cuts) and max(cuts) > 20
    ax.set_yscale("log" if log else "linear")
    ax.set_ylim(1.0, max(cuts + [1.0]) * (1.5 if log else 1.1) if max(cuts + [1.0]) > 1 else 2.0)
    present = [name for name in colour if name in chosen] + [c for c in dict.fromkeys(chosen) if c not in colour]
    ax.legend(handles=[Patch(color=colour.get(name, "k"), label=name or "?") for name in present],
              title="chosen method", fontsize=7, title_fontsize=7, loc="best")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig
