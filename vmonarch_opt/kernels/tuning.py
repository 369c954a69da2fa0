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
import os
import threading

__all__ = ["untuned", "tuning_enabled", "interpreting", "TuningCache", "tuning_cache", "tuned_configs", "force_config", "clear_tuned"]

_state = threading.local()


def interpreting() -> bool:
    """Triton's CPU interpreter is active (``TRITON_INTERPRET=1``): kernels launch one small config."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


class TuningCache:
    """The launch configs one kernel family has tuned, keyed by its shape key. Kernels own one
    each (``tuning_cache("flash")``); others read them through :func:`tuned_configs`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._configs: dict = {}
        self._lock = threading.Lock()
        self.forced = None  # a config every launch uses instead (``force_config``); None: tune

    def get(self, key, default=None):
        return self._configs.get(key, default)

    def put(self, key, config) -> None:
        with self._lock:
            self._configs[key] = config

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._configs)

    def clear(self) -> None:
        with self._lock:
            self._configs.clear()

    def __repr__(self) -> str:
        return f"TuningCache({self.name!r}, {len(self._configs)} configs)"


_CACHES: dict[str, TuningCache] = {}


def tuning_cache(name: str) -> TuningCache:
    """The cache of kernel family ``name`` (created on first use)."""
    cache = _CACHES.get(name)
    if cache is None:
        cache = _CACHES.setdefault(name, TuningCache(name))
    return cache


def tuned_configs(name: str) -> dict:
    """``{shape key: config}`` that kernel family ``name`` has tuned so far in this process
    (``"flash"``, ``"monarch_r"``, ``"vmoba"``, ``"vmoba_cut"``): what benchmarks print."""
    return tuning_cache(name).snapshot()


@contextlib.contextmanager
def force_config(name: str, config):
    """Inside this block every launch of kernel family ``name`` uses ``config`` (its tuple of
    tile sizes, warps, stages, ...) instead of a tuned one: benchmarks compare configs and tests
    reach code paths that tuning would not pick on their small shapes."""
    cache = tuning_cache(name)
    previous, cache.forced = cache.forced, config
    try:
        yield
    finally:
        cache.forced = previous


def clear_tuned(name: str | None = None) -> None:
    """Forget tuned configs (of one family, or all): the next launch tunes again."""
    for n, cache in list(_CACHES.items()):
        if name is None or n == name:
            cache.clear()
