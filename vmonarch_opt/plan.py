"""``SitePlan``: what happens to one attention site. Immutable once made: a stage that changes a
plan (calibration, validation) returns a new one (``plan.replace(...)``)."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Optional

from .methods.registry import ORIGINAL, is_original

__all__ = ["SitePlan", "ORIGINAL"]


@dataclass(frozen=True)
class SitePlan:
    """What happens to one site: the method, its resolved op arguments, and why."""

    site_id: str
    method: str  # a registered method's name, or ORIGINAL (left untouched)
    args: dict = field(default_factory=dict)  # resolved op arguments (grid, block, ...); never mutated
    reason: str = ""  # for ORIGINAL: why it was left dense; otherwise how the method was chosen
    source: str = "default"  # default | override | profile
    calibrated_error: Optional[float] = None
    flops_before: int = 0
    flops_after: Optional[int] = None  # None: not known (depends on data not measured yet)
    density: Optional[float] = None  # measured fraction of video×video token pairs computed (data-dependent methods)
    seq_q: int = 0
    seq_k: int = 0
    head_dim: int = 0

    @property
    def rewritten(self) -> bool:
        """The site runs one of our methods (not the model's own attention)."""
        return not is_original(self.method)

    def replace(self, **changes) -> "SitePlan":
        return dataclasses.replace(self, **changes)

    def left_original(self, reason: str) -> "SitePlan":
        """This plan, changed to keep the model's own attention for ``reason``."""
        return dataclasses.replace(self, method=ORIGINAL, args={}, flops_after=self.flops_before, reason=reason)

    def to_dict(self) -> dict:
        return asdict(self)
