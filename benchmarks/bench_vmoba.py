"""VMoBA block-sparse attention (both selection rules) and our dense flash kernel vs SDPA (FA2, cuDNN)
and FlexAttention.

    python3 benchmarks/bench_vmoba.py [--shapes wan480,wan720,hunyuan720] [--no-check] [--no-flex]
    python3 benchmarks/bench_vmoba.py --smoke         # CPU, Triton interpreter, tiny shape (a test runs it)
    python3 benchmarks/bench_vmoba.py --rules-table   # CPU: density and error of each rule (docs/calibration.md)

All GPU timings are medians of ``triton.testing.do_bench(..., return_mode="median")`` in one process,
bf16, batch 1, on inputs from ``benchmarks/video_inputs.make_video_qkv`` (video structure:
local / temporal / global heads, 3D RoPE). Sections:

1. ``check``: bf16 correctness on the GPU (flash vs SDPA and its lse/entropy vs the reference;
   VMoBA kernels vs reference for every key-load path and for the token rule; threshold 1.0 vs SDPA).
2. ``dense``: our flash kernel (and with ``return_stats``) vs SDPA FLASH (FA2) and CUDNN.
3. ``vmoba``: per shape, the group rule (``selection="group"``: global top-k chosen to hit
   50/75/90/95 % sparsity, threshold 0.25, threshold 1.0, and the pooled rest) and the token rule
   (``selection="token"``, the paper's: threshold 0.25 and top-k at ~90 % sparsity per scope, and the
   pooled rest): selection time, sparse-attention time, total; speedups vs cuDNN; FlexAttention
   (``torch.compile``) on the tokens pre-permuted into block order (not timed) in two forms: the same
   token-level mask (``flex_ms``, group rule only), and a general 128-token **block mask of the same
   density** (``flex_block_ms``: ``create_block_mask`` keeping, per 128-query tile, the 128-key
   tiles with the largest mean-query · mean-key score); the relative error vs dense attention; what
   bounds a row (achieved TFLOP/s of the sparse pass on its FLOPs, the share of the selection in
   the total, the fill of the kernel's tiles).
4. ``targets``: the targets of issue 21 beside the measured ratios, printed last with the short
   table.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
from benchmarks.publish import command_line, out_dir, publish  # noqa: E402
from benchmarks.video_inputs import make_video_qkv  # noqa: E402
from vmonarch_opt.kernels.dispatch import vmoba_select  # noqa: E402
from vmonarch_opt.kernels.flash import kernel as flash_mod  # noqa: E402
from vmonarch_opt.kernels.tuning import tuned_configs, tuning_cache  # noqa: E402
from vmonarch_opt.kernels.vmoba import kernel as vmoba_mod  # noqa: E402
from vmonarch_opt.kernels.flash.kernel import flash_attention_triton  # noqa: E402
from vmonarch_opt.kernels.flash.reference import attention_stats_reference  # noqa: E402
from vmonarch_opt.kernels.vmoba.kernel import (vmoba_attention_triton,  # noqa: E402
                                               vmoba_attention_with_selection, vmoba_select_triton)
from vmonarch_opt.kernels.vmoba.layout import vmoba_layout  # noqa: E402
from vmonarch_opt.kernels.vmoba.reference import (vmoba_attention_from_selection,  # noqa: E402
                                                  vmoba_attention_reference, vmoba_flops, vmoba_select_reference,
                                                  vmoba_select_token_reference)
from vmonarch_opt.kernels.vmoba.token import vmoba_select_token_triton  # noqa: E402

SHAPES = {
    "16k": dict(grid=(16, 32, 32), heads=12, D=128),
    "wan480": dict(grid=(21, 30, 52), heads=12, D=128),  # Wan2.1-1.3B 480p 81f
    "wan720": dict(grid=(21, 45, 80), heads=40, D=128),  # Wan2.1-14B 720p 81f
    "hunyuan720": dict(grid=(33, 45, 80), heads=24, D=128),  # HunyuanVideo 720p 129f
}
SMOKE_SHAPES = {"smoke": dict(grid=(2, 4, 8), heads=1, D=64, chunk=(1, 2, 4))}
SPARSITIES = (0.50, 0.75, 0.90, 0.95)
FLEX_BLOCK = 128  # FlexAttention's tile (the general block-sparse engine's block size)
# issue 21: selection included, at ~90 % sparsity (3D top-k ~ 1/10 of the blocks), equal density for Flex
TARGETS = dict(group_vs_flex_block=1.3, group_vs_cudnn=9.0, token_vs_cudnn=5.0, pooled_overhead=1.10)
RESULTS: dict = {"check": [], "dense": [], "vmoba": [], "targets": [], "rules_table": []}
SMOKE = False


def log(*a):
    print(*a, flush=True)


def save():
    """The JSON so far (a run cut short by a time limit still brings back its finished shapes)."""
    out = out_dir()
    if out:
        (out / "bench_vmoba.json").write_text(json.dumps(RESULTS, indent=1))


def bench(fn, rep=60):
    if SMOKE:  # one run, wall clock (the interpreter: the loop runs, the numbers mean nothing)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
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
VMOBA_CHECKS = [  # grid, chunk, text before/after, D, partition, threshold, topk, pooled, selection, scope
    ((5, 12, 20), (2, 5, 6), 7, 5, 128, "3d", 0.3, 0, False, "group", None),
    ((4, 9, 14), (3, 4, 4), 0, 0, 64, "2d", 0.5, 0, False, "group", None),
    ((6, 10, 12), (2, 4, 4), 0, 9, 128, "1d", 0.25, 3, False, "group", None),
    ((5, 12, 20), (2, 5, 6), 7, 0, 128, "3d", 1.0, 0, False, "group", None),
    ((5, 12, 20), (2, 5, 6), 7, 5, 128, "3d", 0.3, 0, True, "group", None),
    ((4, 9, 14), (3, 4, 4), 0, 0, 64, "2d", 0.25, 4, True, "group", None),
    ((5, 12, 20), (2, 5, 6), 7, 5, 128, "3d", 0.25, 0, False, "token", "query_head"),
    ((4, 9, 14), (3, 4, 4), 0, 6, 64, "2d", 0.4, 0, True, "token", "head_global"),
    ((6, 10, 12), (2, 4, 4), 3, 0, 128, "3d", 0.25, 4, True, "token", "query_head"),
    ((5, 12, 20), (2, 5, 6), 0, 0, 80, "3d", 0.25, 3, False, "token", "head_global"),
]
SMOKE_CHECKS = [((2, 3, 4), (1, 2, 2), 2, 1, 64, "3d", 0.3, 0, True, "group", None),
                ((2, 3, 4), (1, 2, 2), 2, 1, 64, "3d", 0.3, 0, True, "token", "query_head")]


def run_checks(dev, dt):
    rows = []
    torch.manual_seed(0)
    flash_cases = [(17, 23, 64)] if SMOKE else [(1000, 777, 64), (333, 2049, 128), (515, 515, 80),
                                                 (4096, 4096, 128)]
    for (Nq, Nk, D) in flash_cases:
        q, k, v = (torch.randn(2, 3, n, D, device=dev, dtype=dt) for n in (Nq, Nk, Nk))
        if not SMOKE:
            tuning_cache("flash").forced = (128, 64, 4, 3, D in (64, 128))  # both code paths, no tuning here
        what = f"flash Nq={Nq} Nk={Nk} D={D} cfg={tuning_cache('flash').forced}"
        try:
            out, lse, ent = flash_attention_triton(q, k, v, return_stats=True)
            ro, rl, re_ = attention_stats_reference(q, k, v)
            rows.append(dict(what=what, out_err=rel(out, ro), lse_err=rel(lse, rl),
                             ent_maxabs=(ent - re_).abs().max().item(),
                             ok=rel(out, ro) < 1e-2 and rel(lse, rl) < 1e-3))
        except Exception as ex:
            rows.append(dict(what=what, error=f"{type(ex).__name__}: {str(ex)[-400:]}", ok=False))
    tuning_cache("flash").forced = None
    for mode in ((None,) if SMOKE else (0, 1, 2)):
        tuning_cache("vmoba").forced = None if mode is None else (128, 64, 4, 3, mode)
        for (grid, chunk, tb, ta, D, part, th, topk, pooled, rule, scope) in (SMOKE_CHECKS if SMOKE else VMOBA_CHECKS):
            if (mode == 2 and D not in (64, 128)) or (rule == "token" and mode not in (None, 0)):
                continue  # the token kernels have one key-load path: run once
            N = tb + ta + grid[0] * grid[1] * grid[2]
            q, k, v = (torch.randn(2, 2, N, D, device=dev, dtype=dt) * 1.5 for _ in range(3))
            kw = dict(grid=grid, chunk=chunk, text_before=tb, text_after=ta, partition=part,
                      threshold=th, topk=topk, pooled_rest=pooled, selection=rule, scope=scope)
            what = (f"vmoba {rule}{'/' + scope if scope else ''} mode={mode} {part} grid={grid} th={th} "
                    f"topk={topk} text={tb}+{ta} D={D}" + (" pooled" if pooled else ""))
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


def _select(q, k, lay, th, topk, rule, scope, **kw):
    D = q.shape[-1]
    if rule == "token":
        return vmoba_select_token_triton(q, k, layout=lay, threshold=th, topk=topk, scope=scope, **kw)
    return vmoba_select_triton(q, k, layout=lay, threshold=th, topk=topk, scale=D ** -0.5, **kw)


def _check_vmoba(q, k, v, kw, what):
    D = q.shape[-1]
    lay = vmoba_layout(kw["grid"], kw["chunk"], kw["partition"], kw["text_before"], kw["text_after"])
    th, topk, pooled, rule, scope = kw["threshold"], kw["topk"], kw["pooled_rest"], kw["selection"], kw["scope"]
    sk = _select(q, k, lay, th, topk, rule, scope)
    if rule == "token":
        sr = vmoba_select_token_reference(q, k, layout=lay, threshold=th, topk=topk, scope=scope)
        same = bool(torch.equal(sk.row_sel, sr.row_sel))
    else:
        sr = vmoba_select_reference(q, k, layout=lay, threshold=th, topk=topk, scale=D ** -0.5)
        same = bool(torch.equal(sk.kv_idx, sr.kv_idx) and torch.equal(sk.kv_cnt, sr.kv_cnt))
    out = torch.full_like(q, float("nan"))
    vmoba_attention_with_selection(q, k, v, sk, D ** -0.5, out=out, pooled_rest=pooled)
    ref = vmoba_attention_from_selection(q.float(), k.float(), v.float(), sk, D ** -0.5, pooled_rest=pooled)
    e = rel(out, ref)
    e_full = rel(vmoba_attention_triton(q, k, v, **kw), vmoba_attention_reference(q.float(), k.float(), v.float(), **kw))
    dense_e = rel(out, sdpa(SDPBackend.MATH, q.float(), k.float(), v.float())) if th >= 1.0 and not topk else None
    return dict(what=what, sel_same=same, out_err=e, end_to_end_err=e_full, dense_err=dense_e,
                finite=bool(torch.isfinite(out).all()),
                ok=same and e < 1e-2 and e_full < 1e-2 and (dense_e is None or dense_e < 1e-2))


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


def flex_tile_mask(qp, kp, density, block):
    """A general block mask at ``density``: per ``block``-query tile of the block-ordered tokens,
    the ``round(density * tiles)`` key tiles with the largest mean-query . mean-key score, made by
    ``create_block_mask`` from a tile-level mask_mod (every kept tile full, no partial tiles).
    Returns ``(BlockMask, its density, how it was built)``."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    B, H, N, D = qp.shape
    nt = triton.cdiv(N, block)
    pad = nt * block - N

    def tile_means(x):
        x = F.pad(x.float(), (0, 0, 0, pad)).reshape(B, H, nt, block, D).sum(3)
        cnt = torch.full((nt,), float(block), device=x.device)
        cnt[-1] = block - pad
        return x / cnt[:, None]

    score = tile_means(qp) @ tile_means(kp).transpose(-1, -2)  # [B, H, nt, nt]
    keep_n = max(1, min(nt, round(density * nt)))
    top = score.topk(keep_n, dim=-1).indices
    tiles = torch.zeros(B, H, nt, nt, dtype=torch.bool, device=qp.device).scatter_(-1, top, True)

    def mask_mod(b, h, q_idx, kv_idx):
        return tiles[b, h, q_idx // block, kv_idx // block]

    try:
        bm = create_block_mask(mask_mod, B, H, N, N, device=qp.device, BLOCK_SIZE=block, _compile=not SMOKE)
        how = "create_block_mask"
    except Exception as ex:  # a very long sequence: the same mask from its tile lists
        log(f"create_block_mask failed ({type(ex).__name__}: {str(ex)[:200]}); building from kv blocks")
        num = tiles.sum(-1).to(torch.int32)
        idx = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        zero = torch.zeros_like(num)
        bm = BlockMask.from_kv_blocks(zero, idx, num, idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(N, N))
        how = "BlockMask.from_kv_blocks"
    kept = tiles.float().sum(-1) * block  # key tokens per query tile (the last tile may be short)
    kept -= tiles[..., -1].float() * pad
    rows = torch.full((nt,), float(block), device=qp.device)
    rows[-1] = block - pad
    dens = float((kept * rows).sum() / (B * H * N * N))
    return bm, dens, how


def topk_for_sparsity(lay, sparsity):
    return max(1, round((1.0 - sparsity) * lay.num_blocks))


def tile_fill(sel, BM=64, BN=64):
    """How full the kernel's tiles are (1 = no masked rows or columns). Group rule: selected key
    rows / rows of the key tiles walked. Token rule: real query rows / rows of the query tiles
    gathered per (head, block), times the same key-tile fill of each block."""
    lay = sel.layout
    bl = lay.block_len.double().to(sel._shape_src.device)
    key_fill_block = bl / (torch.ceil(bl / BN) * BN)  # per block
    if sel.row_sel is None:
        m = sel.mask().double()  # [B, H, G, C]
        gl = lay.group_len.double().to(m.device)
        used = torch.einsum("bhgc,g,c->", m, gl, bl)
        walked = torch.einsum("bhgc,g,c->", m, gl, torch.ceil(bl / BN) * BN)
        return float(used / walked)
    cnt = sel.row_sel.sum(2).double()  # [B, H, C] queries per block
    q_fill = float(cnt.sum() / (torch.ceil(cnt / BM) * BM).sum())
    k_fill = float((cnt * bl).sum() / (cnt * bl / key_fill_block).sum())
    return q_fill * k_fill


def run_vmoba(name, q, k, v, grid, cudnn_ms, fa2_ms, dense_out, partitions, flex, chunk=None):
    B, H, N, D = q.shape
    chunk = chunk or default_chunk(grid)
    scale = D ** -0.5
    for part in partitions:
        lay = vmoba_layout(grid, chunk, part)
        perm = lay.perm.to(q.device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        qp, kp, vp = (t[:, :, perm].contiguous() for t in (q, k, v))
        k90 = topk_for_sparsity(lay, 0.90)
        modes = [("group", None, "topk", topk_for_sparsity(lay, s), s, False) for s in SPARSITIES] \
            if part == "3d" else [("group", None, "topk", k90, 0.90, False)]
        if part == "3d":
            modes.append(("group", None, "threshold", 0.25, None, False))
            modes.append(("group", None, "threshold", 1.0, 0.0, False))  # dense-equivalent: the flash route
            # the pooled rest: the unselected blocks as one pooled key each (cost of that branch)
            modes.append(("group", None, "topk", k90, 0.90, True))
            modes.append(("group", None, "threshold", 0.25, None, True))
            # the paper's per-token rule: its default threshold, and top-k at ~90 % sparsity per scope
            modes.append(("token", "query_head", "threshold", 0.25, None, False))
            modes.append(("token", "query_head", "topk", k90, 0.90, False))
            modes.append(("token", "query_head", "topk", k90, 0.90, True))
            modes.append(("token", "head_global", "threshold", 0.25, None, False))
            modes.append(("token", "head_global", "topk", k90, 0.90, False))
        if SMOKE:  # every code path once: group and token top-k, each with the pooled rest, a head_global row
            modes = [m for m in modes if m[2] == "topk" and m[4] == 0.90 and (m[1] != "head_global")] + \
                [m for m in modes if m[1] == "head_global" and m[2] == "threshold"]
        for rule, scope, kind, val, target, pooled in modes:
            th, topk = (0.25, val) if kind == "topk" else (val, 0)
            sel = _select(q, k, lay, th, topk, rule, scope)
            t_sel = bench(lambda: _select(q, k, lay, th, topk, rule, scope))
            out = vmoba_attention_with_selection(q, k, v, sel, scale, pooled_rest=pooled)  # tunes
            t_att = bench(lambda: vmoba_attention_with_selection(q, k, v, sel, scale, pooled_rest=pooled))
            t_tot = bench(lambda: vmoba_attention_triton(q, k, v, grid=grid, chunk=chunk, partition=part,
                                                         threshold=th, topk=topk, pooled_rest=pooled,
                                                         selection=rule, scope=scope))
            dens = sel.density
            flops = vmoba_flops(sel, D, pooled)
            cfg = [c for kk, c in tuned_configs("vmoba").items() if kk[3] == lay.grid and kk[4] == lay.chunk
                   and kk[8] == pooled] if rule == "group" else []
            label = f"{rule}{'/' + scope if scope else ''} {kind}={val}" + (" +pooled" if pooled else "")
            row = dict(shape=name, partition=part, chunk=str(lay.chunk), blocks=lay.num_blocks, rule=label,
                       selection=rule, scope=scope, kind=kind, pooled=pooled,
                       target_sparsity=target, sparsity=1 - dens, sel_ms=t_sel, attn_ms=t_att, total_ms=t_tot,
                       cudnn_ms=cudnn_ms, fa2_ms=fa2_ms, speed_vs_cudnn=cudnn_ms / t_tot,
                       speed_vs_cudnn_attn_only=cudnn_ms / t_att, speed_vs_fa2=fa2_ms / t_tot,
                       attn_tflops=flops / t_att * 1e-9, sel_share=t_sel / t_tot, tile_fill=tile_fill(sel),
                       err_vs_dense=rel(out, dense_out), config=str(cfg[-1] if cfg else ""))
            if flex is not None and part == "3d" and not pooled and dens < 1.0:
                try:
                    if rule == "group":  # the same token-level mask
                        bm = flex_block_mask(sel, N)
                        fo = flex(qp, kp, vp, block_mask=bm)
                        t_flex = bench(lambda: flex(qp, kp, vp, block_mask=bm))
                        row.update(flex_ms=t_flex, flex_vs_cudnn=cudnn_ms / t_flex,
                                   ours_attn_vs_flex=t_flex / t_att, ours_total_vs_flex=t_flex / t_tot,
                                   flex_vs_ours_diff=rel(fo[:, :, inv], out))
                    bm, fd, how = flex_tile_mask(qp, kp, dens, FLEX_BLOCK if not SMOKE else 16)
                    fo = flex(qp, kp, vp, block_mask=bm)
                    t_fb = bench(lambda: flex(qp, kp, vp, block_mask=bm))
                    row.update(flex_block_ms=t_fb, flex_block_sparsity=1 - fd, flex_block_built_by=how,
                               flex_block_vs_cudnn=cudnn_ms / t_fb, ours_total_vs_flex_block=t_fb / t_tot,
                               flex_block_err_vs_dense=rel(fo[:, :, inv], dense_out))
                except Exception as ex:  # report, keep going
                    row.update(flex_error=f"{type(ex).__name__}: {str(ex)[-300:]}")
            RESULTS["vmoba"].append(row)
            save()
            log({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in row.items()})
        del qp, kp, vp


def targets():
    """Per shape, the issue's targets beside the measured ratios (3D partition, ~90 % sparsity)."""
    out = []
    shapes = dict.fromkeys(r["shape"] for r in RESULTS["vmoba"])
    for name in shapes:
        rows = [r for r in RESULTS["vmoba"] if r["shape"] == name and r["partition"] == "3d"]

        def pick(rule, pooled, scope=None):
            hit = [r for r in rows if r["selection"] == rule and r["kind"] == "topk" and r["target_sparsity"] == 0.90
                   and r["pooled"] == pooled and (scope is None or r["scope"] == scope)]
            return hit[0] if hit else None

        g, gp, t = pick("group", False), pick("group", True), pick("token", False, "query_head")
        tp = pick("token", True, "query_head")
        checks = []
        if g is not None:
            if "flex_block_ms" in g:
                checks.append(("group top-k vs Flex block mask (total, equal density)",
                               g["ours_total_vs_flex_block"], TARGETS["group_vs_flex_block"], g))
            checks.append(("group top-k vs cuDNN", g["speed_vs_cudnn"], TARGETS["group_vs_cudnn"], g))
        if t is not None:
            checks.append(("token top-k vs cuDNN", t["speed_vs_cudnn"], TARGETS["token_vs_cudnn"], t))
        for base, pooled, what in ((g, gp, "group"), (t, tp, "token")):
            if base is not None and pooled is not None:
                checks.append((f"{what} pooled rest / plain (total ms)", pooled["total_ms"] / base["total_ms"],
                               TARGETS["pooled_overhead"], pooled))
        for what, got, want, r in checks:
            lower_is_better = "pooled" in what
            met = got <= want if lower_is_better else got >= want
            out.append(dict(shape=name, what=what, measured=got, target=("≤ " if lower_is_better else "≥ ") + f"{want:g}",
                            met=met, sparsity=r["sparsity"], total_ms=r["total_ms"], sel_share=r["sel_share"],
                            attn_tflops=r["attn_tflops"], tile_fill=r["tile_fill"]))
    RESULTS["targets"] = out
    return out


# ----------------------------------------------------------------------------- the rules' density (CPU)
RULES_GRID, RULES_CHUNK, RULES_HEADS, RULES_D = (8, 16, 28), (2, 4, 7), 6, 64
RULES = [("group", None, 0.25, 0), ("group", None, 0.5, 0), ("group", None, 0.75, 0), ("group", None, 0.25, 4),
         ("group", None, 0.25, 8), ("group", None, 0.25, 16),
         ("token", "query_head", 0.1, 0), ("token", "query_head", 0.25, 0), ("token", "query_head", 0.5, 0),
         ("token", "query_head", 0.75, 0), ("token", "query_head", 0.25, 4), ("token", "query_head", 0.25, 8),
         ("token", "query_head", 0.25, 16),
         ("token", "head_global", 0.25, 0), ("token", "head_global", 0.5, 0), ("token", "head_global", 0.25, 8)]


def rules_table(grid=RULES_GRID, chunk=RULES_CHUNK, heads=RULES_HEADS, D=RULES_D, rules=RULES):
    """Density (selected fraction of the video pairs) and attention error vs dense of each rule on
    the structured inputs, 3D blocks; CPU references (the docs table)."""
    q, k, v = make_video_qkv(grid=grid, heads=heads, head_dim=D, seed=0)
    dense = F.scaled_dot_product_attention(q, k, v)
    lay = vmoba_layout(grid, chunk, "3d")
    rows = []
    for rule, scope, th, topk in rules:
        kw = dict(grid=grid, chunk=chunk, partition="3d", threshold=th, topk=topk, selection=rule, scope=scope)
        sel = vmoba_select(q, k, scale=D ** -0.5, **kw)
        errs = [rel(vmoba_attention_from_selection(q, k, v, sel, D ** -0.5, pooled_rest=p), dense) for p in (False, True)]
        rows.append(dict(rule=rule if rule == "group" else f"token ({scope})",
                         setting=f"top-{topk}" if topk else f"threshold {th:g}", density=sel.density,
                         err=errs[0], err_pooled=errs[1]))
        log(rows[-1])
    RESULTS["rules_table"] = rows
    head = (f"{grid[0]}×{grid[1]}×{grid[2]} video tokens, {heads} heads × {D}, 3D blocks {chunk[0]}×{chunk[1]}×"
            f"{chunk[2]} ({lay.num_blocks} blocks), `benchmarks/video_inputs.py` seed 0")
    return head, tabulate([[r["rule"], r["setting"], f"{100 * r['density']:.1f} %", f"{r['err']:.3f}",
                            f"{r['err_pooled']:.3f}"] for r in rows],
                          headers=["rule", "setting", "density", "error", "error +pooled"], tablefmt="github")


# ----------------------------------------------------------------------------- main
VM_COLS = ["shape", "partition", "blocks", "rule", "sparsity", "sel_ms", "attn_ms", "total_ms", "cudnn_ms",
           "speed_vs_cudnn", "speed_vs_fa2", "attn_tflops", "sel_share", "tile_fill", "flex_ms", "ours_total_vs_flex",
           "flex_block_ms", "flex_block_sparsity", "ours_total_vs_flex_block", "err_vs_dense"]


def fmt_tables():
    dense_cols = ["shape", "N", "heads", "D", "fa2_ms", "cudnn_ms", "ours_ms", "ours_stats_ms",
                  "ours_tflops", "speed_vs_cudnn", "speed_vs_fa2", "err_vs_cudnn", "config"]
    t1 = tabulate([[r.get(c, "") for c in dense_cols] for r in RESULTS["dense"]],
                  headers=dense_cols, floatfmt=".3g", tablefmt="github")
    t2 = tabulate([[r.get(c, "") for c in VM_COLS] for r in RESULTS["vmoba"]],
                  headers=VM_COLS, floatfmt=".3g", tablefmt="github")
    tcols = ["shape", "what", "measured", "target", "met", "sparsity", "total_ms", "sel_share", "attn_tflops",
             "tile_fill"]
    t3 = tabulate([[r.get(c, "") for c in tcols] for r in targets()], headers=tcols, floatfmt=".3g",
                  tablefmt="github")
    return t1, t2, t3


def main(argv=None):
    global SMOKE
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,wan720,hunyuan720")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shape")
    ap.add_argument("--rules-table", action="store_true",
                    help="CPU: density and error of each selection rule on structured inputs (no GPU)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    SMOKE = args.smoke
    for key in RESULTS:
        RESULTS[key] = []
    cmd = command_line()
    if args.rules_table:
        head, table = rules_table()
        section = (f"## VMoBA selection rules: density and error ({datetime.date.today()}, CPU)\n\n"
                   f"Command: `{cmd}`. {head}; density = selected fraction of the video × video pairs, error = "
                   f"‖out − dense‖ / ‖dense‖ (float32 references).\n\n{table}\n")
        publish("bench_vmoba_rules", section, RESULTS, append=not args.no_append)
        return True
    if SMOKE:
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("VMONARCH_INTERPRET_KERNELS") != "1":
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 and VMONARCH_INTERPRET_KERNELS=1 set before triton "
                             "is imported (the command line sets them itself)")
        dev, dt, shapes = "cpu", torch.float16, SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_vmoba.py needs a CUDA GPU (--smoke: the CPU interpreter run; --rules-table: the "
                             "CPU density table)")
        dev, dt = "cuda", torch.bfloat16
        shapes = {n: SHAPES[n] for n in args.shapes.split(",") if n}
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    RESULTS["meta"] = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                           command=cmd, date=datetime.datetime.now().isoformat(timespec="seconds"))
    log(RESULTS["meta"])
    t0 = time.time()
    ok = True
    if not args.no_check:
        ok = run_checks(dev, dt)
        log(f"checks {'PASSED' if ok else 'FAILED'} ({time.time() - t0:.0f}s)")
    flex = None
    if not args.no_flex:
        import warnings

        from torch.nn.attention.flex_attention import flex_attention
        if SMOKE:  # eager flex (unfused, materialises the scores) on the tiny shape: it says so once
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        flex = flex_attention if SMOKE else torch.compile(flex_attention, dynamic=False)
    if not shapes:  # --shapes "": the GPU checks alone
        save()
        return ok
    for name, sh in shapes.items():
        grid, H, D = sh["grid"], sh["heads"], sh["D"]
        q, k, v = make_video_qkv(grid=grid, heads=H, head_dim=D, dtype=dt, device=dev, seed=0)
        rep = 60 if q.shape[2] < 60000 else 400
        if SMOKE:  # no cuDNN / FA2 on the CPU: the math backend stands in
            fa2 = cud = bench(lambda: sdpa(SDPBackend.MATH, q, k, v))
            dense_out = sdpa(SDPBackend.MATH, q.float(), k.float(), v.float())
        else:
            fa2 = bench(lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v), rep=rep)
            cud = bench(lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v), rep=rep)
            dense_out = sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)
        log(f"{name}: N={q.shape[2]} FA2 {fa2:.3f} ms cuDNN {cud:.3f} ms ({time.time() - t0:.0f}s)")
        if not SMOKE:
            if name in ("wan720", "hunyuan720"):  # reuse the configuration tuned at the 32k shape (saves device time)
                hit = [c for kk, c in tuned_configs("flash").items() if kk[5] == 32768 and not kk[3]]
                tuning_cache("flash").forced = hit[-1] if hit else None
            run_dense(name, q, k, v, fa2, cud, dense_out)
            tuning_cache("flash").forced = None
        parts = ("3d", "1d", "2d") if name == "wan480" else ("3d",)
        run_vmoba(name, q, k, v, grid, cud, fa2, dense_out, parts, flex, chunk=sh.get("chunk"))
        log(f"{name} done ({time.time() - t0:.0f}s)")
        del q, k, v, dense_out
        if dev == "cuda":
            torch.cuda.empty_cache()
    t1, t2, t3 = fmt_tables()
    section = (f"## VMoBA (group and token rules) + dense flash kernel ({RESULTS['meta']['date'][:10]}, {dev_name}, "
               f"torch {torch.__version__}, triton {triton.__version__})\n\n"
               f"Command: `{cmd}`. {'fp16 (interpreter)' if SMOKE else 'bf16'}, batch 1, inputs from "
               f"`benchmarks/video_inputs.py` (seed 0). "
               f"{'One wall-clock run per timing (the interpreter: the numbers mean nothing). ' if SMOKE else ''}"
               f"{'' if SMOKE else 'Medians of `triton.testing.do_bench`. '}Chunk = ceil(grid/4) "
               f"per dim; sparsity = 1 - selected fraction of video x video token pairs (both rules' kernels compute "
               f"exactly the selected pairs); `rule`: `group` (per query group of <= 128 tokens) or `token/<scope>` "
               f"(the paper's per-token rule); `sel_ms` = selection alone, `attn_ms` = sparse attention over that "
               f"selection, `total_ms` = `vmoba_attention_triton` end to end (threshold 1.0 runs the dense flash "
               f"kernel); `attn_tflops` = the row's FLOPs (`vmoba_flops`) / `attn_ms`; `sel_share` = sel_ms / "
               f"total_ms; `tile_fill` = used / walked rows of the kernel's tiles. Flex = "
               f"`torch.compile(flex_attention)` on the tokens pre-permuted into block order (not timed): `flex_ms` "
               f"with the same token-level mask (group rows), `flex_block_ms` with a {FLEX_BLOCK}-token block mask of "
               f"the same density (`create_block_mask`, per query tile the key tiles of largest mean-q . mean-k). "
               f"err = ||out - dense|| / ||dense||. GPU checks: {'all passed' if ok else 'SOME FAILED (see JSON)'}."
               f"\n\nDense flash kernel:\n\n{t1}\n\nVMoBA:\n\n{t2}\n\nTargets (issue 21; 3D, ~90 % sparsity, "
               f"selection included):\n\n{t3}\n")
    publish("bench_vmoba", section, RESULTS, append=not (args.no_append or SMOKE))
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
