"""Switch an optimized model between its optimized attention and its own, without re-optimizing.

Sparse-attention video samplers commonly run the first, high-noise denoising steps with exact
attention (they fix the video's layout) and the rest with the fast kernels. With an optimized
model that is a flag flip::

    opt = vmonarch_opt.optimize(transformer, calib_batch)
    with vmonarch_opt.set_original_attention(opt):      # exact attention inside the block
        v = opt(x, t, ...)
    vmonarch_opt.set_original_attention(opt, False)     # or as a call: stays until switched back

While the flag is on, every rewritten site runs the model's own attention call (bit-identical to
the unoptimized model); the plans, report and hooks stay in place. Under ``torch.compile`` the
flag is guarded on: each setting compiles once and later switches reuse both graphs.
"""
from __future__ import annotations

import torch

from .errors import VMonarchError

__all__ = ["set_original_attention", "AttentionSwitch"]


class AttentionSwitch:
    """Shared by every site of one optimized model (``SiteRuntime.switch``)."""

    def __init__(self) -> None:
        self.original = False

    def __repr__(self) -> str:
        return f"AttentionSwitch(original={self.original})"


class set_original_attention:
    """Run ``model``'s own attention at every site ``optimize`` rewrote (``enabled=True``) or the
    optimized kernels again (``False``). Takes effect at once; used as a context manager, the
    previous setting comes back on exit (like ``torch.set_grad_enabled``)."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True) -> None:
        state = model.__dict__.get("vmonarch")
        if state is None or getattr(state, "switch", None) is None:
            raise VMonarchError(
                f"set_original_attention: this {type(model).__name__} was not optimized by "
                "vmonarch_opt.optimize (no rewritten attention to switch); pass the module optimize() "
                "returned")
        self._switch = state.switch
        self._previous = self._switch.original
        self._switch.original = bool(enabled)

    def __enter__(self) -> "set_original_attention":
        return self

    def __exit__(self, *exc) -> None:
        self._switch.original = self._previous
