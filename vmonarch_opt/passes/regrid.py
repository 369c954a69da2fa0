"""Plans that follow the input's token grid: run an optimized model at another resolution or frame
count than the calibration batch had.

A site's plan is made for the token grid of the calibration batch (``(T, H, W)`` plus text). When
the model is later called with another video size, ``GridTracker`` has recorded, during that
forward, the grids the input implies — the outputs of the patch-embedding convolutions that gave
grids at optimize time, and the batch itself (``num_frames``/``height``/``width``, 5-D latents) —
and ``adapt_plan`` re-derives the plan for the grid that matches the new token count:

* the text tokens of joint attention keep their place; a text of another length (a prompt of
  another length where the model crops its padding, FramePack at batch 1) is placed when that is
  unambiguous: the plan has one text segment, which takes the difference, or the tokens before
  the video came from patch embeddings (FramePack's history latents) and are as many as those
  gave in this forward, the rest going after the video — the video grid then being the one of
  the patch embedding that gave it at optimize time;
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

import functools
import math
from typing import Optional

import torch

from .. import methods as registry
from ..methods import causal
from ..plan import SitePlan
from .causal import cached_key_frames as causal_key_frames
from .grid import _batch_candidates, _batch_size, conv_grid


def exporting() -> bool:
    """``torch.export`` is tracing the model. Reads the flag export sets: torch 2.11's Dynamo folds
    ``torch.compiler.is_exporting()`` to True in every trace, torch.compile's included (later
    versions read the flag too)."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))




class GridTracker:
    """Records the token grids implied by the current forward's input (see the module docstring).

    Its hooks are bound methods (``functools.partial`` of one for the patch embeddings), not
    closures: ``copy.deepcopy`` of the model maps them, with the hook dictionaries and the handles
    in ``_hooks``, to the copy's tracker and modules, and ``pickle`` stores them with the model."""

    def __init__(self, model: torch.nn.Module, conv_modules: list):
        self.grids: list[tuple] = []
        self.by_module: dict[str, tuple] = {}  # patch-embedding module path -> its grid this forward
        self._batch = 1
        self._hooks = []
        self._model = model
        self._conv_modules = list(conv_modules)  # grid.grid_modules(): paths of Conv3d/Conv2d modules
        self.install()

    def install(self) -> None:
        """Register the hooks (``__init__`` does; again after ``remove``)."""
        if self._hooks:
            return
        model = self._model
        self._hooks.append(model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._on_return, always_call=True))
        for path, kind in self._conv_modules:
            mod = model.get_submodule(path)
            self._hooks.append(mod.register_forward_hook(functools.partial(self._on_conv, path, kind)))

    def _on_call(self, module, args, kwargs):
        if exporting():
            return None
        batch = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
        self._batch = _batch_size(batch) or 1
        self.grids = [c.grid for c in _batch_candidates(self._model, batch, describe=False)]
        self.by_module = {}
        return None

    def _on_return(self, module, args, out):
        self.grids, self.by_module = [], {}  # nothing outlives the forward that implied it
        return None

    def _on_conv(self, path: str, kind: str, module, args, out):
        if exporting() or not isinstance(out, torch.Tensor):
            return None
        grid = conv_grid(out.shape, kind, self._batch)
        if grid is not None:
            self.grids.append(grid)
            self.by_module[path] = grid
        return None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _text_split(plan: SitePlan, n_q: int, grid: tuple, by_module: dict, prefix: tuple = ()) -> Optional[tuple]:
    """``(text_before, text_after)`` of a call with ``n_q`` tokens on ``grid``, or None: as
    calibrated when that adds up; else, when the tokens before the video came from patch
    embeddings (FramePack's history latents), as many as those embeddings gave in this forward,
    the rest after the video; else the one text segment the plan has takes the difference (a
    prompt of another length). Two text segments of unknown origin: None (ambiguous)."""
    tb, ta = plan.args["text_before"], plan.args["text_after"]
    nv = math.prod(grid)
    if nv + tb + ta == n_q:
        return tb, ta
    if prefix:
        if not all(m in by_module for m in prefix):
            return None
        tb2 = sum(math.prod(by_module[m]) for m in prefix)
        ta2 = n_q - nv - tb2
        return (tb2, ta2) if ta2 >= 0 and (ta2 > 0) == (ta > 0) else None
    if tb and not ta and n_q > nv:
        return n_q - nv, 0
    if ta and not tb and n_q > nv:
        return 0, n_q - nv
    return None


def adapt_plan(plan: SitePlan, n_q: int, n_k: int, head_dim: int, grids: list,
               by_module: Optional[dict] = None, *, grid_module: str = "", prefix_modules: tuple = (),
               cache: Optional[dict] = None) -> Optional[SitePlan]:
    """``plan`` re-derived for a call with ``n_q`` queries and ``n_k`` keys, or None if no grid in
    ``grids`` fits. ``by_module``: the grids of this forward per patch-embedding module; when the
    plan's grid came from one (``grid_module``), only that module's grid is the video's, and a text
    length that differs from the calibrated one is placed by ``_text_split`` (``prefix_modules``:
    the patch embeddings of the tokens before the video). ``cache``: re-derived plans per shape
    (the site's runtime keeps it)."""
    method = registry.find(plan.method)
    if head_dim != plan.head_dim or method is None:
        return None
    structured = causal.is_causal_plan(plan.args)
    if not method.uses_grid and not structured and n_k <= n_q:
        return plan.replace(seq_q=n_q, seq_k=n_k)
    if n_k > n_q or plan.args.get("cached_frames"):
        return _adapt_cached(plan, method, n_q, n_k, grids, by_module or {}, grid_module, cache)
    if n_q != n_k or plan.seq_q != plan.seq_k or not plan.args.get("grid"):
        return None
    by_module = by_module or {}
    unique = list(dict.fromkeys(tuple(g) for g in grids))
    tb, ta = plan.args["text_before"], plan.args["text_after"]
    match = [(g, (tb, ta)) for g in unique if math.prod(g) + tb + ta == n_q]
    if len(match) != 1:  # none or ambiguous with the calibrated text: the text length changed?
        options = [tuple(by_module[grid_module])] if grid_module in by_module else unique
        match = [(g, t) for g in options for t in [_text_split(plan, n_q, g, by_module, prefix_modules)]
                 if t is not None]
        if len(match) != 1:
            return None
    grid, (tb, ta) = match[0]
    if structured and (tb or ta):
        return None
    cache = {} if cache is None else cache
    key = (n_q, n_k, grid, tb)
    if key not in cache:
        args = {**method.adapt_args(plan.args, tuple(plan.args["grid"]), grid), "text_before": tb, "text_after": ta}
        cache[key] = plan.replace(args=args, seq_q=n_q, seq_k=n_k)
    return cache[key]


def _adapt_cached(plan: SitePlan, method, n_q: int, n_k: int, grids: list, by_module: dict, grid_module: str,
                  cache: Optional[dict]) -> Optional[SitePlan]:
    """A KV-cache call (``n_k > n_q``): the keys are the cached frames then the new ones, whole frames
    of the queries' grid (the plan's own KV-cache form, or a self-attention plan now given a cache:
    the same module attending to more keys than its queries); or a KV-cache plan called without a
    cache (``n_k = n_q``, the first chunk). None when the keys are not whole frames of one grid of
    this forward, the plan has text tokens or a block-causal mask, or the method has no KV-cache
    form for this shape (the model's own attention runs)."""
    a = plan.args
    if a.get("text_before") or a.get("text_after") or a.get("causal_chunk") or (
            not a.get("grid") and method.uses_grid):
        return None
    options = [tuple(by_module[grid_module])] if grid_module in by_module else list(dict.fromkeys(map(tuple, grids)))
    match = [g for g in options if math.prod(g) == n_q]
    if len(match) != 1:
        return None
    qgrid = match[0]
    T, H, W = qgrid
    tk = T if n_k == n_q else causal_key_frames(n_q, n_k, qgrid)
    if tk is None:
        return None
    cache = {} if cache is None else cache
    key = ("cached", n_q, n_k, qgrid)
    if key not in cache:
        base = {k: v for k, v in a.items() if k not in causal.CAUSAL_KEYS}
        old = tuple(base["grid"]) if base.get("grid") else (tk, H, W)
        if method.uses_grid:
            base = method.adapt_args(base, old, (tk, H, W))
        base = {**base, "grid": [tk, H, W]}
        if tk > T:
            base["cached_frames"] = tk - T
            if causal.unsupported(method, base) is not None:
                cache[key] = None
                return None
        cache[key] = plan.replace(args=base, seq_q=n_q, seq_k=n_k)
    return cache[key]
