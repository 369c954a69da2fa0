"""The router: the one place that installs and removes site handlers on a model.

Each owning module (the innermost module that computes a site) gets its ``forward`` wrapped so
that, while it runs, a ``TorchFunctionMode`` intercepts its ``F.scaled_dot_product_attention``
calls — the k-th call is site ``k`` of that module — and hands them to that site's handler,
``handler(a, original)`` (``a``: the bound SDPA arguments; ``original()``: the model's own call).
Hand-written attention is first normalised to an SDPA call (``passes/normalize.py``), and the
normalised forward replaces the module's own while routed. Because the interception is plain
Python around torch ops, a routed model still works under ``torch.compile`` (the mode is traced),
``torch.export`` and CUDA graphs, and its parameters, buffers and ``state_dict`` keys are untouched.
What is installed on the model is made of plain objects that refer to their module (no closures),
so an optimized model can be deep-copied (the copy runs its own weights) and pickled.

Every stage that runs the model with something at its sites goes through :class:`Route`:
calibration observes q/k/v, the output budget and validation run candidate plans, and the
optimized model keeps one installed for good (``Route(...).install()``).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from .passes.detect import SDPA_TARGETS, _SDPA_ARGS

__all__ = ["Route", "Routing", "RoutedForward", "SiteMode", "install", "uninstall", "owning_module", "bind_sdpa"]

_ROUTED_ATTR = "_vmonarch_routed_forward"  # the RoutedForward installed, even if something wrapped it since


def owning_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path) if path else model


@dataclass
class Routing:
    """Where the sites are at run time: per owning module path, the site ids of its SDPA calls in
    call order, and the normalised forwards (hand-written attention as SDPA) that replace a
    module's own while routed. Fixed once planning has normalised the hand-written sites."""

    index: dict = field(default_factory=dict)  # module path -> [site id of its k-th SDPA call]
    forwards: dict = field(default_factory=dict)  # module path -> normalised forward
    graphs: dict = field(default_factory=dict)  # module path -> its fx.GraphModule

    @classmethod
    def build(cls, detected: list, plans: dict, normalised: dict) -> "Routing":
        """``normalised``: ``{module path: (forward, graph)}``. A hand-written site is routed only
        where its module's forward was normalised with it as an SDPA call (it was rewritten then)."""
        index: dict[str, list] = {}
        for ds in detected:
            s = ds.site
            if s.form == "handwritten" and (s.module_path not in normalised or not plans[s.site_id].rewritten):
                continue  # stays a hand-written attention: never reaches the SDPA interceptor
            index.setdefault(s.module_path, []).append(s.site_id)
        return cls(index=index, forwards={p: f for p, (f, _) in normalised.items()},
                   graphs={p: g for p, (_, g) in normalised.items()})


def bind_sdpa(args, kwargs) -> dict:
    a = dict(zip(_SDPA_ARGS, args))
    a.update(kwargs)
    a.setdefault("attn_mask", None)
    a.setdefault("dropout_p", 0.0)
    a.setdefault("is_causal", False)
    a.setdefault("scale", None)
    a.setdefault("enable_gqa", False)
    return a


class SiteMode(TorchFunctionMode):
    """Active while one owning module runs: sends its k-th SDPA call to ``handlers[k]``."""

    def __init__(self, handlers: list):
        super().__init__()
        self.handlers = handlers
        self.calls = 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SDPA_TARGETS:
            i = self.calls
            self.calls = i + 1
            if i < len(self.handlers) and self.handlers[i] is not None:
                a = bind_sdpa(args, kwargs)
                return self.handlers[i](a, lambda: func(*args, **kwargs))
        # Everything else runs unchanged. Tensor methods are re-issued as method calls so that
        # Dynamo, which inlines this handler, sees them as it would without the mode.
        if args and isinstance(args[0], torch.Tensor) and getattr(torch.Tensor, getattr(func, "__name__", ""), None) is func:
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)


class RoutedForward:
    """An owning module's ``forward`` while it is routed: ``SiteMode(handlers)`` is active around
    the module's own forward, or around ``forward`` (a normalised hand-written attention) when
    given. A plain object that holds the module rather than a closure over its bound method, so
    that ``copy.deepcopy`` of the model maps it to the copy's module (the copy runs its own
    weights, handlers and runtimes) and ``pickle``/``torch.save`` store it with the model.

    ``previous``: the instance ``forward`` the module had before it was routed (None: its class's
    ``forward``); ``uninstall`` puts it back."""

    def __init__(self, module: torch.nn.Module, handlers: list, forward: Optional[Callable] = None,
                 previous: Optional[Callable] = None):
        self.module = module
        self.handlers = handlers
        self.forward = forward
        self.previous = previous

    def __call__(self, *args, **kwargs):
        with SiteMode(self.handlers):
            if self.forward is not None:
                return self.forward(*args, **kwargs)
            if self.previous is not None:
                return self.previous(*args, **kwargs)
            return type(self.module).forward(self.module, *args, **kwargs)

    @property
    def __wrapped__(self) -> Callable:
        """What runs inside the mode (``inspect.signature(module.forward)`` follows it)."""
        if self.forward is not None:
            return self.forward
        if self.previous is not None:
            return self.previous
        return types.MethodType(type(self.module).forward, self.module)

    @property
    def __name__(self) -> str:
        return getattr(self.__wrapped__, "__name__", "forward")

    @property
    def __code__(self):
        """The wrapped forward's code object (``torch.export`` reads the root module's
        ``forward.__code__``: a model whose own forward computes attention is routed at its root)."""
        return getattr(self.__wrapped__, "__code__", None) or getattr(
            getattr(self.__wrapped__, "__func__", None), "__code__", None)

    def __repr__(self) -> str:
        return f"<routed forward of {type(self.module).__name__}: {len(self.handlers)} site handler(s)>"


def install(module: torch.nn.Module, handlers: list, forward: Optional[Callable] = None) -> None:
    """Route ``module``: its ``forward`` becomes a :class:`RoutedForward` with ``SiteMode(handlers)``
    active while it runs.

    ``forward`` replaces the module's own forward (used for normalised hand-written attention).
    Routing again replaces the previous handlers; ``uninstall`` restores the original.
    """
    routed = module.__dict__.get(_ROUTED_ATTR)
    previous = routed.previous if routed is not None else module.__dict__.get("forward")
    routed = RoutedForward(module, handlers, forward, previous)
    module.__dict__[_ROUTED_ATTR] = routed
    module.__dict__["forward"] = routed


def uninstall(module: torch.nn.Module) -> None:
    routed = module.__dict__.pop(_ROUTED_ATTR, None)
    if routed is None:
        return
    if routed.previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = routed.previous


class Route:
    """A handler at every site of ``routing``: ``make(site_id)`` gives it. Used as a context
    manager it is removed on exit; ``install()`` keeps it until ``remove()``."""

    def __init__(self, model: torch.nn.Module, routing: Routing, make: Callable):
        self.model, self.routing, self.make = model, routing, make
        self.paths: list[str] = []

    def install(self) -> "Route":
        try:
            for path, ids in self.routing.index.items():
                install(owning_module(self.model, path), [self.make(sid) for sid in ids],
                        forward=self.routing.forwards.get(path))
                self.paths.append(path)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for path in self.paths:
            uninstall(owning_module(self.model, path))
        self.paths = []

    def __enter__(self) -> "Route":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
