"""Backward kernels: VMoBA and the dense flash backward vs torch SDPA (cuDNN, FLASH), forward + backward.

    python benchmarks/bench_backward.py [--shapes 16k,wan480] [--no-check] [--no-append]
    python benchmarks/bench_backward.py --smoke     # CPU, Triton interpreter, tiny shapes (a test runs it)

Sections:

1. ``check``: gradients of our Triton backward kernels in bf16 (fp16 under ``--smoke``) against
   the float32 reference differentiated by autograd, on the same selection: the flash backward
   (with and without the forward's logsumexp) and VMoBA (partitions, text before/after, pooled
   rest, top-k and threshold, every block selected); the selection recomputed by the backward is
   the forward's; the ops' autograd runs the backward ops (``vmonarch::*_backward``) and no
   reference. Relative error ``||g - g_ref|| / ||g_ref||`` per gradient, bound 3e-2 (bf16 P and
   dS in the dots), every gradient finite.
2. ``timing``: per shape (12 heads x 128, batch 1, inputs from ``benchmarks/video_inputs.py``),
   q/k/v requiring grad, forward + backward (``torch.autograd.grad``) time (median of
   ``triton.testing.do_bench``) and the peak memory above the inputs, for: SDPA cuDNN, SDPA FLASH,
   the dense op (its CUDA backward differentiates SDPA), our flash forward + Triton backward (the
   logsumexp recomputed, or passed from the forward's statistics), and VMoBA through its op
   (3D partition, global top-k keeping ~10 % of the blocks, with and without the pooled rest).
   The backward alone is also timed, with its TFLOP/s counted as 2.5x the forward's FLOPs (the
   usual convention: 5 of the backward's matmuls against the forward's 2).

Prints tables, appends them to BENCHMARKS.md (date, device, command; not with ``--smoke`` or
``--no-append``) and writes JSON to $OUT.
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
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from benchmarks.publish import command_line, out_dir, publish  # noqa: E402
from benchmarks.video_inputs import make_video_qkv  # noqa: E402
import vmonarch_opt  # noqa: E402,F401  (registers the ops)
from vmonarch_opt.kernels.flash.backward import flash_attention_backward_triton  # noqa: E402
from vmonarch_opt.kernels.flash.kernel import flash_attention_triton  # noqa: E402
from vmonarch_opt.kernels.tuning import tuned_configs  # noqa: E402
from vmonarch_opt.kernels.vmoba.backward import (vmoba_attention_backward_triton,  # noqa: E402
                                                 vmoba_backward_with_selection)
from vmonarch_opt.kernels.vmoba.kernel import (vmoba_attention_triton,  # noqa: E402
                                               vmoba_attention_with_selection, vmoba_select_triton)
from vmonarch_opt.kernels.vmoba.layout import VMoBASelection, vmoba_layout  # noqa: E402
from vmonarch_opt.kernels.vmoba.reference import (vmoba_attention_from_selection,  # noqa: E402
                                                  vmoba_flops)

SHAPES = {
    "16k": dict(grid=(16, 32, 32), heads=12, D=128),
    "wan480": dict(grid=(21, 30, 52), heads=12, D=128),  # Wan2.1-1.3B 480p 81f: 32760 tokens
}
SMOKE_SHAPES = {"smoke": dict(grid=(2, 4, 6), heads=1, D=64, chunk=(1, 2, 3))}
GRAD_BOUND = 3e-2
RESULTS: dict = {"check": [], "timing": []}


def log(*a):
    print(*a, flush=True)


def save():
    out = out_dir()
    if out:
        (out / "bench_backward.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def rel(a, b):
    a, b = a.double(), b.double()
    e = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    return e if e == e else float("inf")


def default_chunk(grid):
    return tuple(max(1, -(-g // 4)) for g in grid)


class CountOps(TorchDispatchMode):
    """Counts the ``vmonarch::`` ops that run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("vmonarch."):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def ref_grads(fn, tensors, g):
    """float32 (float64 on CPU) gradients of ``fn(*tensors)`` by autograd."""
    dt = torch.float32 if tensors[0].is_cuda else torch.float64
    leaves = [t.detach().to(dt).requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, g.to(dt))


def grad_row(what, got, ref):
    errs = [rel(a, b) for a, b in zip(got, ref)]
    finite = all(bool(torch.isfinite(a).all()) for a in got)
    return dict(what=what, dq_err=errs[0], dk_err=errs[1], dv_err=errs[2], finite=finite,
                ok=finite and max(errs) < GRAD_BOUND)


# ----------------------------------------------------------------------------- 1. checks
def run_checks(dev, dt, smoke):
    rows = []
    torch.manual_seed(0)
    flash_shapes = [(2, 1, 17, 23, 96)] if smoke else \
        [(2, 3, 1000, 777, 64), (1, 3, 333, 2049, 128), (2, 2, 515, 515, 80), (1, 4, 4096, 4096, 128)]
    for B, H, Nq, Nk, D in flash_shapes:
        q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=dt) for n in (Nq, Nk, Nk))
        g = torch.randn(B, H, Nq, D, device=dev, dtype=dt)
        ref = ref_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), (q, k, v), g)
        what = f"flash {B}x{H} Nq={Nq} Nk={Nk} D={D}"
        try:
            out, lse, _ = flash_attention_triton(q, k, v, return_stats=True)
            rows.append(grad_row(what, flash_attention_backward_triton(q, k, v, out, g), ref))
            rows.append(grad_row(what + " lse given",
                                 flash_attention_backward_triton(q, k, v, out, g, lse=lse), ref))
        except Exception as ex:  # report, keep going
            rows.append(dict(what=what, error=f"{type(ex).__name__}: {str(ex)[-400:]}", ok=False))
    cases = [((2, 3, 4), (1, 2, 2), 2, 1, 64, "3d", 0.3, 0, True)] if smoke else \
        [((5, 12, 20), (2, 5, 6), 7, 5, 128, "3d", 0.3, 0, False),
         ((5, 12, 20), (2, 5, 6), 7, 5, 128, "3d", 0.3, 0, True),
         ((4, 9, 14), (3, 4, 4), 0, 0, 64, "2d", 0.5, 0, False),
         ((6, 10, 12), (2, 4, 4), 0, 9, 128, "1d", 0.25, 3, True),
         ((6, 10, 12), (2, 4, 4), 5, 0, 80, "3d", 0.25, 4, False),
         ((8, 16, 16), (2, 4, 4), 0, 0, 128, "3d", 0.25, 6, False)]
    for grid, chunk, tb, ta, D, part, th, topk, pooled in cases:
        N = tb + ta + grid[0] * grid[1] * grid[2]
        B, H = (1, 1) if smoke else (2, 2)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt) * 1.5 for _ in range(3))
        g = torch.randn(B, H, N, D, device=dev, dtype=dt)
        s = D ** -0.5
        what = (f"vmoba {part} grid={grid} th={th} topk={topk} text={tb}+{ta} D={D}"
                + (" pooled" if pooled else ""))
        try:
            lay = vmoba_layout(grid, chunk, part, tb, ta)
            sel = vmoba_select_triton(q, k, layout=lay, threshold=th, topk=topk, scale=s)
            again = vmoba_select_triton(q, k, layout=lay, threshold=th, topk=topk, scale=s)
            out = vmoba_attention_with_selection(q, k, v, sel, s, pooled_rest=pooled)
            ref = ref_grads(lambda a, b, c: vmoba_attention_from_selection(a, b, c, sel, s, pooled),
                            (q, k, v), g)
            row = grad_row(what, vmoba_backward_with_selection(q, k, v, out, g, sel, s, pooled), ref)
            same = bool(torch.equal(sel.kv_idx, again.kv_idx))
            row.update(sel_same=same, density=sel.density, ok=row["ok"] and same)
            rows.append(row)
        except Exception as ex:
            rows.append(dict(what=what, error=f"{type(ex).__name__}: {str(ex)[-400:]}", ok=False))
    # every block selected (threshold 1 would route to the dense kernel): gradients of dense attention
    grid, chunk, D = ((2, 3, 4), (1, 2, 2), 64) if smoke else ((5, 12, 20), (2, 5, 6), 128)
    N, H = 4 + grid[0] * grid[1] * grid[2], 1 if smoke else 2
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dt) for _ in range(3))
    g = torch.randn(1, H, N, D, device=dev, dtype=dt)
    lay = vmoba_layout(grid, chunk, "3d", 4, 0)
    C, G = lay.num_blocks, lay.num_groups
    sel = VMoBASelection(lay, torch.arange(C, dtype=torch.int32, device=dev).expand(1, H, G, C).contiguous(),
                         torch.full((1, H, G), C, dtype=torch.int32, device=dev), 1.0, 0)
    out = vmoba_attention_with_selection(q, k, v, sel, D ** -0.5, pooled_rest=True)
    ref = ref_grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), (q, k, v), g)
    rows.append(grad_row("vmoba every block selected (+pooled) vs dense",
                         vmoba_backward_with_selection(q, k, v, out, g, sel, D ** -0.5, True), ref))
    # the ops: autograd runs the backward ops on the kernels' device
    kw = dict(grid=list(grid), chunk=list(chunk), text_before=4, text_after=0, partition="3d",
              threshold=0.3, topk=0, scale=D ** -0.5, pooled_rest=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with CountOps() as cnt:
        o = torch.ops.vmonarch.vmoba_attention(*leaves, *kw.values())
        got = torch.autograd.grad(o, leaves, g)
    from vmonarch_opt.methods.vmoba import _reference
    ref = ref_grads(lambda a, b, c: _reference(a, b, c, *kw.values()), (q, k, v), g)
    row = grad_row("op vmonarch::vmoba_attention autograd", got, ref)
    ran = cnt.seen.count("vmonarch.vmoba_attention_backward.default")
    row.update(backward_op_calls=ran, ok=row["ok"] and ran == 1)
    rows.append(row)
    RESULTS["check"] = rows
    save()
    log(tabulate(rows, headers="keys", floatfmt=".2e"))
    return all(r["ok"] for r in rows)


# ----------------------------------------------------------------------------- 2. timing
def timer(dev, smoke):
    if not smoke:
        return lambda fn, rep=50: triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")

    def cpu(fn, rep=0):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return cpu


def peak_mb(fn, dev):
    """Peak memory (MB) that ``fn`` allocates above what is allocated before it (CUDA only)."""
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_timing(name, sh, dev, dt, smoke):
    grid, H, D = sh["grid"], sh["heads"], sh["D"]
    q, k, v = make_video_qkv(grid=grid, heads=H, head_dim=D, dtype=dt, device=dev, seed=0)
    B, _, N, _ = q.shape
    g = torch.randn_like(q)
    s = D ** -0.5
    bench = timer(dev, smoke)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    dense_flops = 4 * B * H * N * N * D

    def fwd_bwd(f):
        return lambda: torch.autograd.grad(f(*leaves), leaves, g)

    def add(row, fwd=None, bwd=None, fwd_flops=None):
        if fwd is not None:
            row["fwd_ms"] = bench(fwd)
        if bwd is not None:
            row["bwd_ms"] = bench(bwd)
            if fwd_flops:
                row["bwd_tflops"] = 2.5 * fwd_flops / row["bwd_ms"] * 1e-9
        RESULTS["timing"].append(row)
        save()
        log({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in row.items()})

    base = dict(shape=name, N=N, heads=H, D=D)
    sdpa_ms = {}
    backends = [] if smoke else [("sdpa cuDNN", SDPBackend.CUDNN_ATTENTION),
                                 ("sdpa FLASH", SDPBackend.FLASH_ATTENTION)]
    for label, be in backends:
        def f(a, b, c, be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(a, b, c, scale=s)
        try:
            t = bench(fwd_bwd(f))
            sdpa_ms[label] = t
            add(dict(base, what=label, fwd_bwd_ms=t, peak_mb=peak_mb(fwd_bwd(f), dev)),
                fwd=lambda: f(q, k, v))
        except Exception as ex:
            add(dict(base, what=label, error=f"{type(ex).__name__}: {str(ex)[-300:]}"))
    cudnn = sdpa_ms.get("sdpa cuDNN")

    def speed(t):
        return None if cudnn is None or not t else cudnn / t

    # the dense op as registered: SDPA forward, SDPA differentiated in the backward
    op = torch.ops.vmonarch.dense_attention
    t = bench(fwd_bwd(lambda a, b, c: op(a, b, c, s)))
    add(dict(base, what="dense op (SDPA fwd + SDPA bwd)", fwd_bwd_ms=t, speed_vs_cudnn=speed(t),
             peak_mb=peak_mb(fwd_bwd(lambda a, b, c: op(a, b, c, s)), dev)))
    # our flash forward + Triton backward, logsumexp recomputed (what the op's Triton path does)
    out, lse, _ = flash_attention_triton(q, k, v, scale=s, return_stats=True)
    flash_backward = lambda: flash_attention_backward_triton(q, k, v, out, g, scale=s)  # noqa: E731
    flash_backward()  # tunes
    both = lambda: flash_attention_backward_triton(q, k, v, flash_attention_triton(q, k, v, scale=s), g,  # noqa: E731
                                                   scale=s)
    t = bench(both)
    add(dict(base, what="ours: flash fwd + Triton bwd (lse recomputed)", fwd_bwd_ms=t,
             speed_vs_cudnn=speed(t), peak_mb=peak_mb(both, dev),
             config=str({kk: vv for kk, vv in tuned_configs("flash_bwd_dq").items()})),
        fwd=lambda: flash_attention_triton(q, k, v, scale=s), bwd=flash_backward, fwd_flops=dense_flops)
    add(dict(base, what="ours: Triton bwd, lse from the forward"),
        bwd=lambda: flash_attention_backward_triton(q, k, v, out, g, scale=s, lse=lse), fwd_flops=dense_flops)
    del out, lse
    # VMoBA 3D, global top-k ~10 % of the blocks, through the op (its backward op runs)
    chunk = sh.get("chunk") or default_chunk(grid)
    lay = vmoba_layout(grid, chunk, "3d")
    topk = max(1, round(0.1 * lay.num_blocks))
    vop = torch.ops.vmonarch.vmoba_attention
    for pooled in (True,) if smoke else (False, True):
        args = (list(grid), list(chunk), 0, 0, "3d", 0.25, topk, s, pooled)
        sel = vmoba_select_triton(q, k, layout=lay, threshold=0.25, topk=topk, scale=s)
        fl = vmoba_flops(sel, D, pooled)
        o = vmoba_attention_triton(q, k, v, grid=grid, chunk=chunk, topk=topk, scale=s, pooled_rest=pooled)
        vb = lambda: vmoba_attention_backward_triton(q, k, v, o, g, grid=grid, chunk=chunk,  # noqa: E731
                                                     topk=topk, scale=s, pooled_rest=pooled)
        vb()  # tunes
        f = fwd_bwd(lambda a, b, c: vop(a, b, c, *args))
        t = bench(f)
        cfg = {kind: [c for kk, c in tuned_configs(f"vmoba_bwd_{kind}").items() if kk[3] == lay.grid]
               for kind in ("dq", "dkdv", "pooled")}
        add(dict(base, what=f"vmoba 3d top{topk}/{lay.num_blocks}" + (" +pooled" if pooled else ""),
                 sparsity=1 - sel.density, fwd_bwd_ms=t, speed_vs_cudnn=speed(t),
                 peak_mb=peak_mb(f, dev), config=str(cfg)),
            fwd=lambda: vmoba_attention_triton(q, k, v, grid=grid, chunk=chunk, topk=topk, scale=s,
                                               pooled_rest=pooled),
            bwd=vb, fwd_flops=fl)
        del o
    del q, k, v, g, leaves
    if dev == "cuda":
        torch.cuda.empty_cache()


def fmt_tables():
    cols = ["shape", "N", "what", "sparsity", "fwd_bwd_ms", "speed_vs_cudnn", "fwd_ms", "bwd_ms",
            "bwd_tflops", "peak_mb"]
    t1 = tabulate([[r.get(c, "") for c in ("what", "dq_err", "dk_err", "dv_err", "finite", "ok")]
                   for r in RESULTS["check"]],
                  headers=["check", "dq err", "dk err", "dv err", "finite", "ok"], floatfmt=".2e",
                  tablefmt="github")
    t2 = tabulate([[r.get(c, "") for c in cols] for r in RESULTS["timing"]], headers=cols,
                  floatfmt=".3g", tablefmt="github")
    return t1, t2


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16k,wan480")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    RESULTS["check"], RESULTS["timing"] = [], []
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("VMONARCH_INTERPRET_KERNELS") != "1":
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 and VMONARCH_INTERPRET_KERNELS=1 set "
                             "before triton is imported (the command line sets them itself)")
        dev, dt, shapes = "cpu", torch.float16, SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_backward.py needs a CUDA GPU (or --smoke for the CPU interpreter run)")
        dev, dt = "cuda", torch.bfloat16
        shapes = {n: SHAPES[n] for n in args.shapes.split(",") if n}
    cmd = command_line()
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    RESULTS["meta"] = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                           command=cmd, date=datetime.datetime.now().isoformat(timespec="seconds"))
    log(RESULTS["meta"])
    t0 = time.time()
    ok = True
    if not args.no_check:
        ok = run_checks(dev, dt, args.smoke)
        log(f"checks {'PASSED' if ok else 'FAILED'} ({time.time() - t0:.0f}s)")
    for name, sh in shapes.items():
        run_timing(name, sh, dev, dt, args.smoke)
        log(f"{name} done ({time.time() - t0:.0f}s)")
    t1, t2 = fmt_tables()
    section = (f"## Backward kernels: VMoBA and dense flash vs SDPA ({RESULTS['meta']['date'][:10]}, "
               f"{dev_name}, torch {torch.__version__}, triton {triton.__version__})\n\n"
               f"Command: `{cmd}`. {'fp16' if args.smoke else 'bf16'}, batch 1, inputs from "
               f"`benchmarks/video_inputs.py` (seed 0), q/k/v requiring grad; medians of "
               f"`triton.testing.do_bench`. `fwd_bwd_ms`: forward + `torch.autograd.grad`; `bwd_ms`: "
               f"our backward kernels alone (VMoBA: selection recomputed, included); `bwd_tflops`: "
               f"2.5 x forward FLOPs / bwd_ms (VMoBA: its executed FLOPs); `peak_mb`: peak memory "
               f"above the inputs. VMoBA: 3D partition, chunk = ceil(grid/4), global top-k of ~10 % "
               f"of the blocks. Gradient checks (bound {GRAD_BOUND:g} vs the float32 reference): "
               f"{'all passed' if ok else 'SOME FAILED (see JSON)'}.\n\n{t1}\n\n{t2}\n")
    publish("bench_backward", section, RESULTS, append=not (args.no_append or args.smoke))
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
