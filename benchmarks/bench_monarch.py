"""Benchmark: Triton Monarch attention vs torch SDPA (FLASH and CUDNN backends), same process.

    python3 benchmarks/bench_monarch.py [--shapes wan13b,wan14b] [--rt-shapes wan13b] [--no-append]
    python3 benchmarks/bench_monarch.py --smoke     # CPU, Triton interpreter, tiny shapes (a test runs it)

For each canonical shape (Wan, CogVideoX, HunyuanVideo sizes; see SHAPES below) it times, on the same bf16 inputs, SDPA with the
FLASH and CUDNN backends and our kernel (T=1 frame blocks unless stated), and reports the median
ms (``triton.testing.do_bench``), speed-ups, the attention-FLOP reduction, the TFLOP/s achieved on
our own FLOP count (``monarch_flops``), a per-phase time split, and the relative error vs dense
attention on (a) random Gaussian inputs and (b) video-structured inputs
(``benchmarks/video_inputs.py``). The "dense" of the error column is SDPA-FLASH in bf16 (its own
error, ~1e-3, is far below the Monarch approximation error). Before timing, the kernel is checked
in bf16 against the fp32 reference at reduced head counts (``check`` rows).

MonarchRT section (``--rt-shapes``, default Wan-1.3B 480p, Wan-14B 720p, HunyuanVideo 720p; ``--no-rt``
skips it): the ``monarch_rt`` method's op (``Method.apply``, default tiling f_tied = h_reduce =
w_reduce = 1, one step) on structured inputs at each shape vs SDPA FLASH and cuDNN, its TFLOP/s on
its own FLOP count (``Method.cost``) and its error beside frame-block Monarch's (block (1, H, W), one
step) at the same shape; then, at ``--rt-causal-shape`` (Wan-1.3B 480p), a block-causal row (chunks
of 3 frames, ``causal_chunk=3``) against the exact chunked SDPA (each chunk's queries against the keys
of chunks <= its own, FLASH and cuDNN), and a KV-cache row (the last 3 of 21 frames as queries
attending to all 21: ``cached_frames=18``) against SDPA of the last chunk. A form the method does not
have is a row naming the reason. The issue-20 targets are printed last.

``--smoke`` runs every section on the CPU in Triton's interpreter at tiny shapes (fp16; the math
SDPA backend stands in for FLASH and cuDNN; one wall-clock run per timing: the numbers mean
nothing) and never appends to BENCHMARKS.md.

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

if "--smoke" in sys.argv:  # before triton is imported: kernels run in Triton's CPU interpreter
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["VMONARCH_INTERPRET_KERNELS"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
from benchmarks.publish import command_line, out_dir, publish  # noqa: E402
from benchmarks.video_inputs import make_video_qkv  # noqa: E402
from vmonarch_opt.kernels.monarch import kernel as mk  # noqa: E402
from vmonarch_opt.kernels.tuning import tuned_configs  # noqa: E402
from vmonarch_opt.kernels.monarch.reference import (dense_attention_flops, monarch_attention_reference,  # noqa: E402
                                                   monarch_flops)
from vmonarch_opt.methods import Shape  # noqa: E402
from vmonarch_opt.methods import get as get_method  # noqa: E402

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
RT_DEFAULT = ["wan13b", "wan14b", "hunyuan720p"]
SMOKE_SHAPES = {"smoke": ((6, 2, 4), 1, 32, 0, 0, (1, 2, 4), 1),
                "smoke_text": ((2, 3, 4), 1, 32, 0, 3, (1, 3, 4), 1)}
CAUSAL_CHUNK = 3  # latent frames per chunk (Self-Forcing)
# issue 20, item 5 (H100/H200): MonarchRT forward vs cuDNN at Wan-1.3B 480p
RT_TARGET_VS_CUDNN = 10.0
DEV, DT, SMOKE = "cuda", torch.bfloat16, False


def rel(a, b):
    a, b = a.float(), b.float()
    e = ((a - b).norm() / b.norm()).item()
    return e


def bench(fn, budget_ms=1500):
    if SMOKE:  # one run, wall clock (the interpreter: the loop runs, the numbers mean nothing)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    rep = max(min(budget_ms, 200 * est), 3 * est)
    return triton.testing.do_bench(fn, warmup=max(1.0, min(25.0, 2 * est)), rep=rep, return_mode="median")


def sdpa(backend, q, k, v):
    if SMOKE:  # no FLASH / cuDNN on the CPU: the math backend stands in
        backend = SDPBackend.MATH
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def short_dtype() -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[DT]


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def check_rows():
    """bf16 kernel vs fp32 reference at reduced head counts (layouts of the benchmark)."""
    rows = []
    cases = [("wan13b h2", (21, 30, 52), 2, 128, 0, 0, (1, 30, 52), 1, False),
             ("wan13b h2 T2 rc", (21, 30, 52), 2, 128, 0, 0, (1, 30, 52), 2, True),
             ("tiles h2 T2", (21, 30, 52), 2, 128, 0, 0, (1, 15, 26), 2, False),
             ("cogvx h4 text", (13, 30, 45), 4, 64, 226, 0, (1, 30, 45), 1, False),
             ("odd d80 text", (5, 9, 11), 3, 80, 7, 5, (1, 4, 4), 3, True)]
    if SMOKE:
        cases = [("smoke d32 text", (2, 3, 4), 1, 32, 3, 2, (1, 3, 4), 2, True)]
    for name, grid, heads, D, tb, ta, block, steps, rc in cases:
        for kind in ("random", "video"):
            if kind == "random":
                n = tb + grid[0] * grid[1] * grid[2] + ta
                q, k, v = (torch.randn(1, heads, n, D, device=DEV) for _ in range(3))
            else:
                q, k, v = make_video_qkv(grid=grid, heads=heads, head_dim=D, text_tokens=tb + ta,
                                         text_position="before" if tb else "after", device=DEV, seed=5)
                if tb and ta:  # split the text block around the video
                    q, k, v = (torch.cat([x[:, :, :tb], x[:, :, tb + ta:], x[:, :, tb:tb + ta]], 2)
                               for x in (q, k, v))
            kw = dict(grid=grid, block=block, text_before=tb, text_after=ta, steps=steps, recompute=rc)
            ref = monarch_attention_reference(q, k, v, **kw)
            out16 = mk.monarch_attention_triton(q.to(DT), k.to(DT), v.to(DT), **kw)
            out32 = mk.monarch_attention_triton(q, k, v, **kw)
            rows.append(dict(case=name, inputs=kind, **{f"err_{short_dtype()}": rel(out16, ref)},
                             err_fp32=rel(out32, ref),
                             finite=bool(torch.isfinite(out16).all())))
            del ref, out16, out32
    return rows


def shapes() -> dict:
    return SMOKE_SHAPES if SMOKE else SHAPES


def video_qkv(grid, heads, D, tb, ta, seed):
    """Structured inputs (``benchmarks/video_inputs.py``) with ``tb`` text tokens before the video and
    ``ta`` after it."""
    q, k, v = make_video_qkv(grid=grid, heads=heads, head_dim=D, text_tokens=tb + ta,
                             text_position="before" if tb else "after", dtype=DT, device=DEV, seed=seed)
    if tb and ta:  # split the text block around the video
        q, k, v = (torch.cat([x[:, :, :tb], x[:, :, tb + ta:], x[:, :, tb:tb + ta]], 2) for x in (q, k, v))
    return q, k, v


def run_shape(name, inputs_kind):
    grid, heads, D, tb, ta, block, steps = shapes()[name]
    n = tb + grid[0] * grid[1] * grid[2] + ta
    if inputs_kind == "random":
        q, k, v = (torch.randn(1, heads, n, D, device=DEV, dtype=DT) for _ in range(3))
    else:
        q, k, v = video_qkv(grid, heads, D, tb, ta, seed=1)
    kw = dict(grid=grid, block=block, text_before=tb, text_after=ta, steps=steps)
    out = mk.monarch_attention_triton(q, k, v, **kw)       # compiles + picks configs
    dense = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)
    err = rel(out, dense)
    finite = bool(torch.isfinite(out).all())
    return q, k, v, kw, err, finite


def payload(results, checks, dev, rt=None) -> dict:
    return dict(device=dev, results=results, checks=checks, monarch_rt=rt or {}, command=command_line())


def save_partial(results, checks, dev, rt=None) -> None:
    """The JSON so far (a run cut short by a time limit still brings back its finished shapes)."""
    out = out_dir()
    if out:
        (out / "bench_monarch.json").write_text(json.dumps(payload(results, checks, dev, rt), indent=1))


# ----------------------------------------------------------------------------- MonarchRT
def rt_args(grid, tb, ta, **extra) -> dict:
    """Op arguments of the ``monarch_rt`` method at its default tiling (1, 1, 1), one step."""
    return dict(grid=list(grid), tiling=[1, 1, 1], text_before=tb, text_after=ta, steps=1, **extra)


def sdpa_times(fn) -> tuple:
    """(FLASH ms, cuDNN ms) of ``fn(backend)`` (NaN where a backend refuses the shape)."""
    out = []
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            out.append(bench(lambda: fn(be)))
        except RuntimeError as e:
            print(f"SDPA {be.name} failed: {e}", flush=True)
            out.append(float("nan"))
    return tuple(out)


def rt_row(name) -> dict:
    """``monarch_rt`` at one shape next to frame-block Monarch (block (1, H, W), one step), both on
    the same structured inputs, vs SDPA."""
    grid, heads, D, tb, ta, _, _ = shapes()[name]
    T, H, W = grid
    q, k, v = video_qkv(grid, heads, D, tb, ta, seed=1)
    n, scale = q.shape[2], D ** -0.5
    rt, args = get_method("monarch_rt"), rt_args(grid, tb, ta)
    dense = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)
    out = rt.apply(q, k, v, args, scale)
    mkw = dict(grid=grid, block=(1, H, W), text_before=tb, text_after=ta, steps=1)
    mout = mk.monarch_attention_triton(q, k, v, **mkw)
    t_flash, t_cudnn = sdpa_times(lambda be: sdpa(be, q, k, v))
    t_rt = bench(lambda: rt.apply(q, k, v, args, scale))
    t_m = bench(lambda: mk.monarch_attention_triton(q, k, v, **mkw))
    fl_d = dense_attention_flops(1, heads, n, n, D)
    fl_rt = rt.cost(Shape.of_qk(q, k), args)
    fl_m = monarch_flops(1, heads, n, D, **mkw)
    return dict(row="full", shape=name, N=n, hxd=f"{heads}x{D}", grid="x".join(map(str, grid)), text=tb + ta,
                flash_ms=t_flash, cudnn_ms=t_cudnn, rt_ms=t_rt, vs_flash=t_flash / t_rt, vs_cudnn=t_cudnn / t_rt,
                flop_cut=fl_d / fl_rt, tflops=fl_rt / t_rt * 1e-9, err_video=rel(out, dense),
                finite=bool(torch.isfinite(out).all()), monarch_ms=t_m, monarch_flop_cut=fl_d / fl_m,
                monarch_err_video=rel(mout, dense))


def rt_causal_row(name, chunk=CAUSAL_CHUNK) -> dict:
    """Block-causal ``monarch_rt`` (``causal_chunk``) vs the exact chunked SDPA: chunk c's queries
    against the keys of chunks <= c, one SDPA call per chunk."""
    grid, heads, D, _, _, _, _ = shapes()[name]
    T, H, W = grid
    hw = H * W
    q, k, v = video_qkv(grid, heads, D, 0, 0, seed=2)
    rt, args = get_method("monarch_rt"), rt_args(grid, 0, 0, causal_chunk=chunk)
    scale = D ** -0.5
    ends = [(s, min(T, s + chunk)) for s in range(0, T, chunk)]

    def chunked(be):
        return torch.cat([sdpa(be, q[:, :, s * hw:e * hw], k[:, :, :e * hw], v[:, :, :e * hw]) for s, e in ends], 2)

    row = dict(row=f"block-causal, chunks of {chunk} frames ({rt.causal_mode} mode)", shape=name, N=q.shape[2],
               hxd=f"{heads}x{D}", grid="x".join(map(str, grid)), text=0)
    try:
        out = rt.apply(q, k, v, args, scale)
    except (NotImplementedError, ValueError) as e:
        return {**row, "skipped": f"{type(e).__name__}: {e}"}
    dense = chunked(SDPBackend.FLASH_ATTENTION)
    t_flash, t_cudnn = sdpa_times(chunked)
    t_rt = bench(lambda: rt.apply(q, k, v, args, scale))
    fl_d = 4 * heads * D * sum((e - s) * hw * e * hw for s, e in ends)  # every visible query-key pair
    fl_rt = rt.cost(Shape.of_qk(q, k), args)
    return {**row, "flash_ms": t_flash, "cudnn_ms": t_cudnn, "rt_ms": t_rt, "vs_flash": t_flash / t_rt,
            "vs_cudnn": t_cudnn / t_rt, "flop_cut": fl_d / fl_rt, "tflops": fl_rt / t_rt * 1e-9,
            "err_video": rel(out, dense), "finite": bool(torch.isfinite(out).all())}


def rt_cached_row(name, new_frames=CAUSAL_CHUNK) -> dict:
    """KV-cache ``monarch_rt`` (``cached_frames``): the last ``new_frames`` frames as queries against
    the keys of every frame, vs SDPA of that last chunk."""
    grid, heads, D, _, _, _, _ = shapes()[name]
    T, H, W = grid
    cached = T - new_frames
    q, k, v = video_qkv(grid, heads, D, 0, 0, seed=3)
    q = q[:, :, cached * H * W:].contiguous()
    rt, args = get_method("monarch_rt"), rt_args(grid, 0, 0, cached_frames=cached)
    row = dict(row=f"KV cache: last {new_frames} of {T} frames", shape=name, N=f"{q.shape[2]}x{k.shape[2]}",
               hxd=f"{heads}x{D}", grid="x".join(map(str, grid)), text=0)
    why = rt.cached_unsupported(args)
    if why is not None:
        return {**row, "skipped": why}
    scale = D ** -0.5
    dense = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)
    out = rt.apply(q, k, v, args, scale)
    t_flash, t_cudnn = sdpa_times(lambda be: sdpa(be, q, k, v))
    t_rt = bench(lambda: rt.apply(q, k, v, args, scale))
    fl_rt = rt.cost(Shape.of_qk(q, k), args)
    return {**row, "flash_ms": t_flash, "cudnn_ms": t_cudnn, "rt_ms": t_rt, "vs_flash": t_flash / t_rt,
            "vs_cudnn": t_cudnn / t_rt, "flop_cut": Shape.of_qk(q, k).dense_flops / fl_rt,
            "tflops": fl_rt / t_rt * 1e-9, "err_video": rel(out, dense), "finite": bool(torch.isfinite(out).all())}


def rt_targets(rows: list, target_shape: str) -> list:
    """Issue 20's MonarchRT kernel targets beside what was measured."""
    out = []
    for r in rows:
        if r["row"] != "full":
            continue
        if r["shape"] == target_shape:
            out.append(dict(what=f"monarch_rt forward vs cuDNN at {r['shape']} ({r['grid']})",
                            target=f">= {RT_TARGET_VS_CUDNN:g}x", measured=f"{r['vs_cudnn']:.2f}x",
                            met=r["vs_cudnn"] >= RT_TARGET_VS_CUDNN))
        out.append(dict(what=f"error on structured inputs below frame-block Monarch's at {r['shape']} (FLOP cut "
                             f"{r['flop_cut']:.1f}x vs Monarch's {r['monarch_flop_cut']:.1f}x)",
                        target=f"< {r['monarch_err_video']:.3f}", measured=f"{r['err_video']:.3f}",
                        met=r["err_video"] < r["monarch_err_video"]))
    return out


def rt_tables(rows: list, targets: list) -> str:
    """The MonarchRT section of the markdown: full-attention rows, causal/KV-cache rows, targets."""
    full = [r for r in rows if r["row"] == "full"]
    cols = ["shape", "N", "hxd", "grid", "text", "flash_ms", "cudnn_ms", "rt_ms", "vs_flash", "vs_cudnn", "flop_cut",
            "tflops", "err_video", "monarch_ms", "monarch_flop_cut", "monarch_err_video"]
    t1 = tabulate([[r[c] for c in cols] for r in full], headers=cols, tablefmt="github",
                  floatfmt=("", "", "", "", "", ".3f", ".3f", ".3f", ".2f", ".2f", ".1f", ".0f", ".3f", ".3f", ".1f",
                            ".3f"))
    cols2 = ["row", "shape", "N", "flash_ms", "cudnn_ms", "rt_ms", "vs_flash", "vs_cudnn", "flop_cut", "tflops",
             "err_video"]
    fmts = (".3f", ".3f", ".3f", ".2f", ".2f", ".1f", ".0f", ".3f")  # of cols2[3:]
    other = []
    for r in rows:
        if r["row"] == "full":
            continue
        vals = ([f"not run: {r['skipped']}"] + [""] * (len(cols2) - 4) if "skipped" in r
                else [format(r[c], f) for c, f in zip(cols2[3:], fmts)])
        other.append([r["row"], r["shape"], r["N"]] + vals)
    t2 = tabulate(other, headers=cols2, tablefmt="github", disable_numparse=True)
    t3 = tabulate([[t["what"], t["target"], t["measured"], "met" if t["met"] else "NOT met"] for t in targets],
                  headers=["target (issue 20)", "wanted", "measured", ""], tablefmt="github")
    return (f"MonarchRT (`monarch_rt`, tiling 1x1x1, one step, through `Method.apply`) on structured inputs, beside "
            f"frame-block Monarch (block 1xHxW, one step) at the same shape:\n\n{t1}\n\n"
            f"Block-causal (dense = chunked SDPA: each chunk's queries against the keys of chunks <= its own; "
            f"flop_cut against those visible pairs) and KV-cache (dense = SDPA of the last chunk against every "
            f"key):\n\n{t2}\n\nTargets:\n\n{t3}\n")


def main(argv=None) -> bool:
    global DEV, DT, SMOKE
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help=f"Monarch rows (default {','.join(DEFAULT)})")
    ap.add_argument("--rt-shapes", default=None, help=f"MonarchRT rows (default {','.join(RT_DEFAULT)})")
    ap.add_argument("--rt-causal-shape", default=None,
                    help="the shape of the block-causal and KV-cache MonarchRT rows (default wan13b; '' skips them)")
    ap.add_argument("--no-rt", action="store_true", help="skip the MonarchRT section")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--no-append", action="store_true", help="do not append the section to BENCHMARKS.md")
    args = ap.parse_args(argv)
    SMOKE = args.smoke
    if SMOKE:
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("VMONARCH_INTERPRET_KERNELS") != "1":
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 and VMONARCH_INTERPRET_KERNELS=1 set before triton "
                             "is imported (the command line sets them itself)")
        DEV, DT = "cpu", torch.float16
        default_shapes, rt_default, causal_default = ["smoke_text"], ["smoke_text"], "smoke"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_monarch.py needs a CUDA GPU (--smoke: the CPU interpreter run)")
        DEV, DT = "cuda", torch.bfloat16
        default_shapes, rt_default, causal_default = DEFAULT, RT_DEFAULT, "wan13b"

    def pick(given, default):
        return [x for x in (given if given is not None else ",".join(default)).split(",") if x]

    shape_names = pick(args.shapes, default_shapes)
    rt_names = [] if args.no_rt else pick(args.rt_shapes, rt_default)
    causal_shape = "" if args.no_rt else (args.rt_causal_shape if args.rt_causal_shape is not None else causal_default)
    for name in shape_names + rt_names + ([causal_shape] if causal_shape else []):
        if name not in shapes():
            raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(shapes())}")
    dev = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (Triton interpreter)"
    results, checks, rt = [], [], {"rows": [], "targets": []}
    if not args.no_check:
        checks = check_rows()
        print(tabulate(checks, headers="keys", floatfmt=".2e"), flush=True)
    for name in shape_names:
        grid, heads, D, tb, ta, block, steps = shapes()[name]
        n = tb + grid[0] * grid[1] * grid[2] + ta
        cfg_before = tuned_configs("monarch_r")
        _, _, _, _, err_vid, fin_vid = run_shape(name, "video")
        empty_cache()
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
        save_partial(results, checks, dev, rt)
        del q, k, v
        empty_cache()
    for name in rt_names:
        rt["rows"].append(rt_row(name))
        print(json.dumps(rt["rows"][-1]), flush=True)
        save_partial(results, checks, dev, rt)
        empty_cache()
    if causal_shape:
        for fn in (rt_causal_row, rt_cached_row):
            rt["rows"].append(fn(causal_shape))
            print(json.dumps(rt["rows"][-1]), flush=True)
            save_partial(results, checks, dev, rt)
            empty_cache()
    rt["targets"] = rt_targets(rt["rows"], causal_default)
    cmd = command_line()
    md = (f"## Monarch attention (Triton) vs SDPA — {datetime.date.today().isoformat()}, {dev}, "
          f"torch {torch.__version__}, triton {triton.__version__}\n\n"
          f"Command: `{cmd}`. "
          + ("fp16 in Triton's interpreter, the math SDPA backend standing in for FLASH and cuDNN, one wall-clock "
             "run per timing (the numbers mean nothing), " if SMOKE else "bf16, medians of `triton.testing.do_bench`, ")
          + "batch 1; speed-ups = baseline ms / ours ms; flop_cut = dense FLOPs / Monarch FLOPs; tflops on the "
          "Monarch FLOP count; err = ||ours - dense|| / ||dense|| (dense = SDPA-FLASH bf16) on random and on "
          "video-structured inputs (benchmarks/video_inputs.py).\n\n")
    if results:
        cols = ["shape", "N", "hxd", "grid", "block", "text", "steps", "flash_ms", "cudnn_ms", "ours_ms", "vs_flash",
                "vs_cudnn", "flop_cut", "tflops", "err_random", "err_video"]
        table = tabulate([[r[c] for c in cols] for r in results], headers=cols, tablefmt="github",
                         floatfmt=("", "", "", "", "", "", "", ".3f", ".3f", ".3f", ".2f", ".2f", ".1f", ".0f", ".3f",
                                   ".3f"))
        ph_table = tabulate([[r["shape"], r["ours_ms"],
                              ", ".join(f"{kk} {vv:.3f}" for kk, vv in r["phases_ms"].items()), r["r_cfg"]]
                             for r in results],
                            headers=["shape", "ours_ms", "phases (ms, timed alone)",
                                     "R-step configs tuned here (BLOCK_M, BLOCK_N, warps, stages)"], tablefmt="github")
        md += f"{table}\n\nPer-phase split:\n\n{ph_table}\n"
    if checks:
        ck_table = tabulate(checks, headers="keys", tablefmt="github", floatfmt=".2e")
        md += f"\n{short_dtype()} / fp32 kernel vs fp32 reference (reduced heads):\n\n{ck_table}\n"
    if rt["rows"]:
        md += "\n" + rt_tables(rt["rows"], rt["targets"])
    publish("bench_monarch", md, payload(results, checks, dev, rt), append=not (args.no_append or SMOKE))
    return all(c["finite"] for c in checks) and all(r.get("finite", True) for r in results + rt["rows"])


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
