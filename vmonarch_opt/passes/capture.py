"""Capture a model's computation as FX graphs.

The main path is a custom ``torch.compile`` backend: Dynamo traces the model on the calibration
batch and hands us one FX ``GraphModule`` per captured graph (graph breaks are fine: every graph is
kept). Nodes carry ``example_value`` fake tensors (shapes, dtypes) and ``nn_module_stack`` (which
module each op ran in). ``torch.fx.symbolic_trace`` is the fallback for models Dynamo cannot run.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx

from ..batch import call_model, forward_signature, describe_batch
from ..errors import CaptureError, CalibrationBatchError


@dataclass
class CapturedGraph:
    gm: torch.fx.GraphModule
    index: int
    source: str  # "dynamo" or "fx"


def capture_dynamo(model: torch.nn.Module, batch: Any) -> list[CapturedGraph]:
    """Run ``model(batch)`` under Dynamo with a backend that records every graph."""
    graphs: list[CapturedGraph] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(CapturedGraph(gm, len(graphs), "dynamo"))
        first = [True]

        def run(*args):  # the graph's first real run also records every node's concrete shape
            if first[0]:
                first[0] = False
                return _ShapeRecorder(gm).run(*args)
            return gm.forward(*args)
        return run

    # A fresh Dynamo state: cached code from an earlier capture (or the recompile limit) would
    # otherwise keep our backend from seeing the graphs. Data-dependent ops (nonzero, masked
    # indexing: e.g. a per-prompt loop over text masks) are captured rather than making Dynamo
    # skip the whole frame — which would hide the attention in it; their sizes are unbacked
    # symbols in the graph, so detection reads the concrete shapes recorded on the first run.
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, dynamic=False)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            call_model(compiled, batch)
    finally:
        torch._dynamo.reset()
    return graphs


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs a captured graph once, storing each tensor node's real shape in ``meta["concrete_shape"]``."""

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["concrete_shape"] = tuple(out.shape)
        return out


def capture_fx(model: torch.nn.Module, batch: Any) -> list[CapturedGraph]:
    """Symbolically trace ``model`` and propagate the batch's shapes through the graph."""
    gm = torch.fx.symbolic_trace(model)
    args = _positional_args(model, batch)
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    for n in gm.graph.nodes:  # make fx meta look like dynamo's
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            n.meta["example_value"] = torch.empty(tm.shape, dtype=tm.dtype, device="meta")
    return [CapturedGraph(gm, 0, "fx")]


def _positional_args(model, batch) -> list:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return list(batch)
    sig = inspect.signature(model.forward)
    out = []
    for name, p in sig.parameters.items():
        if name in batch:
            out.append(batch[name])
        elif p.default is not inspect.Parameter.empty:
            out.append(p.default)
        else:
            raise CaptureError(f"fx capture: batch lacks argument {name!r} of {forward_signature(model)}")
    return out


def capture(model: torch.nn.Module, batch: Any, how: str = "auto") -> list[CapturedGraph]:
    """Capture ``model`` on ``batch`` by ``how`` ("dynamo", "fx" or "auto": Dynamo, then FX)."""
    if how not in ("auto", "dynamo", "fx"):
        raise ValueError(f"capture={how!r}: choose 'auto', 'dynamo' or 'fx'")
    errors = []
    if how in ("auto", "dynamo"):
        try:
            graphs = capture_dynamo(model, batch)
            if graphs or how == "dynamo":
                return graphs
            errors.append("dynamo: no graph was captured (the whole forward fell back to eager)")
        except CalibrationBatchError:
            raise
        except Exception as e:  # Dynamo failures are varied; fall back to FX and report both
            errors.append(f"dynamo: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if how == "dynamo":
                raise CaptureError(f"torch.compile could not capture {type(model).__name__}: {errors[-1]}") from e
    try:
        return capture_fx(model, batch)
    except Exception as e:
        errors.append(f"fx: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise CaptureError(
            f"could not capture the graph of {type(model).__name__} on batch {describe_batch(batch)}:\n  "
            + "\n  ".join(errors)
            + "\nCheck that the model runs under torch.compile, or pass capture='fx' for a traceable model."
        ) from e


_FRAME_LOCAL = re.compile(r"""L\[['"][A-Za-z_][A-Za-z0-9_]*['"]\]|self(?=[.\[]|$)""")
_SEGMENT = re.compile(r"\[['\"]([^'\"]+)['\"]\]|\.([A-Za-z_][A-Za-z0-9_]*|\d+)|\[(\d+)\]")


def normalize_module_path(raw: str) -> str:
    """Turn Dynamo's ``L['self'].__dict__['_modules']['blocks'].0.attn1`` into ``blocks.0.attn1``
    (the frame's module is whatever its method calls ``self``: ``L['s']`` too)."""
    m = _FRAME_LOCAL.match(raw)
    s = raw[m.end():] if m else raw
    parts = []
    for m in _SEGMENT.finditer(s):
        seg = m.group(1) or m.group(2) or m.group(3)
        if seg in ("__dict__", "_modules"):
            continue
        parts.append(seg)
    return ".".join(parts)


def node_module_path(node: torch.fx.Node, modules: Optional[dict] = None) -> str:
    """Path of the innermost module a node ran in ("" = the root module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key, raw = list(stack.items())[-1]
    raw = raw[0] if isinstance(raw, tuple) else raw
    path = normalize_module_path(str(raw))
    if modules is None or path in modules:
        return path
    # A frame Dynamo entered below the root (after a graph break) names modules relative to its
    # own ``self`` ("attn"): resolve by identity where the key is the module's id, else by a
    # unique suffix on "." boundaries; an ambiguous path stays unresolved (not in ``modules``).
    for p, m in modules.items():
        if str(id(m)) == str(key):
            return p
    cands = [p for p in modules if p and (p.endswith("." + path) or path.endswith("." + p))]
    return cands[0] if len(cands) == 1 else path
