"""What every ``vmonarch::*`` custom operator shares (each method's module defines its own op).

Every op takes q, k, v in the SDPA layout ``[batch, heads, seq, head_dim]`` (k/v already expanded
to q's head count for GQA) plus its per-site config as plain arguments, so a rewritten model
stays traceable by ``torch.compile``, ``torch.export`` and CUDA-graph capture.

Every op returns its ``[batch, heads, seq, head_dim]`` output in the layout of
``kernels/out_layout.py`` (q's layout, as torch's SDPA kernels do, restricted to the two layouts
attention code uses): a model whose q is a transposed view of ``[batch, seq, heads, head_dim]``
gets an output whose transpose back is contiguous, so the following reshape into the output
projection copies nothing. The fake implementations return the same layout: compiled graphs trust
the fake strides, and every real path returns exactly those strides (:func:`in_q_layout`). The
layout depends on q's stride order only, which inductor keeps for our ops
(``needs_fixed_stride_order``).

Which kernel runs (Triton or the pure-PyTorch reference) is decided in ``kernels/dispatch.py``.

Autograd: :func:`register_autograd` gives an op its backward. Where the method has a backward
kernel for the call (CUDA tensors, see ``kernels/dispatch.py``, and a configuration the kernel
covers) the backward is a second custom op, ``vmonarch::<name>_backward``, taking q, k, v, the
forward's output and its gradient and returning (dq, dk, dv) from our Triton kernels: it recomputes
what is cheap (block statistics) and keeps no N x N or N x (N/S) intermediate. Everywhere else the
backward recomputes the forward with the pure-PyTorch reference under autograd and differentiates
it: exact gradients of the same function at the reference's memory cost (the CPU path, and the
oracle of the kernel tests). VMoBA's block selection is a constant in both, as in the paper.
Both are traceable, so optimized models train eagerly, under ``torch.compile`` (AOT autograd sees
the backward op and its fake implementation) and with activation checkpointing.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .kernels.dispatch import use_triton  # noqa: F401  (re-exported)
from .kernels.out_layout import attention_out_strides, empty_attention_out

__all__ = ["OP_TAGS", "in_q_layout", "empty_attention_out", "register_autograd", "register_reference_autograd",
           "use_triton"]

# Inductor may hand a custom op inputs laid out otherwise than traced unless told not to; our
# output layout follows q's stride order, so the compiled graph must keep it. (Exact strides
# would be stricter than needed and cost copies: 7 ms of Wan2.1-1.3B's compiled forward on H100.)
OP_TAGS = (torch.Tag.needs_fixed_stride_order,)


def in_q_layout(q: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``res`` in the layout of ``empty_attention_out(q)`` (copied only if it is not)."""
    if res.stride() == attention_out_strides(q):
        return res
    return empty_attention_out(q).copy_(res)


def reference_grads(reference: Callable, q, k, v, grad_out, args: tuple):
    """(dq, dk, dv) of ``reference(q, k, v, *args)`` by autograd (recomputed from q/k/v)."""
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = reference(qq, kk, vv, *args)
        return torch.autograd.grad(out, (qq, kk, vv), grad_out)


def register_autograd(op, reference: Callable, backward_op=None,
                      kernel_covers: Optional[Callable[..., bool]] = None) -> None:
    """Backward of ``op(q, k, v, *args)``.

    ``backward_op(q, k, v, out, grad_out, *args) -> (dq, dk, dv)`` is the method's kernel backward
    (a custom op with a fake implementation); it runs when :func:`use_triton` is true for q and
    ``kernel_covers(q, *args)`` (default: always). Otherwise ``reference(q, k, v, *args)`` (pure
    PyTorch) is recomputed and differentiated with autograd. The choice depends on the device and
    the op's non-tensor arguments only, so a compiled backward graph makes it once at trace time.
    """

    def kernel_runs(q, args) -> bool:
        if backward_op is None or not use_triton(q):
            return False
        return kernel_covers is None or bool(kernel_covers(q, *args))

    def setup_context(ctx, inputs, output):
        q, k, v, *rest = inputs
        ctx.args = tuple(rest)
        ctx.kernel = kernel_runs(q, ctx.args)
        if ctx.kernel:
            ctx.save_for_backward(q, k, v, output)
        else:
            ctx.save_for_backward(q, k, v)

    def backward(ctx, grad_out):
        if ctx.kernel:
            q, k, v, out = ctx.saved_tensors
            gq, gk, gv = backward_op(q, k, v, out, grad_out, *ctx.args)
        else:
            q, k, v = ctx.saved_tensors
            gq, gk, gv = reference_grads(reference, q, k, v, grad_out, ctx.args)
        return (gq, gk, gv) + (None,) * len(ctx.args)

    op.register_autograd(backward, setup_context=setup_context)


def register_reference_autograd(op, reference: Callable) -> None:
    """Backward of ``op(q, k, v, *args)`` by the pure-PyTorch reference alone (no kernel backward)."""
    register_autograd(op, reference)
