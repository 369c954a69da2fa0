"""Context parallelism: an optimized Wan2.1-14B 720p forward under diffusers' Ulysses on P GPUs.

    OUT=out python benchmarks/context_parallel.py                 # GPU: P = 1, 2, 4 (as the GPUs allow)
    python benchmarks/context_parallel.py --degrees 2,4 --baseline out1/context_parallel.json
    python benchmarks/context_parallel.py --layers 10               # 10 of the 40 blocks
    python benchmarks/context_parallel.py --smoke --no-append       # CPU: 2 gloo processes, a tiny Wan

On the lent GPUs (diffusers travels as a wheel: carry=[".whl"], as for ``end_to_end.py``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 \\
        benchmarks/context_parallel.py --no-append

With fewer than 2 GPUs it says so and exits 0. A full run (40 blocks, P = 1, 2, 4) takes several
minutes per degree on H200s, most of it P = 1 and Dynamo's capture in ``optimize``: within a
10-minute limit per command, run ``--degrees 1`` and ``--degrees 2,4 --baseline <first JSON>``
separately, or fewer ``--layers`` (the scaling is per block). For each degree P (``--degrees``, default 1, 2, 4;
those above the GPU count are skipped) P processes (NCCL, one GPU each) build
``WanTransformer3DModel`` with the Wan2.1-T2V-14B config (40 blocks, 40 heads × 128, bf16, random
weights, same seed on every rank), 720p / 81 frames: latent 16×21×90×160, 1×2×2 patches →
21×45×80 = 75600 tokens, 512 text tokens (cross-attention, not split). With P > 1 each rank calls
``model.enable_parallelism(ContextParallelConfig(ulysses_degree=P))``; then:

1. **dense**: diffusers' own attention (SDPA) under Ulysses — the baseline;
2. per ``--methods`` entry: ``vmonarch_opt.optimize(model, batch, inplace=True, methods=(m,),
   budget=None, validate=False)`` — optimize after enabling parallelism, so each rank analyses its
   ``40 / P`` heads — then the optimized forward; ``vmonarch_opt.restore`` before the next.

Each time is the median of ``--runs`` forwards after ``--warmup``, every forward between barriers;
a step's time is the slowest rank's. Scaling efficiency = t(1 GPU) / (P · t(P GPUs)) of the same
attention. ``sites ran ours`` checks, per rank, that every rewritten site ran our kernel on every
call (``vmonarch_opt.stats``). Writes ``$OUT/context_parallel.json`` and
``$OUT/context_parallel_section.md`` and appends the table to BENCHMARKS.md (unless ``--no-append``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks

WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)
LATENT_720P = (21, 90, 160)  # latent frames × height × width: 720p / 81 frames
TINY = dict(frames=4, height=4, width=5, heads=2)  # the smoke run: 80 tokens, 1 head per rank at P = 2


def wan_14b(layers: int, device, seed: int = 0):
    """Wan2.1-T2V-14B architecture (``layers`` of its 40 blocks), random bf16 weights made on
    ``device``, and a 720p / 81-frame batch."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            m = WanTransformer3DModel(**{**WAN14B, "num_layers": layers})
    finally:
        torch.set_default_dtype(previous)
    m = m.to(device=device, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(seed + 1)
    t, h, w = LATENT_720P
    b = dict(hidden_states=torch.randn(1, 16, t, h, w, generator=g), timestep=torch.tensor([500]),
             encoder_hidden_states=torch.randn(1, 512, 4096, generator=g), return_dict=False)
    return m, {k: (v.to(device, torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
                   (v.to(device) if torch.is_tensor(v) else v)) for k, v in b.items()}


def _timed(model, batch, runs: int, warmup: int, cuda: bool) -> tuple:
    """(median ms of one forward over ``runs`` after ``warmup``, the last output), each forward
    between barriers so that every rank times the same step."""
    import torch.distributed as dist

    times, out = [], None
    with torch.no_grad():
        for i in range(warmup + runs):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(**batch)[0]
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def measure(rank: int, world: int, cfg: dict) -> dict:
    """One rank of a degree-``world`` run (world 1: one device, no parallelism): dense, then each
    method, as the module docstring says. Returns this rank's times, checks and errors."""
    warnings.simplefilter("ignore")
    import vmonarch_opt
    from diffusers import ContextParallelConfig
    from vmonarch_fixtures import models
    from vmonarch_fixtures.distributed import enable_context_parallel

    smoke = cfg["smoke"]
    cuda = not smoke
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model, batch = models.wan(**TINY) if smoke else wan_14b(cfg["layers"], dev)
    if world > 1:
        enable_context_parallel(model, ContextParallelConfig(ulysses_degree=world))  # diffusers 0.42 bugs worked around
    res = {"rank": rank, "world": world, "runs": {}}
    dense_ms, dense_out = _timed(model, batch, cfg["runs"], cfg["warmup"], cuda)
    res["runs"]["dense"] = {"ms": dense_ms}
    for method in cfg["methods"]:
        try:
            t0 = time.perf_counter()
            vmonarch_opt.optimize(model, batch, inplace=True, methods=(method,), budget=None, validate=False,
                                  **({"min_seq_len": 0} if smoke else {}))
            opt_s = time.perf_counter() - t0
            ms, out = _timed(model, batch, cfg["runs"], cfg["warmup"], cuda)
            stats = vmonarch_opt.stats(model)
            calls = cfg["runs"] + cfg["warmup"]
            rep = model.report.totals
            res["runs"][method] = {
                "ms": ms, "optimize_s": opt_s,
                "flop_cut": 1 - rep["flops_after"] / rep["flops_before"],
                "rel_error_vs_dense": float((out.double() - dense_out.double()).norm() / dense_out.double().norm()),
                "sites": len(stats), "sites_ran_ours": sum(1 for c in stats.values()
                                                           if c["ran"] == calls and not c["fell_back"])}
        except Exception as e:  # noqa: BLE001  reported in the table; the other methods still run
            res["runs"][method] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            vmonarch_opt.restore(model)
    return res


def summarize(by_degree: dict, baseline: dict | None = None) -> tuple[list, list]:
    """Per degree and attention: the step time (slowest rank), speed-up over dense at that degree
    and scaling efficiency vs one GPU. ``by_degree``: ``{P: [measure() of each rank]}``;
    ``baseline``: ``{attention: one-GPU ms}`` from an earlier run (degree 1 here takes precedence)."""
    results, rows = [], []
    base = dict(baseline or {})
    for P in sorted(by_degree):
        ranks = by_degree[P]
        names = list(ranks[0]["runs"])
        step = {}
        for name in names:
            got = [r["runs"][name] for r in ranks]
            err = next((g["error"] for g in got if "error" in g), None)
            if err:
                results.append(dict(degree=P, attention=name, error=err))
                rows.append([P, name, f"FAILED: {err[:80]}", "", "", "", "", ""])
                continue
            step[name] = max(g["ms"] for g in got)
            if P == 1:
                base[name] = step[name]
            eff = base[name] / (P * step[name]) if name in base else None
            first = got[0]
            speed = step["dense"] / step[name] if "dense" in step else None
            ran = (f"{min(g['sites_ran_ours'] for g in got)}/{first['sites']}" if "sites" in first else "—")
            res = dict(degree=P, attention=name, step_ms=step[name], speedup_vs_dense=speed, scaling_efficiency=eff,
                       per_rank_ms=[g["ms"] for g in got])
            for key in ("optimize_s", "flop_cut", "rel_error_vs_dense", "sites", "sites_ran_ours"):
                if key in first:
                    res[key] = first[key] if key != "optimize_s" else max(g[key] for g in got)
            results.append(res)
            rows.append([P, name, f"{step[name]:.1f}", "1.00×" if name == "dense" else f"{speed:.2f}×",
                         "—" if eff is None else f"{100 * eff:.0f}%",
                         f"{100 * res['flop_cut']:.1f}%" if "flop_cut" in res else "—",
                         f"{res['rel_error_vs_dense']:.3f}" if "rel_error_vs_dense" in res else "—", ran])
    return results, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--degrees", default="1,2,4", help="comma-separated context-parallel degrees (1 = one GPU)")
    ap.add_argument("--methods", default="monarch", help="comma-separated methods pinned on every eligible site")
    ap.add_argument("--layers", type=int, default=40, help="Wan-14B blocks built (40 = the full model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="collective timeout of the process groups (s)")
    ap.add_argument("--baseline", help="context_parallel.json of an earlier run whose degree-1 times give t(1 GPU) "
                                       "(run --degrees 1 and --degrees 2,4 as two calls within a time limit)")
    ap.add_argument("--smoke", action="store_true", help="CPU: degrees 1 and 2 as gloo processes, a tiny Wan")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    from vmonarch_fixtures.distributed import run_ranks

    degrees = sorted({int(d) for d in args.degrees.split(",") if d.strip()})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg = dict(smoke=args.smoke, layers=args.layers, methods=methods, runs=args.runs, warmup=args.warmup)
    if args.smoke:
        cfg.update(runs=1, warmup=0)
        degrees = [1, 2]
        devname, backend = "cpu (gloo, smoke run)", "gloo"
    else:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < 2:
            print(f"[cp] context parallelism needs at least 2 GPUs; found {n}: nothing to measure", flush=True)
            return 0
        skipped = [d for d in degrees if d > n]
        degrees = [d for d in degrees if d <= n]
        if skipped:
            print(f"[cp] degrees {skipped} skipped: {n} GPUs", flush=True)
        devname, backend = f"{n}× {torch.cuda.get_device_name(0)}", "nccl"
    print(f"[cp] {devname}, torch {torch.__version__}, degrees {degrees}, methods {methods}", flush=True)
    by_degree = {}
    for P in degrees:
        t0 = time.perf_counter()
        by_degree[P] = run_ranks(measure, P, cfg, timeout=args.timeout, deadline=args.timeout * 4,
                                 threads=1 if args.smoke else 4, backend=backend)
        print(f"[cp] P={P}: {time.perf_counter() - t0:.0f} s; " + ", ".join(
            f"{k} {v.get('ms', float('nan')):.1f} ms" for k, v in by_degree[P][0]["runs"].items()), flush=True)
    baseline = None
    if args.baseline:
        import json

        old = json.loads(Path(args.baseline).read_text())
        baseline = {r["attention"]: r["step_ms"] for r in old["results"] if r.get("degree") == 1 and "step_ms" in r}
    results, rows = summarize(by_degree, baseline)

    from tabulate import tabulate

    from benchmarks.publish import command_line, now, publish

    headers = ["GPUs (Ulysses degree)", "attention", "ms per step (slowest rank)", "speed-up vs dense",
               "scaling efficiency vs 1 GPU", "attn-FLOP cut", "output rel. err vs dense", "sites ran ours"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    what = ("a tiny random Wan (smoke run)" if args.smoke else
            f"Wan2.1-T2V-14B config ({args.layers} of 40 blocks), 720p/81f = 21×45×80 = 75600 tokens, bf16, "
            f"random weights")
    cmd, when = command_line(), now()
    section = (f"## Context parallelism: dense vs optimized under diffusers' Ulysses ({when})\n\n"
               f"Device: {devname}, torch {torch.__version__}. Command: `{cmd}`. Model: {what}; one transformer "
               f"forward per step, median of {cfg['runs']} after {cfg['warmup']} warm-up. Optimized after "
               f"`enable_parallelism` (`inplace=True`, `budget=None`). Scaling efficiency = t(1 GPU) / (P · t(P)).\n\n"
               f"{table}\n")
    publish("context_parallel", section, dict(device=devname, command=cmd, date=when, config=cfg, results=results),
            append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
