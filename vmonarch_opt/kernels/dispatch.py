"""The one place that decides whether a call runs our Triton kernels or the pure-PyTorch reference.

CUDA tensors run the Triton kernels; every other device runs the reference beside them, and so
does CUDA when ``VMONARCH_FORCE_REFERENCE=1`` (the escape hatch when a kernel misbehaves on a new
GPU or Triton version). Under Triton's CPU interpreter (``TRITON_INTERPRET=1``),
``VMONARCH_INTERPRET_KERNELS=1`` sends CPU tensors to the kernels too: the tests use it to run
the ops and their backward kernels end to end without a GPU. The dense op runs torch's SDPA (cuDNN / FlashAttention on CUDA) unless
``VMONARCH_DENSE_KERNEL=triton`` selects our own flash kernel. Kernel modules are imported on
first use, so the references work where Triton cannot compile.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["use_triton", "dense_uses_triton", "monarch_attention", "monarch_attention_backward", "vmoba_attention",
           "vmoba_attention_backward", "vmoba_select", "vmoba_attention_with_selection", "dense_attention",
           "dense_attention_backward", "dense_with_stats", "monarch_rt_attention", "monarch_rt_attention_backward"]


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should run through our Triton kernels rather than the reference."""
    if os.environ.get("VMONARCH_FORCE_REFERENCE", "0") == "1":
        return False
    if t.is_cuda:
        return True
    return (t.device.type == "cpu" and os.environ.get("VMONARCH_INTERPRET_KERNELS", "0") == "1"
            and os.environ.get("TRITON_INTERPRET", "0") == "1")


def dense_uses_triton(q: torch.Tensor) -> bool:
    """True when the dense op runs our Triton flash kernel for ``q`` (``VMONARCH_DENSE_KERNEL=triton``
    and :func:`use_triton`); otherwise it runs torch's SDPA."""
    return use_triton(q) and os.environ.get("VMONARCH_DENSE_KERNEL", "sdpa") == "triton"


def monarch_attention(q, k, v, **kw) -> torch.Tensor:
    if use_triton(q):
        from .monarch.kernel import monarch_attention_triton
        return monarch_attention_triton(q, k, v, **kw)
    from .monarch.reference import monarch_attention_reference
    return monarch_attention_reference(q, k, v, **kw)


def monarch_attention_backward(q, k, v, out, grad_out, **kw):
    """``(dq, dk, dv)`` from the Monarch backward kernels (callers check ``use_triton`` first)."""
    from .monarch.backward import monarch_attention_backward_triton
    return monarch_attention_backward_triton(q, k, v, out, grad_out, **kw)


def monarch_rt_attention(q, k, v, *, steps: int = 1, **kw) -> torch.Tensor:
    """MonarchRT: the Triton kernels cover one step; more steps run the reference everywhere."""
    if use_triton(q) and steps == 1:
        from .monarch_rt.kernel import monarch_rt_triton
        return monarch_rt_triton(q, k, v, steps=steps, **kw)
    from .monarch_rt.reference import monarch_rt_reference
    return monarch_rt_reference(q, k, v, steps=steps, **kw)


def monarch_rt_attention_backward(q, k, v, out, grad_out, **kw):
    """``(dq, dk, dv)`` from the MonarchRT backward kernels (callers check ``use_triton`` first)."""
    from .monarch_rt.backward import monarch_rt_backward_triton
    return monarch_rt_backward_triton(q, k, v, out, grad_out, **kw)


def vmoba_attention(q, k, v, **kw) -> torch.Tensor:
    if use_triton(q):
        from .vmoba.kernel import vmoba_attention_triton
        return vmoba_attention_triton(q, k, v, **kw)
    from .vmoba.reference import vmoba_attention_reference
    return vmoba_attention_reference(q, k, v, **kw)


def vmoba_attention_backward(q, k, v, out, grad_out, **kw):
    """``(dq, dk, dv)`` from the VMoBA backward kernels (callers check ``use_triton`` first)."""
    from .vmoba.backward import vmoba_attention_backward_triton
    return vmoba_attention_backward_triton(q, k, v, out, grad_out, **kw)


def vmoba_select(q: torch.Tensor, k: torch.Tensor, *, grid, chunk, text_before: int = 0,
                 text_after: int = 0, partition: str = "3d", threshold: float = 0.25,
                 topk: int = 0, scale: Optional[float] = None, selection: str = "group",
                 scope: Optional[str] = None, cached_frames: int = 0):
    """VMoBA's block selection alone (a ``VMoBASelection``) under rule ``selection``
    (``cached_frames``: the KV-cache form, q = the last frames of the key grid)."""
    from .vmoba.layout import _check_args, check_rule

    s, lay, threshold, topk = _check_args(q, k, k, grid, chunk, text_before, text_after,
                                          partition, threshold, topk, scale, "vmoba_select", cached_frames)
    selection, scope = check_rule(selection, scope, "vmoba_select")
    if selection == "token":
        if use_triton(q):
            from .vmoba.token import vmoba_select_token_triton
            return vmoba_select_token_triton(q, k, layout=lay, threshold=threshold, topk=topk, scope=scope)
        from .vmoba.reference import vmoba_select_token_reference
        return vmoba_select_token_reference(q, k, layout=lay, threshold=threshold, topk=topk, scope=scope)
    if use_triton(q):
        from .vmoba.kernel import vmoba_select_triton
        return vmoba_select_triton(q, k, layout=lay, threshold=threshold, topk=topk, scale=s)
    from .vmoba.reference import vmoba_select_reference
    return vmoba_select_reference(q, k, layout=lay, threshold=threshold, topk=topk, scale=s)


def vmoba_attention_with_selection(q, k, v, selection, scale: float, pooled_rest: bool = False) -> torch.Tensor:
    """VMoBA attention on a selection made earlier (calibration reuses one selection)."""
    if use_triton(q):
        from .vmoba.kernel import vmoba_attention_with_selection as run
        return run(q, k, v, selection, scale, pooled_rest=pooled_rest)
    from .vmoba.reference import vmoba_attention_from_selection
    return vmoba_attention_from_selection(q, k, v, selection, scale, pooled_rest=pooled_rest)


def dense_attention(q, k, v, scale: float) -> torch.Tensor:
    """Exact attention with the fastest kernel at hand (torch SDPA unless VMONARCH_DENSE_KERNEL=triton)."""
    if dense_uses_triton(q):
        from .flash.kernel import flash_attention_triton
        return flash_attention_triton(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def dense_attention_backward(q, k, v, out, grad_out, scale: float):
    """``(dq, dk, dv)`` from our flash backward kernels (callers check ``use_triton`` first)."""
    from .flash.backward import flash_attention_backward_triton
    return flash_attention_backward_triton(q, k, v, out, grad_out, scale=scale)


def dense_with_stats(q, k, v, scale: float):
    """Dense attention ``(out, lse, entropy)``: our flash kernel with statistics, or the reference."""
    if use_triton(q):
        from .flash.kernel import flash_attention_triton
        return flash_attention_triton(q, k, v, scale=scale, return_stats=True)
    from .flash.reference import attention_stats_reference
    return attention_stats_reference(q, k, v, scale=scale)
