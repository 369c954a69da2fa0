"""Count the attention calls a model really makes, to catch the ones capture did not see.

Detection works on the graphs Dynamo (or FX) captured. Attention inside code that Dynamo skips
(a graph break in a loop makes it run the whole frame eagerly, e.g. a per-prompt loop with
``torch.nonzero``) is in no graph: it is never detected and silently keeps the model's own
attention. The census runs alongside the eager reference call: a ``TorchFunctionMode`` counts
every ``F.scaled_dot_product_attention`` call per innermost module (tracked with global forward
hooks), and ``uncaptured()`` compares those counts with the detected sites so the report can say
which attention was not optimized and why. Calls of ``torch.nn.attention.flex_attention`` (a
higher-order op with score/mask functions and a BlockMask, which no pass rewrites) are counted
too, so the report can name them instead of passing over them in silence. The mask of each
SDPA call is summarised by its staircase (``passes/causal.py``): how block-causal masks are found.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

from .causal import staircase
from .detect import SDPA_TARGETS

__all__ = ["Census", "attention_census", "uncaptured"]


class Census(Counter):
    """SDPA calls per module path (see ``attention_census``); ``flex`` counts flex_attention calls;
    ``shapes[path]``: ``(N_q, N_k, head_dim)`` of each SDPA call of the invocation counted;
    ``staircases[(path, i)]``: the staircase of the mask of that invocation's i-th SDPA call
    (``passes.causal.staircase``: None when some row does not see a prefix; absent without a mask)."""

    def __init__(self):
        super().__init__()
        self.flex: Counter = Counter()
        self.shapes: dict[str, list] = {}
        self.staircases: dict[tuple, tuple] = {}


def _is_flex_attention(func) -> bool:
    return isinstance(func, torch._ops.HigherOrderOperator) and getattr(func, "__name__", "") == "flex_attention"


def _sdpa_mask(args, kwargs):
    m = args[3] if len(args) > 3 else (kwargs or {}).get("attn_mask")
    return m if isinstance(m, torch.Tensor) else None


class _CountSDPA(TorchFunctionMode):
    def __init__(self, stack: list, flex: Counter):
        super().__init__()
        self.stack = stack  # [[module path, SDPA calls so far, their shapes, their masks' staircases], ...]
        self.flex = flex
        self._seen: dict = {}  # id(mask) -> (mask, version, staircase): layers share one mask

    def _staircase(self, mask: torch.Tensor):
        hit = self._seen.get(id(mask))
        if hit is not None and hit[0] is mask and hit[1] == mask._version:
            return hit[2]
        runs = staircase(mask) if mask.dim() >= 2 and mask.shape[-1] > 1 else None
        self._seen[id(mask)] = (mask, mask._version, runs)
        return runs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SDPA_TARGETS and self.stack:
            self.stack[-1][1] += 1
            q = args[0] if args else (kwargs or {}).get("query")
            k = args[1] if len(args) > 1 else (kwargs or {}).get("key")
            if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
                self.stack[-1][2].append((int(q.shape[-2]), int(k.shape[-2]), int(q.shape[-1])))
            mask = _sdpa_mask(args, kwargs)
            self.stack[-1][3].append(self._staircase(mask) if mask is not None else False)
        elif _is_flex_attention(func):
            self.flex[self.stack[-1][0] if self.stack else ""] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def attention_census(model: torch.nn.Module) -> Iterator[Census]:
    """Within this block, SDPA calls of ``model`` are counted per innermost module: the Counter
    yielded (filled as the model runs) maps each module path (``""``: the root) to the most calls
    one invocation of that module made — a module run twice (shared weights) still counts once;
    its ``flex`` Counter holds all flex_attention calls per module."""
    names = {id(m): name for name, m in model.named_modules()}
    stack: list = []
    counts = Census()

    def pre(mod, args):
        name = names.get(id(mod))
        if name is not None:
            stack.append([name, 0, [], []])

    def post(mod, args, out):
        if names.get(id(mod)) is not None and stack:
            name, calls, shapes, stairs = stack.pop()
            if calls > counts[name]:
                counts[name] = calls
                counts.shapes[name] = shapes
                for i, runs in enumerate(stairs):
                    if runs is not False:
                        counts.staircases[(name, i)] = runs

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        with _CountSDPA(stack, counts.flex):
            yield counts
    finally:
        for h in handles:
            h.remove()


def uncaptured(counts: Counter, sites: list) -> dict[str, int]:
    """``{module path: calls}``: SDPA calls per module invocation that no detected site accounts for."""
    detected = Counter(s.module_path for s in sites if s.form == "sdpa")
    return {path: n - detected[path] for path, n in sorted(counts.items()) if n > detected[path]}
