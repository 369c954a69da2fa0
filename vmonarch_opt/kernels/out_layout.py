"""The memory layout of every attention output we produce (kernels, references, fake impls).

Models hand SDPA q/k/v as ``[batch, heads, seq, head_dim]`` views; most diffusers models make
them by transposing ``[batch, seq, heads, head_dim]`` projections and transpose the output back
before the output projection. torch's SDPA kernels return the output in q's layout, which makes
that transpose free; we do the same, restricted to the two layouts attention code uses, decided
from q's shape and stride *order* only (so a compiled graph, which keeps the stride order of our
ops' inputs, sees the same output strides as the fake implementation predicted):

* q's sequence dimension strides wider than its head dimension (a transposed
  ``[batch, seq, heads, head_dim]`` view): the output is a ``[batch, seq, heads, head_dim]``
  contiguous buffer seen through ``transpose(1, 2)``;
* anything else: a contiguous ``[batch, heads, seq, head_dim]`` tensor.
"""
from __future__ import annotations

import torch

__all__ = ["empty_attention_out", "attention_out_strides"]


def _seq_major(q: torch.Tensor) -> bool:
    return q.dim() == 4 and q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


def empty_attention_out(q: torch.Tensor) -> torch.Tensor:
    """Uninitialised output for attention with queries ``q`` (see the module docstring)."""
    if _seq_major(q):
        b, h, n, d = q.shape
        return q.new_empty(b, n, h, d).transpose(1, 2)
    return q.new_empty(q.shape)


def attention_out_strides(q: torch.Tensor) -> tuple:
    """Strides of ``empty_attention_out(q)`` without allocating."""
    if _seq_major(q):
        b, h, n, d = q.shape
        return (n * h * d, d, h * d, 1)
    strides, acc = [], 1
    for size in reversed(q.shape):
        strides.append(acc)
        acc *= size
    return tuple(reversed(strides))
