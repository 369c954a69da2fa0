"""The ranks that must agree on one optimized model, and the few collectives the optimizer runs.

``optimize`` and ``calibrate`` run on every rank of a context-parallel group (each rank holds the
whole model; under Ulysses each rank's attention sees all tokens of ``H / P`` heads). Where a rank
decides something from what it measured (calibration choices), the ranks exchange their results so
that every rank makes the same decision; at the end they check that they hold the same plans.

Every exchange goes through :meth:`Comm.exchange`: each rank runs its local step, and the ranks
swap ``(error, value)`` pairs. When the step failed on some rank, every rank raises a
:class:`~vmonarch_opt.errors.VMonarchError` that names the rank and its error, instead of the other
ranks waiting forever for a rank that left. A rank that fails *inside* the model's forward (between
the model's own collectives) cannot be caught that way: there the process group's timeout is the
bound (``init_process_group(timeout=...)``; gloo also fails fast once the peer's process exits).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.distributed as dist

from ..errors import VMonarchError

__all__ = ["Comm", "process_group", "explicit_comm"]

_EXPLICIT: contextvars.ContextVar = contextvars.ContextVar("vmonarch_process_group", default=None)


@dataclass(frozen=True)
class Comm:
    """A process group the optimizer exchanges results over (``group=None``: the default group)."""

    group: Any = None
    rank: int = 0
    world: int = 1
    origin: str = ""  # where the group came from (for messages): "process_group()", "diffusers ..."
    timeout: Optional[datetime.timedelta] = None  # gloo: a monitored barrier bounds each exchange
    replicated: bool = False  # every rank runs all heads (not split across the ranks)

    @classmethod
    def of(cls, group=None, origin: str = "", timeout: Optional[float] = None, replicated: bool = False) -> "Comm":
        if not (dist.is_available() and dist.is_initialized()):
            raise VMonarchError(f"{origin or 'vmonarch_opt.parallel'}: torch.distributed is not initialized; call "
                                f"torch.distributed.init_process_group(...) on every rank first")
        td = None if timeout is None else datetime.timedelta(seconds=float(timeout))
        return cls(group=group, rank=dist.get_rank(group), world=dist.get_world_size(group), origin=origin, timeout=td,
                   replicated=replicated)

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self.group))

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world
        if self.timeout is not None and "gloo" in self.backend:
            # names the ranks that never arrive, after `timeout`, rather than the group's (long) default
            dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def exchange(self, what: str, local: Callable[[], Any]) -> list:
        """Run ``local()`` here and return every rank's value, in rank order. If it raised on any
        rank, every rank raises a VMonarchError naming each failed rank and its error (the failed
        rank chains its own exception)."""
        err, value, exc = None, None, None
        try:
            value = local()
        except Exception as e:  # reported to every rank below
            exc = e
            err = f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e)[-3:]).rstrip()}"
        got = self.all_gather_object((err, value if err is None else None))
        failed = [(r, e) for r, (e, _) in enumerate(got) if e is not None]
        if failed:
            lines = "\n".join(f"  rank {r}: {e}" for r, e in failed)
            raise VMonarchError(f"vmonarch_opt ({self.origin or 'context parallel'}): {what} failed on "
                                f"{len(failed)} of {self.world} ranks, so every rank stops here:\n{lines}") from exc
        return [v for _, v in got]


@contextlib.contextmanager
def process_group(group=None, *, timeout: Optional[float] = None, replicated: bool = False):
    """Inside this block, ``optimize`` and ``calibrate`` treat the ranks of ``group`` (default: the
    default group) as one model run by several ranks: every rank must call them with the same model
    and batch; calibration choices are agreed across the ranks and the plans are checked to be
    identical. Use it for models that run their own Ulysses (each rank's attention holds its share
    of the heads); a diffusers model with ``enable_parallelism(ContextParallelConfig(...))``
    already on needs no block.

    ``replicated=True``: every rank runs the whole model (``optimize`` before
    ``enable_parallelism``): the ranks measure the same heads, and the agreement only makes
    certain that rounding differences between the ranks cannot choose differently.
    ``timeout`` (seconds): with gloo, each exchange first waits at a monitored barrier that long and
    names the ranks that did not arrive (default: the process group's own timeout)."""
    comm = Comm.of(group, origin="vmonarch_opt.parallel.process_group()", timeout=timeout, replicated=replicated)
    token = _EXPLICIT.set(comm)
    try:
        yield comm
    finally:
        _EXPLICIT.reset(token)


def explicit_comm() -> Optional[Comm]:
    """The group of the enclosing :func:`process_group` block, if any."""
    return _EXPLICIT.get()


def same_everywhere(comm: Comm, what: str, value) -> None:
    """Raise on every rank when ``value`` (a picklable, comparable object) differs between ranks."""
    got = comm.exchange(what, lambda: value)
    bad = [r for r, v in enumerate(got) if v != got[0]]
    if bad:
        raise VMonarchError(f"vmonarch_opt ({comm.origin}): {what} differs between ranks 0 and {bad}; every rank must "
                            f"call it with the same model, batch and options")
