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

On a diffusers pipeline (``optimize_pipeline``'s result) the switch acts on every optimized
transformer at once, and ``dense_steps=k`` runs the first ``k`` denoising steps of every later
generation with exact attention and the rest optimized (``pipelines.py`` counts the steps)::

    vmonarch_opt.set_original_attention(fast, dense_steps=2)   # each fast(...) call: steps 0, 1 exact
    vmonarch_opt.set_original_attention(fast, False)           # optimized everywhere again
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import VMonarchError
from .runtime import AttentionSwitch  # noqa: F401  (the flag; defined beside the site runtimes)

__all__ = ["set_original_attention", "AttentionSwitch"]


class set_original_attention:
    """Run ``model``'s own attention at every site ``optimize`` rewrote (``enabled=True``) or the
    optimized kernels again (``False``). Takes effect at once; used as a context manager, the
    previous setting comes back on exit (like ``torch.set_grad_enabled``).

    ``model`` may also be a diffusers pipeline whose transformers were optimized
    (``optimize_pipeline``): every optimized transformer is switched. There ``dense_steps=k``
    (an int ≥ 0) runs denoising steps ``0 … k-1`` of each generation with the model's own attention
    and the later steps optimized, until the next ``set_original_attention(pipe, ...)`` call (or
    the end of the ``with`` block)."""

    def __init__(self, model, enabled: bool = True, *, dense_steps: Optional[int] = None) -> None:
        from .pipelines import is_pipeline, pipeline_switch

        self._undo = None
        if is_pipeline(model):
            self._undo = pipeline_switch(model, bool(enabled), dense_steps)
            return
        if dense_steps is not None:
            raise VMonarchError(
                "set_original_attention(model, dense_steps=k) needs the pipeline, whose scheduler says which step "
                "runs: pass the diffusers pipeline (optimize_pipeline's result), or switch a single model yourself "
                "per step (set_original_attention(model, step < k) in a callback_on_step_end)")
        state = model.__dict__.get("vmonarch") if isinstance(model, torch.nn.Module) else None
        if state is None or getattr(state, "switch", None) is None:
            raise VMonarchError(
                f"set_original_attention: this {type(model).__name__} was not optimized by "
                "vmonarch_opt.optimize (no rewritten attention to switch); pass the module optimize() "
                "returned, or a pipeline optimize_pipeline() returned")
        self._switch = state.switch
        self._previous = self._switch.original
        self._switch.original = bool(enabled)

    def __enter__(self) -> "set_original_attention":
        return self

    def __exit__(self, *exc) -> None:
        if self._undo is not None:
            self._undo()
            return
        self._switch.original = self._previous
