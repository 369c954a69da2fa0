"""Training speed and memory: forward + backward of our attention ops, and one full Wan training step.

    OUT=out python benchmarks/bench_training.py --no-append                      # GPU: every section
    python benchmarks/bench_training.py --sections attention --shapes wan480     # one section / shape
    python benchmarks/bench_training.py --smoke --no-append                      # CPU smoke run (tiny shapes)

One process, bf16, batch 1 (CPU smoke: float32, tiny shapes, perf_counter). Sections (``--sections``):

1. ``attention``: per shape (``16k`` = 16×32×32 and ``wan480`` = 21×30×52 = 32760 tokens, 12 heads × 128,
   inputs from ``benchmarks/video_inputs.make_video_qkv``), forward and forward + backward (``torch.autograd.grad``
   of the output against a fixed random gradient, q/k/v requiring grad) of: SDPA with the cuDNN and the
   FLASH backends; FlexAttention (``torch.compile(flex_attention)``) with a block mask of the same
   density as VMoBA's selection (its very token mask, tokens permuted into block order, not timed);
   and our ops as a training step calls them (``torch.ops.vmonarch.*``): Monarch with frame blocks
   (1 step), VMoBA with 3D blocks and global top-k at ~90 % sparsity (``round(0.1 × blocks)`` blocks per
   query group), and the dense op. Medians of ``triton.testing.do_bench``; peak memory is the CUDA
   allocator's peak above what was allocated before the call (inputs and their gradient excluded).
   The ``backward`` column says what ran: ``kernel`` when a ``vmonarch::*_backward`` op was seen by the
   profiler (our Triton backward), ``reference autograd`` when the op recomputed its pure-PyTorch
   reference under autograd (``vmonarch_opt/ops.py``).
2. ``grads``: per method, the relative L2 error of dq, dk and dv from the op in bf16 (float32 in the
   smoke run), and from the op in float32, against float64 autograd through the pure-PyTorch reference
   (VMoBA: on the selection the op made, so only the backward is compared), at small shapes with text
   tokens, batch 2, head_dim 64 and 128.
3. ``wan``: one training step (forward, MSE loss against a random target, backward, AdamW step) of
   diffusers ``WanTransformer3DModel`` with the Wan2.1-1.3B config (random weights, bf16) at 480p/81f
   (21×30×52 tokens, 512 text tokens), gradient checkpointing on every block unless
   ``--no-checkpointing``: dense (diffusers' SDPA) vs ``vmonarch_opt.optimize(..., budget=None)`` with each
   method pinned (VMoBA: 3D blocks, top-6 of 64, on every layer). AdamW runs with lr = 0 so that every
   configuration starts from the same weights (the step does the same work). Median of ``--runs``
   CUDA-event timings after ``--warmup`` steps; peak memory of the steps; the sites' ran / fell-back counts.

Writes ``$OUT/bench_training.json`` after every row and ``$OUT/bench_training_section.md``; prints a
short table last; appends the section to BENCHMARKS.md unless ``--no-append``.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
import vmonarch_opt  # noqa: E402
from vmonarch_opt import VMoBAConfig  # noqa: E402
from vmonarch_opt.kernels import dispatch  # noqa: E402
from vmonarch_opt.methods.monarch import default_monarch_block  # noqa: E402
from vmonarch_opt.kernels.monarch.reference import monarch_attention_reference  # noqa: E402
from vmonarch_opt.kernels.vmoba.layout import vmoba_layout  # noqa: E402
from vmonarch_opt.kernels.vmoba.reference import vmoba_attention_from_selection  # noqa: E402
from vmonarch_opt.io import atomic_write_text  # noqa: E402
from vmonarch_fixtures import models  # noqa: E402
from benchmarks.publish import command_line, now, out_dir, publish  # noqa: E402
from benchmarks.video_inputs import make_video_qkv  # noqa: E402

SHAPES = {
    "16k": dict(grid=(16, 32, 32), heads=12, D=128),
    "wan480": dict(grid=(21, 30, 52), heads=12, D=128),  # Wan2.1-1.3B 480p / 81 frames
    "smoke": dict(grid=(2, 4, 6), heads=2, D=32),  # --smoke (CPU)
}
METHODS = ("monarch", "vmoba", "dense")
SPARSITY = 0.90  # VMoBA rows: global top-k keeping ~10 % of the key blocks
RESULTS: dict = {"attention": [], "grads": [], "wan": []}


def log(*a):
    print(*a, flush=True)


def save():
    """The JSON so far (a run cut short by a time limit still brings back its finished rows)."""
    out = out_dir()
    if out:
        import json

        atomic_write_text(out / "bench_training.json", json.dumps(RESULTS, indent=1, default=str))


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    e = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    return e if e == e else float("inf")


# ----------------------------------------------------------------------------- timing and memory
def median_ms(fn, cuda: bool, rep_ms: int = 200) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def peak_gb(fn, cuda: bool):
    """Peak CUDA memory of ``fn()`` above what was allocated before it, in GiB (None off CUDA)."""
    if not cuda:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def backward_kind(fn) -> str:
    """What the backward of our op ran: our kernel's backward op, or the reference under autograd."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    if any(n.startswith("vmonarch::") and n.endswith("_backward") for n in names):
        return "kernel"
    return "reference autograd"


# ----------------------------------------------------------------------------- the attention calls
def vmoba_args(grid: tuple) -> dict:
    """3D blocks (default chunk: about 4 per grid dimension), global top-k at ~SPARSITY."""
    chunk = tuple(max(1, -(-g // 4)) for g in grid)
    blocks = vmoba_layout(grid, chunk, "3d").num_blocks
    return dict(grid=list(grid), chunk=list(chunk), text_before=0, text_after=0, partition="3d", threshold=0.25,
                topk=max(1, round((1 - SPARSITY) * blocks)), pooled_rest=False)


def op_call(method: str, grid: tuple, scale: float):
    """``f(q, k, v)``: our op as the optimized model calls it."""
    if method == "monarch":
        block = list(default_monarch_block(grid))
        return lambda q, k, v: torch.ops.vmonarch.monarch_attention(q, k, v, list(grid), block, 0, 0, 1, scale, False)
    if method == "vmoba":
        a = vmoba_args(grid)
        return lambda q, k, v: torch.ops.vmonarch.vmoba_attention(q, k, v, a["grid"], a["chunk"], 0, 0, "3d",
                                                                  a["threshold"], a["topk"], scale, False)
    if method == "dense":
        return lambda q, k, v: torch.ops.vmonarch.dense_attention(q, k, v, scale)
    raise ValueError(f"unknown method {method!r}: use {', '.join(METHODS)}")


def describe(method: str, grid: tuple) -> str:
    if method == "monarch":
        return f"monarch frame blocks {'×'.join(map(str, default_monarch_block(grid)))}, 1 step"
    if method == "vmoba":
        a = vmoba_args(grid)
        blocks = vmoba_layout(grid, tuple(a["chunk"]), "3d").num_blocks
        return f"vmoba 3d top-{a['topk']} of {blocks}"
    return "dense op"


def run_attention(shape: str, methods, cuda: bool, flex_on: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sh = SHAPES[shape]
    grid, H, D = sh["grid"], sh["heads"], sh["D"]
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = (t.requires_grad_(True) for t in make_video_qkv(grid=grid, heads=H, head_dim=D, dtype=dtype,
                                                                device=dev, seed=0))
    N, scale = q.shape[2], D ** -0.5
    g = torch.randn(q.shape, dtype=dtype, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    rep = 200 if N < 20000 else 600

    def fwd_bwd(attn, *inputs):
        inputs = inputs or (q, k, v)
        return lambda: torch.autograd.grad(attn(*inputs), inputs, g)

    def forward(attn, *inputs):
        inputs = inputs or (q, k, v)

        def run():
            with torch.no_grad():
                return attn(*inputs)
        return run

    def row(label, attn, backward, *inputs, **extra):
        r = dict(shape=shape, N=N, heads=H, D=D, attention=label, backward=backward, **extra)
        try:
            r["fwd_ms"] = median_ms(forward(attn, *inputs), cuda, rep)
            r["fwd_bwd_ms"] = median_ms(fwd_bwd(attn, *inputs), cuda, rep)
            r["peak_gb"] = peak_gb(fwd_bwd(attn, *inputs), cuda)
        except Exception as e:  # an OOM or a missing backend must not hide the other rows
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        if cuda:
            torch.cuda.empty_cache()
        RESULTS["attention"].append(r)
        save()
        log({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in r.items()})
        return r

    def sdpa(backend):
        def attn(q_, k_, v_):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q_, k_, v_)
        return attn

    if cuda:
        ref = row("SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION), "torch")
        row("SDPA FLASH", sdpa(SDPBackend.FLASH_ATTENTION), "torch")
    else:
        ref = row("SDPA MATH (CPU)", sdpa(SDPBackend.MATH), "torch")
    for method in methods:
        attn = op_call(method, grid, scale)
        try:
            kind = backward_kind(fwd_bwd(attn))
        except Exception as e:
            kind = f"failed: {type(e).__name__}"
        extra = {}
        if method == "vmoba":
            a = vmoba_args(grid)
            with torch.no_grad():
                sel = dispatch.vmoba_select(q, k, grid=grid, chunk=tuple(a["chunk"]), partition="3d",
                                            threshold=a["threshold"], topk=a["topk"], scale=scale)
            extra["density"] = float(sel.density)
        row(f"vmonarch {describe(method, grid)}", attn, kind, **extra)
        if method == "vmoba" and flex_on:
            run_flex(shape, q, k, v, g, sel, row, cuda)
    for r in RESULTS["attention"]:
        if r["shape"] == shape and "fwd_bwd_ms" in r and "fwd_bwd_ms" in ref:
            r["speed_vs_sdpa"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            if r.get("peak_gb") is not None and ref.get("peak_gb"):
                r["peak_vs_sdpa"] = r["peak_gb"] / ref["peak_gb"]
    save()


def run_flex(shape, q, k, v, g, sel, row, cuda: bool) -> None:
    """FlexAttention forward + backward with VMoBA's token mask as a BlockMask (same density)."""
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks.bench_vmoba import flex_block_mask

    perm = sel.layout.perm.to(q.device)
    qp, kp, vp = (t.detach()[:, :, perm].contiguous().requires_grad_(True) for t in (q, k, v))
    try:
        bm = flex_block_mask(sel, q.shape[2])
    except Exception as e:
        RESULTS["attention"].append(dict(shape=shape, attention="FlexAttention", error=f"{type(e).__name__}: {e}"))
        return
    fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    gp = g[:, :, perm].contiguous()

    def attn(q_, k_, v_):
        with warnings.catch_warnings():  # CPU smoke: eager flex_attention (unfused) is what we mean to run
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return fn(q_, k_, v_, block_mask=bm)

    label = f"FlexAttention, VMoBA's block mask ({100 * float(sel.density):.1f} % dense)"
    r = dict(shape=shape, N=q.shape[2], heads=q.shape[1], D=q.shape[3], attention=label, backward="torch",
             density=float(sel.density))
    try:
        r["fwd_ms"] = median_ms(lambda: attn(qp.detach(), kp.detach(), vp.detach()), cuda)
        if cuda:
            step = lambda: torch.autograd.grad(attn(qp, kp, vp), (qp, kp, vp), gp)  # noqa: E731
            r["fwd_bwd_ms"] = median_ms(step, cuda)
            r["peak_gb"] = peak_gb(step, cuda)
        else:
            r["backward"] = "none on CPU (FlexAttention has no CPU backward)"
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
    RESULTS["attention"].append(r)
    save()
    log({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in r.items()})


# ----------------------------------------------------------------------------- gradient errors
def run_grads(cuda: bool, methods) -> None:
    """Gradient errors of each op's backward vs float64 autograd through the reference."""
    dev = "cuda" if cuda else "cpu"
    low = torch.bfloat16 if cuda else torch.float32
    cases = [((3, 8, 12), 64, 7, 0), ((4, 6, 10), 128, 0, 5)] if cuda else [((2, 3, 4), 16, 3, 0)]
    for grid, D, tb, ta in cases:
        n = tb + math.prod(grid) + ta
        gen = torch.Generator(device=dev).manual_seed(3)
        base = [torch.randn(2, 2, n, D, device=dev, generator=gen, dtype=torch.float64) for _ in range(4)]
        scale = D ** -0.5
        for method in methods:
            r = dict(grid=grid, D=D, text_before=tb, text_after=ta, method=method)
            try:
                q64, k64, v64 = (t.clone().requires_grad_(True) for t in base[:3])
                g64 = base[3]
                if method == "monarch":
                    block = list(default_monarch_block(grid))
                    call = lambda q, k, v: torch.ops.vmonarch.monarch_attention(  # noqa: E731
                        q, k, v, list(grid), block, tb, ta, 1, scale, False)
                    want = torch.autograd.grad(monarch_attention_reference(
                        q64, k64, v64, grid=grid, block=tuple(block), text_before=tb, text_after=ta, steps=1,
                        scale=scale), (q64, k64, v64), g64)
                elif method == "vmoba":
                    a = vmoba_args(grid)
                    call = lambda q, k, v: torch.ops.vmonarch.vmoba_attention(  # noqa: E731
                        q, k, v, list(grid), a["chunk"], tb, ta, "3d", a["threshold"], a["topk"], scale, False)
                    with torch.no_grad():  # the selection the low-precision op makes
                        sel = dispatch.vmoba_select(base[0].to(low), base[1].to(low), grid=grid,
                                                    chunk=tuple(a["chunk"]), text_before=tb, text_after=ta,
                                                    partition="3d", threshold=a["threshold"], topk=a["topk"],
                                                    scale=scale)
                    want = torch.autograd.grad(vmoba_attention_from_selection(q64, k64, v64, sel, scale),
                                               (q64, k64, v64), g64)
                else:
                    call = lambda q, k, v: torch.ops.vmonarch.dense_attention(q, k, v, scale)  # noqa: E731
                    want = torch.autograd.grad(F.scaled_dot_product_attention(q64, k64, v64, scale=scale),
                                               (q64, k64, v64), g64)
                for dt, tag in ((low, "low"), (torch.float32, "fp32")):
                    got = _grad_of(call, base, dt)
                    for name, a_, b_ in zip(("dq", "dk", "dv"), got, want):
                        r[f"{name}_err_{tag}"] = rel(a_, b_)
                    r[f"finite_{tag}"] = all(bool(torch.isfinite(x).all()) for x in got)
                r["dtype_low"] = str(low).replace("torch.", "")
                r["backward"] = backward_kind(lambda: _grad_of(call, base, low))
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            RESULTS["grads"].append(r)
            save()
            log({kk: (f"{vv:.2e}" if isinstance(vv, float) else vv) for kk, vv in r.items()})


def _grad_of(call, base, dt):
    q, k, v = (t.detach().to(dt).requires_grad_(True) for t in base[:3])
    return torch.autograd.grad(call(q, k, v), (q, k, v), base[3].to(dt))


# ----------------------------------------------------------------------------- Wan training step
def wan_model(smoke: bool, device):
    if smoke:
        return models.wan(frames=3, height=6, width=8, device=device)
    return models.wan_1_3b(device=device)


def method_kwargs(method: str, smoke: bool) -> dict:
    kw = dict(budget=None, methods=(method,))
    if method == "vmoba":  # 3D blocks on every layer, ~10 % of them per query group
        kw = dict(budget=None, overrides={"*": VMoBAConfig(partition="3d", topk=2 if smoke else 6)})
    if smoke:
        kw["min_seq_len"] = 0
    return kw


def run_wan(methods, cuda: bool, smoke: bool, runs: int, warmup: int, checkpointing: bool,
            max_seconds: float, t_start: float) -> None:
    dev = torch.device("cuda" if cuda else "cpu")
    model, batch = wan_model(smoke, dev)
    target = torch.randn(batch["hidden_states"].shape, generator=torch.Generator().manual_seed(9)).to(
        dev, batch["hidden_states"].dtype)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"[train] wan: {nparams / 1e9:.3f} B parameters, hidden_states {tuple(batch['hidden_states'].shape)}")

    def timed_steps():
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        adam = torch.optim.AdamW(model.parameters(), lr=0.0)  # same work, same weights for every row

        def step():
            out = model(**batch)[0]
            F.mse_loss(out.float(), target.float()).backward()
            adam.step()
            adam.zero_grad(set_to_none=True)

        try:
            for _ in range(warmup):
                step()
            times = []
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for _ in range(runs):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    step()
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b))
                else:
                    t0 = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - t0) * 1e3)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
            return statistics.median(times), peak
        finally:
            del adam
            if checkpointing:
                model.disable_gradient_checkpointing()
            model.eval()
            model.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    dense_ms = None
    for config in [None] + list(methods):  # None: the model's own attention (diffusers' SDPA)
        label = ("dense SDPA (diffusers)" if config is None
                 else f"vmonarch {config}" + (" op" if config == "dense" else ""))
        if time.perf_counter() - t_start > max_seconds:
            RESULTS["wan"].append(dict(config=label, error=f"skipped (over --max-seconds={max_seconds:g})"))
            save()
            continue
        r = dict(config=label, checkpointing=checkpointing, runs=runs, warmup=warmup)
        try:
            if config is not None:
                t0 = time.perf_counter()
                vmonarch_opt.optimize(model, batch, inplace=True, **method_kwargs(config, smoke))
                r["optimize_s"] = time.perf_counter() - t0
                tot = model.report.totals
                r["flop_cut"] = 1 - tot["flops_after"] / tot["flops_before"]
                r["by_method"] = tot["by_method"]
                for rt in model.vmonarch.runtimes.values():
                    rt.reset_calls()
            ms, peak = timed_steps()
            r.update(step_ms=ms, peak_gb=peak)
            if config is None:
                dense_ms = ms
            elif dense_ms:
                r["speed_vs_dense"] = dense_ms / ms
            if config is not None:
                calls = vmonarch_opt.stats(model)
                r["ran"] = sum(c["ran"] for c in calls.values())
                r["fell_back"] = sum(sum(c["fell_back"].values()) for c in calls.values())
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        finally:
            if config is not None:
                vmonarch_opt.restore(model)
        RESULTS["wan"].append(r)
        save()
        log({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in r.items()})
    del model, batch
    gc.collect()


# ----------------------------------------------------------------------------- tables and main
def _fmt(v, spec=".3g"):
    return "" if v is None or v == "" else (format(v, spec) if isinstance(v, float) else str(v))


def tables() -> str:
    from tabulate import tabulate

    parts = []
    if RESULTS["attention"]:
        cols = ["shape", "N", "attention", "backward", "fwd_ms", "fwd_bwd_ms", "speed_vs_sdpa", "peak_gb",
                "peak_vs_sdpa", "density", "error"]
        parts.append("Attention, forward + backward:\n\n" + tabulate(
            [[_fmt(r.get(c)) for c in cols] for r in RESULTS["attention"]], headers=cols, tablefmt="github",
            disable_numparse=True))
    if RESULTS["grads"]:
        cols = ["method", "grid", "D", "text_before", "text_after", "backward", "dtype_low", "dq_err_low", "dk_err_low",
                "dv_err_low", "dq_err_fp32", "dk_err_fp32", "dv_err_fp32", "error"]
        parts.append("Gradient error vs float64 reference autograd (relative L2):\n\n" + tabulate(
            [[_fmt(r.get(c), ".2e") for c in cols] for r in RESULTS["grads"]], headers=cols, tablefmt="github",
            disable_numparse=True))
    if RESULTS["wan"]:
        cols = ["config", "step_ms", "speed_vs_dense", "peak_gb", "flop_cut", "ran", "fell_back", "optimize_s",
                "error"]
        parts.append("Wan training step (forward + backward + AdamW):\n\n" + tabulate(
            [[_fmt(r.get(c)) for c in cols] for r in RESULTS["wan"]], headers=cols, tablefmt="github",
            disable_numparse=True))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="attention,grads,wan", help="comma-separated: attention, grads, wan")
    ap.add_argument("--shapes", default="16k,wan480", help=f"attention shapes: {', '.join(SHAPES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: monarch, vmoba, dense")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention rows")
    ap.add_argument("--runs", type=int, default=3, help="wan: timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="wan: untimed steps first")
    ap.add_argument("--no-checkpointing", action="store_true", help="wan: no gradient checkpointing")
    ap.add_argument("--max-seconds", type=float, default=1e9, help="wan: skip the configurations left after this")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32: checks that everything runs")
    ap.add_argument("--no-append", action="store_true", help="do not append the section to BENCHMARKS.md")
    args = ap.parse_args(argv)
    for key in RESULTS:
        RESULTS[key] = []
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("bench_training.py measures on a CUDA GPU; use --smoke for the CPU check")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; use {', '.join(METHODS)}")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    shapes = ["smoke"] if args.smoke else [s.strip() for s in args.shapes.split(",") if s.strip()]
    devname = torch.cuda.get_device_name() if cuda else "cpu"
    cmd, when = command_line(), now()
    RESULTS["meta"] = dict(device=devname, torch=torch.__version__, command=cmd, date=when, smoke=args.smoke)
    log(f"[train] device {devname}, torch {torch.__version__}, sections {sections}")
    t0 = time.perf_counter()
    if "attention" in sections:
        for shape in shapes:
            run_attention(shape, methods, cuda, flex_on=not args.no_flex)
            log(f"[train] attention {shape} done ({time.perf_counter() - t0:.0f} s)")
    if "grads" in sections:
        run_grads(cuda, methods)
    if "wan" in sections:
        run_wan([m for m in methods], cuda, args.smoke, args.runs, args.warmup, not args.no_checkpointing,
                args.max_seconds, t0)
    what = "tiny shapes on CPU (--smoke), float32" if args.smoke else "bf16, batch 1"
    section = (f"## Training: attention forward + backward, and a Wan training step ({when}, {devname}, "
               f"torch {torch.__version__})\n\nCommand: `{cmd}`. {what}. Attention: medians of "
               f"`triton.testing.do_bench` (CPU: of 3 runs), forward + backward = `torch.autograd.grad` of q/k/v; "
               f"peak = allocator peak above the inputs; speed and peak relative to "
               f"{'SDPA cuDNN' if cuda else 'SDPA MATH'}; backward = what ran behind our op. Gradient errors: "
               f"relative L2 vs float64 autograd through the pure-PyTorch reference. Wan: "
               f"{'a tiny random config (2 layers, 3×6×8 tokens)' if args.smoke else 'Wan2.1-1.3B config, 480p/81f'}"
               f", "
               f"random weights, one step = forward + MSE + backward + AdamW (lr 0), gradient "
               f"checkpointing {'off' if args.no_checkpointing else 'on'}, median of {args.runs} after "
               f"{args.warmup} warm-up.\n\n{tables()}\n")
    publish("bench_training", section, RESULTS, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
