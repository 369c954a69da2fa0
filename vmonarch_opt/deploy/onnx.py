"""``export_onnx(optimized, example_inputs, "model.onnx")``: an optimized model as a standard ONNX file.

The ``vmonarch::*`` custom ops have no ONNX equivalent, so during export every rewritten site is
traced through the pure-PyTorch decompositions of ``lowering.py`` instead (through the
``runtime.lowering`` hook): Monarch attention becomes reshapes, batched MatMuls and
Softmaxes, VMoBA a gather-based block attention whose block selection is computed in the graph,
dense attention the standard MatMul/Softmax/MatMul pattern. The model is exported with
``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the file is checked with
``onnx.checker`` and, by default, run in onnxruntime on ``example_inputs`` and compared with
the PyTorch output of the optimized model.

The graph is specialised to the shapes of ``example_inputs``, like the optimization itself (each
site's plan is for one sequence length). Sites whose plan does not fit the example call (another
shape, a mask that is not a text key-padding mask, causal, dropout) raise :class:`OnnxExportError`
naming the site, unless ``strict=False`` (then they export as the model's own attention).
"""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import VMonarchError
from ..passes.keypad import is_key_padding_shape
from .. import methods as registry
from ..methods import causal
from ..metrics import rel_error
from ..runtime import lowering, prepare_qkv, runtime_mismatch

__all__ = ["export_onnx", "OnnxExport", "OnnxExportError", "lower_site"]


class OnnxExportError(VMonarchError):
    """The optimized model could not be exported to ONNX (the message names the site or step)."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, how each site was lowered, and the check results."""

    path: str
    sites: list = field(default_factory=list)  # [{"site": id, "method": ..., "lowered": ...}]
    ops: Counter = field(default_factory=Counter)  # ONNX op type -> count in the main graph
    max_rel_error: Optional[float] = None  # onnxruntime vs PyTorch, worst output (None: not verified)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({_size(self.path)}) in {self.seconds:.1f} s"]
        for s in self.sites:
            lines.append(f"  {s['site']}: {s['method']} -> {s['lowered']}")
        if not self.sites:
            lines.append("  no rewritten attention sites: the model exported as it is")
        top = ", ".join(f"{k} {v}" for k, v in self.ops.most_common(8))
        lines.append(f"  ONNX ops: {sum(self.ops.values())} nodes ({top}, ...)")
        if self.max_rel_error is not None:
            lines.append(f"  onnxruntime vs PyTorch: max relative error {self.max_rel_error:.2e}")
        return "\n".join(lines)


def _size(path: str) -> str:
    n = os.path.getsize(path) if os.path.exists(path) else 0
    data = path + ".data"
    if os.path.exists(data):
        n += os.path.getsize(data)
    return f"{n / 2**20:.1f} MiB"


def _padding_mask(mask: torch.Tensor, batch: int, n: int, video: slice):
    """In-graph version of ``keypad.valid_keys``: ``(key_valid [batch, n] bool, ok)`` where ``ok``
    (a 0-d bool tensor) says the mask really is a text key-padding mask; None if its shape is not one."""
    if not is_key_padding_shape(tuple(mask.shape), n):
        return None
    if mask.dtype == torch.bool:
        valid, is_pad = mask, None
    else:
        valid = torch.isfinite(mask) & (mask > -1e4)
        is_pad = ((mask == 0) | ~valid).all()
    valid = valid.reshape(valid.shape[0], -1) if valid.dim() > 1 else valid.unsqueeze(0)
    if valid.shape[0] not in (1, batch):
        return None
    valid = valid.expand(batch, n)
    ok = valid[:, video].all()
    return valid, (ok if is_pad is None else ok & is_pad)


def lower_site(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ONNX-friendly decomposition of ``plan``'s op on 4-D q/k/v (what ``call_method`` runs)."""
    method = registry.find(plan.method)
    if method is None or not method.lowered_as:
        raise OnnxExportError(f"site {plan.site_id}: method {plan.method!r} has no ONNX lowering "
                              f"(lowered: {', '.join(n for n in registry.names() if registry.get(n).lowered_as)}); "
                              f"pin it with overrides={{{plan.site_id!r}: 'dense'}}")
    return method.lower(q, k, v, plan.args, scale, key_valid=key_valid)


class _Lowerer:
    """The ``runtime.lowering`` hook used while tracing: records what it did per site."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.done: dict = {}

    def _unsupported(self, plan, why: str, original):
        if self.strict:
            raise OnnxExportError(
                f"site {plan.site_id} ({plan.method}) cannot be exported as planned: {why}. "
                f"Export with the example inputs the model was optimized for, pin the site with "
                f"overrides={{{plan.site_id!r}: 'original'}}, or pass strict=False to export it as the "
                f"model's own attention.")
        self.done.setdefault(plan.site_id, dict(site=plan.site_id, method=plan.method,
                                                lowered=f"model's own attention ({why})"))
        return original()

    def __call__(self, plan, a: dict, original):
        structured = causal.is_causal_plan(plan.args)
        why = _structured_mismatch(plan, a) if structured else runtime_mismatch(plan, a)
        if why is not None:
            return self._unsupported(plan, why, original)
        q, v = a["query"], a["value"]
        q4, k4, v4, scale = prepare_qkv(a)
        ok = key_valid = None
        if structured:
            method = registry.get(plan.method)
            try:
                out = causal.apply(method, q4, k4, v4, plan.args, scale, lowering=True)
            except NotImplementedError as e:
                return self._unsupported(plan, str(e), original)
            how = (f"{method.lowered_as}; " + ("KV cache" if plan.args.get("cached_frames") else
                                               f"block-causal, one decomposition per chunk of "
                                               f"{plan.args['causal_chunk']} frames (the mask is not read)"))
            self.done.setdefault(plan.site_id, dict(site=plan.site_id, method=plan.method, lowered=how))
            return out.reshape(q.shape[:-1] + (v.shape[-1],))
        if a["attn_mask"] is not None:
            tb, ta = plan.args.get("text_before", 0), plan.args.get("text_after", 0)
            pm = _padding_mask(a["attn_mask"], q4.shape[0], k4.shape[-2],
                               slice(tb, k4.shape[-2] - ta))
            if pm is None:
                shp = tuple(a["attn_mask"].shape)
                why = (f"its mask of shape {shp} is a query × key padding mask, which runs optimized in "
                       f"PyTorch but has no ONNX lowering" if len(shp) == 4 and shp[-2] > 1 else
                       f"its mask of shape {shp} is not a text key-padding mask")
                return self._unsupported(plan, why, original)
            key_valid, ok = pm
        out = lower_site(plan, q4, k4, v4, scale, key_valid).reshape(q.shape[:-1] + (v.shape[-1],))
        how = registry.get(plan.method).lowered_as
        if ok is not None:
            # as at run time: a mask that hides video keys runs the model's own attention
            out = torch.where(ok, out, original())
            how += "; text key-padding mask in-graph"
        self.done.setdefault(plan.site_id, dict(site=plan.site_id, method=plan.method, lowered=how))
        return out


def _structured_mismatch(plan, a: dict) -> Optional[str]:
    """``runtime_mismatch`` for a block-causal / KV-cache plan while exporting: the shapes must be
    the planned ones; the mask's values cannot be read in a traced graph, so the exported graph
    assumes the block-causal mask it was planned for (export says so in its table)."""
    q, k = a["query"], a["key"]
    if q.shape[-2] != plan.seq_q or k.shape[-2] != plan.seq_k or q.shape[-1] != plan.head_dim:
        return (f"shape (N_q={q.shape[-2]}, N_k={k.shape[-2]}) differs from the planned "
                f"(N_q={plan.seq_q}, N_k={plan.seq_k})")
    if plan.args.get("causal_chunk") and a["attn_mask"] is None:
        return "no mask was passed to a site planned block-causal"
    if plan.args.get("cached_frames") and a["attn_mask"] is not None:
        return "a mask was passed to a KV-cache site"
    if a["is_causal"] or a["dropout_p"]:
        return "is_causal or dropout"
    return None


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(f"example_inputs must be what the model is called with: a dict (model(**inputs)), a "
                    f"tuple/list (model(*inputs)) or a tensor; got {type(example_inputs).__name__}")


def _batch_dims(args: tuple, kwargs: dict):
    """``dynamic_shapes`` for torch.export: dim 0 of the tensor inputs that carry the batch."""
    tensors = [t for t in _tensor_leaves((args, kwargs)) if t.dim() > 0]
    if not tensors:
        raise TypeError("dynamic_batch=True needs tensor inputs with a batch dimension")
    batch = tensors[0].shape[0]
    if batch < 2:
        raise ValueError(f"dynamic_batch=True needs example inputs with batch >= 2 (got {batch}): torch.export "
                         f"specialises dimensions of size 1; repeat the example along dim 0")
    dim = torch.export.Dim("batch", min=1)

    def spec(x):
        return {0: dim} if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch else None

    # example inputs are either positional (a tuple) or keyword (a dict), never both
    return {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)


def _find(exc: BaseException, cls) -> Optional[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, cls):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _tensor_leaves(obj) -> list:
    leaves, _ = torch.utils._pytree.tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return rel_error(a, b)


def _verify(path: str, args: tuple, kwargs: dict, expected, rtol: float) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: no notes about constant folding
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inputs = [t for t in _tensor_leaves((args, kwargs))]
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise OnnxExportError(f"cannot verify {path}: the ONNX graph takes {len(names)} inputs {names} but the "
                              f"example inputs have {len(inputs)} tensors; pass verify=False and check it yourself")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    got = sess.run(None, feed)
    want = _tensor_leaves(expected)
    if len(got) != len(want):
        raise OnnxExportError(f"cannot verify {path}: onnxruntime returned {len(got)} outputs, PyTorch "
                              f"{len(want)}")
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape):
            raise OnnxExportError(f"{path}: output {i} has shape {tuple(g.shape)} in onnxruntime and "
                                  f"{tuple(w.shape)} in PyTorch")
        if not w.is_floating_point():
            continue
        e = _rel(torch.from_numpy(g).to(w.device), w.float() if w.dtype == torch.bfloat16 else w)
        worst = max(worst, e)
        if not e <= rtol:
            raise OnnxExportError(f"{path}: onnxruntime output {i} differs from PyTorch: relative error "
                                  f"{e:.3g} > rtol={rtol:g}")
    return worst


def export_onnx(optimized: torch.nn.Module, example_inputs: Any, path: str, *, opset: Optional[int] = None,
                strict: bool = True, verify: bool = True, rtol: float = 1e-4,
                external_data: Optional[bool] = None, dynamic_batch: bool = False,
                quiet: bool = True) -> OnnxExport:
    """Export an optimized model (or any model) to ONNX with its attention sites lowered.

    Args:
        optimized: the module returned by ``vmonarch_opt.optimize`` (a plain model exports as is).
        example_inputs: what the model is called with (a dict, tuple/list or tensor); the graph is
            specialised to these shapes. Non-tensor entries (``return_dict=False``) are constants.
        path: the ``.onnx`` file to write (weights above 2 GB go to ``path + ".data"``).
        opset: ONNX opset version (None: the exporter's default).
        strict: raise :class:`OnnxExportError` naming the site when a rewritten site does not fit
            the example call; ``False`` exports such a site as the model's own attention.
        verify: run the file in onnxruntime (CPU) and compare with the PyTorch output (``rtol``:
            largest relative L2 error accepted over the floating-point outputs).
        external_data: force weights into / out of a separate file (None: only above 2 GB).
        dynamic_batch: make the batch dimension (dim 0 of every tensor input whose dim 0 equals
            the example's batch size) dynamic in the graph; the example needs batch >= 2, as
            torch.export specialises size-1 dimensions. Sequence lengths stay fixed.
        quiet: silence the exporter's progress messages and warnings.

    Returns an :class:`OnnxExport` (path, lowering per site, ONNX op counts, verification error).
    """
    if not isinstance(optimized, torch.nn.Module):
        raise TypeError(f"export_onnx() takes a torch.nn.Module, got {type(optimized).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"export_onnx needs onnx and onnxscript (torch.onnx's exporter): "
                          f"pip install onnx onnxscript onnxruntime ({e})") from e
    dynamic_shapes = _batch_dims(args, kwargs) if dynamic_batch else None
    t0 = time.perf_counter()
    lower = _Lowerer(strict)
    was_training = optimized.training
    optimized.eval()
    quiet_ctx = _quiet() if quiet else contextlib.nullcontext()
    try:
        with torch.no_grad():
            expected = optimized(*args, **kwargs) if verify else None
            with lowering(lower), quiet_ctx:
                try:
                    ep = torch.export.export(optimized, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
                except Exception as e:  # errors raised while tracing come wrapped
                    ours = _find(e, OnnxExportError)
                    if ours is not None:
                        raise OnnxExportError(str(ours)) from e
                    raise OnnxExportError(
                        f"torch.export could not trace {type(optimized).__name__} with the lowered attention "
                        f"(sites lowered before the failure: {', '.join(lower.done) or 'none'}): "
                        f"{type(e).__name__}: {_first_line(e)}\n  The model itself must be exportable with "
                        f"torch.export.export(model, strict=False): no data-dependent Python control flow "
                        f"on tensor values.") from e
                try:
                    program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, verbose=False,
                                                optimize=True)
                except Exception as e:
                    raise OnnxExportError(f"torch.onnx could not translate the exported graph of "
                                          f"{type(optimized).__name__}: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        optimized.train(was_training)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    program.save(path, external_data=external_data)

    import onnx

    _ort_compat(path)

    onnx.checker.check_model(path, full_check=True)
    ops = Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
    err = _verify(path, args, kwargs, expected, rtol) if verify else None
    return OnnxExport(path=path, sites=list(lower.done.values()), ops=ops, max_rel_error=err,
                      seconds=time.perf_counter() - t0)


def _ort_compat(path: str) -> None:
    """Rewrite what is valid ONNX but has no onnxruntime CPU kernel: ``Where`` on bool tensors
    (``bool_mask.masked_fill(..., False)``, e.g. in HunyuanVideo) becomes ``Or(And(c, x), And(Not(c), y))``."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(path, load_external_data=False)
    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # pragma: no cover - inference is best effort here
        inferred = g
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    nodes, changed = [], 0
    for n in g.node:
        if n.op_type == "Where" and types.get(n.output[0]) == TensorProto.BOOL:
            c, x, y = n.input
            base = (n.name or n.output[0]) + "_bool"
            nodes += [helper.make_node("And", [c, x], [base + "_cx"], name=base + "_and1"),
                      helper.make_node("Not", [c], [base + "_nc"], name=base + "_not"),
                      helper.make_node("And", [base + "_nc", y], [base + "_ncy"], name=base + "_and2"),
                      helper.make_node("Or", [base + "_cx", base + "_ncy"], [n.output[0]], name=base + "_or")]
            changed += 1
        else:
            nodes.append(n)
    if changed:
        del g.node[:]
        g.node.extend(nodes)
        onnx.save(model, path)


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warns about unrelated registrations: keep them out."""
    import logging

    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
             "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
