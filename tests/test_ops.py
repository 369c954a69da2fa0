"""The vmonarch::* custom ops: registration checks (fake impls, autograd) and gradients."""
import pytest
import torch
import torch.nn.functional as F

import vmonarch_opt  # noqa: F401  registers the ops
from conftest import rel_err


def _qkv(b=2, h=2, n=24, d=16, dtype=torch.float32):
    return [torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for _ in range(3)]


def _grads(out, inputs):
    g = torch.randn_like(out)
    return torch.autograd.grad(out, inputs, g), g


def test_dense_op_matches_sdpa_with_gradients():
    q, k, v = _qkv()
    out = torch.ops.vmonarch.dense_attention(q, k, v, 0.3)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert rel_err(out, ref) < 1e-6
    (gq, gk, gv), g = _grads(out, (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert rel_err(a, b) < 1e-5


def test_vmoba_op_everything_selected_matches_sdpa_with_gradients():
    q, k, v = _qkv(n=2 + 3 * 4 * 2)  # 2 text tokens before a 3×4×2 grid
    out = torch.ops.vmonarch.vmoba_attention(q, k, v, [3, 4, 2], [2, 2, 2], 2, 0, "3d", 1.0, 0, 0.25)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert rel_err(out, ref) < 1e-5
    (gq, gk, gv), g = _grads(out, (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert rel_err(a, b) < 1e-4


def test_vmoba_op_pooled_rest_with_gradients():
    """pooled_rest reaches the kernel through the op (default False), and its gradients are those
    of the reference under autograd (selection constant)."""
    from vmonarch_opt.kernels.vmoba.reference import vmoba_attention_reference

    q, k, v = _qkv(n=2 + 3 * 4 * 2)
    args = (q, k, v, [3, 4, 2], [1, 2, 2], 2, 0, "3d", 0.25, 2, 0.25)
    out = torch.ops.vmonarch.vmoba_attention(*args, True)
    kw = dict(grid=(3, 4, 2), chunk=(1, 2, 2), text_before=2, partition="3d", threshold=0.25, topk=2,
              scale=0.25)
    ref = vmoba_attention_reference(q, k, v, pooled_rest=True, **kw)
    assert rel_err(out, ref) < 1e-6
    assert rel_err(torch.ops.vmonarch.vmoba_attention(*args), vmoba_attention_reference(q, k, v, **kw)) < 1e-6
    assert rel_err(out, torch.ops.vmonarch.vmoba_attention(*args)) > 1e-3
    (gq, gk, gv), g = _grads(out, (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert rel_err(a, b) < 1e-5


def test_monarch_op_one_block_matches_sdpa_with_gradients():
    q, k, v = _qkv(n=3 + 2 * 3 * 4)  # 3 text tokens after a 2×3×4 grid, one block
    out = torch.ops.vmonarch.monarch_attention(q, k, v, [2, 3, 4], [2, 3, 4], 0, 3, 1, 0.25, False)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert rel_err(out, ref) < 1e-5
    (gq, gk, gv), g = _grads(out, (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("which", ["dense", "vmoba", "monarch"])
def test_opcheck(which):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(b=1, n=12))
    if which == "dense":
        op, args = torch.ops.vmonarch.dense_attention.default, (q, k, v, 0.25)
    elif which == "vmoba":
        op, args = torch.ops.vmonarch.vmoba_attention.default, (q, k, v, [2, 3, 2], [1, 2, 2], 0, 0, "2d", 0.5, 0, 0.25,
                                                                True)
    else:
        op, args = torch.ops.vmonarch.monarch_attention.default, (q, k, v, [2, 3, 2], [1, 3, 2], 0, 0, 1, 0.25, False)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("selection", ["group", "token"])
def test_vmoba_reference_backward_compiles(selection):
    """AOT autograd traces the VMoBA reference backward (CPU) under fake tensors: the layout caches
    are bypassed there, so compiled gradients equal eager ones (partial blocks and text too)."""
    args = [[3, 4, 5], [2, 3, 2], 2, 1, "3d", 0.5, 0, 0.25, True, selection, ""]
    q, k, v = (torch.randn(2, 2, 2 + 60 + 1, 16) for _ in range(3))

    def loss(q, k, v):
        return torch.ops.vmonarch.vmoba_attention(q, k, v, *args).square().sum()

    def grads(fn):
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        return torch.autograd.grad(fn(qq, kk, vv), (qq, kk, vv))

    eager = grads(loss)
    torch._dynamo.reset()
    compiled = grads(torch.compile(loss, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-6
