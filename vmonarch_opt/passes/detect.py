"""Find every attention site in captured FX graphs.

Two forms are recognised:

* explicit ``F.scaled_dot_product_attention`` (any call form: positional or keyword arguments);
* hand-written ``softmax(q @ kᵀ · scale [+ mask]) @ v`` with the product written as ``@``,
  ``torch.matmul``, ``bmm``, ``baddbmm`` (its ``alpha`` is the scale) or ``einsum``; the scale may
  multiply or divide the scores, or be applied to q and/or k before the product; an additive mask
  or ``masked_fill`` may precede the softmax; dtype casts and dropout may sit around the softmax.

The matcher works on Torch-level graphs from Dynamo and from ``torch.fx.symbolic_trace`` alike
(``call_function`` and ``call_method`` spellings of the same op are both accepted).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx
import torch.nn.functional as F

from ..site import AttentionSite
from .capture import CapturedGraph, node_module_path

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type_as", "type", "contiguous", "clone"}
_CAST_FUNCS = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.to, torch.Tensor.type_as,
               torch.Tensor.contiguous}
_MUL = {operator.mul, torch.mul, torch.Tensor.mul, operator.imul}
_DIV = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div, operator.itruediv}
_ADD = {operator.add, torch.add, torch.Tensor.add, operator.iadd}
_TRANSPOSE_METHODS = {"transpose", "permute", "mT", "t"}
_DROPOUT_FUNCS = {F.dropout, torch.dropout, torch.nn.functional.dropout}


_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def _projection_inputs(node, gmods: dict, limit: int = 400) -> Optional[frozenset]:
    """The inputs of the linear projections that ``node`` (a q or k) was computed from, following
    its data path back through reshapes, RoPE, norms, indexing and concatenation (the first tensor
    argument of an op; every part of a ``cat``). None when the path reaches a graph input, a
    constant or anything else without passing a projection."""
    found, todo, seen = set(), [node], set()
    while todo:
        n = todo.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        if n.op == "call_function" and n.target in _LINEAR_FUNCS or (
                n.op == "call_module" and isinstance(gmods.get(n.target), torch.nn.Linear)):
            found.add(n.args[0])
        elif n.op == "call_function" and (n.target in _CAT or n.target is torch.stack):
            parts = n.args[0] if n.args else n.kwargs.get("tensors", ())
            todo.extend(parts)
        elif n.op in ("call_function", "call_method", "call_module") and n.args and isinstance(n.args[0], torch.fx.Node):
            todo.append(n.args[0])
        else:
            return None  # placeholder, get_attr, or an op without a tensor first argument
    return frozenset(found) if found else None


def _extends_queries(q, k, gmods: dict, limit: int = 400) -> bool:
    """k is the queries' own key projection joined with tensors from outside the graph (a KV cache:
    ``cat([cache, k_new])``, or a slice of a cache buffer the new keys were written into): its data
    path reaches the projection of q's tokens and also a graph input or attribute."""
    qs = _projection_inputs(q, gmods)
    if qs is None:
        return False
    found, outside, todo, seen = set(), False, [k], set()
    while todo:
        n = todo.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return False
        if n.op in ("placeholder", "get_attr"):
            outside = True
            for u in n.users:  # new keys written into a cache buffer: cache[..., s:e, :] = k_new
                if u.op == "call_function" and u.target is operator.setitem and len(u.args) > 2:
                    todo.append(u.args[2])
                elif u.op == "call_method" and u.target in ("copy_", "index_copy_") and len(u.args) > 1:
                    todo.append(u.args[-1])
        elif n.op == "call_function" and n.target in _LINEAR_FUNCS or (
                n.op == "call_module" and isinstance(gmods.get(n.target), torch.nn.Linear)):
            found.add(n.args[0])
        elif n.op == "call_function" and (n.target in _CAT or n.target is torch.stack):
            todo.extend(n.args[0] if n.args else n.kwargs.get("tensors", ()))
        elif n.op in ("call_function", "call_method", "call_module"):
            todo.extend(a for a in n.args if isinstance(a, torch.fx.Node))
    return outside and bool(found) and found <= qs


def _attention_kind(q, k, seq_q: int, seq_k: int, gmods: dict) -> str:
    """"self" when q and k are projections of the same tokens, "cached" when k holds more tokens:
    the queries' own keys after a KV cache, else "cross". Equal lengths alone do not make
    self-attention (audio↔video, or text as long as the video); where the projections cannot be
    traced, equal lengths decide."""
    if seq_q != seq_k:
        return "cached" if seq_k > seq_q and _extends_queries(q, k, gmods) else "cross"
    qs, ks = _projection_inputs(q, gmods), _projection_inputs(k, gmods)
    if qs is None or ks is None:
        return "self"
    return "self" if qs == ks else "cross"


@dataclass
class DetectedSite:
    """An ``AttentionSite`` plus the graph handles the later passes need (not serialised)."""

    site: AttentionSite
    graph: CapturedGraph
    node: torch.fx.Node  # the SDPA node, or the P·V product node of a hand-written site
    q: Optional[torch.fx.Node] = None
    k: Optional[torch.fx.Node] = None  # k in [..., N, D] form, or None when only kᵀ exists
    k_t: Optional[torch.fx.Node] = None
    v: Optional[torch.fx.Node] = None
    mask: Any = None
    extra: dict = field(default_factory=dict)


def example_value(x) -> Optional[torch.Tensor]:
    if isinstance(x, torch.fx.Node):
        v = x.meta.get("example_value", x.meta.get("val"))
        if isinstance(v, torch.Tensor):
            return v
    return None


def _shape(x) -> Optional[tuple]:
    """Static shape of a node: the concrete shape of the captured run where recorded (sizes that
    depend on data are symbols in the graph), else its example value's; None if unknown."""
    if isinstance(x, torch.fx.Node) and x.meta.get("concrete_shape") is not None:
        return tuple(int(s) for s in x.meta["concrete_shape"])
    v = example_value(x)
    if v is None:
        return None
    try:
        return tuple(int(s) for s in v.shape)
    except Exception:  # an unbacked (data-dependent) size without a recorded concrete shape
        return None


def _is_call(n, funcs=(), methods=()) -> bool:
    if not isinstance(n, torch.fx.Node):
        return False
    if n.op == "call_function" and n.target in funcs:
        return True
    return n.op == "call_method" and n.target in methods


def _is_softmax(n: torch.fx.Node, modules: dict) -> bool:
    if n.op == "call_function" and n.target in _SOFTMAX_FUNCS:
        return True
    if n.op == "call_method" and n.target == "softmax":
        return True
    return n.op == "call_module" and isinstance(modules.get(n.target), torch.nn.Softmax)


def _softmax_dim(n: torch.fx.Node, modules: dict):
    if n.op == "call_module":
        return modules[n.target].dim
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    return dim


def _strip_casts(n):
    while _is_call(n, _CAST_FUNCS, _CAST_METHODS):
        n = n.args[0]
    return n


def _const(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


class _Unsupported(Exception):
    pass


def _peel_scale(n, factor: float, tensor_scale: list):
    """Strip constant multiplications/divisions; returns (inner node, accumulated factor)."""
    while True:
        n = _strip_casts(n)
        if _is_call(n, _MUL, {"mul", "__mul__", "mul_"}):
            a, b = n.args[0], n.args[1]
            if _const(b) is not None:
                factor *= _const(b); n = a; continue
            if _const(a) is not None:
                factor *= _const(a); n = b; continue
            sa, sb = _shape(a), _shape(b)
            if sb is not None and math.prod(sb) == 1:
                tensor_scale.append(b); n = a; continue
            if sa is not None and math.prod(sa) == 1:
                tensor_scale.append(a); n = b; continue
            return n, factor
        if _is_call(n, _DIV, {"div", "__truediv__", "div_"}):
            a, b = n.args[0], n.args[1]
            if _const(b) is not None:
                factor /= _const(b); n = a; continue
            sb = _shape(b)
            if sb is not None and math.prod(sb) == 1:
                tensor_scale.append(b); n = a; continue
            return n, factor
        return n, factor


def _einsum_qk(eq: str) -> Optional[bool]:
    """True if ``eq`` is a (…id, …jd -> …ij) product (q·kᵀ)."""
    try:
        lhs, out = eq.replace(" ", "").split("->")
        a, b = lhs.split(",")
    except ValueError:
        return None
    if len(a) < 2 or len(b) < 2 or len(out) < 2:
        return None
    d = a[-1]
    return b[-1] == d and d not in out and out[-2] == a[-2] and out[-1] == b[-2] and a[:-2] == b[:-2] == out[:-2]


def _einsum_pv(eq: str) -> Optional[bool]:
    """True if ``eq`` is a (…ij, …jd -> …id) product (P·V)."""
    try:
        lhs, out = eq.replace(" ", "").split("->")
        a, b = lhs.split(",")
    except ValueError:
        return None
    if len(a) < 2 or len(b) < 2 or len(out) < 2:
        return None
    j = a[-1]
    return b[-2] == j and j not in out and out[-2] == a[-2] and out[-1] == b[-1] and a[:-2] == b[:-2] == out[:-2]


def _qk_operands(n) -> Optional[tuple]:
    """If ``n`` computes q·kᵀ, return (q, k_t node or None, k node or None, alpha, how)."""
    if _is_call(n, _MATMUL_FUNCS, _MATMUL_METHODS):
        return n.args[0], n.args[1], None, 1.0, "matmul"
    if _is_call(n, {torch.baddbmm, torch.Tensor.baddbmm}, {"baddbmm"}):
        beta = n.kwargs.get("beta", 1.0)
        if _const(beta) != 0.0:
            return None  # input is added: not a plain product
        alpha = _const(n.kwargs.get("alpha", 1.0))
        return n.args[1], n.args[2], None, alpha if alpha is not None else 1.0, "baddbmm"
    if _is_call(n, {torch.einsum, torch.functional.einsum}, ()):
        eq = n.args[0]
        ops = n.args[1:] if not (len(n.args) == 2 and isinstance(n.args[1], (list, tuple))) else n.args[1]
        if isinstance(eq, str) and len(ops) == 2 and _einsum_qk(eq):
            return ops[0], None, ops[1], 1.0, "einsum"
    return None


def _pv_operands(n, p) -> Optional[torch.fx.Node]:
    """If ``n`` computes p·v with ``p`` as left operand, return v."""
    if _is_call(n, _MATMUL_FUNCS, _MATMUL_METHODS) and n.args[0] is p:
        return n.args[1]
    if _is_call(n, {torch.einsum, torch.functional.einsum}, ()):
        eq = n.args[0]
        ops = n.args[1:] if not (len(n.args) == 2 and isinstance(n.args[1], (list, tuple))) else n.args[1]
        if isinstance(eq, str) and len(ops) == 2 and ops[0] is p and _einsum_pv(eq):
            return ops[1]
    return None


def _untranspose(k_t) -> Optional[torch.fx.Node]:
    """If ``k_t`` is a last-two-dims transpose of some k, return that k."""
    if not isinstance(k_t, torch.fx.Node):
        return None
    shp = _shape(k_t)
    nd = len(shp) if shp else None
    if k_t.op == "call_method" and k_t.target in ("transpose", "swapaxes") or (
        k_t.op == "call_function" and k_t.target in (torch.transpose, torch.Tensor.transpose, torch.swapaxes)
    ):
        dims = [a for a in k_t.args[1:3]]
        if len(dims) == 2 and nd and all(isinstance(d, int) for d in dims):
            ds = sorted(d % nd for d in dims)
            if ds == [nd - 2, nd - 1]:
                return k_t.args[0]
    if k_t.op == "call_method" and k_t.target == "t" and nd == 2:
        return k_t.args[0]
    if k_t.op == "call_function" and k_t.target is getattr and k_t.args[1] == "mT":
        return k_t.args[0]
    return None


def _match_handwritten(sm: torch.fx.Node, modules: dict, training: bool) -> Optional[dict]:
    dim = _softmax_dim(sm, modules)
    sm_in = sm.args[0] if sm.args else sm.kwargs.get("input")
    in_shape = _shape(sm_in)
    if in_shape is None or dim is None or (dim % len(in_shape)) != len(in_shape) - 1:
        return None
    info: dict = {"mask": None, "mask_kind": "", "tensor_scale": []}
    factor = 1.0
    n = sm_in
    for _ in range(6):  # peel casts, scale and at most one mask, in any order
        n, factor = _peel_scale(n, factor, info["tensor_scale"])
        if _qk_operands(n) is not None:
            break
        if _is_call(n, _ADD, {"add", "__add__", "add_"}) and info["mask"] is None:
            a, b = n.args[0], n.args[1]
            a_core = _peel_scale(a, 1.0, [])[0]
            if _qk_operands(a_core) is not None or _is_call(a_core, _MUL | _DIV, {"mul", "div"}):
                info["mask"], info["mask_kind"], n = b, "additive", a
                continue
            b_core = _peel_scale(b, 1.0, [])[0]
            if _qk_operands(b_core) is not None:
                info["mask"], info["mask_kind"], n = a, "additive", b
                continue
            return None
        if _is_call(n, {torch.masked_fill, torch.Tensor.masked_fill}, {"masked_fill", "masked_fill_"}) and info["mask"] is None:
            info["mask"], info["mask_kind"], n = n.args[1], "masked_fill", n.args[0]
            continue
        return None
    qk = _qk_operands(n)
    if qk is None:
        return None
    q, k_t, k, alpha, how = qk
    factor *= alpha
    q, factor = _peel_scale(q, factor, info["tensor_scale"])
    if k is None:
        k = _untranspose(k_t)
    if k is not None:
        k, factor = _peel_scale(k, factor, info["tensor_scale"])
    # forward: softmax -> (casts, dropout) -> P @ V
    p = sm
    dropout = {"p": 0.0, "training": False}
    while True:
        users = list(p.users)
        if len(users) != 1:
            info["probs_escape"] = len(users) > 1
            break
        u = users[0]
        if _is_call(u, _CAST_FUNCS, _CAST_METHODS):
            p = u; continue
        if _is_call(u, _DROPOUT_FUNCS, {"dropout"}):
            # its arguments are constants of the traced graph (``training=self.training`` included)
            dropout["p"] = float(u.kwargs.get("p", u.args[1] if len(u.args) > 1 else 0.5))
            dropout["training"] = bool(u.kwargs.get("training", u.kwargs.get(
                "train", u.args[2] if len(u.args) > 2 else True)))
            dropout["kind"] = "function"
            p = u; continue
        if u.op == "call_module" and isinstance(modules.get(u.target), torch.nn.Dropout):
            mod = modules[u.target]
            dropout["p"], dropout["training"] = float(mod.p), bool(mod.training)
            dropout["kind"], dropout["module"] = "module", u.target  # reads its own p and mode when called
            p = u; continue
        v = _pv_operands(u, p)
        if v is None:
            return None
        info.update(q=q, k=k, k_t=k_t, v=v, pv=u, factor=factor, how=how, dropout=dropout)
        return info
    if info.get("probs_escape"):
        # Still an attention, but its probabilities are used elsewhere: report, never rewrite.
        for u in sm.users:
            v = _pv_operands(u, sm)
            if v is not None:
                info.update(q=q, k=k, k_t=k_t, v=v, pv=u, factor=factor, how=how, dropout=dropout)
                return info
    return None


def _sdpa_args(n: torch.fx.Node) -> dict:
    bound = dict(zip(_SDPA_ARGS, n.args))
    bound.update(n.kwargs)
    return bound


def detect(graphs: list[CapturedGraph], model: torch.nn.Module) -> list[DetectedSite]:
    """All attention sites in ``graphs``, in execution order, with ids from their owning module."""
    modules = dict(model.named_modules())
    found: list[DetectedSite] = []
    for g in graphs:
        gmods = dict(g.gm.named_modules())
        for n in g.gm.graph.nodes:
            if n.op == "call_function" and n.target in SDPA_TARGETS:
                found.append(_sdpa_site(n, g, modules, gmods))
            elif _is_softmax(n, gmods):
                ds = _handwritten_site(n, g, modules, gmods, model.training)
                if ds is not None:
                    found.append(ds)
    for ds in found:
        ds.site.module_resolved = ds.site.module_path in modules
    counts: dict[str, int] = {}
    for ds in found:
        path = ds.site.module_path
        ds.site.ordinal = counts.get(path, 0)
        counts[path] = ds.site.ordinal + 1
    for ds in found:
        s = ds.site
        base = s.module_path or "<root>"
        s.site_id = base if counts[s.module_path] == 1 else f"{base}#{s.ordinal}"
    return found


def _dims(qs, ks, vs):
    """batch, heads, kv_heads, layout from q/k/v shapes."""
    if len(qs) >= 4:
        return math.prod(qs[:-3]), qs[-3], ks[-3], "[B,H,N,D]" if len(qs) == 4 else "[...,H,N,D]"
    if len(qs) == 3:
        return qs[0], 1, 1, "[B*H,N,D]"
    return 1, 1, 1, "[N,D]"


def _sdpa_site(n, g, modules, gmods) -> DetectedSite:
    a = _sdpa_args(n)
    qs, ks, vs = _shape(a["query"]), _shape(a["key"]), _shape(a["value"])
    qv = example_value(a["query"])
    batch, heads, kv_heads, layout = _dims(qs, ks, vs)
    mask = a.get("attn_mask")
    mv = example_value(mask) if isinstance(mask, torch.fx.Node) else None
    scale = a.get("scale")
    dropout_p = a.get("dropout_p", 0.0)
    site = AttentionSite(
        site_id="", module_path=node_module_path(n, modules), ordinal=0, form="sdpa",
        batch=batch, heads=heads, kv_heads=kv_heads if a.get("enable_gqa") else heads,
        seq_q=qs[-2], seq_k=ks[-2], head_dim=qs[-1], head_dim_v=vs[-1],
        dtype=str(qv.dtype).replace("torch.", "") if qv is not None else "?", layout=layout,
        scale=float(scale) if isinstance(scale, (int, float)) else None,
        scale_is_tensor=isinstance(scale, torch.fx.Node),
        has_mask=mask is not None,
        mask_shape=_shape(mask) if mv is not None else None,
        mask_kind=("" if mask is None else ("bool" if mv is not None and mv.dtype == torch.bool else "additive")),
        is_causal=bool(a.get("is_causal", False)) if not isinstance(a.get("is_causal"), torch.fx.Node) else True,
        dropout_p=float(dropout_p) if isinstance(dropout_p, (int, float)) else 1.0,
        graph_index=g.index, node_name=n.name,
    )
    site.dropout_training = site.dropout_p > 0
    site.kind = _attention_kind(a["query"], a["key"], site.seq_q, site.seq_k, gmods)
    return DetectedSite(site, g, n, q=a["query"], k=a["key"], v=a["value"], mask=mask)


def _handwritten_site(sm, g, modules, gmods, training) -> Optional[DetectedSite]:
    info = _match_handwritten(sm, gmods, training)
    if info is None:
        return None
    q, v = info["q"], info["v"]
    qs, vs = _shape(q), _shape(v)
    if qs is None or vs is None:
        return None
    k_shape = _shape(info["k"]) if info["k"] is not None else None
    if k_shape is None:
        kt = _shape(info["k_t"])
        k_shape = kt[:-2] + (kt[-1], kt[-2]) if kt else None
    if k_shape is None:
        return None
    batch, heads, kv_heads, layout = _dims(qs, k_shape, vs)
    mask = info["mask"]
    mv = example_value(mask)
    qv = example_value(q)
    factor = info["factor"]
    site = AttentionSite(
        site_id="", module_path=node_module_path(sm, modules), ordinal=0, form="handwritten",
        batch=batch, heads=heads, kv_heads=kv_heads, seq_q=qs[-2], seq_k=k_shape[-2],
        head_dim=qs[-1], head_dim_v=vs[-1],
        dtype=str(qv.dtype).replace("torch.", "") if qv is not None else "?", layout=layout,
        scale=factor, scale_is_tensor=bool(info["tensor_scale"]),
        has_mask=mask is not None, mask_shape=_shape(mask) if mv is not None else None,
        mask_kind=info["mask_kind"],
        dropout_p=info["dropout"]["p"], dropout_training=info["dropout"]["training"] and info["dropout"]["p"] > 0,
        probs_escape=bool(info.get("probs_escape")),
        graph_index=g.index, node_name=info["pv"].name,
    )
    site.kind = _attention_kind(q, info["k"] if info["k"] is not None else info["k_t"], site.seq_q, site.seq_k, gmods)
    site.notes.append(f"hand-written ({info['how']})")
    return DetectedSite(site, g, info["pv"], q=q, k=info["k"], k_t=info["k_t"], v=v, mask=mask,
                        extra={"softmax": sm, "factor": factor})


_PRODUCT_FUNCS = _MATMUL_FUNCS | {torch.baddbmm, torch.Tensor.baddbmm, torch.einsum, torch.functional.einsum}
_PRODUCT_METHODS = _MATMUL_METHODS | {"baddbmm"}


def _is_product_of_activations(n) -> bool:
    """``n`` multiplies two computed tensors (matmul/bmm/baddbmm/einsum of two graph values)."""
    if not _is_call(n, _PRODUCT_FUNCS, _PRODUCT_METHODS):
        return False
    ops = [a for a in n.args if isinstance(a, torch.fx.Node)]
    if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)):  # einsum(eq, [a, b])
        ops = [a for a in n.args[1] if isinstance(a, torch.fx.Node)]
    return len([a for a in ops if a.op != "get_attr"]) >= 2


def _attention_in_substance(sm: torch.fx.Node, depth: int = 8) -> bool:
    """A softmax whose input is computed from a product of two activations (q·kᵀ, however scaled,
    biased or masked) and whose output reaches a product with another tensor (·v) within a few
    element-wise steps: attention, whatever form the code gives it."""
    sm_in = sm.args[0] if sm.args else sm.kwargs.get("input")
    seen, frontier, found = set(), [sm_in], False
    for _ in range(depth):
        nxt = []
        for x in frontier:
            if not isinstance(x, torch.fx.Node) or x in seen:
                continue
            seen.add(x)
            if _is_product_of_activations(x):
                found = True
                break
            nxt.extend(a for a in list(x.args) + list(x.kwargs.values()) if isinstance(a, torch.fx.Node))
        if found or not nxt:
            break
        frontier = nxt
    if not found:
        return False
    frontier = [sm]
    for _ in range(4):
        users = [u for x in frontier for u in x.users]
        if any(_is_product_of_activations(u) for u in users):
            return True
        frontier = users
    return False


def unrecognised_attention(graphs: list[CapturedGraph], model: torch.nn.Module, detected: list) -> dict[str, int]:
    """``{module path: count}`` of softmaxes that are attention in substance (see
    ``_attention_in_substance``) but no detected site accounts for: a form detection does not
    know, named in the report instead of passing silently."""
    modules = dict(model.named_modules())
    known = {(d.graph.index, d.extra["softmax"].name) for d in detected if "softmax" in d.extra}
    out: dict[str, int] = {}
    for g in graphs:
        gmods = dict(g.gm.named_modules())
        for n in g.gm.graph.nodes:
            if _is_softmax(n, gmods) and (g.index, n.name) not in known and _attention_in_substance(n):
                path = node_module_path(n, modules)
                out[path] = out.get(path, 0) + 1
    return out
