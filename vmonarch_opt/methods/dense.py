"""Dense attention through our op (exact): torch's SDPA (cuDNN / FlashAttention) on CUDA, or our
Triton flash kernel with ``VMONARCH_DENSE_KERNEL=triton``. It lets a site with a text padding mask
leave the model's masked SDPA for an unmasked call on the kept tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import dispatch
from ..ops import OP_TAGS, empty_attention_out, in_q_layout, register_reference_autograd
from .base import Method
from .registry import register

__all__ = ["DenseConfig", "DenseMethod", "dense_attention"]


@dataclass(frozen=True)
class DenseConfig:
    """Exact dense attention through our op (torch SDPA by default, see ``kernels/dispatch.py``)."""

    method = "dense"


@torch.library.custom_op("vmonarch::dense_attention", mutates_args=(), tags=OP_TAGS)
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return in_q_layout(q, dispatch.dense_attention(q, k, v, scale))


@dense_attention.register_fake
def _(q, k, v, scale):
    return empty_attention_out(q)  # the layout of every real path (in_q_layout)


register_reference_autograd(dense_attention, lambda q, k, v, scale: F.scaled_dot_product_attention(q, k, v, scale=scale))


class DenseMethod(Method):
    name = "dense"
    config_cls = DenseConfig
    default_rank = 2
    structured = False
    uses_grid = False
    lowered_as = "MatMul/Softmax/MatMul"

    def run(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        return torch.ops.vmonarch.dense_attention(q, k, v, scale)

    def lower(self, q, k, v, args: dict, scale: float, key_valid=None) -> torch.Tensor:
        from ..deploy.lowering import dense_lowered

        return dense_lowered(q, k, v, scale, key_valid=key_valid)


register(DenseMethod())
