"""How long does calibration take on a real-size model?

    OUT=out python benchmarks/calibration_time.py             # GPU: Wan2.1-1.3B 480p/81f
    python benchmarks/calibration_time.py --tiny --no-append  # CPU smoke run

Calibrates ``WanTransformer3DModel`` with the Wan2.1-T2V-1.3B config (random weights, bf16, batch 1,
latent 16×21×60×104 → 32760 tokens) with ``vmonarch_opt.calibrate(model, batch)`` under the default
``Budget()``, twice in one process:

* **cold**: the first call of the process: Dynamo capture and every Triton kernel variant compiled
  (and autotuned) on first use — what a user sees the first time on a fresh machine (Triton's
  on-disk cache makes later processes faster);
* **warm**: the same call again: capture, one eager forward, the statistics and every candidate's
  measurement — the cost of calibration itself.

For each: wall seconds, the number of sites and candidates measured, the slowest site, and the
per-candidate measurement time of the first site (where compilation lands). Writes
``$OUT/calibration_time.json`` and appends a table to BENCHMARKS.md (unless ``--no-append``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
import vmonarch_opt  # noqa: E402
from vmonarch_fixtures import models  # noqa: E402
from benchmarks.publish import command_line, now, publish  # noqa: E402


def summarize(profile, wall_s: float) -> dict:
    rows = [r for r in profile.sites.values() if r.get("seconds") is not None]
    site_s = [r["seconds"] for r in rows]
    first = rows[0] if rows else {}
    return dict(wall_s=wall_s, sites=len(rows), candidates=sum(len(r["candidates"]) for r in rows),
                site_s_median=statistics.median(site_s) if site_s else None,
                site_s_max=max(site_s) if site_s else None,
                first_site=first.get("site", {}).get("site_id") if first else None,
                first_site_candidates={c["label"]: c.get("measure_s") for c in first.get("candidates", [])},
                by_method=profile.totals()["by_method"],
                flop_cut=1 - profile.totals()["flops_after"] / max(1, profile.totals()["flops_before"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small random config (CPU smoke run)")
    ap.add_argument("--repeats", type=int, default=2, help="calibrations in one process (1st cold, rest warm)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    devname = torch.cuda.get_device_name(dev) if cuda else "cpu"
    if args.tiny:
        model, batch = models.wan(frames=3, height=6, width=8)
        kw = dict(min_seq_len=0)
    else:
        model, batch = models.wan_1_3b(device=dev)
        kw = {}
    print(f"[calib] {devname}, torch {torch.__version__}, {type(model).__name__} "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    runs = []
    for i in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        prof = vmonarch_opt.calibrate(model, batch, progress=False, **kw)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        s = summarize(prof, wall)
        s["run"] = "cold (first in process)" if i == 0 else "warm"
        runs.append(s)
        print(f"[calib] run {i}: {wall:.1f} s, {s['sites']} sites, {s['candidates']} candidates, "
              f"per site median {s['site_s_median']} s / max {s['site_s_max']} s; chosen {s['by_method']}, "
              f"FLOP cut {100 * s['flop_cut']:.1f}%", flush=True)
        print(f"[calib]   first site {s['first_site']}: {s['first_site_candidates']}", flush=True)
        if i == 0:
            print(prof, flush=True)

    from tabulate import tabulate

    rows = [[r["run"], f"{r['wall_s']:.1f}", r["sites"], r["candidates"], f"{r['site_s_median']:.2f}",
             f"{r['site_s_max']:.2f}", ", ".join(f"{k}: {v}" for k, v in sorted(r["by_method"].items())),
             f"{100 * r['flop_cut']:.1f}%"] for r in runs]
    table = tabulate(rows, headers=["calibration", "wall s", "sites", "candidates", "s/site (median)",
                                    "s/site (max)", "chosen", "attn-FLOP cut"], tablefmt="github",
                     disable_numparse=True)
    cmd, when = command_line(), now()
    what = "small random Wan config (--tiny)" if args.tiny else "Wan2.1-1.3B config, 480p/81f (32760 tokens), bf16"
    section = (f"## Calibration time ({when})\n\nDevice: {devname}, torch {torch.__version__}. Command: `{cmd}`. "
               f"Model: {what}, random weights, batch 1, `vmonarch_opt.calibrate(model, batch)` with the default "
               f"`Budget()`. Cold = first call in the process (Dynamo capture and Triton compilation/autotuning "
               f"included); warm = the same call again.\n\n{table}\n")
    publish("calibration_time", section, dict(device=devname, command=cmd, date=when, runs=runs),
            append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
