"""How far one output is from another: the one relative error of the package.

``‖a − b‖ / ‖b‖``, computed in float64. A NaN or Inf anywhere in either output is an infinite
error (never 0, never NaN: a NaN compares as neither smaller nor larger and would slip through
budgets). Outputs that cannot be compared (no tensor found) give None: "cannot measure", which
callers must not read as 0.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["rel_error", "rel_error_with_heads", "first_tensor"]


def first_tensor(x) -> Optional[torch.Tensor]:
    """The tensor an output stands for: itself, the first of a tuple/list, the first value of a dict
    that has one, or a diffusers output's ``.sample``."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x:
        return first_tensor(x[0])
    if isinstance(x, dict):
        for v in x.values():
            t = first_tensor(v)
            if t is not None:
                return t
        return None
    if hasattr(x, "sample"):
        return first_tensor(x.sample)
    return None


def _tensor_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    e = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    return e if math.isfinite(e) else math.inf


def rel_error(a, b) -> Optional[float]:
    """Relative error of output ``a`` against reference ``b`` (tensors, or the first tensor of
    tuples/lists/dicts/diffusers outputs); ``inf`` if either holds a NaN or Inf; None when there
    is no tensor to compare."""
    ta, tb = first_tensor(a), first_tensor(b)
    if ta is None or tb is None:
        return None
    if ta.shape != tb.shape:
        raise ValueError(f"rel_error: outputs of different shapes {tuple(ta.shape)} and {tuple(tb.shape)}")
    return _tensor_rel(ta, tb)


def rel_error_with_heads(a: torch.Tensor, b: torch.Tensor) -> tuple[float, list]:
    """``(relative error, per head)`` of ``[B, H, N, D]`` outputs from one pass over their
    difference (float32 squares summed per head: calibration calls this for every candidate of every
    site on full-size activations); NaN/Inf give ``inf``."""
    d2 = (a.detach().float() - b.detach().float()).pow(2).sum(dim=(0, 2, 3)).double()
    r2 = b.detach().float().pow(2).sum(dim=(0, 2, 3)).double()
    total = (d2.sum() / r2.sum().clamp_min(1e-300)).sqrt().item()
    heads = (d2 / r2.clamp_min(1e-300)).sqrt().tolist()
    fix = lambda e: e if math.isfinite(e) else math.inf  # noqa: E731
    return fix(total), [fix(e) for e in heads]
