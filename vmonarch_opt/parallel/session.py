"""``optimize`` / ``calibrate`` on a model that runs split across ranks: what changes.

:meth:`Session.start` looks at the model and the enclosing :func:`~.comm.process_group` block:

* a diffusers model with ``enable_parallelism(ContextParallelConfig(ulysses_degree=P))`` already
  on (enable, then optimize): its context-parallel group is the group; ``inplace=True`` is
  required (``copy.deepcopy`` cannot copy diffusers' hooks: the copies' forwards keep calling the
  original modules);
* the same with ``ring_degree > 1``: refused, optimize first (under diffusers' ring attention no
  SDPA call reaches the optimizer, and the ring form is installed at ``apply``);
* any other diffusers hooks (offloading, caches) with ``inplace=False``: refused, for the same
  deepcopy reason;
* a ``process_group()`` block: its group;
* otherwise no group: a single process (any order of ``enable_parallelism`` after ``optimize``
  is handled at run time, ``guard.py``).

With a group, the session makes the ranks agree: joint sites (text tokens in the sequence) stay
dense under Ulysses (diffusers puts each rank's text between the ranks' video runs); calibration
measurements are merged across the ranks before choosing (``calibration.py``); the final plans
are compared across the ranks and a difference raises on every rank.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import VMonarchError
from .comm import Comm, explicit_comm
from .guard import cp_config

__all__ = ["Session", "diffusers_hooked"]


def diffusers_hooked(model: torch.nn.Module) -> list:
    """Paths of the modules carrying diffusers hooks (``enable_parallelism``, offloading, caches).
    An empty hook registry (a pipeline's ``cache_context`` leaves one on the transformer) wraps
    nothing and does not count."""
    return [name or "<root>" for name, m in model.named_modules()
            if getattr(getattr(m, "_diffusers_hook", None), "hooks", None)]


@dataclass
class Session:
    """The ranks one ``optimize`` / ``calibrate`` call agrees across (``comm=None``: one process)."""

    comm: Optional[Comm] = None
    kind: str = ""  # "ulysses" (diffusers), "process_group"

    @classmethod
    def start(cls, model: torch.nn.Module, inplace: bool, who: str = "optimize()") -> "Session":
        cp = cp_config(getattr(model, "_parallel_config", None))
        hooked = diffusers_hooked(model)
        if cp is not None and cp.ring_degree > 1:
            raise VMonarchError(
                f"{who}: ring context parallelism (ring_degree={cp.ring_degree}) is already enabled on this "
                f"{type(model).__name__}; under diffusers' ring attention no SDPA call reaches vmonarch_opt. Call "
                f"{who} on every rank first, then model.enable_parallelism(...): the optimized sites then take the "
                f"split sequence themselves (docs/multi_gpu.md)")
        if hooked and not inplace:
            what = "enable_parallelism(...)" if cp is not None else "diffusers hooks (offloading, caching, parallelism)"
            raise VMonarchError(
                f"{who}: this {type(model).__name__} carries {what} on {hooked[:3]}{' …' * (len(hooked) > 3)}; "
                f"copy.deepcopy cannot copy diffusers' hooks (the copy would keep calling the original modules). "
                f"Pass inplace=True, or call {who} before enabling them")
        if cp is not None:
            return cls(Comm.of(cp._flattened_mesh.get_group(),
                               origin=f"diffusers Ulysses context parallel, {cp.ulysses_degree} ranks"), "ulysses")
        comm = explicit_comm()
        if comm is not None:
            return cls(comm, "process_group")
        return cls()

    @property
    def active(self) -> bool:
        return self.comm is not None and self.comm.world > 1

    def restrict(self, sites: list, plans: dict) -> dict:
        """Under diffusers' Ulysses, joint sites (text tokens in the sequence) keep the model's attention."""
        if self.kind != "ulysses":
            return plans
        out = dict(plans)
        for s in sites:
            p = out[s.site_id]
            if p.rewritten and (s.text_before or s.text_after):
                out[s.site_id] = p.left_original(
                    "Ulysses context parallel: diffusers splits the text and video streams separately, so after the "
                    "all-to-all each rank's text sits between the video runs; joint attention stays dense")
        return out

    def agree_profile(self, profile, budget):
        if not self.active:
            return profile
        from .calibration import agree_profile

        return agree_profile(self.comm, profile, budget)

    def check_plans(self, plans: dict) -> None:
        """Raise on every rank unless all ranks hold the same plans (method and arguments per site)."""
        if not self.active:
            return
        mine = {sid: (p.method, json.dumps(p.args, sort_keys=True, default=str)) for sid, p in plans.items()}
        got = self.comm.exchange("the final plans", lambda: mine)
        diff = sorted({sid for g in got[1:] for sid in set(g) | set(mine) if g.get(sid) != got[0].get(sid)})
        if diff:
            where = [f"{sid}: " + " / ".join(f"rank {r} {g.get(sid, ('absent',))[0]}" for r, g in enumerate(got))
                     for sid in diff[:4]]
            raise VMonarchError(f"vmonarch_opt ({self.comm.origin}): the ranks chose different plans for {len(diff)} "
                                f"site(s) — {'; '.join(where)}. Every rank must optimize the same model on the same "
                                f"batch (the output the budget measures must be the same on every rank)")
