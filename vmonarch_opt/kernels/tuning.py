"""Whether our Triton kernels may run their launch-config tuning sweep.

Each kernel tunes its launch configuration (tile sizes, warps, stages) the first time it meets a
new shape: every candidate config is compiled and timed, ~1-3 s per config on a cold machine.
That is right for a model that then runs many times, and wasteful where many kernel variants run
once each — calibration measures every candidate layout of every method. Inside ``untuned()``
a kernel whose config is not tuned yet launches one safe default config instead, without
caching it; configs tuned earlier still apply.
"""
from __future__ import annotations

import contextlib
import threading

__all__ = ["untuned", "tuning_enabled"]

_state = threading.local()


def tuning_enabled() -> bool:
    """False inside an ``untuned()`` block (of this thread)."""
    return getattr(_state, "tune", True)


@contextlib.contextmanager
def untuned(active: bool = True):
    """Kernels launched in this block skip the tuning sweep (``active=False``: a no-op)."""
    previous = tuning_enabled()
    _state.tune = previous and not active
    try:
        yield
    finally:
        _state.tune = previous
