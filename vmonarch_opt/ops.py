"""The ``vmonarch::*`` custom operators that rewritten attention sites call.

Every op takes q, k, v in the SDPA layout ``[batch, heads, seq, head_dim]`` (k/v already expanded
to q's head count for GQA) plus its per-site config as plain arguments, so a rewritten model
stays traceable by ``torch.compile``, ``torch.export`` and CUDA-graph capture.

Every op returns its ``[batch, heads, seq, head_dim]`` output in the layout of
``kernels/out_layout.py`` (q's layout, as torch's SDPA kernels do, restricted to the two layouts
attention code uses): a model whose q is a transposed view of ``[batch, seq, heads, head_dim]``
gets an output whose transpose back is contiguous, so the following reshape into the output
projection copies nothing. The fake implementations return the same layout: compiled graphs trust
the fake strides, and every real path below returns exactly those strides (``_in_q_layout``).
The layout depends on q's stride order only, which inductor keeps for our ops
(``needs_fixed_stride_order``).

Dispatch: CUDA tensors run the Triton kernels; every other device (and CUDA when
``VMONARCH_FORCE_REFERENCE=1``) runs the pure-PyTorch reference next to the kernel. The dense op
runs torch's SDPA (cuDNN / FlashAttention on CUDA) unless ``VMONARCH_DENSE_KERNEL=triton``.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .kernels import dispatch
from .kernels.dispatch import use_triton  # noqa: F401  (re-exported)
from .kernels.out_layout import attention_out_strides, empty_attention_out

__all__ = ["monarch_attention", "vmoba_attention", "dense_attention", "use_triton"]


# Inductor may hand a custom op inputs laid out otherwise than traced unless told not to; our
# output layout follows q's stride order, so the compiled graph must keep it. (Exact strides
# would be stricter than needed and cost copies: 7 ms of Wan2.1-1.3B's compiled forward on H100.)
_TAGS = (torch.Tag.needs_fixed_stride_order,)


def _in_q_layout(q: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``res`` in the layout of ``empty_attention_out(q)`` (copied only if it is not)."""
    if res.stride() == attention_out_strides(q):
        return res
    return empty_attention_out(q).copy_(res)


@torch.library.custom_op("vmonarch::monarch_attention", mutates_args=(), tags=_TAGS)
def monarch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: list[int],
    block: list[int],
    text_before: int,
    text_after: int,
    steps: int,
    scale: float,
    recompute: bool,
) -> torch.Tensor:
    kw = dict(grid=tuple(grid), block=tuple(block), text_before=text_before,
              text_after=text_after, steps=steps, scale=scale, recompute=recompute)
    return _in_q_layout(q, dispatch.monarch_attention(q, k, v, **kw))


@monarch_attention.register_fake
def _(q, k, v, grid, block, text_before, text_after, steps, scale, recompute):
    return empty_attention_out(q)  # the layout of every real path (_in_q_layout)


@torch.library.custom_op("vmonarch::vmoba_attention", mutates_args=(), tags=_TAGS)
def vmoba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: list[int],
    chunk: list[int],
    text_before: int,
    text_after: int,
    partition: str,
    threshold: float,
    topk: int,
    scale: float,
    pooled_rest: bool = False,
) -> torch.Tensor:
    kw = dict(grid=tuple(grid), chunk=tuple(chunk), text_before=text_before,
              text_after=text_after, partition=partition, threshold=threshold,
              topk=topk, scale=scale, pooled_rest=pooled_rest)
    return _in_q_layout(q, dispatch.vmoba_attention(q, k, v, **kw))


@vmoba_attention.register_fake
def _(q, k, v, grid, chunk, text_before, text_after, partition, threshold, topk, scale, pooled_rest=False):
    return empty_attention_out(q)  # the layout of every real path (_in_q_layout)


@torch.library.custom_op("vmonarch::dense_attention", mutates_args=(), tags=_TAGS)
def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _in_q_layout(q, dispatch.dense_attention(q, k, v, scale))


@dense_attention.register_fake
def _(q, k, v, scale):
    return empty_attention_out(q)  # the layout of every real path (_in_q_layout)


# --- autograd -----------------------------------------------------------------------------------
# Backward recomputes the forward with the pure-PyTorch reference under autograd and
# differentiates it: exact gradients of the same function (VMoBA's block selection is treated as
# a constant, as in the paper), at the reference's memory cost. It lets optimized models be
# fine-tuned and compiled with gradients enabled.

def _reference_forward(name: str, q, k, v, args: tuple) -> torch.Tensor:
    if name == "monarch":
        from .kernels.monarch.reference import monarch_attention_reference
        grid, block, tb, ta, steps, scale, recompute = args
        return monarch_attention_reference(q, k, v, grid=tuple(grid), block=tuple(block), text_before=tb,
                                           text_after=ta, steps=steps, scale=scale, recompute=recompute)
    if name == "vmoba":
        from .kernels.vmoba.reference import vmoba_attention_reference
        grid, chunk, tb, ta, partition, threshold, topk, scale, *rest = args
        return vmoba_attention_reference(q, k, v, grid=tuple(grid), chunk=tuple(chunk), text_before=tb,
                                         text_after=ta, partition=partition, threshold=threshold,
                                         topk=topk, scale=scale, pooled_rest=bool(rest and rest[0]))
    (scale,) = args
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _make_autograd(name: str):
    def setup_context(ctx, inputs, output):
        q, k, v, *rest = inputs
        ctx.save_for_backward(q, k, v)
        ctx.args = tuple(rest)

    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = _reference_forward(name, qq, kk, vv, ctx.args)
            gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), grad_out)
        return (gq, gk, gv) + (None,) * len(ctx.args)

    return setup_context, backward


for _op, _name in ((monarch_attention, "monarch"), (vmoba_attention, "vmoba"), (dense_attention, "dense")):
    _setup, _backward = _make_autograd(_name)
    _op.register_autograd(_backward, setup_context=_setup)
