"""From a diffusers pipeline to optimized transformers: record the calibration batches of a real
generation, optimize every transformer, switch the whole pipeline back to exact attention::

    with vmonarch_opt.record(pipe, steps=(0, 0.5, 1.0)) as rec:
        pipe(prompt_embeds=emb, num_inference_steps=30)
    fast = vmonarch_opt.optimize_pipeline(pipe, rec)        # a new pipeline; pipe is left as it was

Nothing in diffusers is edited. Recording puts a forward pre-hook (with keyword arguments) on each
denoiser of the pipeline (the components named ``transformer*`` or ``unet*``) and counts the
denoising steps by wrapping two methods of the pipeline's scheduler on that scheduler object:
``set_timesteps`` starts a run, ``step`` ends a step. The transformer calls made between the
``i``-th and ``i + 1``-th ``scheduler.step`` belong to step ``i``. Every call is recorded as the
pipeline makes it: Wan and HunyuanVideo (with true CFG) call the transformer twice per step
(prompt, then negative prompt), CogVideoX once with a doubled batch.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch

from .batch import describe_batch, iter_tensors
from .errors import VMonarchError
from .io import atomic_write_text

__all__ = ["record", "Recording", "RecordedCall", "optimize_pipeline", "PipelineReport", "denoisers"]

_DENOISER_PREFIXES = ("transformer", "unet")
_COUNTER_KEY = "_vmonarch_step_counter"
_SCHEDULE_KEY = "_vmonarch_dense_steps"


# ----------------------------------------------------------------------------- pipeline access
def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline (duck-typed: not a module, with a ``components`` dict and a scheduler)."""
    if isinstance(obj, torch.nn.Module):
        return False
    try:
        comps = obj.components
    except Exception:  # noqa: BLE001  a property that raises is no pipeline of ours
        return False
    return isinstance(comps, dict) and hasattr(obj, "scheduler")


def denoisers(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's denoising networks, by component name: every ``torch.nn.Module`` component
    whose name starts with ``transformer`` or ``unet`` (Wan 2.2: ``transformer`` and
    ``transformer_2``). Components that are ``None`` are left out."""
    if not is_pipeline(pipe):
        raise TypeError(f"expected a diffusers pipeline (an object with .components and .scheduler), got "
                        f"{type(pipe).__name__}; for a single model use vmonarch_opt.optimize(model, calib_batch)")
    return {k: v for k, v in pipe.components.items()
            if k.startswith(_DENOISER_PREFIXES) and isinstance(v, torch.nn.Module)}


def _module_device(module: torch.nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    return None


# ----------------------------------------------------------------------------- step counting
class _StepCounter:
    """Counts one scheduler's denoising steps: ``set_timesteps`` starts a run (``step = 0``), each
    ``step`` call that returns adds one. Installed as instance attributes of the scheduler object
    (``functools.wraps`` keeps the signatures that pipelines inspect) and shared by every user
    (recordings, dense-step schedules) until the last one releases it."""

    _WRAPPED = ("set_timesteps", "set_begin_index", "step")

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.run = -1  # set_timesteps calls seen
        self.step: Optional[int] = None  # steps done in the current run; None before any run
        self.begin_index = 0
        self.users = 0
        self._saved: dict = {}
        self._ours: dict = {}

    @classmethod
    def acquire(cls, scheduler) -> "_StepCounter":
        counter = scheduler.__dict__.get(_COUNTER_KEY)
        if counter is None:
            counter = cls(scheduler)
            counter._install()
            scheduler.__dict__[_COUNTER_KEY] = counter
        counter.users += 1
        return counter

    def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        for name in self._WRAPPED:
            if name not in self._ours:
                continue
            if self.scheduler.__dict__.get(name) is self._ours[name]:  # nobody wrapped it after us
                if name in self._saved:
                    self.scheduler.__dict__[name] = self._saved[name]
                else:
                    del self.scheduler.__dict__[name]
            else:  # someone wrapped our wrapper: leave it in place, counting nothing
                self._ours[name].__dict__["_vmonarch_counter"] = None
        self.scheduler.__dict__.pop(_COUNTER_KEY, None)

    def _install(self) -> None:
        for name in self._WRAPPED:
            original = getattr(self.scheduler, name, None)
            if original is None:
                continue
            if name in self.scheduler.__dict__:
                self._saved[name] = self.scheduler.__dict__[name]
            wrapper = self._wrap(name, original)
            self._ours[name] = wrapper
            self.scheduler.__dict__[name] = wrapper

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            c = wrapper.__dict__["_vmonarch_counter"]  # None once released under someone else's wrapper
            if c is not None:
                if name == "set_timesteps":
                    c.run += 1
                    c.step = 0
                    c.begin_index = 0
                elif name == "set_begin_index":
                    c.begin_index = int(args[0] if args else kwargs.get("begin_index", 0) or 0)
                elif c.step is not None:
                    c.step += 1
            return out

        wrapper.__dict__["_vmonarch_counter"] = self
        return wrapper

    def steps_in_run(self, pipe) -> int:
        """How many steps the current run's denoising loop has: the pipeline's ``_num_timesteps``
        (set before the loop by diffusers' video pipelines, after any strength trimming), else the
        scheduler's timesteps after its begin index."""
        n = pipe.__dict__.get("_num_timesteps") if pipe is not None else None
        if isinstance(n, int) and n > 0:
            return n
        ts = getattr(self.scheduler, "timesteps", None)
        total = len(ts) if ts is not None else 0
        return max(1, total - self.begin_index)


# ----------------------------------------------------------------------------- recording
StepSpec = Union[str, int, float, Iterable[Union[int, float]]]


def _check_steps(steps: StepSpec) -> Union[str, tuple]:
    if isinstance(steps, str):
        if steps != "all":
            raise ValueError(f"steps={steps!r}: give 'all', a step index (int, negative counts from the end), a "
                             f"fraction of the schedule (float in [0, 1]), or a tuple of these, e.g. (0, 0.5, 1.0)")
        return steps
    items = (steps,) if isinstance(steps, (int, float)) else tuple(steps)
    if not items:
        raise ValueError("steps=(): record at least one step, e.g. steps=(0, 0.5, 1.0) or steps='all'")
    for s in items:
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ValueError(f"steps: {s!r} is not a step; give ints (step indices, -1 = the last) or floats in "
                             f"[0, 1] (fractions of the schedule: 0.0 the first step, 1.0 the last)")
        if isinstance(s, float) and not (0.0 <= s <= 1.0):
            raise ValueError(f"steps: the fraction {s} is outside [0, 1]; for a step index give an int "
                             f"(e.g. {int(s)} rather than {s})")
    return items


def _resolve_steps(spec, n: int) -> tuple[set, list]:
    """Step indices of a run of ``n`` steps, and the requested ints that fall outside it."""
    if spec == "all":
        return set(range(n)), []
    out, outside = set(), []
    for s in spec:
        if isinstance(s, float):
            out.add(min(n - 1, int(math.floor(s * (n - 1) + 0.5))))
        elif -n <= s < n:
            out.add(s % n)
        else:
            outside.append(s)
    return out, outside


def _copy(x: Any, device):
    if isinstance(x, torch.Tensor):
        return x.detach().to(device, copy=True) if device is not None else x.detach().clone()
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*(_copy(v, device) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_copy(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _copy(v, device) for k, v in x.items()}
    return x


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


def _timestep_value(batch: dict) -> Optional[float]:
    t = batch.get("timestep")
    if isinstance(t, torch.Tensor) and t.numel():
        return float(t.flatten()[0])
    if isinstance(t, (int, float)):
        return float(t)
    return None


@dataclass
class RecordedCall:
    """One recorded call of a denoiser: its keyword arguments (``batch``, ready for
    ``optimize(module, [batch, ...])``) and where it happened."""

    component: str  # "transformer", "transformer_2", …
    run: int  # which pipeline call inside the recording (0 = the first)
    step: int  # denoising step index in that run
    steps: int  # number of denoising steps of that run
    call: int  # order of this call inside the step for this component (Wan: 0 = prompt, 1 = negative prompt)
    timestep: Optional[float]
    batch: dict


class Recording:
    """What :func:`record` captured. ``batches(component)`` gives the calibration batches of one
    denoiser; ``str(recording)`` summarises the calls per component and step."""

    def __init__(self, pipe, steps: StepSpec, components: Optional[Iterable[str]], device):
        self.steps_spec = _check_steps(steps)
        mods = denoisers(pipe)
        if components is not None:
            components = list(components)
            missing = [c for c in components if c not in mods]
            if missing:
                raise ValueError(f"record(components={components}): {missing} not among the pipeline's denoisers "
                                 f"{sorted(mods)}")
            mods = {c: mods[c] for c in components}
        if not mods:
            raise VMonarchError(f"{type(pipe).__name__} has no denoiser to record (no component named transformer* "
                                f"or unet* is set); pass components=[...] naming it")
        self.pipeline = type(pipe).__name__
        self.components = list(mods)
        self.device = None if device is None else torch.device(device)
        self.calls: list[RecordedCall] = []
        self.ran: dict[str, list[tuple[int, int]]] = {c: [] for c in mods}  # (run, step) of every call, recorded or not
        self.outside_loop: Counter = Counter()  # calls before any set_timesteps
        self.out_of_range: dict[int, list] = {}  # run -> requested step indices beyond its length
        self._pipe = weakref.ref(pipe)
        self._modules = mods
        self._hooks: list = []
        self._counter: Optional[_StepCounter] = None
        self._runs: dict[int, tuple[int, set]] = {}  # run -> (steps, wanted indices)
        self._run_index: dict[int, int] = {}  # the step counter's run number -> run of this recording
        self._order: Counter = Counter()  # (component, run, step) -> calls so far
        self.active = False

    # -- lifetime ----------------------------------------------------------------------------
    def start(self) -> "Recording":
        if self.active:
            raise VMonarchError("this recording is already active")
        pipe = self._pipe()
        if pipe is None:
            raise VMonarchError("the pipeline of this recording no longer exists")
        self._counter = _StepCounter.acquire(pipe.scheduler)
        for name, mod in self._modules.items():
            self._hooks.append(mod.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        self.active = True
        return self

    def stop(self) -> "Recording":
        if not self.active:
            return self
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._counter.release()
        self._counter = None
        self.active = False
        return self

    def __enter__(self) -> "Recording":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is not None:
            return
        if not self.calls:
            seen = sum(len(v) for v in self.ran.values()) + sum(self.outside_loop.values())
            why = ("the pipeline was not called inside the with-block" if not seen else
                   "no denoiser call fell on the requested steps" if not self.outside_loop else
                   "the denoisers were called outside a denoising loop (no scheduler.set_timesteps before)")
            warnings.warn(f"vmonarch_opt.record: nothing was recorded: {why}", RuntimeWarning, stacklevel=2)
        for run, outside in self.out_of_range.items():
            n = self._runs[run][0]
            warnings.warn(f"vmonarch_opt.record: run {run} had {n} denoising steps; step(s) {outside} requested by "
                          f"steps={self.steps_spec!r} do not exist there and were not recorded (fractions such as "
                          f"1.0 always mean the last step)", RuntimeWarning, stacklevel=2)

    # -- the hook ----------------------------------------------------------------------------
    def _hook(self, name: str):
        try:
            sig = inspect.signature(self._modules[name].forward)
        except (TypeError, ValueError):
            sig = None

        @torch.compiler.disable
        def hook(module, args, kwargs):
            c = self._counter
            if c is None or c.step is None:
                self.outside_loop[name] += 1
                return None
            run = self._run_index.setdefault(c.run, len(self._run_index))  # 0 = the first run of this recording
            step = c.step
            if run not in self._runs:
                n = c.steps_in_run(self._pipe())
                wanted, outside = _resolve_steps(self.steps_spec, n)
                self._runs[run] = (n, wanted)
                if outside:
                    self.out_of_range[run] = outside
            n, wanted = self._runs[run]
            self.ran[name].append((run, step))
            order = self._order[(name, run, step)]
            self._order[(name, run, step)] += 1
            if step not in wanted:
                return None
            if args:
                if sig is None:
                    raise VMonarchError(f"vmonarch_opt.record: {name} was called with positional arguments and its "
                                        f"forward signature cannot be read to name them")
                batch = {}
                for pname, value in sig.bind_partial(*args, **kwargs).arguments.items():
                    kind = sig.parameters[pname].kind
                    if kind is inspect.Parameter.VAR_KEYWORD:
                        batch.update(value)
                    elif kind is inspect.Parameter.VAR_POSITIONAL:
                        if value:
                            raise VMonarchError(f"vmonarch_opt.record: {name} was called with {len(value)} variadic "
                                                f"positional argument(s), which have no names to record them under")
                    else:
                        batch[pname] = value
            else:
                batch = dict(kwargs)
            batch = _copy(batch, self.device)
            self.calls.append(RecordedCall(component=name, run=run, step=step, steps=n, call=order,
                                           timestep=_timestep_value(batch), batch=batch))
            return None

        return hook

    # -- results -----------------------------------------------------------------------------
    def batches(self, component: str = "transformer", steps: Optional[Iterable[int]] = None) -> list[dict]:
        """The recorded keyword arguments of ``component``'s calls, in call order (optionally only
        those at the given step indices): ``optimize(pipe.transformer, rec.batches())`` calibrates
        on them. Tensors are on the recording's device (``record(device=...)``)."""
        if component not in self.components:
            raise KeyError(f"{component!r} was not recorded; recorded components: {self.components}")
        keep = None if steps is None else set(steps)
        return [c.batch for c in self.calls if c.component == component and (keep is None or c.step in keep)]

    def recorded_steps(self, component: str = "transformer") -> list[int]:
        """Step indices at which ``component`` was recorded (every run)."""
        return sorted({c.step for c in self.calls if c.component == component})

    def ran_steps(self, component: str = "transformer") -> list[int]:
        """Step indices at which ``component`` ran during the recording, recorded or not."""
        return sorted({s for _, s in self.ran.get(component, [])})

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors."""
        return sum(_nbytes(c.batch) for c in self.calls)

    def rows(self) -> list[dict]:
        """One row per component, run and step that was recorded."""
        groups: dict = {}
        for c in self.calls:
            g = groups.setdefault((c.component, c.run, c.step), dict(component=c.component, run=c.run, step=c.step,
                                                                     steps=c.steps, timestep=c.timestep, calls=0,
                                                                     batch=describe_batch(_tensors_only(c.batch))))
            g["calls"] += 1
        return list(groups.values())

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = [[r["component"], r["run"], f"{r['step']} of {r['steps']}",
                 "" if r["timestep"] is None else f"{r['timestep']:.4g}", r["calls"], r["batch"]] for r in self.rows()]
        table = tabulate(rows, headers=["component", "run", "step", "timestep", "calls", "inputs (one call)"],
                         tablefmt="simple", disable_numparse=True)
        ran = "; ".join(f"{k} ran steps {_ranges(self.ran_steps(k))}" for k in self.components)
        dev = "kept on their devices" if self.device is None else f"on {self.device}"
        return (f"vmonarch_opt recording — {self.pipeline}, steps={self.steps_spec!r}\n{table}\n"
                f"{len(self.calls)} calls recorded ({_size(self.nbytes)}, {dev}); {ran or 'nothing ran'}")

    def __repr__(self) -> str:
        return str(self)


def _size(n: int) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} bytes"


def _tensors_only(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _ranges(steps: list[int]) -> str:
    if not steps:
        return "none"
    out, start, prev = [], steps[0], steps[0]
    for s in steps[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(str(start) if start == prev else f"{start}–{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(out)


def record(pipe, steps: StepSpec = (0, 0.5, 1.0), *, components: Optional[Iterable[str]] = None,
           device: Union[str, torch.device, None] = "cpu") -> Recording:
    """Record the calls of a pipeline's denoisers as calibration batches; use as a context manager::

        with vmonarch_opt.record(pipe, steps=(0, 0.5, 1.0)) as rec:
            pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=30)
        print(rec)                          # what was recorded, per component and step

    Args:
        steps: which denoising steps to record: ints are step indices (``-1`` the last), floats in
            ``[0, 1]`` fractions of the run's schedule (``0.0`` the first step, ``0.5`` the middle,
            ``1.0`` the last; rounded to the nearest step, halves up), or ``"all"``. The same
            steps are recorded in every pipeline call inside the block. Every call of a
            denoiser at those steps is kept, as the pipeline makes it: with classifier-free
            guidance Wan (and HunyuanVideo with ``true_cfg_scale``) call the transformer twice per
            step, prompt first, CogVideoX once on a doubled batch (negative prompt first). Wan
            2.2's experts each get the calls of the steps they ran.
        components: denoiser component names to hook (default: every ``transformer*`` /
            ``unet*`` component of the pipeline).
        device: where the recorded tensors are copied (``"cpu"``, the default, keeps accelerator
            memory free), or ``None`` to keep a copy on each tensor's own device. A recorded call
            holds a copy of the denoiser's inputs: for Wan2.1 480p/81f in bf16 about 8.4 MB
            (latents 16×21×60×104 and 512 × 4096 text embeddings); ``rec.nbytes`` says the total.
    """
    return Recording(pipe, steps, components, device)


# ----------------------------------------------------------------------------- optimizing
def _signature(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in iter_tensors(batch) if isinstance(v, torch.Tensor))


def _one_shape(name: str, batches: list[dict]) -> list[dict]:
    """The batches of the most common shape (first recorded wins a tie); the others are left out
    with a warning (optimize calibrates one shape at a time)."""
    groups: dict = {}
    for b in batches:
        groups.setdefault(_signature(b), []).append(b)
    if len(groups) == 1:
        return batches
    best = max(groups.values(), key=len)
    others = sum(len(g) for g in groups.values() if g is not best)
    warnings.warn(f"vmonarch_opt.optimize_pipeline: {name}'s recorded calls have {len(groups)} different input shapes; "
                  f"calibrating on the {len(best)} of shape {describe_batch(_tensors_only(best[0]))} and leaving out "
                  f"{others} (e.g. prompt and negative prompt embeddings of different lengths: pad them to one "
                  f"length to calibrate on both)", RuntimeWarning, stacklevel=3)
    return best


def _to_device(batch: Any, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _recorded_batches(rec, name: str) -> list:
    if isinstance(rec, Recording):
        if rec.active:
            raise VMonarchError("optimize_pipeline: the recording is still active; call it after the with-block")
        if name not in rec.components:
            return []
        return rec.batches(name)
    return list(rec.get(name) or [])


def _no_batches_error(pipe, rec, name: str) -> VMonarchError:
    if isinstance(rec, Recording) and name in rec.components:
        ran = rec.ran_steps(name)
        if ran:
            return VMonarchError(
                f"optimize_pipeline: {name} ran steps {_ranges(ran)} but none of them was recorded (steps="
                f"{rec.steps_spec!r}); record with steps covering them (e.g. steps='all' or {tuple(ran[:1] + ran[-1:])}), "
                f"or leave {name} out with components=[...]")
        return VMonarchError(f"optimize_pipeline: {name} was never called while recording (with this pipeline call, "
                             f"another transformer ran every step); generate with settings that reach it, or leave "
                             f"{name} out with components=[...]")
    recorded = rec.components if isinstance(rec, Recording) else sorted(rec)
    return VMonarchError(f"optimize_pipeline: no batches for {name}; recorded: {recorded}. Record it (record(pipe) "
                         f"hooks every transformer* / unet* component) or leave it out with components=[...]")


def optimize_pipeline(pipe, recording, *, inplace: bool = False, components: Optional[Iterable[str]] = None,
                      per_component: Optional[dict] = None, **optimize_kwargs):
    """Optimize every denoiser of ``pipe`` on the batches ``recording`` captured; returns the
    optimized pipeline.

    Unless ``inplace=True`` the user's pipeline is left as it was: the result is a shallow copy of
    ``pipe`` (same class; VAE, text encoders, scheduler and settings shared) holding optimized
    copies of its transformers, so both can run (sequentially: they share the scheduler). With
    ``inplace=True`` the transformers are rewritten in place (no second copy of their weights; for
    large models) and ``pipe`` itself is returned; ``vmonarch_opt.restore(pipe.transformer)`` undoes
    one.

    Args:
        recording: a :class:`Recording`, or ``{component: [batch, ...]}``.
        components: which denoisers to optimize (default: all of them; each needs recorded batches).
        per_component: ``{component: {optimize keyword: value}}`` for one denoiser only, e.g.
            ``{"transformer_2": {"profile": "low_noise.json"}}``; it updates the shared keywords.
        **optimize_kwargs: passed to :func:`vmonarch_opt.optimize` for every denoiser (``methods``,
            ``budget``, ``profile``, ``overrides``, ``grid``, ``min_seq_len``, ``capture``,
            ``validate``, ``evaluate``).

    ``result.report`` is a :class:`PipelineReport` (one report per optimized denoiser); each
    denoiser also carries its own ``.report``. Batches of several input shapes are reduced to the
    most common one, with a warning.
    """
    from .optimize import optimize

    mods = denoisers(pipe)
    if not isinstance(recording, (Recording, dict)):
        raise TypeError(f"optimize_pipeline(pipe, recording): recording must be what vmonarch_opt.record(pipe) "
                        f"returned, or {{component: [batch, ...]}}; got {type(recording).__name__}")
    names = list(mods) if components is None else list(components)
    unknown = [n for n in names if n not in mods]
    if unknown:
        raise ValueError(f"optimize_pipeline(components=...): {unknown} not among the pipeline's denoisers {sorted(mods)}")
    per_component = dict(per_component or {})
    bad = [k for k in per_component if k not in names]
    if bad:
        raise ValueError(f"optimize_pipeline(per_component=...): {bad} not among the denoisers optimized {names}")
    for k, kw in per_component.items():
        if not isinstance(kw, dict) or "inplace" in kw:
            raise ValueError(f"per_component[{k!r}] must be a dict of optimize() keywords (inplace is set once, for "
                             f"the whole pipeline)")
    if "inplace" in optimize_kwargs:
        raise ValueError("inplace is an argument of optimize_pipeline itself")
    batches = {}
    for n in names:
        b = _recorded_batches(recording, n)
        if not b:
            raise _no_batches_error(pipe, recording, n)
        batches[n] = _one_shape(n, b)

    target = pipe if inplace else copy.copy(pipe)
    reports = {}
    for n in names:
        mod = mods[n]
        dev = _module_device(mod)
        kw = {**optimize_kwargs, **per_component.get(n, {})}
        opt = optimize(mod, [_to_device(b, dev) for b in batches[n]], inplace=inplace, **kw)
        if not inplace:
            setattr(target, n, opt)
        reports[n] = opt.report
    report = PipelineReport(type(pipe).__name__, reports,
                            recording=str(recording) if isinstance(recording, Recording) else None)
    target.__dict__["report"] = report
    return target


# ----------------------------------------------------------------------------- report
class PipelineReport:
    """One :class:`~vmonarch_opt.Report` per optimized denoiser: ``report["transformer_2"]``,
    iteration over component names, ``str()`` (every table), ``to_markdown()``, ``to_json(path)``."""

    FORMAT = "vmonarch_opt.pipeline_report/1"

    def __init__(self, pipeline: str, reports: dict, recording: Optional[str] = None):
        self.pipeline = pipeline
        self.reports = dict(reports)
        self.recording = recording

    def __getitem__(self, name: str):
        return self.reports[name]

    def __iter__(self):
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)

    def items(self):
        return self.reports.items()

    def summary(self) -> str:
        lines = []
        for n, r in self.reports.items():
            t = r.totals
            by = ", ".join(f"{k}: {v}" for k, v in sorted(t["by_method"].items()))
            after = "?" if t["flops_after"] is None else f"{t['flops_after'] / 1e9:.3g}"
            cut = f"{t['flop_cut']:.2f}× fewer" if t.get("flop_cut") else "? fewer"
            err = t.get("output_error")
            err = "" if err is None else f", output rel. error {err:.2e}"
            lines.append(f"  {n} ({r.data['model']}): {t['sites']} sites ({by}); attention GFLOP per call "
                         f"{t['flops_before'] / 1e9:.3g} → {after} ({cut}){err}")
        return f"vmonarch_opt — {self.pipeline}: {len(self.reports)} denoiser(s) optimized\n" + "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.summary()]
        for n, r in self.reports.items():
            parts.append(f"\n── {n} ──\n{r}")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return str(self)

    def to_markdown(self) -> str:
        body = "".join(f"\n## {n}\n\n{r.to_markdown()}" for n, r in self.reports.items())
        return f"# vmonarch_opt — {self.pipeline}\n\n```text\n{self.summary()}\n```\n{body}"

    def to_dict(self) -> dict:
        import json

        return {"format": self.FORMAT, "pipeline": self.pipeline, "recording": self.recording,
                "reports": {n: json.loads(r.to_json()) for n, r in self.reports.items()}}

    def to_json(self, path=None) -> str:
        import json

        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text


# ----------------------------------------------------------------------------- whole-pipeline switch
def optimized_denoisers(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's denoisers that ``optimize`` rewrote (they carry an attention switch)."""
    out = {n: m for n, m in denoisers(pipe).items() if getattr(m.__dict__.get("vmonarch"), "switch", None) is not None}
    if not out:
        raise VMonarchError(f"set_original_attention: no denoiser of this {type(pipe).__name__} was optimized by "
                            f"vmonarch_opt (none of {sorted(denoisers(pipe))} carries a switch); call it on the "
                            f"pipeline optimize_pipeline() returned")
    return out


class _DenseSteps:
    """Runs steps ``0 … k-1`` of every denoising loop with the model's own attention: a forward
    pre-hook on each optimized denoiser sets its switch from the scheduler's step count."""

    def __init__(self, pipe, k: int):
        self.k = k
        self.mods = optimized_denoisers(pipe)
        self.counter = _StepCounter.acquire(pipe.scheduler)
        self._pipe = weakref.ref(pipe)
        self._hooks = [m.register_forward_pre_hook(self._hook(m)) for m in self.mods.values()]

    def _hook(self, module):
        switch = module.__dict__["vmonarch"].switch

        @torch.compiler.disable
        def hook(mod, args):
            pipe = self._pipe()
            if pipe is not None and getattr(pipe, "scheduler", None) is not self.counter.scheduler:
                raise VMonarchError(
                    f"set_original_attention(pipe, dense_steps={self.k}) counts the steps of the scheduler it was set "
                    f"with, and pipe.scheduler has been replaced since; call set_original_attention(pipe, "
                    f"dense_steps={self.k}) again after changing the scheduler")
            step = self.counter.step
            if step is not None:
                switch.original = step < self.k
            return None

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.counter.release()


def pipeline_switch(pipe, enabled: bool, dense_steps: Optional[int]):
    """Set the switch of every optimized denoiser of ``pipe`` (see ``switch.set_original_attention``);
    returns a function that puts back the previous setting."""
    if dense_steps is not None:
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"dense_steps={dense_steps!r}: give the number of first denoising steps to run with "
                             f"exact attention, an int ≥ 0")
        if not enabled:
            raise ValueError("set_original_attention(pipe, False, dense_steps=k) contradicts itself: dense_steps=k "
                             "already means exact attention for steps 0 … k-1 and the optimized kernels after")
    mods = optimized_denoisers(pipe)
    switches = [m.__dict__["vmonarch"].switch for m in mods.values()]
    before = [s.original for s in switches]
    old = pipe.__dict__.pop(_SCHEDULE_KEY, None)
    old_k = None
    if old is not None:
        old_k = old.k
        old.remove()
    if dense_steps is None:
        for s in switches:
            s.original = bool(enabled)
    else:
        for s in switches:
            s.original = dense_steps > 0  # until the first call sets it from the step count
        pipe.__dict__[_SCHEDULE_KEY] = _DenseSteps(pipe, dense_steps)

    def undo() -> None:
        current = pipe.__dict__.pop(_SCHEDULE_KEY, None)
        if current is not None:
            current.remove()
        for s, b in zip(switches, before):
            s.original = b
        if old_k is not None:
            pipe.__dict__[_SCHEDULE_KEY] = _DenseSteps(pipe, old_k)

    return undo


def dense_steps_of(pipe) -> Optional[int]:
    """The ``dense_steps`` schedule set on ``pipe`` (None when there is none)."""
    s = pipe.__dict__.get(_SCHEDULE_KEY)
    return None if s is None else s.k
