"""Monarch attention backward kernels (TRITON_INTERPRET=1 on CPU) against float64 reference autograd."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from vmonarch_opt.kernels import dispatch
from vmonarch_opt.kernels.monarch.backward import monarch_attention_backward_triton
from vmonarch_opt.kernels.monarch.kernel import monarch_attention_triton
from vmonarch_opt.kernels.monarch.reference import monarch_attention_reference

LAYOUTS = [  # (grid, block)
    ((3, 4, 5), (1, 4, 5)),      # frame blocks (contiguous)
    ((5, 3, 4), (2, 3, 4)),      # frame groups, partial last group
    ((2, 5, 6), (1, 2, 4)),      # spatial tiles, partial along h and w
    ((1, 1, 45), (1, 1, 16)),    # 1D blocks, partial last block
]
# relative error of the kernel gradients against float64 autograd of the reference
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _reference_grads(q, k, v, do, **kw):
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    out = monarch_attention_reference(qq, kk, vv, **kw)
    return torch.autograd.grad(out, (qq, kk, vv), do.double())


def _kernel_grads(q, k, v, do, **kw):
    out = monarch_attention_triton(q, k, v, **kw)
    return monarch_attention_backward_triton(q, k, v, out, do, **kw)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(layout=st.sampled_from(LAYOUTS), head_dim=st.sampled_from([64, 80, 96, 128]),
       batch=st.integers(1, 2), heads=st.integers(1, 2), tb=st.sampled_from([0, 3]),
       ta=st.sampled_from([0, 2]), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2 ** 16))
def test_backward_kernel_matches_float64_reference(layout, head_dim, batch, heads, tb, ta, dtype, seed):
    grid, block = layout
    n = tb + math.prod(grid) + ta
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(batch, heads, n, head_dim, generator=g).to(dtype) for _ in range(4))
    kw = dict(grid=grid, block=block, text_before=tb, text_after=ta)
    got = _kernel_grads(q, k, v, do, **kw)
    want = _reference_grads(q, k, v, do, **kw)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and a.shape == q.shape
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert rel_err(a, b) < TOL[dtype], f"d{name}"


def test_backward_kernel_strided_inputs_and_grad():
    # q/k/v as transposed views of [b, N, h, D] (the usual attention layout) and a strided dO
    grid, block = (2, 5, 6), (1, 2, 4)
    n = 2 + 60
    q, k, v = (torch.randn(2, n, 3, 64).transpose(1, 2) for _ in range(3))
    do = torch.randn(2, n, 3, 64).transpose(1, 2)
    kw = dict(grid=grid, block=block, text_before=2, scale=0.3)
    got = _kernel_grads(q, k, v, do, **kw)
    want = _reference_grads(q, k, v, do, **kw)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL[torch.float32]


def test_one_block_gradients_are_dense():
    """One Monarch block is exact dense attention: so are its gradients (text tokens included)."""
    grid = (2, 3, 4)
    q, k, v, do = (torch.randn(2, 2, 3 + 24 + 2, 64) for _ in range(4))
    got = _kernel_grads(q, k, v, do, grid=grid, block=grid, text_before=3, text_after=2)
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    want = torch.autograd.grad(F.scaled_dot_product_attention(qq, kk, vv), (qq, kk, vv), do.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-5


@pytest.mark.parametrize("case", ["large_logits", "duplicate_keys"])
def test_backward_adversarial_inputs_finite_and_right(case):
    """Saturated softmaxes and near-identical keys: finite, and as close to float64 as float32
    autograd of the reference itself gets (the duplicate-key gradients cancel to ~1e-4 of dO)."""
    grid, block = (3, 4, 5), (1, 4, 5)
    q, k, v, do = (torch.randn(1, 2, 60, 64) for _ in range(4))
    if case == "large_logits":
        q, k = q * 8, k * 8                      # saturated softmaxes in both steps
    else:
        k = k[:, :, :1].expand_as(k).contiguous() + 1e-3 * k   # near-identical keys
    got = _kernel_grads(q, k, v, do, grid=grid, block=block)
    want = _reference_grads(q, k, v, do, grid=grid, block=block)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    fp32 = torch.autograd.grad(monarch_attention_reference(qq, kk, vv, grid=grid, block=block), (qq, kk, vv), do)
    for a, f, b in zip(got, fp32, want):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < max(2e-5, 4 * rel_err(f, b))


def test_gradcheck_reference_tiny():
    """The oracle itself: float64 finite differences of the reference (steps 1 and 2, text tokens)."""
    for steps, recompute in ((1, False), (2, True)):
        q, k, v = (torch.randn(1, 1, 2 + 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        fn = lambda q, k, v: monarch_attention_reference(q, k, v, grid=(3, 2, 2), block=(1, 2, 2), text_before=2,  # noqa: E731
                                                         steps=steps, recompute=recompute)
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_backward_kernel_rejects_steps_above_one():
    q = torch.randn(1, 1, 12, 16)
    with pytest.raises(ValueError, match="steps=2"):
        monarch_attention_backward_triton(q, q, q, q, q, grid=(3, 2, 2), block=(1, 2, 2), steps=2)


def _op_grads(q, k, v, do, args):
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = torch.ops.vmonarch.monarch_attention(qq, kk, vv, *args)
    return torch.autograd.grad(out, (qq, kk, vv), do)


@pytest.mark.parametrize("steps", [1, 2])
def test_op_autograd_runs_the_kernel_backward_where_it_covers(monkeypatch, steps):
    """With kernels on (VMONARCH_INTERPRET_KERNELS=1), steps=1 differentiates through the backward
    kernels, steps=2 through the reference; both give the reference's gradients. GQA: k/v heads
    are expanded before the op, the expansion's gradient sums them."""
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    calls = []
    real = dispatch.monarch_attention_backward
    monkeypatch.setattr(dispatch, "monarch_attention_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grid, block, tb = (3, 4, 5), (1, 4, 5), 3
    n = tb + 60
    q = torch.randn(2, 4, n, 64)
    k1, v1 = torch.randn(2, 2, n, 64), torch.randn(2, 2, n, 64)
    do = torch.randn(2, 4, n, 64)
    args = [list(grid), list(block), tb, 0, steps, 0.125, False]

    def run(q, k1, v1):
        k, v = k1.repeat_interleave(2, 1), v1.repeat_interleave(2, 1)
        return torch.ops.vmonarch.monarch_attention(q, k, v, *args)

    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k1, v1))
    got = torch.autograd.grad(run(qq, kk, vv), (qq, kk, vv), do)
    assert len(calls) == (1 if steps == 1 else 0)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k1, v1))
    ref = monarch_attention_reference(qd, kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1), grid=grid,
                                      block=block, text_before=tb, steps=steps, scale=0.125)
    want = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 2e-5


def test_compiled_backward_uses_the_kernel_op(monkeypatch):
    """AOT autograd traces the backward op through its fake implementation: compiled gradients
    equal eager ones and the kernel backward ran."""
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    calls = []
    real = dispatch.monarch_attention_backward
    monkeypatch.setattr(dispatch, "monarch_attention_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    args = [[2, 3, 4], [1, 3, 4], 2, 1, 1, 0.25, False]
    q, k, v = (torch.randn(1, 2, 27, 32) for _ in range(3))
    do = torch.randn(1, 2, 27, 32)

    def f(q, k, v):
        return torch.ops.vmonarch.monarch_attention(q, k, v, *args)

    eager = _op_grads(q, k, v, do, args)
    n_eager = len(calls)
    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    compiled = torch.autograd.grad(cf(qq, kk, vv), (qq, kk, vv), do)
    assert n_eager == 1 and len(calls) == 2
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_opcheck_backward_op(monkeypatch):
    """Schema and fake implementation of the backward op agree with the kernel's real outputs."""
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    q, k, v, do = (torch.randn(1, 2, 2 + 12, 16) for _ in range(4))
    args = [[3, 2, 2], [1, 2, 2], 2, 0, 1, 0.25, False]
    out = torch.ops.vmonarch.monarch_attention(q, k, v, *args)
    torch.library.opcheck(torch.ops.vmonarch.monarch_attention_backward.default, (q, k, v, out, do, *args),
                          test_utils=("test_schema", "test_faketensor"))
