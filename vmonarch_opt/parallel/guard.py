"""What an optimized diffusers model does at its sites when ``enable_parallelism`` is on.

diffusers' attention processors pass their ``_parallel_config`` to ``dispatch_attention_fn``,
which wraps the attention in its context-parallel forms. :func:`attach` puts a
:class:`ModuleGuard` (forward pre- and post-hook) on every routed diffusers attention module; on
each call it reads the processor's config and sets the mode the module's site handlers
(:class:`GuardedHandler`) run in:

* no context parallelism: the site's ``SiteRuntime`` as always;
* **Ulysses** (``ulysses_degree > 1``): diffusers all-to-alls q/k/v so that this rank holds every
  token of ``H / P`` heads, then calls SDPA — our handler sees exactly that call and runs the
  plan on it (plans do not depend on the head count; grid and token order are unchanged). Except
  a site with text tokens in its sequence (joint attention): diffusers splits the text and the
  video streams separately, so after the all-to-all the text of each rank sits between the ranks'
  video runs, not where the plan put it: such a site runs the model's own attention, counted as a
  ``context_parallel`` fallback with that reason;
* **ring** (``ring_degree > 1``, Ulysses off): on a module whose sites are all self-attention
  over the split sequence without text, the guard clears the processor's config for the call
  (put back by the post-hook) so that diffusers calls SDPA on this rank's run of tokens, and the
  handlers run ``parallel.ring.ring_site`` (the plan's ring form, or exact dense ring attention).
  Other modules keep diffusers' own ring attention, which bypasses SDPA (their rewritten sites
  are counted as ``context_parallel`` fallbacks, with the reason); ring and Ulysses together
  likewise.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..router import owning_module
from .ring import ring_site

__all__ = ["ModuleGuard", "GuardedHandler", "Guards", "attach", "cp_config", "processor_of"]

ULYSSES, RING, DIFFUSERS_RING = "ulysses", "ring", "diffusers ring"


def processor_of(module) -> Optional[object]:
    """The diffusers attention processor of ``module`` when it takes a parallel config."""
    proc = getattr(module, "processor", None)
    return proc if proc is not None and hasattr(proc, "_parallel_config") else None


def cp_config(parallel_config) -> Optional[object]:
    """The active ``ContextParallelConfig`` of a diffusers ``ParallelConfig`` (None when off)."""
    cp = getattr(parallel_config, "context_parallel_config", None) if parallel_config is not None else None
    if cp is None or (cp.ring_degree or 1) * (cp.ulysses_degree or 1) <= 1:
        return None
    return cp


class ModuleGuard:
    """Forward hooks of one routed diffusers attention module: the context-parallel mode of the
    current call. ``takeover``: the module's sites are all self-attention over the split sequence
    without text, so vmonarch_opt's ring attention can stand in for diffusers' (``why_not`` says
    why not otherwise)."""

    def __init__(self, module: torch.nn.Module, runtimes: list, takeover: bool, why_not: str = ""):
        self.module = module
        self.runtimes = runtimes
        self.takeover = takeover
        self.why_not = why_not
        self.mode: Optional[str] = None
        self.group = None
        self.uneven = False
        self.saved = None

    def pre(self, module, args) -> None:
        self.mode, self.saved = None, None
        proc = processor_of(module)
        cp = cp_config(getattr(proc, "_parallel_config", None))
        if cp is None:
            return
        if cp.ring_degree > 1 and cp.ulysses_degree == 1 and self.takeover:
            self.mode, self.group, self.uneven = RING, cp._ring_mesh.get_group(), bool(cp.ring_anything)
            self.saved = proc._parallel_config
            proc._parallel_config = None  # diffusers calls SDPA on this rank's tokens; we do the ring
        elif cp.ring_degree > 1:
            self.mode = DIFFUSERS_RING
            why = ("ring and Ulysses together" if cp.ulysses_degree > 1 else self.why_not)
            for rt in self.runtimes:
                if rt.plan.rewritten:
                    rt.fall_back("context_parallel", None, f"ring context parallel: {why}; diffusers' own ring "
                                                           f"attention ran (dense)")
        else:
            self.mode = ULYSSES

    def post(self, module, args, output) -> None:
        if self.saved is not None:
            processor_of(module)._parallel_config = self.saved
        self.mode, self.saved = None, None


class GuardedHandler:
    """A site's handler on a guarded module: the site's ``SiteRuntime`` in the guard's mode."""

    def __init__(self, runtime, guard: ModuleGuard):
        self.runtime = runtime
        self.guard = guard

    def __call__(self, a: dict, original):
        g, rt = self.guard, self.runtime
        if g.mode == RING:
            return ring_site(rt, a, g.group, g.uneven)
        text = rt.plan.args.get("text_before") or rt.plan.args.get("text_after")
        if g.mode == ULYSSES and rt.plan.rewritten and text:
            rt.fall_back("context_parallel", a["query"],
                         "Ulysses context parallel: diffusers splits the text and video streams separately, so after "
                         "the all-to-all the text tokens are not where the plan has them (joint attention)")
            return original()
        return rt(a, original)


def _guarded_make(make, handlers: dict, sid: str):
    """``Route.make`` of a guarded route (module-level, so the route copies and pickles)."""
    return handlers.get(sid) or make(sid)


class Guards:
    """The guards :func:`attach` installed on a model; ``remove()`` takes them off again."""

    def __init__(self, route, make, guards: dict):
        self.route, self.make, self.guards = route, make, guards
        self.handles: list = []

    def install_hooks(self) -> None:
        self.remove_hooks()
        for g in self.guards.values():
            self.handles.append(g.module.register_forward_pre_hook(g.pre))
            self.handles.append(g.module.register_forward_hook(g.post, always_call=True))

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def remove(self) -> None:
        """The hooks off and the route's handlers unguarded (``restore``)."""
        self.remove_hooks()
        if self.route.make is not self.make:
            self.route.make = self.make
            if self.route.paths:
                self.route.remove()
                self.route.install()


def _takeover(sites: list, missed: set, path: str) -> tuple[bool, str]:
    if path in missed:
        return False, "the module calls attention the optimizer did not capture"
    for s in sites:
        if s.kind != "self" or s.text_before or s.text_after or s.seq_q != s.seq_k:
            return False, f"site {s.site_id} is {s.kind} attention" + (" with text tokens" if s.text_before or
                                                                       s.text_after else "")
    return True, ""


def attach(model: torch.nn.Module, route, runtimes: dict, routing, sites: list, missed=()) -> Optional[Guards]:
    """Guard every routed diffusers attention module of ``model`` (see the module docstring); None
    when the model has none. Re-installs ``route`` with the guarded handlers."""
    by_id = {s.site_id: s for s in sites}
    guards, handlers = {}, {}
    for path, sids in routing.index.items():
        module = owning_module(model, path)
        if processor_of(module) is None:
            continue
        ok, why = _takeover([by_id[s] for s in sids], set(missed), path)
        guard = ModuleGuard(module, [runtimes[s] for s in sids], ok, why)
        guards[path] = guard
        for s in sids:
            handlers[s] = GuardedHandler(runtimes[s], guard)
    if not guards:
        return None
    make = route.make
    route.make = functools.partial(_guarded_make, make, handlers)
    route.remove()
    route.install()
    out = Guards(route, make, guards)
    out.install_hooks()
    return out
