"""VMoBA's KV-cache form (queries = the last frames of the key grid, ``cached_frames``) and its
block-causal form (``causal_chunk``, run chunk by chunk through the KV-cache form): every block
selected is dense attention (of the new queries over all keys; masked block-causal attention);
the KV-cache rows equal the full-grid rows where ``kernels/vmoba/reference.py`` says so; a
block-causal query selects among exactly the key blocks it sees; the Triton forward, selection
and backward (TRITON_INTERPRET=1) against the references; FLOP and density accounting; an
end-to-end SkyReels-V2 model in autoregressive mode.

Bounds as in test_vmoba_token.py: relative error against float64 on the same inputs and the same
selection, 2e-5 for fp32 and 3e-3 (outputs) / 4e-3 (gradients) for fp16; kernel outputs and
gradients are written into NaN-poisoned buffers and checked finite.
"""
import pytest
import torch
import torch.nn.functional as F

import vmonarch_opt
from conftest import assert_kernels_ran, rel_err
from vmonarch_opt.kernels.vmoba import backward as vbwd
from vmonarch_opt.kernels.vmoba import kernel as vker
from vmonarch_opt.kernels.vmoba import token as vtok
from vmonarch_opt.kernels.vmoba.backward import vmoba_backward_with_selection
from vmonarch_opt.kernels.vmoba.kernel import (vmoba_attention_triton, vmoba_attention_with_selection,
                                               vmoba_select_triton)
from vmonarch_opt.kernels.vmoba.layout import _check_args, vmoba_layout
from vmonarch_opt.kernels.vmoba.reference import (token_gate, token_keep, vmoba_attention_from_selection,
                                                  vmoba_attention_reference, vmoba_select_reference,
                                                  vmoba_select_token_reference)
from vmonarch_opt.kernels.vmoba.token import vmoba_select_token_triton
from vmonarch_opt.methods import registry
from vmonarch_opt.methods.base import Shape
from vmonarch_opt.methods.causal import block_causal_visible
from vmonarch_opt.methods.vmoba import _calls

VMOBA = registry.get("vmoba")


def _kv(B, H, grid, F_, D, dtype=torch.float32, scale=1.0):
    T, Hh, W = grid
    q = (torch.randn(B, H, (T - F_) * Hh * W, D) * scale).to(dtype)
    k = (torch.randn(B, H, T * Hh * W, D) * scale).to(dtype)
    v = torch.randn(B, H, T * Hh * W, D).to(dtype)
    return q, k, v


def _args(grid, chunk, partition, threshold=0.3, topk=0, pooled=False, selection="token", scope="query_head", **kw):
    return dict(grid=list(grid), chunk=list(chunk), text_before=0, text_after=0, partition=partition,
                threshold=threshold, topk=topk, pooled_rest=pooled, selection=selection, scope=scope, **kw)


def _poison(monkeypatch):
    """Output and gradient buffers of every VMoBA kernel module start as NaN: each row must be written."""
    from vmonarch_opt.kernels.out_layout import empty_attention_out

    for mod in (vker, vtok, vbwd):
        monkeypatch.setattr(mod, "empty_attention_out", lambda x: empty_attention_out(x).fill_(float("nan")))


# ---------------------------------------------------------------- layout
def test_kv_layout_queries_are_the_last_frames():
    """The key blocks are the full grid's; the queries' block order lists exactly the tokens of the
    new frames of every block, in block order; groups hold only queries and stay in one block."""
    grid, F_ = (5, 3, 4), 2
    full = vmoba_layout(grid, (2, 2, 3), "3d")
    lay = vmoba_layout(grid, (2, 2, 3), "3d", cached_frames=F_)
    assert torch.equal(lay.perm, full.perm) and torch.equal(lay.block_len, full.block_len)
    first = F_ * 12
    expect = full.perm[full.perm >= first] - first
    assert torch.equal(lay.q_perm, expect) and lay.n_query_video == 36 and lay.n_video == 60
    for c in range(lay.num_blocks):
        toks = full.perm[full.block_off[c]:full.block_off[c] + full.block_len[c]]
        assert int(lay.q_block_len[c]) == int((toks >= first).sum())
    assert int(lay.group_len.sum()) == 36 and set(lay.group_block.tolist()) == {
        c for c in range(lay.num_blocks) if lay.q_block_len[c] > 0}
    with pytest.raises(ValueError, match="leaves no query frame"):
        vmoba_layout(grid, (2, 2, 3), "3d", cached_frames=5)
    with pytest.raises(ValueError, match="no text tokens"):
        vmoba_layout(grid, (2, 2, 3), "3d", text_before=1, cached_frames=1)
    q, k, v = _kv(1, 1, grid, F_, 16)
    with pytest.raises(ValueError, match="cached_frames=2 takes 60 keys and the last 36"):
        vmoba_attention_reference(q[:, :, 1:], k, v, grid=grid, chunk=(2, 2, 3), cached_frames=F_)
    with pytest.raises(ValueError, match="pass cached_frames"):
        vmoba_attention_reference(q, k, v, grid=grid, chunk=(2, 2, 3))


# ---------------------------------------------------------------- every block selected: dense
@pytest.mark.parametrize("selection", ["token", "group"])
def test_kv_every_block_is_dense_attention(selection):
    """Threshold 1 (reference) and top-k = every block (the block-sparse kernels, not the dense
    shortcut): the new queries' SDPA over all keys."""
    grid, F_ = (4, 3, 5), 3
    q, k, v = _kv(2, 2, grid, F_, 64)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    dense = F.scaled_dot_product_attention(q64, k64, v64)
    kw = dict(grid=grid, chunk=(2, 2, 3), partition="3d", selection=selection, cached_frames=F_)
    assert rel_err(vmoba_attention_reference(q64, k64, v64, threshold=1.0, **kw), dense) < 1e-12
    C = vmoba_layout(grid, (2, 2, 3), "3d").num_blocks
    for pooled in (False, True):  # no block is left to pool
        out = vmoba_attention_triton(q, k, v, topk=C, pooled_rest=pooled, **kw)
        assert torch.isfinite(out).all() and rel_err(out, dense) < 2e-5


def test_block_causal_every_block_is_masked_sdpa(monkeypatch):
    """Block-causal plans (chunks of 2 frames over 5: the last chunk is shorter) with every block
    selected, the reference (CPU) and the kernels: the model's masked attention."""
    grid, hw = (5, 3, 4), 12
    q, k, v = (torch.randn(2, 2, 60, 64) for _ in range(3))
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                           attn_mask=block_causal_visible(5, hw, 2), scale=0.125)
    every = _args(grid, (2, 2, 2), "3d", threshold=1.0, causal_chunk=2)
    assert rel_err(VMOBA.apply(q.double(), k.double(), v.double(), every, 0.125), dense) < 1e-12
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    for selection in ("token", "group"):
        a = _args(grid, (2, 2, 2), "3d", topk=99, selection=selection, causal_chunk=2,
                  scope="query_head" if selection == "token" else "head_global")
        out = VMOBA.apply(q, k, v, a, 0.125)
        assert torch.isfinite(out).all() and rel_err(out, dense) < 2e-5, selection


# ---------------------------------------------------------------- KV rows = full-grid rows
@pytest.mark.parametrize("partition,pooled,threshold,topk", [("3d", False, 0.3, 0), ("2d", True, 0.25, 0),
                                                             ("1d", True, 0.25, 2)])
def test_kv_rows_equal_full_grid_rows_under_the_token_rule(partition, pooled, threshold, topk):
    """Token rule, scope query_head: a query's selection depends on its own q and the blocks' mean
    keys only, so its KV-cache row is its row of the full-grid run (the docstring's claim); the
    cached rows are never computed."""
    grid, F_, hw = (5, 3, 4), 2, 12
    q, k, v = (torch.randn(1, 2, 60, 32, dtype=torch.float64) for _ in range(3))
    kw = dict(grid=grid, chunk=(2, 2, 3), partition=partition, threshold=threshold, topk=topk, pooled_rest=pooled,
              selection="token", scope="query_head")
    full = vmoba_attention_reference(q, k, v, **kw)
    kv = vmoba_attention_reference(q[:, :, F_ * hw:], k, v, cached_frames=F_, **kw)
    assert (kv - full[:, :, F_ * hw:]).abs().max() < 1e-12
    lay = vmoba_layout(grid, (2, 2, 3), partition)
    lay_kv = vmoba_layout(grid, (2, 2, 3), partition, cached_frames=F_)
    is_new = lay.perm >= F_ * hw  # full-grid block-order rows of the new frames, in q_perm's order
    sel_full = vmoba_select_token_reference(q, k, layout=lay, threshold=threshold, topk=topk)
    sel_kv = vmoba_select_token_reference(q[:, :, F_ * hw:], k, layout=lay_kv, threshold=threshold, topk=topk)
    assert torch.equal(sel_kv.row_sel, sel_full.row_sel[:, :, is_new])
    # the kernels (fp32): the KV rows and selections are those of their full-grid run
    qf, kf, vf = (t.float() for t in (q, k, v))
    full_k = vmoba_attention_triton(qf, kf, vf, **kw)
    kv_k = vmoba_attention_triton(qf[:, :, F_ * hw:], kf, vf, cached_frames=F_, **kw)
    assert rel_err(kv_k, full_k[:, :, F_ * hw:]) < 2e-5 and rel_err(kv_k, kv) < 1e-4
    sel_kf = vmoba_select_token_triton(qf[:, :, F_ * hw:], kf, layout=lay_kv, threshold=threshold, topk=topk,
                                       scope="query_head")
    sel_ff = vmoba_select_token_triton(qf, kf, layout=lay, threshold=threshold, topk=topk, scope="query_head")
    assert torch.equal(sel_kf.row_sel, sel_ff.row_sel[:, :, is_new])


def test_kv_global_rules_rank_the_new_queries():
    """Group rule and head_global: the ranking runs over the new queries' entries (the group rule's
    target is threshold x N_q): the reference's selection is the rule applied to them alone."""
    grid, F_, hw = (4, 3, 4), 1, 12
    q, k, _ = (torch.randn(1, 2, 48, 16, dtype=torch.float64) for _ in range(3))
    qn = q[:, :, F_ * hw:]
    lay = vmoba_layout(grid, (2, 2, 2), "3d", cached_frames=F_)
    sel = vmoba_select_reference(qn, k, layout=lay, threshold=0.3, topk=0, scale=0.25)
    # by hand: mean query per group, mean key per block, softmax, the head's cut at 0.3 * N_q
    kv = k[:, :, lay.perm]
    kbar = torch.stack([kv[:, :, o:o + n].mean(2) for o, n in zip(lay.block_off.tolist(), lay.block_len.tolist())], 2)
    qv = qn[:, :, lay.q_perm]
    starts = (lay.q_block_off[lay.group_block] + lay.group_start).tolist()
    qbar = torch.stack([qv[:, :, s:s + n].mean(2) for s, n in zip(starts, lay.group_len.tolist())], 2)
    P = torch.softmax(0.25 * qbar @ kbar.transpose(-1, -2), -1)
    w = P * lay.group_len.double()[:, None]
    own = torch.nn.functional.one_hot(lay.group_block, lay.num_blocks).bool()
    for b in range(2):
        target = 0.3 * 36 - w[0, b][own].sum()
        others = P[0, b][~own].sort(descending=True)
        wo = w[0, b][~own][others.indices].cumsum(0)
        cut = others.values[int((wo >= target).nonzero()[0])] if target > 0 else float("inf")
        expect = own | (P[0, b] >= cut)
        assert torch.equal(sel.mask()[0, b], expect)
    hg = vmoba_select_token_reference(qn, k, layout=lay, threshold=0.3, topk=0, scope="head_global")
    pos_block = torch.repeat_interleave(torch.arange(lay.num_blocks), lay.q_block_len)
    own_t = torch.nn.functional.one_hot(pos_block, lay.num_blocks).bool()
    assert torch.equal(hg.row_sel, token_keep(token_gate(qn, k, lay), own_t, 0.3, 0, "head_global"))


# ---------------------------------------------------------------- block-causal: visible blocks only
def test_block_causal_selection_ranges_over_the_visible_blocks():
    """Chunk c's queries select among the key blocks of its visible frames, by the token rule over
    those blocks alone (brute force in float64: the full grid's gates restricted to the blocks a
    query sees), and read no key it does not see. One-frame temporal blocks: every prefix grid's
    partition is the full grid's, clipped."""
    grid, hw, Cc = (5, 2, 3), 6, 2
    q, k, v = (torch.randn(2, 2, 30, 16, dtype=torch.float64) * 1.5 for _ in range(3))
    a = _args(grid, (1, 1, 2), "3d", threshold=0.3, causal_chunk=Cc)
    out = VMOBA.apply(q, k, v, a, 0.25)
    full = vmoba_layout(grid, (1, 1, 2), "3d")
    gate = token_gate(q, k, full)  # [B, H, N, C], rows in block order (row_of maps tokens there)
    block_of = torch.empty(30, dtype=torch.long)
    block_of[full.perm] = torch.repeat_interleave(torch.arange(full.num_blocks), full.block_len)
    row_of = torch.empty(30, dtype=torch.long)
    row_of[full.perm] = torch.arange(30)
    block_frame = torch.tensor([int(full.perm[o]) // hw for o in full.block_off.tolist()])
    expect = torch.empty_like(q)
    for c0 in range(0, 5, Cc):
        e = min(5, c0 + Cc)
        vis = (block_frame < e).nonzero()[:, 0]
        toks = torch.arange(c0 * hw, e * hw)
        g = gate[:, :, row_of[toks]][..., vis]
        own = block_of[toks][:, None] == vis[None, :]
        keep = token_keep(g, own, 0.3, 0, "query_head")  # [B, H, n, |vis|]
        key_ok = keep[..., (block_of[:e * hw][None, :] == vis[:, None]).double().argmax(0)]
        logits = 0.25 * q[:, :, toks] @ k[:, :, :e * hw].transpose(-1, -2)
        p = torch.softmax(logits.masked_fill(~key_ok, float("-inf")), -1)
        expect[:, :, toks] = p @ v[:, :, :e * hw]
    assert (out - expect).abs().max() < 1e-12
    # each call's key blocks are exactly the blocks of the frames its queries see
    for r0, r1, k1, ca in _calls(VMOBA, a, 30, 30):
        lay = vmoba_layout(ca["grid"], ca["chunk"], ca["partition"], cached_frames=ca.get("cached_frames", 0))
        assert k1 == lay.n_tokens == ca["grid"][0] * hw and r1 - r0 == lay.n_query_tokens
        assert sorted(lay.perm.tolist()) == list(range(k1))


# ---------------------------------------------------------------- kernels vs reference, gradients
KV_CASES = [  # B, H, grid, cached, chunk, partition, D, dtype, selection, scope, pooled, threshold, topk
    (2, 1, (3, 3, 5), 1, (2, 2, 3), "3d", 64, torch.float32, "token", "query_head", False, 0.3, 0),
    (1, 2, (4, 3, 3), 2, (3, 2, 2), "2d", 96, torch.float16, "token", "head_global", True, 0.3, 0),
    (2, 1, (3, 2, 7), 2, (1, 2, 3), "1d", 128, torch.float32, "group", "head_global", True, 0.3, 0),
    (1, 2, (5, 3, 3), 3, (2, 2, 2), "3d", 64, torch.float16, "group", "head_global", False, 0.25, 3),
]


@pytest.mark.parametrize("B,H,grid,F_,chunk,part,D,dt,selection,scope,pooled,thr,topk", KV_CASES)
def test_kv_kernels_vs_float64(monkeypatch, B, H, grid, F_, chunk, part, D, dt, selection, scope, pooled, thr,
                               topk):
    """The Triton selection equals the reference's; the forward and the backward on it against the
    float64 reference and its autograd (same selection); every row written (NaN-poisoned buffers)."""
    _poison(monkeypatch)
    q, k, v = _kv(B, H, grid, F_, D, dt, 1.5)
    g = torch.randn(q.shape).to(dt)
    s, lay, _, _ = _check_args(q, k, v, grid, chunk, 0, 0, part, thr, topk, None, "test", F_)
    if selection == "token":
        sel = vmoba_select_token_triton(q, k, layout=lay, threshold=thr, topk=topk, scope=scope, v=v, pooled=pooled)
        ref_sel = vmoba_select_token_reference(q, k, layout=lay, threshold=thr, topk=topk, scope=scope)
        assert torch.equal(sel.row_sel, ref_sel.row_sel)
    else:
        sel = vmoba_select_triton(q, k, layout=lay, threshold=thr, topk=topk, scale=s, v=v, pooled=pooled)
        ref_sel = vmoba_select_reference(q, k, layout=lay, threshold=thr, topk=topk, scale=s)
        assert torch.equal(sel.kv_idx, ref_sel.kv_idx) and torch.equal(sel.kv_cnt, ref_sel.kv_cnt)
    assert 0.05 < sel.density < 0.95
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = vmoba_attention_from_selection(q64, k64, v64, sel, s, pooled)
    out = vmoba_attention_with_selection(q, k, v, sel, s, pooled_rest=pooled)
    assert out.dtype == dt and out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < (3e-3 if dt == torch.float16 else 2e-5)
    ref_g = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    got = vmoba_backward_with_selection(q, k, v, out, g, sel, s, pooled_rest=pooled)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref_g):
        assert a.dtype == dt and a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) < (4e-3 if dt == torch.float16 else 2e-5), name


@pytest.mark.parametrize("kernels", [False, True])
def test_op_autograd_kv_and_block_causal(monkeypatch, kernels):
    """Gradients flow through the op's KV-cache form and through a block-causal plan (chunk calls
    concatenated): the reference's autograd on CPU, the Triton backward op with the kernels on;
    both against float64 autograd of the reference, GQA keys expanded from one head."""
    from vmonarch_opt.methods.vmoba import _reference

    if kernels:
        monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    grid, F_, hw, D = (4, 2, 3), 2, 6, 32
    q = torch.randn(2, 2, 12, D, requires_grad=True)
    k0, v0 = (torch.randn(2, 1, 24, D, requires_grad=True) for _ in range(2))
    args = ([4, 2, 3], [2, 1, 2], 0, 0, "3d", 0.3, 0, D ** -0.5, True, "token", "query_head", F_)
    w = torch.randn(2, 2, 12, D)
    out = torch.ops.vmonarch.vmoba_attention(q, k0.repeat_interleave(2, 1), v0.repeat_interleave(2, 1), *args)
    (out * w).sum().backward()
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k0, v0)]
    ref = _reference(leaves[0], leaves[1].repeat_interleave(2, 1), leaves[2].repeat_interleave(2, 1), *args)
    (ref * w.double()).sum().backward()
    assert rel_err(out, ref) < 2e-5
    for a, b in zip((q.grad, k0.grad, v0.grad), leaves):
        assert torch.isfinite(a).all() and rel_err(a, b.grad) < 2e-5
    # block-causal (group rule, pooled rest): the chunk calls' gradients
    qs, ks, vs = (torch.randn(1, 2, 24, D, requires_grad=True) for _ in range(3))
    a = _args(grid, (2, 1, 2), "3d", pooled=True, selection="group", scope="head_global", causal_chunk=2)
    w = torch.randn(1, 2, 24, D)
    (VMOBA.apply(qs, ks, vs, a, 0.2) * w).sum().backward()
    leaves = [t.detach().double().requires_grad_(True) for t in (qs, ks, vs)]
    monkeypatch.delenv("VMONARCH_INTERPRET_KERNELS", raising=False)  # the float64 reference
    (VMOBA.apply(*leaves, a, 0.2) * w.double()).sum().backward()
    for t, b in zip((qs, ks, vs), leaves):
        assert torch.isfinite(t.grad).all() and rel_err(t.grad, b.grad) < 2e-5
    assert ks.grad[:, :, 18:].abs().sum() > 0  # the last chunk's own keys get gradient too


# ---------------------------------------------------------------- FLOPs, density, hooks
def test_measured_flops_and_density_of_causal_and_kv_plans():
    """calibration_run / executed measure every op call apply makes: the output is apply's, the FLOPs
    their sum, the density over the visible pairs, and cost() reproduces the FLOPs from it."""
    grid, hw = (5, 3, 4), 12
    q, k, v = (torch.randn(1, 2, 60, 16, dtype=torch.float64) for _ in range(3))
    shape = Shape.of_qk(q, k)
    for extra in (dict(causal_chunk=2), dict(causal_chunk=5)):
        for pooled in (False, True):
            a = _args(grid, (2, 2, 2), "3d", pooled=pooled, **extra)
            out, flops, dens = VMOBA.calibration_run(q, k, v, a, 0.25)
            assert torch.equal(out, VMOBA.apply(q, k, v, a, 0.25))
            assert VMOBA.executed(q, k, v, a, 0.25) == (flops, dens) and 0 < dens < 1
            assert VMOBA.cost(shape, a, dens) == flops
    every = _args(grid, (2, 2, 2), "3d", threshold=1.0, causal_chunk=2)
    _, flops, dens = VMOBA.calibration_run(q, k, v, every, 0.25)
    visible = int(block_causal_visible(5, hw, 2).sum())
    assert dens == 1.0 and flops == 4 * 2 * visible * 16
    kv = _args(grid, (2, 2, 2), "3d", pooled=True, cached_frames=2)
    out, flops, dens = VMOBA.calibration_run(q[:, :, 24:], k, v, kv, 0.25)
    assert out.shape == (1, 2, 36, 16) and VMOBA.cached_flops(Shape.of_qk(q[:, :, 24:], k), kv, dens) == flops
    assert VMOBA.cached_flops(shape, kv) is None  # unknown before measuring
    assert VMOBA.causal_mode == "cached" and VMOBA.cached_unsupported(kv) is None
    assert "leaves no query frame" in VMOBA.cached_unsupported({**kv, "cached_frames": 5})
    many = _args((40, 8, 8), (1, 2, 2), "3d", cached_frames=39)
    assert "at most 512" in VMOBA.cached_unsupported(many)
    assert VMOBA.cached_unsupported({**many, "selection": "group", "scope": "head_global"}) is None


# ---------------------------------------------------------------- end to end
def test_skyreels_v2_block_causal_with_vmoba(monkeypatch):
    """SkyReels-V2 in autoregressive mode (chunks of 2 latent frames): its self-attention sites are
    planned VMoBA with causal_chunk, run our op with the kernels (no fallback), and stay close to
    the dense model; with every block selected the output is the model's."""
    from vmonarch_fixtures import models
    from vmonarch_opt import VMoBAConfig

    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    model, b = models.skyreels_v2()
    with torch.no_grad():
        ref = model(**b)[0]
    opt = vmonarch_opt.optimize(model, b, methods=("vmoba",), min_seq_len=0, budget=None)
    rows = [r for r in opt.report.rows if r["site"]["kind"] == "self"]
    assert len(rows) == 2 and all(r["plan"]["method"] == "vmoba" and r["plan"]["args"]["causal_chunk"] == 2
                                  for r in rows)
    with torch.no_grad():
        out = opt(**b)[0]
    assert_kernels_ran(opt)
    assert torch.isfinite(out).all() and 0 < rel_err(out, ref) < 0.2
    exact = vmonarch_opt.optimize(model, b, overrides={"*": VMoBAConfig(threshold=1.0)}, min_seq_len=0, budget=None)
    with torch.no_grad():
        assert rel_err(exact(**b)[0], ref) < 1e-4
    assert_kernels_ran(exact)


@pytest.mark.parametrize("selection", ["token", "group"])
def test_onnx_lowering_of_kv_and_block_causal_plans(selection):
    """The ONNX decomposition (``lower``) takes the KV-cache form: the same function as the
    reference, for a KV-cache plan and for a block-causal plan run through it chunk by chunk."""
    from vmonarch_opt.methods import causal

    grid = (5, 3, 4)
    q, k, v = (torch.randn(2, 2, 60, 16, dtype=torch.float64) for _ in range(3))
    scope = "query_head" if selection == "token" else "head_global"
    for pooled in (False, True):
        kv = _args(grid, (2, 2, 3), "3d", pooled=pooled, selection=selection, scope=scope, cached_frames=2)
        assert rel_err(VMOBA.lower(q[:, :, 24:], k, v, kv, 0.25), VMOBA.run_cached(q[:, :, 24:], k, v, kv, 0.25)) \
            < 1e-12
        bc = _args(grid, (2, 2, 3), "3d", pooled=pooled, selection=selection, scope=scope, causal_chunk=2)
        assert rel_err(causal.apply(VMOBA, q, k, v, bc, 0.25, lowering=True), VMOBA.apply(q, k, v, bc, 0.25)) < 1e-12
