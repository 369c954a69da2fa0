"""Dense attention through our op (exact): torch's SDPA (cuDNN / FlashAttention) on CUDA, or our
Triton flash kernel with ``VMONARCH_DENSE_KERNEL=triton``. It lets a site with a text padding mask
leave the model's masked SDPA for an unmasked call on the kept tokens.

Backward: the gradients of the kernel that ran the forward. With SDPA (the default on CUDA) the
backward differentiates SDPA itself: autograd recomputes the SDPA forward, which keeps its row
logsumexp, and runs SDPA's fused backward (cuDNN / FlashAttention). Our Triton flash backward
(``kernels/flash/backward.py``) needs that logsumexp too and the op returns only the output, so it
would pay a recomputation (a QK^T pass, half a forward) and then run a backward kernel slower than
cuDNN's, against one cuDNN forward + backward: SDPA's own backward is the faster choice whenever
SDPA ran the forward. With ``VMONARCH_DENSE_KERNEL=triton`` the forward ran our flash kernel, and
the backward op ``vmonarch::dense_attention_backward`` runs our Triton backward (the same function
differentiated; ``benchmarks/bench_backward.py`` times both designs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import dispatch
from ..ops import OP_TAGS, empty_attention_out, in_q_layout, register_autograd
from .base import Method, Shape
from .registry import register

__all__ = ["DenseConfig", "DenseMethod", "dense_attention", "dense_attention_backward"]


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


def _reference(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


@torch.library.custom_op("vmonarch::dense_attention_backward", mutates_args=(), tags=OP_TAGS)
def dense_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             grad_out: torch.Tensor, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``dense_attention`` by our Triton flash backward (the row logsumexp
    recomputed). The op's autograd calls it only after our flash forward (module docstring)."""
    if not dispatch.use_triton(q):
        raise RuntimeError("vmonarch::dense_attention_backward runs our Triton flash backward, which needs CUDA "
                           "tensors (or, for tests, TRITON_INTERPRET=1 with VMONARCH_INTERPRET_KERNELS=1); "
                           "elsewhere call .backward() on vmonarch::dense_attention's output (SDPA is "
                           "differentiated)")
    dq, dk, dv = dispatch.dense_attention_backward(q, k, v, out, grad_out, scale)
    return in_q_layout(q, dq), in_q_layout(k, dk), in_q_layout(v, dv)


@dense_attention_backward.register_fake
def _(q, k, v, out, grad_out, scale):
    return empty_attention_out(q), empty_attention_out(k), empty_attention_out(v)


def _kernel_covers(q, scale) -> bool:
    """Our Triton backward exactly where our Triton forward ran (see the module docstring)."""
    return (dispatch.dense_uses_triton(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[-1] <= 256)


register_autograd(dense_attention, _reference, dense_attention_backward, _kernel_covers)


class DenseMethod(Method):
    name = "dense"
    config_cls = DenseConfig
    default_rank = 2
    structured = False
    uses_grid = False
    lowered_as = "MatMul/Softmax/MatMul"
    lowers_cached = True  # fewer queries than keys: the same decomposition
    causal_mode = "cached"  # block-causal: each chunk's queries against its visible keys (exact)

    def run(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        return torch.ops.vmonarch.dense_attention(q, k, v, scale)

    def cached_unsupported(self, args: dict):
        return None

    def run_cached(self, q, k, v, args: dict, scale: float) -> torch.Tensor:
        return torch.ops.vmonarch.dense_attention(q, k, v, scale)  # fewer queries than keys: exact

    def cached_flops(self, shape: Shape, args: dict, density=None):
        return shape.dense_flops

    def lower(self, q, k, v, args: dict, scale: float, key_valid=None) -> torch.Tensor:
        from ..deploy.lowering import dense_lowered

        return dense_lowered(q, k, v, scale, key_valid=key_valid)


register(DenseMethod())
