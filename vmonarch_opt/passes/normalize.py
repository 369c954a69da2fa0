"""Normalise hand-written attention to ``F.scaled_dot_product_attention`` calls.

The owning module is traced on its calibration inputs — with ``torch.fx`` (non-tensor arguments
become constants) or, when fx cannot trace it, with Dynamo's ``export`` — every
``softmax(q·kᵀ·s) @ v`` it computes is replaced by one SDPA node with the same q, k, v and scale,
and the result is checked against the module's own output on those inputs. The router then
intercepts the SDPA call like any other.

At run time the traced graph is used only for calls like the traced one (same non-tensor
arguments, tensor dtypes, devices and ranks); any other call runs the module's original code, so
the model never computes something it did not mean. Dropout is one of those cases: the SDPA node
that replaces ``dropout(softmax(·)) @ v`` has no dropout, so while a rewritten attention's dropout
is active (an ``nn.Dropout`` in training mode with p > 0; a functional ``dropout``, whose arguments
the trace fixed, once the module is in another mode than when traced) the module's own code runs,
dropout included, and its sites count the call as a ``"dropout"`` fallback. A functional dropout
elsewhere in the module (``F.dropout(x, p, training=self.training)``) is fixed by the trace too: in
the other mode the module's own code runs as well.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .detect import _DROPOUT_FUNCS, _is_softmax, _match_handwritten


class NormalizeError(Exception):
    pass


def _same(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _signature_of(values: dict) -> dict:
    """What a call must match to reuse the traced graph."""
    sig = {}
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            sig[k] = ("tensor", v.dtype, v.device.type, v.dim())
        else:
            sig[k] = ("value", v)
    return sig


def _mismatch(sig: dict, values: dict):
    """How a call differs from the traced one (None: it matches)."""
    if set(values) != set(sig):
        return f"arguments {sorted(values)} instead of the traced {sorted(sig)}"
    for k, want in sig.items():
        v = values[k]
        if want[0] == "tensor":
            if not isinstance(v, torch.Tensor):
                return f"argument {k!r} is not a tensor as when traced"
            got = (v.dtype, v.device.type, v.dim())
            if got != want[1:]:
                return (f"argument {k!r} is {str(v.dtype).replace('torch.', '')} on {v.device.type}, {v.dim()}-D; "
                        f"traced {str(want[1]).replace('torch.', '')} on {want[2]}, {want[3]}-D")
        elif isinstance(v, torch.Tensor) or not _same(v, want[1]):
            return f"argument {k!r} = {v!r} differs from the traced {want[1]!r}"
    return None



def _trace_fx(module, values: dict):
    concrete = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if any(not isinstance(v, (type(None), bool, int, float, str)) for v in concrete.values()):
        raise NormalizeError("forward takes non-tensor arguments that torch.fx cannot specialise")
    graph = torch.fx.Tracer().trace(module, concrete_args=concrete)
    gm = torch.fx.GraphModule(module, graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    run_args = [values.get(n.target.lstrip("*")) for n in placeholders]
    with torch.no_grad():
        ShapeProp(gm).propagate(*run_args)
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            n.meta["example_value"] = torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return gm


def _trace_dynamo(module, args, kwargs):
    gm, _guards = torch._dynamo.export(module)(*args, **kwargs)
    return gm


def normalize_module(module: torch.nn.Module, args: tuple, kwargs: dict, expected: int,
                     rewrite: list[bool]) -> tuple["NormalizedForward", Any, dict]:
    """Trace ``module``; replace its hand-written attentions ``i`` with ``rewrite[i]`` by SDPA.

    ``expected`` is how many hand-written attentions Dynamo saw in this module. Returns the new
    forward, the graph module, and ``{index: reason}`` for attentions that were not rewritten.
    Raises ``NormalizeError`` with the reason when the module cannot be traced at all.
    """
    sig = inspect.signature(module.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise NormalizeError(f"{type(module).__name__}.forward takes *args/**kwargs")
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    errors = []
    gm = None
    try:
        gm = _trace_fx(module, values)
    except Exception as e:
        errors.append(f"torch.fx: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        try:
            gm = _trace_dynamo(module, args, kwargs)
        except Exception as e2:
            errors.append(f"dynamo export: {type(e2).__name__}: {str(e2).splitlines()[0] if str(e2) else ''}")
            raise NormalizeError(f"{type(module).__name__}.forward cannot be traced ({'; '.join(errors)})") from e2
    mods = dict(gm.named_modules())
    matches = []
    for n in list(gm.graph.nodes):
        if _is_softmax(n, mods):
            m = _match_handwritten(n, mods, module.training)
            if m is not None:
                matches.append(m)
    if len(matches) != expected:
        raise NormalizeError(f"the traced module has {len(matches)} hand-written attentions where torch.compile saw {expected}")
    skipped = {}
    dropouts = []  # ("module", target) / ("function", p): dropout on the probabilities of a rewritten attention
    for i, (m, do) in enumerate(zip(matches, rewrite)):
        if not do:
            continue
        if m.get("probs_escape"):
            skipped[i] = "attention probabilities are used beyond the product with V"
            continue
        d = m["dropout"]
        if d.get("kind") == "module":
            dropouts.append(("module", d["module"]))
        elif d.get("kind") == "function":
            dropouts.append(("function", d["p"]))
        pv = m["pv"]
        with gm.graph.inserting_before(pv):
            k = m["k"]
            if k is None:
                k = gm.graph.call_method("transpose", (m["k_t"], -2, -1))
            sdpa = gm.graph.call_function(F.scaled_dot_product_attention, (m["q"], k, m["v"]),
                                          {"scale": float(m["factor"])})
            # the product it replaces was contiguous; SDPA (and our ops) return q's layout,
            # which a later .view() of the model's code may not accept
            sdpa = gm.graph.call_method("contiguous", (sdpa,))
        pv.replace_all_uses_with(sdpa)
        gm.graph.erase_node(pv)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()

    names = list(values)
    forward = NormalizedForward(module, gm, names, {n: p.default for n, p in sig.parameters.items()},
                                _signature_of(values), dropouts=dropouts, traced_training=module.training,
                                mode_fixed=_has_functional_dropout(gm))
    with torch.no_grad():
        ref = module(*args, **kwargs)
        out = forward.run(values)
    _check_close(ref, out)
    return forward, gm, skipped


class NormalizedForward:
    """The normalised forward of a module: the traced graph for calls like the traced one (same
    non-tensor arguments, tensor dtypes, devices and ranks), the module's own code for any other.
    A plain object holding the module and its graph, not a closure, so that a deep copy of the
    model runs the copy's graph and weights, and pickle stores it with the model."""

    def __init__(self, module: torch.nn.Module, gm: torch.fx.GraphModule, names: list, defaults: dict,
                 traced: dict, dropouts: list = (), traced_training: bool = False, mode_fixed: bool = False):
        self.module = module
        self.gm = gm  # shares the module's submodules and parameters
        self.names = names  # the forward's parameters, in order
        self.defaults = defaults
        self.traced = traced  # _signature_of the traced call
        self.sites: list = []  # runtimes of the module's sites once applied: told when a call falls back
        self.dropouts = list(dropouts)  # dropout on the probabilities of rewritten attentions (dropped by the graph)
        self.traced_training = bool(traced_training)  # the module's mode when traced
        self.mode_fixed = bool(mode_fixed)  # the graph keeps a functional dropout whose mode the trace fixed

    def _mode_mismatch(self):
        """``(kind, why)`` when the graph would not compute what the module's code computes in its
        current mode (see the module docstring), else None."""
        training = self.module.training
        traced = getattr(self, "traced_training", training)  # (objects pickled before these fields: no check)
        was = "training" if traced else "eval"
        for kind, ref in getattr(self, "dropouts", ()):
            if kind == "module":
                try:
                    sub = self.gm.get_submodule(ref)
                except AttributeError:
                    return "dropout", f"the attention dropout module {ref!r} is gone"
                if sub.training and sub.p > 0:
                    return "dropout", (f"attention dropout ({ref}, p={sub.p:g}) is active in training mode: the "
                                       f"module's own code ran, dropout included (in eval mode, or with p=0, the "
                                       f"optimized attention runs)")
            elif training != traced:
                return "dropout", (f"attention dropout (a functional dropout, its p and mode fixed when traced in "
                                   f"{was} mode) may be active now: the module's own code ran, dropout included (in "
                                   f"{was} mode the optimized attention runs)")
        if getattr(self, "mode_fixed", False) and training != traced:
            return "handwritten", (f"the module was traced in {was} mode and calls a functional dropout whose mode "
                                   f"the trace fixed: its own code ran (in {was} mode the optimized attention runs)")
        return None

    def run(self, vals: dict):
        return self.gm(*[vals[n] for n in self.names])

    @property
    def __wrapped__(self):
        """The module's own forward (``inspect.signature`` follows it)."""
        return type(self.module).forward.__get__(self.module)

    def __call__(self, *a, **kw):
        vals = dict(zip(self.names, a))
        vals.update(kw)
        for n in self.names:
            if n not in vals:
                vals[n] = self.defaults[n]
        why = _mismatch(self.traced, vals)
        if why is not None:
            kind, msg = "handwritten", (f"the hand-written attention was called unlike when traced ({why}): its own "
                                        f"code ran; optimize() the model as you call it (dtype, device, arguments)")
        else:
            mode = self._mode_mismatch()
            if mode is None:
                return self.run(vals)
            kind, msg = mode
        # not the traced kind of call: the module's own code, its sites told
        like = next((v for v in vals.values() if isinstance(v, torch.Tensor)), None)
        for rt in self.sites:
            rt.fall_back(kind, like, msg)
        return type(self.module).forward(self.module, *a, **kw)


def _has_functional_dropout(gm: torch.fx.GraphModule) -> bool:
    """The graph calls a functional dropout (its p and training arguments fixed by the trace)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _DROPOUT_FUNCS or n.op == "call_method" and n.target == "dropout":
            return True
    return False


def _check_close(ref, out) -> None:
    if isinstance(ref, torch.Tensor):
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
            raise NormalizeError("the traced module returns a different structure")
        err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
        tol = 1e-4 if ref.dtype == torch.float32 else 2e-2
        if not err <= tol:
            raise NormalizeError(f"the normalised module differs from the original (rel. error {err:.2e})")
    elif isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            raise NormalizeError("the traced module returns a different structure")
        for r, o in zip(ref, out):
            _check_close(r, o)
