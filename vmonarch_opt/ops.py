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

Autograd: :func:`register_reference_autograd` gives an op a backward that recomputes the forward
with the pure-PyTorch reference under autograd and differentiates it: exact gradients of the same
function (VMoBA's block selection is a constant, as in the paper), at the reference's memory
cost. It lets optimized models be fine-tuned and compiled with gradients enabled.
"""
from __future__ import annotations

from typing import Callable

import torch

from .kernels.dispatch import use_triton  # noqa: F401  (re-exported)
from .kernels.out_layout import attention_out_strides, empty_attention_out

__all__ = ["OP_TAGS", "in_q_layout", "empty_attention_out", "register_reference_autograd", "use_triton"]

# Inductor may hand a custom op inputs laid out otherwise than traced unless told not to; our
# output layout follows q's stride order, so the compiled graph must keep it. (Exact strides
# would be stricter than needed and cost copies: 7 ms of Wan2.1-1.3B's compiled forward on H100.)
OP_TAGS = (torch.Tag.needs_fixed_stride_order,)


def in_q_layout(q: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``res`` in the layout of ``empty_attention_out(q)`` (copied only if it is not)."""
    if res.stride() == attention_out_strides(q):
        return res
    return empty_attention_out(q).copy_(res)


def register_reference_autograd(op, reference: Callable) -> None:
    """Backward of ``op(q, k, v, *args)``: differentiate ``reference(q, k, v, *args)`` (pure
    PyTorch, recomputed from the saved q/k/v) with autograd."""

    def setup_context(ctx, inputs, output):
        q, k, v, *rest = inputs
        ctx.save_for_backward(q, k, v)
        ctx.args = tuple(rest)

    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = reference(qq, kk, vv, *ctx.args)
            gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), grad_out)
        return (gq, gk, gv) + (None,) * len(ctx.args)

    op.register_autograd(backward, setup_context=setup_context)
