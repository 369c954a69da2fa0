"""Run a function on several processes joined by a process group (gloo on CPU for tests and smoke
runs of context parallelism without GPUs; NCCL, one GPU per rank, for benchmarks), and enable
diffusers' context parallelism (on CPU too).

``run_ranks(fn, world)`` spawns ``world`` processes; each initialises ``torch.distributed`` (a
file rendezvous, a collective timeout of ``timeout`` seconds), calls ``fn(rank, world, *args)``
and sends back its return value (picklable) or its traceback. The parent returns the values in
rank order, or raises with every failed rank's traceback; processes still running after
``deadline`` seconds are terminated and reported as hung.
"""
from __future__ import annotations

import datetime
import os
import queue as queue_mod
import tempfile
import time
import traceback
from typing import Callable
from unittest import mock

import torch

__all__ = ["run_ranks", "enable_context_parallel", "RanksFailed"]


class RanksFailed(RuntimeError):
    """Some rank raised, or did not finish in time."""


def _entry(rank: int, world: int, init: str, timeout: float, threads: int, backend: str, fn: Callable, args: tuple,
           out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    status, payload = "ok", None
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        payload = fn(rank, world, *args)
    except BaseException:  # noqa: BLE001  reported to the parent
        status, payload = "error", traceback.format_exc()
    finally:
        out.put((rank, status, payload))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int = 2, *args, timeout: float = 30.0, deadline: float = 240.0,
              threads: int = 1, backend: str = "gloo") -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own process of a
    ``backend`` group (``timeout``: the group's collective timeout, seconds; ``"nccl"``: rank r on
    GPU r)."""
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world, init, timeout, threads, backend, fn, args, out),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        got: dict = {}
        end = time.monotonic() + deadline
        while len(got) < world and time.monotonic() < end:
            try:
                rank, status, payload = out.get(timeout=1.0)
                got[rank] = (status, payload)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
        for p in procs:
            p.join(timeout=max(0.0, end - time.monotonic()) if len(got) == world else 1.0)
            if p.is_alive():
                p.terminate()
                p.join(5)
    failed = [f"rank {r}:\n{got[r][1]}" for r in sorted(got) if got[r][0] != "ok"]
    missing = [r for r in range(world) if r not in got]
    if failed or missing:
        hung = f"\nranks that never reported (hung or killed): {missing}" if missing else ""
        raise RanksFailed("\n".join(failed) + hung)
    return [got[r][1] for r in range(world)]


def enable_context_parallel(model, config, cp_plan=None) -> None:
    """``model.enable_parallelism(config=config, cp_plan=cp_plan)``, around two diffusers 0.42 bugs.

    It picks the rank's device as ``rank % torch.accelerator.device_count()``, which is 0 without
    an accelerator (ZeroDivisionError on CPU): the count is at least 1 here for the call. The root
    entry of a model's ``_cp_plan`` that splits a 1-D ``timestep`` (Wan) makes its split hook warn
    through ``logger.warning_once``, which diffusers' logger lacks: that entry is left out when
    ``cp_plan`` is not given (the timestep is not split either way)."""
    if cp_plan is None:
        cp_plan = {k: v for k, v in type(model)._cp_plan.items() if k != ""}
    count = torch.accelerator.device_count
    with mock.patch.object(torch.accelerator, "device_count", lambda: max(1, count())):
        model.enable_parallelism(config=config, cp_plan=cp_plan)
