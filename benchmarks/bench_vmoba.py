"""VMoBA block-sparse attention and our dense flash kernel vs SDPA (FA2, cuDNN) and FlexAttention.

    python3 benchmarks/bench_vmoba.py [--shapes 16k,wan480,wan720] [--no-check]

All timings are medians of ``triton.testing.do_bench(..., return_mode="median")`` in one process,
bf16, batch 1, on inputs from ``benchmarks/video_inputs.make_video_qkv`` (video structure:
local / temporal / global heads, 3D RoPE). Sections:

1. ``check``: bf16 correctness on the GPU (flash vs SDPA and its lse/entropy vs the reference;
   VMoBA kernel vs reference for every key-load path; threshold 1.0 vs SDPA).
2. ``dense``: our flash kernel (and with ``return_stats``) vs SDPA FLASH (FA2) and CUDNN.
3. ``vmoba``: per shape and sparsity (global top-k chosen to hit 50/75/90/95% sparsity, plus the
   default threshold 0.25): selection time, sparse-attention time, total; speedups vs cuDNN;
   FlexAttention (compiled) on the *same* token-level mask (our blocks, tokens permuted into
   block order so that each block is contiguous; permutation and block-mask construction not
   timed), and the relative error vs dense attention. Rows "+pooled" run the same selection
   with ``pooled_rest=True`` (the unselected blocks as one pooled key each).

Prints tables, appends them to BENCHMARKS.md (date, device, command) and writes JSON to $OUT.
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
from vmonarch_opt.kernels.flash import kernel as flash_mod  # noqa: E402
from vmonarch_opt.kernels.tuning import tuned_configs, tuning_cache  # noqa: E402
from vmonarch_opt.kernels.vmoba import kernel as vmoba_mod  # noqa: E402
from vmonarch_opt.kernels.flash.kernel import flash_attention_triton  # noqa: E402
from vmonarch_opt.kernels.flash.reference import attention_stats_reference  # noqa: E402
from vmonarch_opt.kernels.vmoba.kernel import (vmoba_attention_triton,  # noqa: E402
                                               vmoba_attention_with_selection, vmoba_select_triton)
from vmonarch_opt.kernels.vmoba.layout import vmoba_layout  # noqa: E402
from vmonarch_opt.kernels.vmoba.reference import vmoba_attention_reference, vmoba_select_reference  # noqa: E402

SHAPES = {
    "16k": dict(grid=(16, 32, 32), heads=12, D=128),
    "wan480": dict(grid=(21, 30, 52), heads=12, D=128),  # Wan2.1-1.3B 480p 81f
    "wan720": dict(grid=(21, 45, 80), heads=40, D=128),  # Wan2.1-14B 720p 81f
}
SPARSITIES = (0.50, 0.75, 0.90, 0.95)
RESULTS: dict = {"check": [], "dense": [], "vmoba": []}


def log(*a):
    print(*a, flush=True)


def save():
    """The JSON so far (a run cut short by a time limit still brings back its finished shapes)."""
    out = out_dir()
    if out:
        (out / "bench_vmoba.json").write_text(json.dumps(RESULTS, indent=1))


def bench(fn, rep=60):
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    e = ((a - b).norm() / b.norm()).item()
    return e if e == e else float("inf")


def sdpa(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def default_chunk(grid):
    return tuple(max(1, -(-g // 4)) for g in grid)


# ----------------------------------------------------------------------------- 1. checks
def run_checks():
    dev = "cuda"
    rows = []
    torch.manual_seed(0)
    for (Nq, Nk, D) in [(1000, 777, 64), (333, 2049, 128), (515, 515, 80), (4096, 4096, 128)]:
        q, k, v = (torch.randn(2, 3, n, D, device=dev, dtype=torch.bfloat16)
                   for n in (Nq, Nk, Nk))
        tuning_cache("flash").forced = (128, 64, 4, 3, D in (64, 128))  # both code paths, no tuning here
        what = f"flash bf16 Nq={Nq} Nk={Nk} D={D} cfg={tuning_cache('flash').forced}"
        try:
            out, lse, ent = flash_attention_triton(q, k, v, return_stats=True)
            ro, rl, re_ = attention_stats_reference(q, k, v)
            rows.append(dict(what=what, out_err=rel(out, ro), lse_err=rel(lse, rl),
                             ent_maxabs=(ent - re_).abs().max().item(),
                             ok=rel(out, ro) < 1e-2 and rel(lse, rl) < 1e-3))
        except Exception as ex:
            rows.append(dict(what=what, error=f"{type(ex).__name__}: {str(ex)[-400:]}", ok=False))
    tuning_cache("flash").forced = None
    for mode in (0, 1, 2):
        tuning_cache("vmoba").forced = (128, 64, 4, 3, mode)
        for (grid, chunk, tb, ta, D, part, th, topk, pooled) in [
                ((5, 12, 20), (2, 5, 6), 7, 5, 128, "3d", 0.3, 0, False),
                ((4, 9, 14), (3, 4, 4), 0, 0, 64, "2d", 0.5, 0, False),
                ((6, 10, 12), (2, 4, 4), 0, 9, 128, "1d", 0.25, 3, False),
                ((5, 12, 20), (2, 5, 6), 7, 0, 128, "3d", 1.0, 0, False),
                ((5, 12, 20), (2, 5, 6), 7, 5, 128, "3d", 0.3, 0, True),
                ((4, 9, 14), (3, 4, 4), 0, 0, 64, "2d", 0.25, 4, True)]:
            if mode == 2 and D not in (64, 128):
                continue
            N = tb + ta + grid[0] * grid[1] * grid[2]
            q, k, v = (torch.randn(2, 2, N, D, device=dev, dtype=torch.bfloat16) * 1.5
                       for _ in range(3))
            kw = dict(grid=grid, chunk=chunk, text_before=tb, text_after=ta, partition=part,
                      threshold=th, topk=topk, pooled_rest=pooled)
            what = (f"vmoba mode={mode} {part} grid={grid} th={th} topk={topk} text={tb}+{ta}"
                    + (" pooled" if pooled else ""))
            try:
                rows.append(_check_vmoba(q, k, v, kw, what))
            except Exception as ex:
                rows.append(dict(what=what, error=f"{type(ex).__name__}: {str(ex)[-400:]}",
                                 ok=False))
    tuning_cache("vmoba").forced = None
    RESULTS["check"] = rows
    save()
    log(tabulate(rows, headers="keys", floatfmt=".2e"))
    return all(r["ok"] for r in rows)


def _check_vmoba(q, k, v, kw, what):
    D = q.shape[-1]
    grid, chunk, part, tb, ta = kw["grid"], kw["chunk"], kw["partition"], \
        kw["text_before"], kw["text_after"]
    th, topk, pooled = kw["threshold"], kw["topk"], kw["pooled_rest"]
    lay = vmoba_layout(grid, chunk, part, tb, ta)
    sk = vmoba_select_triton(q, k, layout=lay, threshold=th, topk=topk, scale=D ** -0.5)
    sr = vmoba_select_reference(q, k, layout=lay, threshold=th, topk=topk,
                                scale=D ** -0.5)
    same = bool(torch.equal(sk.kv_idx, sr.kv_idx) and torch.equal(sk.kv_cnt, sr.kv_cnt))
    out = torch.full_like(q, float("nan"))
    vmoba_attention_with_selection(q, k, v, sk, D ** -0.5, out=out, pooled_rest=pooled)
    ref = vmoba_attention_reference(q, k, v, **kw)
    e = rel(out, ref)
    dense_e = rel(out, sdpa(SDPBackend.MATH, q.float(), k.float(), v.float())) \
        if th >= 1.0 else None
    return dict(what=what, sel_same=same, out_err=e, dense_err=dense_e,
                finite=bool(torch.isfinite(out).all()),
                ok=same and e < 1e-2 and (dense_e is None or dense_e < 1e-2))


# ----------------------------------------------------------------------------- 2. dense
def run_dense(name, q, k, v, fa2_ms, cudnn_ms, dense_out):
    B, H, N, D = q.shape
    flops = 4 * B * H * N * N * D
    t_ours = bench(lambda: flash_attention_triton(q, k, v))
    t_stats = bench(lambda: flash_attention_triton(q, k, v, return_stats=True))
    cfg = [c for kk, c in tuned_configs("flash").items() if kk[5] == flash_mod._bucket(N)
           and not kk[3]]
    err = rel(flash_attention_triton(q, k, v), dense_out)
    row = dict(shape=name, N=N, heads=H, D=D, fa2_ms=fa2_ms, cudnn_ms=cudnn_ms, ours_ms=t_ours,
               ours_stats_ms=t_stats, ours_tflops=flops / t_ours * 1e-9,
               cudnn_tflops=flops / cudnn_ms * 1e-9, speed_vs_cudnn=cudnn_ms / t_ours,
               speed_vs_fa2=fa2_ms / t_ours, err_vs_cudnn=err, config=str(cfg[-1] if cfg else ""))
    RESULTS["dense"].append(row)
    save()
    log(row)


# ----------------------------------------------------------------------------- 3. vmoba
def flex_block_mask(sel, N):
    """BlockMask (128x128, tokens in block order) equivalent to ``sel`` at token level."""
    from torch.nn.attention.flex_attention import BlockMask
    lay = sel.layout
    dev = sel.kv_idx.device
    B, H, G, C = sel.kv_idx.shape
    S = sel.mask().to(dev)                                  # [B, H, G, C]
    qg = torch.repeat_interleave(torch.arange(G), lay.group_len).to(dev)
    kb = torch.repeat_interleave(torch.arange(C), lay.block_len).to(dev)
    nt = triton.cdiv(N, 128)
    tile = torch.arange(N, device=dev) // 128
    Aq = torch.zeros(nt, G, device=dev)
    Aq[tile, qg] = 1.0
    Ak = torch.zeros(nt, C, device=dev)
    Ak[tile, kb] = 1.0
    Sf = S.float()
    any_sel = (Aq @ Sf @ Ak.T) > 0
    any_uns = (Aq @ (1 - Sf) @ Ak.T) > 0
    full = any_sel & ~any_uns
    part = any_sel & any_uns

    def to_idx(m):
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.contiguous(), idx.contiguous()

    pn, pi = to_idx(part)
    fn, fi = to_idx(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return S[b, h, qg[q_idx], kb[kv_idx]]

    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=128, mask_mod=mask_mod,
                                    seq_lengths=(N, N))


def topk_for_sparsity(lay, sparsity):
    return max(1, round((1.0 - sparsity) * lay.num_blocks))


def run_vmoba(name, q, k, v, grid, cudnn_ms, fa2_ms, dense_out, partitions, flex):
    B, H, N, D = q.shape
    chunk = default_chunk(grid)
    scale = D ** -0.5
    for part in partitions:
        lay = vmoba_layout(grid, chunk, part)
        perm = lay.perm.to(q.device)
        qp, kp, vp = (t[:, :, perm].contiguous() for t in (q, k, v))
        modes = [("topk", topk_for_sparsity(lay, s), s, False) for s in SPARSITIES] if part == "3d" \
            else [("topk", topk_for_sparsity(lay, 0.90), 0.90, False)]
        if part == "3d":
            modes.append(("threshold", 0.25, None, False))
            modes.append(("threshold", 1.0, 0.0, False))  # dense-equivalent: total_ms = flash route
            # the pooled rest: the unselected blocks as one pooled key each (cost of that branch)
            modes.append(("topk", topk_for_sparsity(lay, 0.90), 0.90, True))
            modes.append(("threshold", 0.25, None, True))
        for kind, val, target, pooled in modes:
            th, topk = (0.25, val) if kind == "topk" else (val, 0)
            sel = vmoba_select_triton(q, k, layout=lay, threshold=th, topk=topk, scale=scale)
            t_sel = bench(lambda: vmoba_select_triton(q, k, layout=lay, threshold=th, topk=topk,
                                                      scale=scale))
            out = vmoba_attention_with_selection(q, k, v, sel, scale, pooled_rest=pooled)  # tunes
            t_att = bench(lambda: vmoba_attention_with_selection(q, k, v, sel, scale,
                                                                 pooled_rest=pooled))
            t_tot = bench(lambda: vmoba_attention_triton(q, k, v, grid=grid, chunk=chunk,
                                                         partition=part, threshold=th, topk=topk,
                                                         pooled_rest=pooled))
            dens = sel.density
            cfg = [c for kk, c in tuned_configs("vmoba").items() if kk[3] == lay.grid and kk[4] == lay.chunk
                   and kk[8] == pooled]
            row = dict(shape=name, partition=part, chunk=str(lay.chunk), blocks=lay.num_blocks,
                       rule=f"{kind}={val}" + (" +pooled" if pooled else ""), target_sparsity=target, sparsity=1 - dens,
                       sel_ms=t_sel, attn_ms=t_att, total_ms=t_tot, cudnn_ms=cudnn_ms,
                       fa2_ms=fa2_ms, speed_vs_cudnn=cudnn_ms / t_tot,
                       speed_vs_cudnn_attn_only=cudnn_ms / t_att, speed_vs_fa2=fa2_ms / t_tot,
                       err_vs_dense=rel(out, dense_out), config=str(cfg[-1] if cfg else ""))
            if flex is not None and part == "3d" and not pooled:
                try:
                    bm = flex_block_mask(sel, N)
                    fo = flex(qp, kp, vp, block_mask=bm)
                    t_flex = bench(lambda: flex(qp, kp, vp, block_mask=bm))
                    inv = torch.empty_like(perm)
                    inv[perm] = torch.arange(perm.numel(), device=perm.device)
                    row.update(flex_ms=t_flex, flex_vs_cudnn=cudnn_ms / t_flex,
                               ours_attn_vs_flex=t_flex / t_att, ours_total_vs_flex=t_flex / t_tot,
                               flex_vs_ours_diff=rel(fo[:, :, inv], out))
                except Exception as ex:  # report, keep going
                    row.update(flex_error=f"{type(ex).__name__}: {str(ex)[-300:]}")
            RESULTS["vmoba"].append(row)
            save()
            log({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in row.items()})


# ----------------------------------------------------------------------------- main
def fmt_tables():
    dense_cols = ["shape", "N", "heads", "D", "fa2_ms", "cudnn_ms", "ours_ms", "ours_stats_ms",
                  "ours_tflops", "speed_vs_cudnn", "speed_vs_fa2", "err_vs_cudnn", "config"]
    vm_cols = ["shape", "partition", "chunk", "blocks", "rule", "sparsity", "sel_ms", "attn_ms",
               "total_ms", "cudnn_ms", "speed_vs_cudnn", "speed_vs_cudnn_attn_only",
               "speed_vs_fa2", "flex_ms", "flex_vs_cudnn", "ours_attn_vs_flex",
               "ours_total_vs_flex", "err_vs_dense"]
    t1 = tabulate([[r.get(c, "") for c in dense_cols] for r in RESULTS["dense"]],
                  headers=dense_cols, floatfmt=".3g", tablefmt="github")
    t2 = tabulate([[r.get(c, "") for c in vm_cols] for r in RESULTS["vmoba"]],
                  headers=vm_cols, floatfmt=".3g", tablefmt="github")
    return t1, t2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16k,wan480,wan720")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    cmd = command_line()
    dev_name = torch.cuda.get_device_name()
    RESULTS["meta"] = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                           command=cmd, date=datetime.datetime.now().isoformat(timespec="seconds"))
    log(RESULTS["meta"])
    t0 = time.time()
    ok = True
    if not args.no_check:
        ok = run_checks()
        log(f"checks {'PASSED' if ok else 'FAILED'} ({time.time() - t0:.0f}s)")
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    shapes = [s for s in args.shapes.split(",") if s]
    if not shapes:  # --shapes "": the GPU checks alone
        save()
        return
    for name in shapes:
        sh = SHAPES[name]
        grid, H, D = sh["grid"], sh["heads"], sh["D"]
        q, k, v = make_video_qkv(grid=grid, heads=H, head_dim=D, dtype=torch.bfloat16,
                                 device="cuda", seed=0)
        rep = 60 if q.shape[2] < 60000 else 400
        fa2 = bench(lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v), rep=rep)
        cud = bench(lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v), rep=rep)
        dense_out = sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)
        log(f"{name}: N={q.shape[2]} FA2 {fa2:.3f} ms cuDNN {cud:.3f} ms ({time.time() - t0:.0f}s)")
        if name == "wan720":  # reuse the configuration tuned at the 32k shape (saves device time)
            hit = [c for kk, c in tuned_configs("flash").items() if kk[5] == 32768 and not kk[3]]
            tuning_cache("flash").forced = hit[-1] if hit else None
        run_dense(name, q, k, v, fa2, cud, dense_out)
        tuning_cache("flash").forced = None
        parts = ("3d", "1d", "2d") if name == "wan480" else ("3d",)
        run_vmoba(name, q, k, v, grid, cud, fa2, dense_out, parts, flex)
        log(f"{name} done ({time.time() - t0:.0f}s)")
        del q, k, v, dense_out
        torch.cuda.empty_cache()
    t1, t2 = fmt_tables()
    section = (f"## VMoBA + dense flash kernel ({RESULTS['meta']['date'][:10]}, {dev_name}, "
               f"torch {torch.__version__}, triton {triton.__version__})\n\n"
               f"Command: `{cmd}`. bf16, batch 1, inputs from `benchmarks/video_inputs.py` "
               f"(seed 0). Medians of `triton.testing.do_bench`. Chunk = ceil(grid/4) per dim; "
               f"sparsity = 1 - computed fraction of video x video token pairs; `sel_ms` = block "
               f"selection alone, `attn_ms` = block-sparse attention over that selection (its "
               f"block-order copy of k/v included: `vmoba_attention_triton` fuses that copy into "
               f"the selection pass, so `total_ms` can be below `sel_ms + attn_ms`), `total_ms` = "
               f"`vmoba_attention_triton` end to end (threshold 1.0 runs the dense flash kernel). Flex = "
               f"`torch.compile(flex_attention)` with the same token-level mask (tokens "
               f"pre-permuted into block order, not timed). err = ||out - dense|| / ||dense||. "
               f"GPU checks: {'all passed' if ok else 'SOME FAILED (see JSON)'}.\n\n"
               f"Dense flash kernel:\n\n{t1}\n\nVMoBA:\n\n{t2}\n")
    publish("bench_vmoba", section, RESULTS, append=not args.no_append)


if __name__ == "__main__":
    main()
