"""Plans that follow the input's token grid: run an optimized model at another resolution or frame
count than the calibration batch had.

A site's plan is made for the token grid of the calibration batch (``(T, H, W)`` plus text). When
the model is later called with another video size, ``GridTracker`` has recorded, during that
forward, the grids the input implies — the outputs of the patch-embedding convolutions that gave
grids at optimize time, and the batch itself (``num_frames``/``height``/``width``, 5-D latents) —
and ``adapt_plan`` re-derives the plan for the grid that matches the new token count:

* the text tokens of joint attention must be as many as at optimize time (their place is kept);
* Monarch: a block dimension that spanned the whole grid dimension spans the new one (frame blocks
  stay frame blocks), the others are kept, clipped to the new grid;
* VMoBA: the number of chunks per dimension is kept (chunk = ceil(new size / chunks)), so the
  block count, top-k and threshold mean the same;
* the dense kernel needs nothing.

The same applies at the calibrated token count when the input's grid is another one (a 30x52
and a 52x30 latent have as many tokens), for sites whose grid was inferred rather than given with
``grid=``. The calibrated error was measured at the calibration shape; the first adapted call of each site
warns and says so. Without a matching grid the site runs the model's own attention, as before.
Under torch.compile the hooks are traced with the model (shape arithmetic only, no graph break):
each new input shape compiles with the plans for its grid, as in eager mode (the warning is not
emitted inside a compiled region: it would break the graph). They do nothing while torch.export
traces the model: an exported program runs the plans at the shape it was optimized for, and the
model's own attention at others.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from ..config import SitePlan
from .grid import _batch_candidates, _batch_size, conv_grid


def _exporting() -> bool:
    return bool(getattr(torch.compiler, "is_exporting", lambda: False)())


class GridTracker:
    """Records the token grids implied by the current forward's input (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, conv_modules: list):
        self.grids: list[tuple] = []
        self._batch = 1
        self._hooks = []
        self._model = model
        self._hooks.append(model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._on_return, always_call=True))
        for path, kind in conv_modules:  # grid.grid_modules(): paths of Conv3d/Conv2d modules
            mod = model.get_submodule(path)
            self._hooks.append(mod.register_forward_hook(
                lambda m, args, out, kind=kind: self._on_conv(kind, out)))

    def _on_call(self, module, args, kwargs):
        if _exporting():
            return None
        batch = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
        self._batch = _batch_size(batch) or 1
        self.grids = [c.grid for c in _batch_candidates(self._model, batch, describe=False)]
        return None

    def _on_return(self, module, args, out):
        self.grids = []  # nothing outlives the forward that implied it
        return None

    def _on_conv(self, kind: str, out):
        if _exporting() or not isinstance(out, torch.Tensor):
            return None
        grid = conv_grid(out.shape, kind, self._batch)
        if grid is not None:
            self.grids.append(grid)
        return None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _adapted_args(plan: SitePlan, grid: tuple) -> dict:
    a = dict(plan.args)
    old = tuple(a["grid"])
    a["grid"] = list(grid)
    if plan.method == "monarch":
        a["block"] = [g_new if b == g_old else min(b, g_new)
                      for b, g_old, g_new in zip(a["block"], old, grid)]
    elif plan.method == "vmoba":
        n_chunks = [math.ceil(g / c) for g, c in zip(old, a["chunk"])]
        a["chunk"] = [max(1, math.ceil(g / n)) for g, n in zip(grid, n_chunks)]
    return a


def adapt_plan(plan: SitePlan, n_q: int, n_k: int, head_dim: int, grids: list) -> Optional[SitePlan]:
    """``plan`` re-derived for a call with ``n_q`` queries and ``n_k`` keys, or None if no grid in
    ``grids`` fits (cached per shape on the plan)."""
    if head_dim != plan.head_dim or plan.method not in ("monarch", "vmoba", "dense"):
        return None
    if plan.method == "dense":
        return replace(plan, seq_q=n_q, seq_k=n_k)
    if n_q != n_k or plan.seq_q != plan.seq_k or not plan.args.get("grid"):
        return None
    text = plan.args["text_before"] + plan.args["text_after"]
    match = [g for g in dict.fromkeys(tuple(g) for g in grids) if math.prod(g) + text == n_q]
    if len(match) != 1:  # none, or ambiguous
        return None
    cache = plan.__dict__.setdefault("_adapted", {})  # not a dataclass field: never serialised
    key = (n_q, n_k, match[0])
    if key not in cache:
        cache[key] = replace(plan, args=_adapted_args(plan, match[0]), seq_q=n_q, seq_k=n_k)
    return cache[key]
