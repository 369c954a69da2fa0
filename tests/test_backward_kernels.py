"""Backward kernels (Triton, TRITON_INTERPRET=1 on CPU): the dense flash backward and VMoBA's,
against the float64 reference differentiated by autograd, and the ops' autograd running them.

Bounds: relative error ||g - g64|| / ||g64|| of each gradient against float64 autograd on the
same (rounded) inputs: fp32 inputs 2e-5 (IEEE fp32 dots, fp32 accumulation), fp16 inputs 4e-3
(P and dS rounded to fp16 before their dots, as the forward's P). Every gradient is also checked
finite, and the kernels write into NaN-poisoned buffers, so a row they skip fails the test.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import vmonarch_opt  # noqa: F401  registers the ops
from conftest import rel_err
from vmonarch_opt.kernels.flash import backward as flash_bwd
from vmonarch_opt.kernels.flash.backward import bwd_dkdv_keys, bwd_dq_rows, flash_attention_backward_triton
from vmonarch_opt.kernels.flash.kernel import flash_attention_triton
from vmonarch_opt.kernels.vmoba import backward as vmoba_bwd
from vmonarch_opt.kernels.vmoba.backward import (transposed_selection, vmoba_attention_backward_triton,
                                                 vmoba_backward_with_selection)
from vmonarch_opt.kernels.vmoba.kernel import vmoba_select_triton
from vmonarch_opt.kernels.vmoba.layout import VMoBASelection, _check_args, vmoba_layout
from vmonarch_opt.kernels.vmoba.reference import (vmoba_attention_from_selection, vmoba_attention_reference,
                                                  vmoba_select_reference)

BOUND = {torch.float32: 2e-5, torch.float16: 4e-3}


def _grads64(fn, tensors, g):
    leaves = [t.detach().double().requires_grad_(True) for t in tensors]
    return torch.autograd.grad(fn(*leaves), leaves, g.double())


def _check(got, ref, dt):
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape and a.dtype == dt, name
        assert torch.isfinite(a).all(), f"{name} not finite"
        e = rel_err(a, b)
        assert e < BOUND[dt], f"{name}: relative error {e:.2e} >= {BOUND[dt]:g}"


@pytest.fixture
def poisoned(monkeypatch):
    """The backward kernels' gradient buffers start as NaN: every row must be written."""
    from vmonarch_opt.kernels.out_layout import empty_attention_out

    def nan_out(x):
        return empty_attention_out(x).fill_(float("nan"))

    monkeypatch.setattr(flash_bwd, "empty_attention_out", nan_out)
    monkeypatch.setattr(vmoba_bwd, "empty_attention_out", nan_out)


# ---------------------------------------------------------------- dense flash backward
@pytest.mark.parametrize("B,H,Nq,Nk,D,dt,scale,with_lse", [
    (2, 2, 37, 53, 64, torch.float32, None, False),
    (1, 3, 45, 30, 80, torch.float16, 0.2, True),
    (2, 1, 20, 70, 96, torch.float32, 0.15, True),
    (1, 2, 33, 17, 128, torch.float16, None, False),
])
def test_flash_backward_vs_float64(poisoned, B, H, Nq, Nk, D, dt, scale, with_lse):
    q, k, v = (torch.randn(B, H, n, D).to(dt) for n in (Nq, Nk, Nk))
    g = torch.randn(B, H, Nq, D).to(dt)
    s = scale if scale is not None else D ** -0.5
    ref = _grads64(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=s), (q, k, v), g)
    out, lse, _ = flash_attention_triton(q, k, v, scale=scale, return_stats=True)
    got = flash_attention_backward_triton(q, k, v, out, g, scale=scale, lse=lse if with_lse else None)
    _check(got, ref, dt)


def test_flash_backward_strided_inputs_and_broadcast_grad():
    """Transposed [B, N, H, D] views in, gradients back in their layout; a stride-0 output gradient
    (``out.sum()``) is read correctly."""
    q, k, v = (torch.randn(2, n, 3, 64).transpose(1, 2) for n in (29, 41, 41))
    g = torch.ones(1, 1, 1, 1).expand(2, 3, 29, 64)
    ref = _grads64(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), (q, k, v), g)
    got = flash_attention_backward_triton(q, k, v, flash_attention_triton(q, k, v), g)
    _check(got, ref, torch.float32)
    for grad, x in zip(got, (q, k, v)):
        assert grad.stride() == x.stride()  # q's layout, as the forward's output


def test_flash_backward_row_and_key_ranges():
    """The sub-range passes VMoBA uses for its text rows / text keys touch exactly their range."""
    B, H, N, D = 1, 2, 40, 64
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    g = torch.randn(B, H, N, D)
    s = 0.125
    ref = _grads64(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=s), (q, k, v), g)
    out = flash_attention_triton(q, k, v, scale=s)
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
    lse2, delta = torch.full((B * H, N), float("nan")), torch.full((B * H, N), float("nan"))
    bwd_dq_rows(q, k, v, out, g, dq, lse2, delta, 5, 17, s)  # rows 5..21
    assert torch.isnan(dq[:, :, :5]).all() and torch.isnan(dq[:, :, 22:]).all()
    assert torch.isnan(lse2[:, :5]).all() and torch.isfinite(lse2[:, 5:22]).all()
    assert rel_err(dq[:, :, 5:22], ref[0][:, :, 5:22]) < 2e-5
    bwd_dq_rows(q, k, v, out, g, dq, lse2, delta, 0, 5, s)
    bwd_dq_rows(q, k, v, out, g, dq, lse2, delta, 22, N - 22, s)
    bwd_dkdv_keys(q, k, v, g, dk, dv, lse2, delta, 30, 10, s)  # keys 30..39, from every query row
    assert torch.isnan(dk[:, :, :30]).all() and torch.isnan(dv[:, :, :30]).all()
    assert rel_err(dk[:, :, 30:], ref[1][:, :, 30:]) < 2e-5 and rel_err(dv[:, :, 30:], ref[2][:, :, 30:]) < 2e-5


def test_flash_backward_errors():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match="grad_out"):
        flash_attention_backward_triton(q, k, v, q, q[:, :, :4])
    with pytest.raises(ValueError, match="lse"):
        flash_attention_backward_triton(q, k, v, q, q, lse=torch.zeros(1, 2, 7))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_backward_triton(q.double(), k.double(), v.double(), q.double(), q.double())


# ---------------------------------------------------------------- VMoBA backward
VMOBA_CASES = [  # B, H, grid, chunk, partition, text before/after, D, dtype, pooled, threshold, topk
    (2, 2, (3, 5, 6), (2, 3, 4), "3d", 5, 3, 64, torch.float32, False, 0.3, 0),
    (1, 2, (3, 5, 6), (2, 3, 4), "3d", 5, 3, 64, torch.float32, True, 0.3, 0),
    (1, 2, (4, 4, 5), (2, 2, 2), "2d", 0, 4, 96, torch.float16, True, 0.25, 0),
    (2, 1, (5, 3, 4), (2, 2, 2), "1d", 3, 0, 64, torch.float32, False, 0.25, 2),
    (1, 1, (2, 6, 7), (1, 3, 3), "3d", 2, 0, 128, torch.float16, False, 0.25, 3),
    (2, 1, (3, 4, 4), (2, 2, 2), "3d", 0, 0, 80, torch.float32, True, 0.25, 2),
    # 1d blocks of 135 tokens: two query groups (128 + 7) per block
    (1, 1, (2, 9, 15), (1, 9, 15), "1d", 0, 2, 64, torch.float32, True, 0.25, 1),
]


@pytest.mark.parametrize("B,H,grid,chunk,part,tb,ta,D,dt,pooled,thr,topk", VMOBA_CASES)
def test_vmoba_backward_vs_float64(poisoned, B, H, grid, chunk, part, tb, ta, D, dt, pooled, thr, topk):
    N = tb + grid[0] * grid[1] * grid[2] + ta
    q, k = ((torch.randn(B, H, N, D) * 1.5).to(dt) for _ in range(2))
    v, g = (torch.randn(B, H, N, D).to(dt) for _ in range(2))
    s, lay, _, _ = _check_args(q, k, v, grid, chunk, tb, ta, part, thr, topk, None, "test")
    sel = vmoba_select_reference(q.double(), k.double(), layout=lay, threshold=thr, topk=topk, scale=s)
    assert 0.05 < sel.density < 0.95  # sparse, and not trivially so
    ref = _grads64(lambda a, b, c: vmoba_attention_from_selection(a, b, c, sel, s, pooled), (q, k, v), g)
    out = vmoba_attention_from_selection(q, k, v, sel, s, pooled)
    _check(vmoba_backward_with_selection(q, k, v, out, g, sel, s, pooled), ref, dt)


def test_vmoba_backward_recomputes_the_forward_selection(poisoned):
    """End to end from the arguments: the backward's own (Triton) selection is the forward's."""
    kw = dict(grid=(3, 4, 5), chunk=(2, 2, 3), text_before=3, text_after=2, partition="3d",
              threshold=0.3, topk=0, pooled_rest=True)
    N = 5 + 60
    q, k = (torch.randn(1, 2, N, 64) * 1.5 for _ in range(2))
    v, g = torch.randn(1, 2, N, 64), torch.randn(1, 2, N, 64)
    s, lay, _, _ = _check_args(q, k, v, kw["grid"], kw["chunk"], 3, 2, "3d", 0.3, 0, None, "test")
    sel = vmoba_select_triton(q, k, layout=lay, threshold=0.3, topk=0, scale=s)
    again = vmoba_select_triton(q, k, layout=lay, threshold=0.3, topk=0, scale=s, v=v, pooled=True)
    assert torch.equal(sel.kv_idx, again.kv_idx) and torch.equal(sel.kv_cnt, again.kv_cnt)
    ref = _grads64(lambda a, b, c: vmoba_attention_from_selection(a, b, c, sel, s, True), (q, k, v), g)
    out = vmoba_attention_from_selection(q, k, v, sel, s, True)
    _check(vmoba_attention_backward_triton(q, k, v, out, g, **kw), ref, torch.float32)


@pytest.mark.parametrize("route", ["full selection +pooled", "threshold 1"])
def test_vmoba_every_block_selected_equals_dense(poisoned, route):
    grid, chunk, tb, ta = (3, 4, 5), (2, 2, 3), 4, 3
    N = tb + 60 + ta
    q, k, v, g = (torch.randn(1, 2, N, 64) for _ in range(4))
    s = 0.125
    ref = _grads64(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=s), (q, k, v), g)
    out = F.scaled_dot_product_attention(q, k, v, scale=s)
    if route == "threshold 1":  # the forward runs the dense flash kernel: so does the backward
        got = vmoba_attention_backward_triton(q, k, v, out, g, grid=grid, chunk=chunk, text_before=tb,
                                              text_after=ta, threshold=1.0, scale=s, pooled_rest=True)
    else:  # the block-sparse kernels with every block listed (no pooled key is left)
        lay = vmoba_layout(grid, chunk, "3d", tb, ta)
        C, G = lay.num_blocks, lay.num_groups
        sel = VMoBASelection(lay, torch.arange(C, dtype=torch.int32).expand(1, 2, G, C).contiguous(),
                             torch.full((1, 2, G), C, dtype=torch.int32), 1.0, 0)
        got = vmoba_backward_with_selection(q, k, v, out, g, sel, s, pooled_rest=True)
    _check(got, ref, torch.float32)


def test_transposed_selection_is_the_csr_transpose():
    B, H, G, C = 2, 3, 7, 5
    m = torch.rand(B, H, G, C) < 0.4
    m[..., 0] = True
    cidx = torch.arange(C).expand(B, H, G, C)
    kv_idx = torch.sort(torch.where(m, cidx, cidx + C), -1).values
    kv_idx = torch.where(kv_idx >= C, -1, kv_idx).to(torch.int32)
    sel = VMoBASelection(vmoba_layout((1, 1, C), (1, 1, 1), "3d"), kv_idx, m.sum(-1).to(torch.int32), 0.5, 0)
    q_idx, q_cnt = transposed_selection(sel)
    for bh in range(B * H):
        for c in range(C):
            groups = [gg for gg in range(G) if m.reshape(B * H, G, C)[bh, gg, c]]
            assert q_cnt[bh, c] == len(groups)
            assert q_idx[bh, c].tolist() == groups + [-1] * (G - len(groups))


# ---------------------------------------------------------------- gradcheck of the references
@pytest.mark.parametrize("pooled", [False, True])
def test_vmoba_reference_gradcheck(pooled):
    """The reference's gradients (the oracle above, and the CPU backward) are its derivatives."""
    grid, chunk, tb, ta = (2, 2, 3), (1, 2, 2), 1, 1
    q, k, v = (torch.randn(1, 1, 14, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s, lay, _, _ = _check_args(q, k, v, grid, chunk, tb, ta, "3d", 0.25, 2, None, "test")
    sel = vmoba_select_reference(q.detach(), k.detach(), layout=lay, threshold=0.25, topk=2, scale=s)
    assert 0 < sel.density < 1
    assert torch.autograd.gradcheck(lambda a, b, c: vmoba_attention_from_selection(a, b, c, sel, s, pooled),
                                    (q, k, v), fast_mode=True)
    # and with the selection recomputed inside (piecewise constant: same gradients)
    assert torch.autograd.gradcheck(
        lambda a, b, c: vmoba_attention_reference(a, b, c, grid=grid, chunk=chunk, text_before=tb, text_after=ta,
                                                  threshold=0.25, topk=2, pooled_rest=pooled), (q, k, v),
        fast_mode=True)


def test_dense_reference_gradcheck():
    from vmonarch_opt.methods.dense import _reference

    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    assert torch.autograd.gradcheck(lambda a, b, c: _reference(a, b, c, 0.4), (q, k, v), fast_mode=True)


# ---------------------------------------------------------------- the ops' autograd
class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("vmonarch."):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_vmoba_op_backward_runs_the_kernel_backward(monkeypatch):
    """With the kernels on (interpreter), ``.backward()`` through the op runs
    ``vmonarch::vmoba_attention_backward`` once, with GQA (k/v expanded from fewer heads), text on
    both sides and the pooled rest, and matches the reference's float64 gradients."""
    from vmonarch_opt.methods.vmoba import _reference

    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    B, H, Hkv, D, grid, chunk, tb, ta = 2, 2, 1, 64, [3, 4, 5], [2, 2, 3], 3, 2
    N = tb + 60 + ta
    q = torch.randn(B, H, N, D, requires_grad=True)
    k0, v0 = (torch.randn(B, Hkv, N, D, requires_grad=True) for _ in range(2))
    args = (grid, chunk, tb, ta, "3d", 0.3, 0, D ** -0.5, True)
    w = torch.randn(B, H, N, D)
    with _CountOps() as seen:
        out = torch.ops.vmonarch.vmoba_attention(q, k0.repeat_interleave(2, 1), v0.repeat_interleave(2, 1), *args)
        (out * w).sum().backward()
    assert seen.seen.count("vmonarch.vmoba_attention.default") == 1
    assert seen.seen.count("vmonarch.vmoba_attention_backward.default") == 1
    # the oracle: the op's reference backward (reference selection, float64); same selection here
    kk = k0.detach().repeat_interleave(2, 1)
    lay = vmoba_layout(grid, chunk, "3d", tb, ta)
    ref_sel = vmoba_select_reference(q.detach().double(), kk.double(), layout=lay, threshold=0.3, topk=0,
                                     scale=D ** -0.5)
    tri_sel = vmoba_select_triton(q.detach(), kk, layout=lay, threshold=0.3, topk=0, scale=D ** -0.5)
    assert torch.equal(ref_sel.kv_idx, tri_sel.kv_idx)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k0, v0)]
    ref = _reference(leaves[0], leaves[1].repeat_interleave(2, 1), leaves[2].repeat_interleave(2, 1), *args)
    (ref * w.double()).sum().backward()
    _check((q.grad, k0.grad, v0.grad), [t.grad for t in leaves], torch.float32)


@pytest.mark.parametrize("kernel", ["triton", "sdpa"])
def test_dense_op_backward(monkeypatch, kernel):
    """The dense op's backward is the derivative of the kernel that ran its forward: our Triton
    backward op after our flash forward, SDPA differentiated (no backward op) after SDPA."""
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    monkeypatch.setenv("VMONARCH_DENSE_KERNEL", kernel)
    q, k, v = (torch.randn(2, 2, n, 80, requires_grad=True) for n in (23, 31, 31))
    g = torch.randn(2, 2, 23, 80)
    with _CountOps() as seen:
        out = torch.ops.vmonarch.dense_attention(q, k, v, 0.2)
        got = torch.autograd.grad(out, (q, k, v), g)
    assert seen.seen.count("vmonarch.dense_attention_backward.default") == (kernel == "triton")
    ref = _grads64(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=0.2), (q, k, v), g)
    _check(got, ref, torch.float32)


@pytest.mark.parametrize("which", ["dense", "vmoba"])
def test_backward_opcheck(monkeypatch, which):
    """opcheck of the backward ops (schema, fake implementation) with the kernels on; without them
    the op says what it needs (the op's autograd never calls it there)."""
    q, k, v, g = (torch.randn(1, 2, 12, 16) for _ in range(4))
    if which == "dense":
        op, args = torch.ops.vmonarch.dense_attention_backward.default, (q, k, v, q.clone(), g, 0.25)
    else:
        op, args = torch.ops.vmonarch.vmoba_attention_backward.default, (
            q, k, v, q.clone(), g, [2, 3, 2], [1, 2, 2], 0, 0, "2d", 0.5, 0, 0.25, True)
    with pytest.raises(RuntimeError, match="VMONARCH_INTERPRET_KERNELS"):
        op(*args)
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- the GPU benchmark's CPU path
def test_bench_backward_smoke(monkeypatch, tmp_path):
    """``benchmarks/bench_backward.py --smoke``: its checks and timing loop run (interpreter, tiny)."""
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks import bench_backward

    monkeypatch.setattr(sys, "argv", ["bench_backward.py", "--smoke"])
    assert bench_backward.main(["--smoke", "--no-append"]) is True
    res = (tmp_path / "bench_backward.json").read_text()
    assert '"ok": false' not in res and "vmoba 3d top" in res
