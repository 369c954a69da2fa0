"""How a calibration batch is fed to a model: dict -> model(**b), tuple/list -> model(*b), tensor -> model(b)."""
from __future__ import annotations

import inspect
from typing import Any, Iterator, Optional

import torch

from .errors import CalibrationBatchError


def call_model(model, batch: Any):
    """Call ``model`` with ``batch`` using the convention of its type."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise CalibrationBatchError(
        f"calib_batch must be a dict (called as model(**batch)), a tuple/list (model(*batch)) or a "
        f"tensor (model(batch)); got {type(batch).__name__}. Pass what you pass to model(...)."
    )


def describe_batch(batch: Any) -> str:
    """A one-line description of a batch: keys, shapes and dtypes."""

    def one(x):
        if isinstance(x, torch.Tensor):
            return f"Tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}@{x.device.type}"
        if isinstance(x, (int, float, bool, str)) or x is None:
            return repr(x)
        return type(x).__name__

    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}={one(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(one(v) for v in batch) + ")"
    return one(batch)


def forward_signature(model) -> str:
    """The model's forward signature, for error messages."""
    try:
        return f"{type(model).__name__}.forward{inspect.signature(model.forward)}"
    except (TypeError, ValueError):
        return f"{type(model).__name__}.forward(...)"


def run_calibration_call(model, batch: Any):
    """Call the model, turning a failure into an error that names the model's signature."""
    try:
        return call_model(model, batch)
    except CalibrationBatchError:
        raise
    except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as e:
        raise CalibrationBatchError(
            f"the model could not be called with the calibration batch: {type(e).__name__}: {e}\n"
            f"  model expects: {forward_signature(model)}\n"
            f"  batch given:   {describe_batch(batch)}\n"
            f"Pass a calib_batch that the model accepts as-is (a dict for model(**batch), a tuple for "
            f"model(*batch), or a tensor), with the shapes you will run at."
        ) from e


def as_batches(calib: Any) -> list:
    """Several batches may be given as a list of dicts (e.g. several diffusion timesteps), all of
    one shape (``check_same_shapes``)."""
    if isinstance(calib, list) and calib and all(isinstance(b, dict) for b in calib):
        check_same_shapes(calib)
        return list(calib)
    return [calib]


def check_finite(batches: list) -> None:
    """Every floating-point tensor of every batch is finite: a NaN or Inf would make every
    measured error meaningless. Raises ``CalibrationBatchError`` naming the input and position."""
    for i, b in enumerate(batches):
        for name, t in iter_tensors(b):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                continue
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                pos = tuple(int(x) for x in bad.nonzero()[0].tolist())
                what = "NaN" if bool(torch.isnan(t[pos])) else "Inf"
                where = f"batch {i}, " if len(batches) > 1 else ""
                raise CalibrationBatchError(
                    f"the calibration batch has a {what} in {where}input {name!r} at position {pos} "
                    f"({int(bad.sum())} non-finite value(s) in that tensor of shape {tuple(t.shape)}); "
                    f"calibrate on finite inputs, like the ones you will run the model on")


def _shape_of(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    return "no tensor"


def check_same_shapes(batches: list) -> None:
    """Raise a ValueError naming the batches and their shapes when calibration batches differ in
    their tensors' shapes or dtypes, or in which arguments are tensors (other values may differ:
    timesteps, flags).

    Each site's plan is made for one shape, and a call of another shape runs the model's own
    attention: calibrating on batches of several shapes would measure each site on the batches of
    one shape only, while saying it was calibrated on all of them.
    """
    sig = [{k: _shape_of(v) for k, v in iter_tensors(b) if isinstance(v, torch.Tensor)} for b in batches]
    if all(s == sig[0] for s in sig[1:]):
        return
    keys = list(dict.fromkeys(k for s in sig for k in s))
    differ = [k for k in keys if len({s.get(k, "no tensor") for s in sig}) > 1]
    groups: dict = {}  # signature of the differing arguments -> batch indices
    for i, s in enumerate(sig):
        groups.setdefault(tuple(s.get(k, "no tensor") for k in differ), []).append(i)
    lines = [f"  batch{'es' if len(idx) > 1 else ''} {', '.join(map(str, idx))}: "
             + ", ".join(f"{k}={v}" for k, v in zip(differ, key)) for key, idx in groups.items()]
    raise ValueError(
        "calibration batches of different shapes:\n" + "\n".join(lines) + "\n"
        "Each site is planned and calibrated for one shape; batches of another shape would not be measured "
        "there. Optimize (or calibrate) per shape — one call per video size, each with its own profile — "
        "or pass batches of one shape (e.g. the same latent size at several noise levels).")


def iter_tensors(obj: Any) -> Iterator[tuple[str, Any]]:
    """Yield (name, value) for the top-level entries of a batch."""
    if isinstance(obj, dict):
        yield from obj.items()
    elif isinstance(obj, (tuple, list)):
        yield from ((f"arg{i}", v) for i, v in enumerate(obj))
    else:
        yield "arg0", obj


def batch_device(batches: list) -> Optional[torch.device]:
    """The device of the first tensor in ``batches`` (None: no tensor)."""
    for b in batches:
        for _, t in iter_tensors(b):
            if isinstance(t, torch.Tensor):
                return t.device
    return None
