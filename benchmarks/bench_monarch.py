"""Benchmark: Triton Monarch attention vs torch SDPA (FLASH and CUDNN backends), same process.

    python3 benchmarks/bench_monarch.py [--shapes wan13b,wan14b] [--no-append]

For each canonical shape (Wan, CogVideoX, HunyuanVideo sizes; see SHAPES below) it times, on the same bf16 inputs, SDPA with the
FLASH and CUDNN backends and our kernel (T=1 frame blocks unless stated), and reports the median
ms (``triton.testing.do_bench``), speed-ups, the attention-FLOP reduction, the TFLOP/s achieved on
our own FLOP count (``monarch_flops``), a per-phase time split, and the relative error vs dense
attention on (a) random Gaussian inputs and (b) video-structured inputs
(``benchmarks/video_inputs.py``). The "dense" of the error column is SDPA-FLASH in bf16 (its own
error, ~1e-3, is far below the Monarch approximation error). Before timing, the kernel is checked
in bf16 against the fp32 reference at reduced head counts (``check`` rows).

Writes ``$OUT/bench_monarch.json`` (after every shape) and ``$OUT/bench_monarch_section.md`` when OUT
is set, and appends the markdown section to BENCHMARKS.md unless ``--no-append``
(``benchmarks/publish.py``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from tabulate import tabulate
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
from benchmarks.publish import command_line, out_dir, publish  # noqa: E402
from benchmarks.video_inputs import make_video_qkv  # noqa: E402
from vmonarch_opt.kernels.monarch import kernel as mk  # noqa: E402
from vmonarch_opt.kernels.tuning import tuned_configs  # noqa: E402
from vmonarch_opt.kernels.monarch.reference import (dense_attention_flops, monarch_attention_reference,  # noqa: E402
                                                   monarch_flops)

# name: (grid, heads, head_dim, text_before, text_after, block, steps)
SHAPES = {
    "4k": ((16, 16, 16), 12, 128, 0, 0, (1, 16, 16), 1),
    "16k": ((16, 32, 32), 12, 128, 0, 0, (1, 32, 32), 1),
    "wan13b": ((21, 30, 52), 12, 128, 0, 0, (1, 30, 52), 1),
    "wan13b_T2": ((21, 30, 52), 12, 128, 0, 0, (1, 30, 52), 2),
    "wan13b_tiles": ((21, 30, 52), 12, 128, 0, 0, (1, 15, 26), 1),
    "cogvideox5b": ((13, 30, 45), 48, 64, 226, 0, (1, 30, 45), 1),
    "wan14b": ((21, 45, 80), 40, 128, 0, 0, (1, 45, 80), 1),
    "hunyuan720p": ((33, 45, 80), 24, 128, 0, 256, (1, 45, 80), 1),
    # FramePack-I2V section at 544×704: history latents before the video, image + prompt tokens after
    "framepack": ((9, 34, 44), 24, 128, 3762, 825, (1, 34, 44), 1),
}
DEFAULT = ["4k", "16k", "wan13b", "wan13b_T2", "wan13b_tiles", "cogvideox5b", "wan14b", "hunyuan720p"]


def rel(a, b):
    a, b = a.float(), b.float()
    e = ((a - b).norm() / b.norm()).item()
    return e


def bench(fn, budget_ms=1500):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    rep = max(min(budget_ms, 200 * est), 3 * est)
    return triton.testing.do_bench(fn, warmup=max(1.0, min(25.0, 2 * est)), rep=rep, return_mode="median")


def sdpa(backend, q, k, v):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def check_rows():
    """bf16 kernel vs fp32 reference at reduced head counts (layouts of the benchmark)."""
    rows = []
    cases = [("wan13b h2", (21, 30, 52), 2, 128, 0, 0, (1, 30, 52), 1, False),
             ("wan13b h2 T2 rc", (21, 30, 52), 2, 128, 0, 0, (1, 30, 52), 2, True),
             ("tiles h2 T2", (21, 30, 52), 2, 128, 0, 0, (1, 15, 26), 2, False),
             ("cogvx h4 text", (13, 30, 45), 4, 64, 226, 0, (1, 30, 45), 1, False),
             ("odd d80 text", (5, 9, 11), 3, 80, 7, 5, (1, 4, 4), 3, True)]
    for name, grid, heads, D, tb, ta, block, steps, rc in cases:
        for kind in ("random", "video"):
            if kind == "random":
                n = tb + grid[0] * grid[1] * grid[2] + ta
                q, k, v = (torch.randn(1, heads, n, D, device="cuda") for _ in range(3))
            else:
                q, k, v = make_video_qkv(grid=grid, heads=heads, head_dim=D, text_tokens=tb + ta,
                                         text_position="before" if tb else "after", device="cuda", seed=5)
                if tb and ta:  # split the text block around the video
                    q, k, v = (torch.cat([x[:, :, :tb], x[:, :, tb + ta:], x[:, :, tb:tb + ta]], 2)
                               for x in (q, k, v))
            kw = dict(grid=grid, block=block, text_before=tb, text_after=ta, steps=steps, recompute=rc)
            ref = monarch_attention_reference(q, k, v, **kw)
            out16 = mk.monarch_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
            out32 = mk.monarch_attention_triton(q, k, v, **kw)
            rows.append(dict(case=name, inputs=kind, err_bf16=rel(out16, ref), err_fp32=rel(out32, ref),
                             finite=bool(torch.isfinite(out16).all())))
            del ref, out16, out32
    return rows


def run_shape(name, inputs_kind):
    grid, heads, D, tb, ta, block, steps = SHAPES[name]
    n = tb + grid[0] * grid[1] * grid[2] + ta
    if inputs_kind == "random":
        q, k, v = (torch.randn(1, heads, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    else:
        q, k, v = make_video_qkv(grid=grid, heads=heads, head_dim=D, text_tokens=tb + ta,
                                 text_position="before" if tb else "after", dtype=torch.bfloat16,
                                 device="cuda", seed=1)
    kw = dict(grid=grid, block=block, text_before=tb, text_after=ta, steps=steps)
    out = mk.monarch_attention_triton(q, k, v, **kw)       # compiles + picks configs
    dense = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)
    err = rel(out, dense)
    finite = bool(torch.isfinite(out).all())
    return q, k, v, kw, err, finite


def payload(results, checks, dev) -> dict:
    return dict(device=dev, results=results, checks=checks, command=command_line())


def save_partial(results, checks, dev) -> None:
    """The JSON so far (a run cut short by a time limit still brings back its finished shapes)."""
    out = out_dir()
    if out:
        (out / "bench_monarch.json").write_text(json.dumps(payload(results, checks, dev), indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(DEFAULT))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-append", action="store_true", help="do not append the section to BENCHMARKS.md")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    results, checks = [], []
    if not args.no_check:
        checks = check_rows()
        print(tabulate(checks, headers="keys", floatfmt=".2e"), flush=True)
    for name in args.shapes.split(","):
        grid, heads, D, tb, ta, block, steps = SHAPES[name]
        n = tb + grid[0] * grid[1] * grid[2] + ta
        cfg_before = tuned_configs("monarch_r")
        _, _, _, _, err_vid, fin_vid = run_shape(name, "video")
        torch.cuda.empty_cache()
        q, k, v, kw, err_rand, fin_rand = run_shape(name, "random")
        t_flash = bench(lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v))
        try:
            t_cudnn = bench(lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v))
        except RuntimeError as e:  # cuDNN may refuse a shape
            print(f"{name}: cudnn failed: {e}", flush=True)
            t_cudnn = float("nan")
        t_ours = bench(lambda: mk.monarch_attention_triton(q, k, v, **kw))
        _, launches = mk.monarch_phases(q, k, v, **kw)
        phases = {ph: bench(fn, 500) for ph, fn in launches}
        fl_d = dense_attention_flops(1, heads, n, n, D)
        fl_m = monarch_flops(1, heads, n, D, **kw)
        new_cfg = [vv for kk, vv in tuned_configs("monarch_r").items() if kk not in cfg_before]
        r = dict(shape=name, N=n, hxd=f"{heads}x{D}", grid="x".join(map(str, grid)), block="x".join(map(str, block)),
                 text=tb + ta, steps=steps, flash_ms=t_flash, cudnn_ms=t_cudnn, ours_ms=t_ours,
                 vs_flash=t_flash / t_ours, vs_cudnn=t_cudnn / t_ours, flop_cut=fl_d / fl_m,
                 tflops=fl_m / t_ours * 1e-9, err_random=err_rand, err_video=err_vid,
                 finite=fin_rand and fin_vid, phases_ms={kk: round(vv, 4) for kk, vv in phases.items()},
                 r_cfg=" ".join(map(str, new_cfg)) if new_cfg else "(tuned earlier)")
        results.append(r)
        print(json.dumps(r), flush=True)
        save_partial(results, checks, dev)
        del q, k, v
        torch.cuda.empty_cache()
    cols = ["shape", "N", "hxd", "grid", "block", "text", "steps", "flash_ms", "cudnn_ms", "ours_ms", "vs_flash",
            "vs_cudnn", "flop_cut", "tflops", "err_random", "err_video"]
    table = tabulate([[r[c] for c in cols] for r in results], headers=cols, tablefmt="github",
                     floatfmt=("", "", "", "", "", "", "", ".3f", ".3f", ".3f", ".2f", ".2f", ".1f", ".0f", ".3f", ".3f"))
    ph_table = tabulate([[r["shape"], r["ours_ms"], ", ".join(f"{kk} {vv:.3f}" for kk, vv in r["phases_ms"].items()),
                          r["r_cfg"]] for r in results], headers=["shape", "ours_ms", "phases (ms, timed alone)",
                                                                   "R-step configs tuned here (BLOCK_M, BLOCK_N, warps, stages)"], tablefmt="github")
    ck_table = tabulate(checks, headers="keys", tablefmt="github", floatfmt=".2e") if checks else ""
    cmd = command_line()
    md = (f"## Monarch attention (Triton) vs SDPA — {datetime.date.today().isoformat()}, {dev}, "
          f"torch {torch.__version__}, triton {triton.__version__}\n\n"
          f"Command: `{cmd}`. bf16, batch 1, medians of `triton.testing.do_bench`; speed-ups = baseline ms / ours ms; "
          f"flop_cut = dense FLOPs / Monarch FLOPs; tflops on the Monarch FLOP count; err = ||ours - dense|| / ||dense|| "
          f"(dense = SDPA-FLASH bf16) on random and on video-structured inputs (benchmarks/video_inputs.py).\n\n"
          f"{table}\n\nPer-phase split:\n\n{ph_table}\n")
    if ck_table:
        md += f"\nbf16 / fp32 kernel vs fp32 reference (reduced heads):\n\n{ck_table}\n"
    publish("bench_monarch", md, payload(results, checks, dev), append=not args.no_append)


if __name__ == "__main__":
    main()
