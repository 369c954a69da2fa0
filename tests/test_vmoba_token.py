"""VMoBA's token rule (``selection="token"``): the selection against a transcription of the paper
implementation's rule, the Triton selection / forward / backward (TRITON_INTERPRET=1) against the
references, the op's autograd, and how the rule is named in configs, reports and profiles.

Bounds as in test_backward_kernels.py: relative error against float64 on the same (rounded)
inputs and the same selection, 2e-5 for fp32 and 4e-3 (gradients) / 3e-3 (outputs) for fp16;
every output is written into NaN-poisoned buffers and checked finite.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import vmonarch_opt
from conftest import rel_err
from vmonarch_opt.kernels.dispatch import vmoba_select
from vmonarch_opt.kernels.vmoba import token as tok
from vmonarch_opt.kernels.vmoba.backward import vmoba_attention_backward_triton, vmoba_backward_with_selection
from vmonarch_opt.kernels.vmoba.kernel import vmoba_attention_triton, vmoba_attention_with_selection
from vmonarch_opt.kernels.vmoba.layout import VMoBASelection, _check_args, vmoba_layout
from vmonarch_opt.kernels.vmoba.reference import (token_gate, vmoba_attention_from_selection,
                                                  vmoba_attention_reference, vmoba_flops,
                                                  vmoba_select_token_reference)
from vmonarch_opt.kernels.vmoba.token import vmoba_select_token_triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.video_inputs import make_video_qkv  # noqa: E402

EPS = 1e-6


# ---------------------------------------------------------------- the paper implementation's rule
def paper_rule(gate, own, threshold, topk, scope, copy_cutoff_bug=False):
    """The selection of KwaiVGI/VMoBA ``moba_attn_varlen`` for one sample, transcribed step by
    step in its own layout: ``gate``/``own`` are [C blocks, H heads, S tokens]; returns the
    selected (block, head, token) mask with the own blocks. Threshold mode: min-max normalise
    (per token and head, or per head), the own share, the others sorted descending, running sum
    over the total, the first index reaching the remaining share, every sorted entry up to it.
    Where no index reaches it, their query_head code writes ``full_like(any_cond, C - 1)`` (a
    boolean tensor, so index 1): ``copy_cutoff_bug`` reproduces that, else the index is C - 1.
    Top-k mode: the own gates raised by 1e9, then topk per token (or topk·S per head)."""
    C, H, S = gate.shape
    if topk:
        g = gate.clone()
        g[own] += 1e9
        kk = min(topk, C)
        if scope == "query_head":
            m = torch.zeros_like(own).scatter_(0, torch.topk(g, kk, dim=0).indices, True)
        else:
            flat = g.permute(1, 0, 2).reshape(H, C * S)
            m = torch.zeros(H, C * S, dtype=torch.bool).scatter_(1, torch.topk(flat, kk * S, dim=1).indices, True)
            m = m.reshape(H, C, S).permute(1, 0, 2)
        return m | own
    if scope == "query_head":
        lo, hi = gate.amin(0), gate.amax(0)
        den = torch.where(hi - lo <= EPS, torch.ones_like(hi), hi - lo)
        n = (gate - lo) / den
        total = n.sum(0)
        remain = torch.clamp(threshold - (n * own).sum(0) / (total + EPS), min=0.0)
        others = n.clone()
        others[own] = 0.0
        sv, si = torch.sort(others, dim=0, descending=True, stable=True)
        cond = sv.cumsum(0) / (total + EPS) >= remain
        reached = cond.any(0)
        fallback = torch.full_like(reached, C - 1) if copy_cutoff_bug else torch.full(reached.shape, C - 1)
        cutoff = torch.where(reached, cond.float().argmax(0), fallback)
        m = torch.zeros_like(own).scatter_(0, si, torch.arange(C).view(-1, 1, 1) <= cutoff)
        return m | own
    lo, hi = gate.amin(dim=(0, 2), keepdim=True), gate.amax(dim=(0, 2), keepdim=True)
    den = torch.where(hi - lo <= EPS, torch.ones_like(hi), hi - lo)
    n = (gate - lo) / den
    total = n.sum(dim=(0, 2))
    remain = torch.clamp(threshold - (n * own).sum(dim=(0, 2)) / (total + EPS), min=0.0)
    others = n.clone()
    others[own] = 0.0
    sv, si = torch.sort(others.permute(1, 0, 2).reshape(H, C * S), dim=1, descending=True, stable=True)
    cond = sv.cumsum(1) / (total[:, None] + EPS) >= remain[:, None]
    cutoff = torch.where(cond.any(1), cond.float().argmax(1), torch.full((H,), C * S - 1))
    m = torch.zeros(H, C * S, dtype=torch.bool).scatter_(1, si, torch.arange(C * S)[None] <= cutoff[:, None])
    return m.reshape(H, C, S).permute(1, 0, 2) | own


def paper_selection(q, k, lay, threshold, topk, scope, copy_cutoff_bug=False):
    """``paper_rule`` per sample on our gates (block order), as [B, H, Nv, C]."""
    gate = token_gate(q, k, lay)  # [B, H, Nv, C]
    C = lay.num_blocks
    pos_block = torch.repeat_interleave(torch.arange(C), lay.block_len)
    own = F.one_hot(pos_block, C).bool().T[:, None, :].expand(C, q.shape[1], -1).contiguous()
    return torch.stack([paper_rule(gate[b].permute(2, 0, 1), own, threshold, topk, scope,
                                   copy_cutoff_bug).permute(1, 2, 0) for b in range(q.shape[0])])


def _inputs(kind, B, H, grid, tb, ta, D=16, dtype=torch.float32, seed=0):
    N = tb + ta + grid[0] * grid[1] * grid[2]
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(B, H, N, D, generator=g) * 1.5).to(dtype) for _ in range(3)]
    assert not (tb and ta), "structured inputs put their text on one side"
    qkv = make_video_qkv(grid=grid, heads=H, head_dim=D, batch=B, text_tokens=tb + ta,
                         text_position="before" if tb else "after", seed=seed)
    return [t.to(dtype) for t in qkv]


RULES = [(0.25, 0), (0.6, 0), (0.25, 3)]


@pytest.mark.parametrize("kind,grid,chunk,part,tb,ta", [
    ("random", (3, 5, 7), (2, 2, 3), "3d", 2, 1),   # odd grid: partial blocks
    ("random", (4, 6, 6), (2, 3, 3), "2d", 0, 0),
    ("structured", (4, 8, 8), (2, 4, 4), "3d", 3, 0),
    ("structured", (8, 4, 6), (2, 3, 3), "1d", 0, 4),
])
def test_reference_selection_is_the_paper_rule(kind, grid, chunk, part, tb, ta):
    q, k, _ = _inputs(kind, 2, 3, grid, tb, ta)
    lay = vmoba_layout(grid, chunk, part, tb, ta)
    assert lay.num_blocks >= 3  # C = 2 ties the own block's zero with the other's (an unstable sort)
    for scope in ("query_head", "head_global"):
        for thr, topk in RULES:
            sel = vmoba_select_token_reference(q, k, layout=lay, threshold=thr, topk=topk, scope=scope)
            want = paper_selection(q, k, lay, thr, topk, scope)
            assert torch.equal(sel.row_sel, want), (scope, thr, topk)
            assert 0 < sel.density < 1
            pairs = (want.sum(2).double() * lay.block_len.double()).sum(-1)  # [B, H] selected token pairs
            assert abs(sel.density - float(pairs.mean()) / lay.n_video ** 2) < 1e-12


def test_unreachable_threshold_keeps_every_block_not_two():
    """Their query_head fallback index is ``full_like(bool, C - 1)`` = True = 1: with a share no
    running sum can reach (q = 0 tokens: every gate equal, total 0) they keep the own block and
    two others; we keep every block. The test fails if that bug is copied."""
    grid, chunk = (3, 4, 6), (1, 2, 2)
    q, k, _ = _inputs("random", 1, 2, grid, 0, 0)
    q[:, :, :10] = 0.0  # ten tokens whose gates are all equal
    lay = vmoba_layout(grid, chunk, "3d")
    C = lay.num_blocks
    zero_rows = torch.isin(lay.perm, torch.arange(10))  # block-order positions of those tokens
    sel = vmoba_select_token_reference(q, k, layout=lay, threshold=0.25, topk=0, scope="query_head")
    assert sel.row_sel[:, :, zero_rows].all()  # every block
    fixed = paper_selection(q, k, lay, 0.25, 0, "query_head")
    copied = paper_selection(q, k, lay, 0.25, 0, "query_head", copy_cutoff_bug=True)
    assert torch.equal(sel.row_sel, fixed)
    assert copied[:, :, zero_rows].sum(-1).max() == 3 and not torch.equal(sel.row_sel, copied)
    assert (sel.row_sel[:, :, ~zero_rows].sum(-1) < C).any()  # the other tokens stay sparse
    ker = vmoba_select_token_triton(q, k, layout=lay, threshold=0.25, topk=0, scope="query_head")
    assert torch.equal(ker.row_sel, sel.row_sel)


def test_best_other_block_added_when_own_block_meets_the_threshold():
    """Their running sum starts at the first ranked other block and uses ``>=``: a token whose own
    block alone already meets the threshold still gets its best other block."""
    grid, chunk = (2, 4, 4), (1, 2, 2)
    lay = vmoba_layout(grid, chunk, "3d")
    q, k, _ = _inputs("random", 1, 1, grid, 0, 0, D=16)
    kbar = torch.randn(lay.num_blocks, 16)
    pos_block = torch.repeat_interleave(torch.arange(lay.num_blocks), lay.block_len)
    for c in range(lay.num_blocks):  # block c's keys all equal kbar[c]: its mean key
        k[0, 0, lay.perm[pos_block == c]] = kbar[c]
    q[0, 0, lay.perm] = 20 * kbar[pos_block] + 0.1 * torch.randn(lay.n_video, 16)  # own block dominates
    for scope in ("query_head", "head_global"):
        sel = vmoba_select_token_reference(q, k, layout=lay, threshold=0.01, topk=0, scope=scope)
        assert torch.equal(sel.row_sel, paper_selection(q, k, lay, 0.01, 0, scope))
        if scope == "query_head":
            assert (sel.row_sel.sum(-1) == 2).all()  # own + the best other, per token
            g = token_gate(q, k, lay)[0, 0]
            g[torch.arange(lay.n_video), pos_block] = -1e9
            best = g.argmax(-1)
            assert sel.row_sel[0, 0, torch.arange(lay.n_video), best].all()
        else:
            assert sel.row_sel.sum() == lay.n_video + 1  # the head's single best other entry


def test_edge_rules_topk_one_threshold_one_and_batch_independence():
    grid, chunk = (3, 4, 5), (2, 2, 3)
    q, k, v = _inputs("random", 2, 2, grid, 2, 1)
    lay = vmoba_layout(grid, chunk, "3d", 2, 1)
    for scope in ("query_head", "head_global"):
        # top-1 is the own block alone (their code falls back to full attention there)
        one = vmoba_select_token_reference(q, k, layout=lay, threshold=0.25, topk=1, scope=scope)
        assert (one.row_sel.sum(-1) == 1).all()
        kw = dict(grid=grid, chunk=chunk, text_before=2, text_after=1, selection="token", scope=scope)
        # threshold >= 1 is exactly dense
        dense = F.scaled_dot_product_attention(q, k, v)
        assert rel_err(vmoba_attention_reference(q, k, v, threshold=1.0, **kw), dense) < 1e-6
        # every sample is selected on its own (their packed-batch call pools head_global)
        both = vmoba_select_token_reference(q, k, layout=lay, threshold=0.3, topk=0, scope=scope)
        alone = vmoba_select_token_reference(q[1:], k[1:], layout=lay, threshold=0.3, topk=0, scope=scope)
        assert torch.equal(both.row_sel[1:], alone.row_sel)
    with pytest.raises(ValueError, match="scope"):
        vmoba_attention_reference(q, k, v, grid=grid, chunk=chunk, text_before=2, text_after=1, scope="group")
    with pytest.raises(ValueError, match="head_global"):
        vmoba_select(q, k, grid=grid, chunk=chunk, text_before=2, text_after=1, scope="query_head")
    with pytest.raises(ValueError, match="selection"):
        vmoba_select(q, k, grid=grid, chunk=chunk, text_before=2, text_after=1, selection="tokens")


def test_token_rule_density_and_flops():
    """Density counts each token's own pairs; FLOPs count exactly those (the kernels compute no
    more) plus the text rows and columns; with every block the dense count."""
    grid, chunk, tb, ta = (3, 4, 5), (1, 2, 2), 3, 2
    q, k, _ = _inputs("random", 2, 2, grid, tb, ta)
    N = tb + ta + 60
    kw = dict(grid=grid, chunk=chunk, text_before=tb, text_after=ta, selection="token")
    sel = vmoba_select(q, k, threshold=0.3, **kw)
    lay = sel.layout
    kb = torch.repeat_interleave(torch.arange(lay.num_blocks), lay.block_len)
    pairs = int(sel.row_sel[..., kb].sum())  # block-order query x key-token pairs
    assert vmoba_flops(sel, 16) == 4 * 16 * (pairs + 2 * 2 * (60 * (tb + ta) + (tb + ta) * N))
    full = vmoba_select(q, k, threshold=1.0, **kw)
    assert full.density == 1.0 and vmoba_flops(full, 16) == 4 * 2 * 2 * N * N * 16


# ---------------------------------------------------------------- Triton selection (interpreter)
@pytest.mark.parametrize("kind,grid,chunk,part,tb,ta,dt", [
    ("random", (3, 4, 5), (2, 3, 2), "3d", 2, 1, torch.float32),  # odd grid: partial blocks
    ("structured", (4, 6, 8), (2, 3, 4), "2d", 0, 3, torch.float16),
])
def test_kernel_selection_equals_reference(kind, grid, chunk, part, tb, ta, dt):
    q, k, _ = _inputs(kind, 2, 2, grid, tb, ta, D=64, dtype=dt)
    lay = vmoba_layout(grid, chunk, part, tb, ta)
    for scope in ("query_head", "head_global"):
        for thr, topk in RULES:
            ref = vmoba_select_token_reference(q, k, layout=lay, threshold=thr, topk=topk, scope=scope)
            ker = vmoba_select_token_triton(q, k, layout=lay, threshold=thr, topk=topk, scope=scope)
            assert ker.row_sel.dtype == torch.bool and torch.equal(ker.row_sel, ref.row_sel), (scope, thr, topk)


# ---------------------------------------------------------------- Triton attention and gradients
def _poison(monkeypatch):
    """The token kernels' output and gradient buffers start as NaN: every row must be written."""
    from vmonarch_opt.kernels.out_layout import empty_attention_out

    monkeypatch.setattr(tok, "empty_attention_out", lambda x: empty_attention_out(x).fill_(float("nan")))


TOKEN_CASES = [  # B, H, grid, chunk, partition, text before/after, D, dtype, pooled, scope, threshold, topk
    (2, 1, (3, 4, 5), (2, 2, 3), "3d", 3, 2, 64, torch.float32, False, "query_head", 0.3, 0),
    (1, 2, (3, 4, 5), (2, 2, 3), "3d", 0, 3, 80, torch.float32, True, "head_global", 0.4, 0),
    (1, 1, (2, 5, 6), (1, 3, 3), "2d", 2, 0, 96, torch.float16, True, "query_head", 0.25, 3),
    (2, 1, (6, 3, 4), (2, 2, 2), "1d", 0, 0, 64, torch.float16, False, "head_global", 0.25, 2),
]


@pytest.mark.parametrize("B,H,grid,chunk,part,tb,ta,D,dt,pooled,scope,thr,topk", TOKEN_CASES)
def test_kernel_forward_and_backward_vs_float64(monkeypatch, B, H, grid, chunk, part, tb, ta, D, dt, pooled,
                                                 scope, thr, topk):
    _poison(monkeypatch)
    N = tb + ta + grid[0] * grid[1] * grid[2]
    q, k = ((torch.randn(B, H, N, D) * 1.5).to(dt) for _ in range(2))
    v, g = (torch.randn(B, H, N, D).to(dt) for _ in range(2))
    s, lay, _, _ = _check_args(q, k, v, grid, chunk, tb, ta, part, thr, topk, None, "test")
    sel = vmoba_select_token_triton(q, k, layout=lay, threshold=thr, topk=topk, scope=scope, v=v, pooled=pooled)
    assert 0.05 < sel.density < 0.95
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = vmoba_attention_from_selection(q64, k64, v64, sel, s, pooled)
    out = vmoba_attention_with_selection(q, k, v, sel, s, pooled_rest=pooled)
    assert out.dtype == dt and torch.isfinite(out).all()
    assert rel_err(out, ref) < (3e-3 if dt == torch.float16 else 2e-5)
    ref_g = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    got = vmoba_backward_with_selection(q, k, v, out, g, sel, s, pooled_rest=pooled)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref_g):
        assert a.dtype == dt and torch.isfinite(a).all(), name
        assert rel_err(a, b) < (4e-3 if dt == torch.float16 else 2e-5), name


def test_kernel_end_to_end_head_chunks_and_everything_selected(monkeypatch):
    """From the arguments (selection in Triton, recomputed by the backward) with the heads run in
    chunks of one (a tiny slot budget); and with every block selected the block-sparse token
    kernels give dense attention."""
    monkeypatch.setattr(tok, "_PARTIAL_BUDGET", 1)
    grid, chunk, tb, ta = (3, 4, 5), (2, 2, 3), 2, 2
    N = tb + ta + 60
    q, k = (torch.randn(2, 2, N, 64) * 1.5 for _ in range(2))
    v, g = torch.randn(2, 2, N, 64), torch.randn(2, 2, N, 64)
    kw = dict(grid=grid, chunk=chunk, text_before=tb, text_after=ta, partition="3d", threshold=0.3, topk=0,
              pooled_rest=True, selection="token", scope="query_head")
    out = vmoba_attention_triton(q, k, v, **kw)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = vmoba_attention_reference(q64, k64, v64, **kw)
    assert rel_err(out, ref) < 2e-5
    ref_g = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for a, b in zip(vmoba_attention_backward_triton(q, k, v, out, g, **kw), ref_g):
        assert rel_err(a, b) < 2e-5
    lay = vmoba_layout(grid, chunk, "3d", tb, ta)
    every = VMoBASelection(lay, None, None, 1.0, 0, selection="token", scope="query_head",
                           row_sel=torch.ones(2, 2, 60, lay.num_blocks, dtype=torch.bool))
    dense = F.scaled_dot_product_attention(q64, k64, v64, scale=0.125)
    assert rel_err(vmoba_attention_with_selection(q, k, v, every, 0.125, pooled_rest=True), dense) < 2e-5


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("vmonarch."):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_op_gqa_autograd_runs_the_token_kernels(monkeypatch):
    """The op with the token rule, GQA (k/v expanded from one head), text on both sides: forward and
    ``.backward()`` run our kernels (one backward op) and match the float64 reference gradients."""
    from vmonarch_opt.methods.vmoba import _reference

    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    B, H, D, grid, chunk, tb, ta = 2, 2, 64, [3, 4, 5], [2, 2, 3], 2, 1
    N = tb + 60 + ta
    q = torch.randn(B, H, N, D, requires_grad=True)
    k0, v0 = (torch.randn(B, 1, N, D, requires_grad=True) for _ in range(2))
    args = (grid, chunk, tb, ta, "3d", 0.3, 0, D ** -0.5, False, "token", "query_head")
    w = torch.randn(B, H, N, D)
    with _CountOps() as seen:
        out = torch.ops.vmonarch.vmoba_attention(q, k0.repeat_interleave(2, 1), v0.repeat_interleave(2, 1), *args)
        (out * w).sum().backward()
    assert seen.seen.count("vmonarch.vmoba_attention_backward.default") == 1
    lay = vmoba_layout(grid, chunk, "3d", tb, ta)
    kk = k0.detach().repeat_interleave(2, 1)
    assert torch.equal(vmoba_select_token_reference(q.detach().double(), kk.double(), layout=lay, threshold=0.3,
                                                    topk=0, scope="query_head").row_sel,
                       vmoba_select_token_triton(q.detach(), kk, layout=lay, threshold=0.3, topk=0,
                                                 scope="query_head").row_sel)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k0, v0)]
    ref = _reference(leaves[0], leaves[1].repeat_interleave(2, 1), leaves[2].repeat_interleave(2, 1), *args)
    (ref * w.double()).sum().backward()
    assert rel_err(out, ref) < 2e-5
    for a, b in zip((q.grad, k0.grad, v0.grad), leaves):
        assert torch.isfinite(a).all() and rel_err(a, b.grad) < 2e-5


# ---------------------------------------------------------------- configs, reports, profiles
def test_config_rule_is_named_and_round_trips(tmp_path):
    from vmonarch_opt.methods import registry
    from vmonarch_opt.site import AttentionSite

    vm = registry.get("vmoba")
    site = AttentionSite("s", "s", 0, "sdpa", 1, 2, 2, 98, 98, 16, 16, "float32", "[B,H,N,D]", grid=(4, 4, 6),
                         text_before=2)
    assert vmonarch_opt.VMoBAConfig().selection == "token"
    for cfg in (vmonarch_opt.VMoBAConfig(topk=2), vmonarch_opt.VMoBAConfig(selection="token", scope="head_global"),
                vmonarch_opt.VMoBAConfig(selection="group", threshold=0.5)):
        args = vm.resolve_args(cfg, site, 2)
        again = vm.config_from_dict(vm.config_to_dict(cfg), strict=True)
        assert again == cfg
        assert vm.config_from_args(args).selection == cfg.selection
        scope = cfg.scope or ("query_head" if cfg.selection == "token" else "head_global")
        assert vm.params(args).startswith(f"{cfg.selection}/{scope} ")
        assert cfg.selection in vm.describe(cfg)
        q, k, v = (torch.randn(1, 2, 98, 16) for _ in range(3))
        _, flops, density = vm.calibration_run(q, k, v, args, 0.25)
        assert vm.flops(vmonarch_opt.methods.Shape.of(site), args, density) == flops
    # a profile written before the token rule: its VMoBA choice is the group rule
    old = {"method": "vmoba", "chunk": [1, 2, 2], "partition": "3d", "threshold": 0.25, "topk": 0,
           "pooled_rest": False}
    assert vm.config_from_dict(old, strict=True).selection == "group"
    assert "token rule" in vm.check_config(vmonarch_opt.VMoBAConfig(selection="token", chunk=(1, 1, 1)),
                                           site.__class__("s", "s", 0, "sdpa", 1, 2, 2, 1024, 1024, 16, 16,
                                                          "float32", "[B,H,N,D]", grid=(4, 16, 16)))
    assert "scope" in vm.check_config(vmonarch_opt.VMoBAConfig(selection="group", scope="query_head"), site)


def test_calibration_tries_both_rules():
    from vmonarch_opt.methods import registry
    from vmonarch_opt.profiles.budget import Budget
    from vmonarch_opt.site import AttentionSite

    site = AttentionSite("s", "s", 0, "sdpa", 1, 2, 2, 96, 96, 16, 16, "float32", "[B,H,N,D]", grid=(4, 4, 6))
    cands = registry.get("vmoba").candidates(site, Budget(), 2)
    rules = {(c.selection, c.threshold, c.topk, c.pooled_rest) for _, c in cands}
    assert {r[0] for r in rules} == {"group", "token"} and len(rules) == len(cands) == 10
    assert {r for r in rules if r[0] == "token"} == {("token", 0.25, 0, p) for p in (False, True)}
    only_group = registry.get("vmoba").candidates(site, Budget(vmoba_token_thresholds=()), 2)
    assert len(only_group) == 8 and all(c.selection == "group" for _, c in only_group)


# ---------------------------------------------------------------- the GPU benchmark's CPU path
def test_bench_vmoba_smoke(monkeypatch, tmp_path):
    """``benchmarks/bench_vmoba.py --smoke``: checks, both rules' rows, both Flex baselines and the
    targets table run (interpreter, tiny shape) and land in $OUT."""
    import json

    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    from benchmarks import bench_vmoba

    monkeypatch.setattr(sys, "argv", ["bench_vmoba.py", "--smoke"])
    assert bench_vmoba.main(["--smoke", "--no-append"]) is True
    res = json.loads((tmp_path / "bench_vmoba.json").read_text())
    assert res["check"] and all(r["ok"] for r in res["check"])
    rules = {r["rule"] for r in res["vmoba"]}
    assert {"group", "token"} == {r["selection"] for r in res["vmoba"]} and any("+pooled" in r for r in rules)
    assert all(r.get("flex_block_ms", 0) > 0 and "flex_error" not in r for r in res["vmoba"] if not r["pooled"])
    assert {t["what"] for t in res["targets"]} >= {"group top-k vs cuDNN", "token top-k vs cuDNN"}
    section = (tmp_path / "bench_vmoba_section.md").read_text()
    assert section.rstrip().endswith("|") and section.index("Targets") > section.index("VMoBA:")
