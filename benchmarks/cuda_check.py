"""Every method's CUDA kernels against its float64 reference, forward and backward, on the GPU.

    python benchmarks/cuda_check.py [--smoke]

The unit tests check the kernels on the CPU in Triton's interpreter, where bf16 is not right and
nothing is compiled for a real GPU. This runs each method's plan (``Method.apply``: plain,
block-causal and KV-cache forms) on CUDA tensors in bf16 and fp16 at moderate shapes, and the same
plan on float64 CPU copies (the pure-PyTorch references), and reports the relative error of the
output and of dq/dk/dv. Prints a table last; writes ``$OUT/cuda_check.json``. ``--smoke`` runs tiny
shapes on the CPU (fp32, the interpreter) to keep the script itself tested.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.publish import out_dir  # noqa: E402
from vmonarch_opt import methods as registry  # noqa: E402
from vmonarch_opt.methods import causal  # noqa: E402
from vmonarch_opt.site import AttentionSite  # noqa: E402


def _site(grid, heads, D, cached=0, chunk=0, batch=1):
    T, H, W = grid
    n = T * H * W
    s = AttentionSite(site_id="check", module_path="check", ordinal=0, form="sdpa", batch=batch, heads=heads,
                      kv_heads=heads, seq_q=n, seq_k=(T + cached) * H * W, head_dim=D, head_dim_v=D,
                      dtype="bfloat16", layout="[B,H,N,D]", grid=grid, kind="cached" if cached else "self")
    s.cached_frames, s.causal_chunk = cached, chunk
    return s


def cases(smoke: bool):
    """(label, method name, config, site)."""
    from vmonarch_opt import MonarchConfig, MonarchRTConfig, VMoBAConfig

    if smoke:
        g, gk, H, D = (4, 2, 3), (2, 2, 3), 2, 16
    else:
        g, gk, H, D = (6, 16, 24), (3, 16, 24), 4, 128
    out = [
        ("monarch frames", "monarch", MonarchConfig(block=(1, g[1], g[2])), _site(g, H, D)),
        ("monarch frames, block-causal 2", "monarch", MonarchConfig(block=(1, g[1], g[2])), _site(g, H, D, chunk=2)),
        ("monarch_rt 1x1x1", "monarch_rt", MonarchRTConfig(), _site(g, H, D)),
        ("monarch_rt 1x2x1", "monarch_rt", MonarchRTConfig(h_reduce=2), _site(g, H, D)),
        ("monarch_rt block-causal 2", "monarch_rt", MonarchRTConfig(), _site(g, H, D, chunk=2)),
        ("monarch_rt KV cache", "monarch_rt", MonarchRTConfig(), _site(gk, H, D, cached=g[0] - gk[0] + 1)),
        ("vmoba token", "vmoba", VMoBAConfig(), _site(g, H, D)),
        ("vmoba group", "vmoba", VMoBAConfig(selection="group"), _site(g, H, D)),
        ("vmoba token block-causal 2", "vmoba", VMoBAConfig(), _site(g, H, D, chunk=2)),
        ("vmoba token KV cache", "vmoba", VMoBAConfig(), _site(gk, H, D, cached=g[0] - gk[0] + 1)),
        ("dense block-causal 2", "dense", registry.get("dense").config(), _site(g, H, D, chunk=2)),
    ]
    return out


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    e = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    return e if e == e else float("inf")


def check(label, name, cfg, site, device, dtype, backward=True) -> dict:
    m = registry.get(name)
    args = m.site_args(cfg, site, 0)
    why = causal.unsupported(m, args)
    if why:
        return {"case": label, "dtype": str(dtype), "skipped": why}
    g = torch.Generator().manual_seed(0)
    B, Hh, D = site.batch, site.heads, site.head_dim
    q = torch.randn(B, Hh, site.seq_q, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hh, site.seq_k, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hh, site.seq_k, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, Hh, site.seq_q, D, generator=g, dtype=torch.float64)
    scale = D ** -0.5
    ref_in = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    interp = os.environ.pop("VMONARCH_INTERPRET_KERNELS", None)  # (--smoke) the reference, not the kernels
    try:
        ref = m.apply(*ref_in, args, scale)
        if backward:
            ref.backward(do)
    finally:
        if interp is not None:
            os.environ["VMONARCH_INTERPRET_KERNELS"] = interp
    row = {"case": label, "dtype": str(dtype).replace("torch.", ""), "N_q": site.seq_q, "N_k": site.seq_k}
    ins = [t.to(device, dtype).requires_grad_(backward) for t in (q, k, v)]
    t0 = time.perf_counter()
    out = m.apply(*ins, args, scale)
    row["out"] = rel(out, ref)
    if backward:
        out.backward(do.to(device, dtype))
        for n, a, b in zip("qkv", ins, ref_in):
            row[f"d{n}"] = rel(a.grad, b.grad)
    row["finite"] = bool(torch.isfinite(out).all())
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


_SMOKE_ENV = {"TRITON_INTERPRET": "1", "VMONARCH_INTERPRET_KERNELS": "1"}


def _run_all(smoke: bool, device, dtypes, only=()) -> list:
    rows = []
    for label, name, cfg, site in cases(smoke):
        if only and not any(o in label for o in only):
            continue
        for dt in dtypes:
            try:
                r = check(label, name, cfg, site, device, dt)
            except Exception as e:  # noqa: BLE001  reported, never hidden
                r = {"case": label, "dtype": str(dt), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--cases", default="", help="only the cases whose label contains one of these (comma-separated)")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtypes = "cpu", (torch.float32,)
    else:
        if not torch.cuda.is_available():
            print("cuda_check: no CUDA device")
            return 1
        device, dtypes = "cuda", (torch.bfloat16, torch.float16)
    saved = {k: os.environ.get(k) for k in _SMOKE_ENV}
    if args.smoke:  # the kernels on CPU tensors, in Triton's interpreter (restored afterwards)
        os.environ.update(_SMOKE_ENV)
    try:
        rows = _run_all(args.smoke, device, dtypes, [c for c in args.cases.split(",") if c])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = out_dir()
    if out:
        (out / "cuda_check.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    from tabulate import tabulate

    cols = ["case", "dtype", "N_q", "N_k", "out", "dq", "dk", "dv", "finite"]
    print(tabulate([[r.get(c, r.get("error", r.get("skipped", ""))[:40] if c == "out" else r.get(c, ""))
                     for c in cols] for r in rows], headers=cols, floatfmt=".2e"))
    return 0 if all("error" not in r and r.get("finite", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
