"""How far one output is from another."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["rel_error"]


def rel_error(a, b) -> Optional[float]:
    """``‖a − b‖ / ‖b‖`` of two outputs (tensors, the first of tuples/lists/dicts, or ``.sample``
    of diffusers outputs); None when they are not comparable."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and a and b:
        return rel_error(a[0], b[0])
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k in b:
                return rel_error(a[k], b[k])
    if hasattr(a, "sample") and hasattr(b, "sample"):
        return rel_error(a.sample, b.sample)
    return None
