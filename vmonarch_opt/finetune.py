"""Fine-tune an optimized model toward the original model's outputs (distillation).

Structured attention changes what every layer sees; a short fine-tuning of the optimized model on
the user's own inputs lets the weights adapt to it. :func:`finetune` does the plain version of that:
for each batch it runs the teacher (the original model, dense attention, no gradients) and the
optimized model in training mode, and descends the mean squared difference of their outputs with
AdamW. What trains is a choice:

* ``train="attention"``: the parameters of the modules whose attention was rewritten (their q/k/v
  and output projections, norms): the layers that see the approximation, and few parameters;
* ``train="all"``: every parameter of the optimized model;
* ``train="lora"``: low-rank adapters on the linear layers of those attention modules, through
  ``peft`` (an optional dependency: ``pip install peft``); merged into the weights at the end, so the
  model keeps its class, modules and ``state_dict`` keys.

The teacher is never changed: it runs under ``torch.no_grad()`` in eval mode (no dropout, no
running-statistics updates; its modes are put back afterwards), and none of its parameters may be
shared with the student. The optimized model is changed in place (that is
the point); its ``requires_grad`` flags and its train/eval mode are put back afterwards.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .batch import call_model
from .errors import VMonarchError

__all__ = ["finetune", "FinetuneResult", "distillation_loss", "TRAIN_CHOICES"]

TRAIN_CHOICES = ("attention", "all", "lora")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did."""

    train: str  # "attention" | "all" | "lora"
    steps: int  # optimizer steps taken
    seconds: float
    stopped: str  # "steps" | "max_seconds" | "batches exhausted"
    losses: list = field(default_factory=list)  # distillation loss of each step (before its update)
    parameters: list = field(default_factory=list)  # names of the trained parameters (LoRA: the adapters)
    trained_numel: int = 0  # number of trained scalars

    def __repr__(self) -> str:
        first = f"{self.losses[0]:.4g}" if self.losses else "-"
        last = f"{self.losses[-1]:.4g}" if self.losses else "-"
        return (f"FinetuneResult(train={self.train!r}, steps={self.steps}, {self.seconds:.1f} s, stopped by "
                f"{self.stopped}, loss {first} -> {last}, {self.trained_numel} trained scalars in "
                f"{len(self.parameters)} tensors)")


def _leaves(out: Any) -> list:
    """The tensors of a model output: a tensor, a tuple/list, a dict or a diffusers output."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    return []


def distillation_loss(student_out: Any, teacher_out: Any, batch: Any = None) -> torch.Tensor:
    """Mean squared error between the floating-point tensors of two model outputs (in float32,
    averaged over the tensors). Raises a ValueError when the outputs differ in structure."""
    s = [t for t in _leaves(student_out) if t.is_floating_point()]
    t = [x for x in _leaves(teacher_out) if x.is_floating_point()]
    if not s or len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise ValueError(f"distillation_loss: the optimized model returned {[tuple(a.shape) for a in s]} and the "
                         f"teacher {[tuple(b.shape) for b in t]}; both must return the same floating-point tensors "
                         f"(pass loss_fn= for another comparison)")
    return sum(torch.nn.functional.mse_loss(a.float(), b.detach().float()) for a, b in zip(s, t)) / len(s)


def _batch_source(batches) -> Callable[[int], Any]:
    """``step -> batch``, raising StopIteration when an iterator is exhausted."""
    if isinstance(batches, (dict, torch.Tensor, tuple)):
        raise TypeError(f"batches= takes several batches: a list of batches (cycled), an iterable such as a "
                        f"DataLoader, or a function step -> batch; got a single {type(batches).__name__}: wrap it "
                        f"in a list, [batch]")
    if callable(batches) and not isinstance(batches, torch.nn.Module):
        return batches
    if isinstance(batches, list):
        if not batches:
            raise ValueError("batches=[] is empty: give at least one batch")
        return lambda step: batches[step % len(batches)]
    if isinstance(batches, Iterable):
        state = {"it": iter(batches)}
        reiterable = state["it"] is not batches  # a DataLoader starts again; a generator does not

        def nxt(step):
            try:
                return next(state["it"])
            except StopIteration:
                if not reiterable:
                    raise
                state["it"] = iter(batches)
                return next(state["it"])  # an empty iterable stops here
        return nxt
    raise TypeError(f"batches={type(batches).__name__}: give a list of batches, an iterable of batches or a "
                    f"function step -> batch (each batch as you call the model: dict, tuple or tensor)")


def _rewritten_modules(optimized) -> list[str]:
    state = optimized.__dict__["vmonarch"]
    paths = {s.module_path for s in state.sites if state.plans[s.site_id].rewritten}
    return sorted(paths)


def _attention_parameters(optimized) -> list[tuple[str, torch.nn.Parameter]]:
    paths = _rewritten_modules(optimized)
    if not paths:
        raise ValueError("finetune(train='attention'): optimize() rewrote no attention site of this model, so "
                         "there is no attention module to train; use train='all' or check optimized.report")
    seen, out = set(), []
    for path in paths:
        mod = optimized.get_submodule(path) if path else optimized
        prefix = f"{path}." if path else ""
        for name, p in mod.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((prefix + name, p))
    if not out:
        raise ValueError(f"finetune(train='attention'): the rewritten attention modules {paths} have no parameters; "
                         f"use train='all'")
    return out


def _import_peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("finetune(train='lora') needs the optional dependency peft: pip install peft "
                          "(or use train='attention' / 'all', which need nothing more)") from e
    return peft


def _inject_lora(optimized, rank: int, alpha: Optional[float]) -> list[tuple[str, torch.nn.Parameter]]:
    peft = _import_peft()
    state = optimized.__dict__["vmonarch"]
    paths = _rewritten_modules(optimized)
    traced = [p for p in paths if p in (state.normalized or {})]
    if traced:
        raise ValueError(f"finetune(train='lora'): the attention of {traced} is hand-written and runs as a traced "
                         f"graph that holds its linear layers, so adapters injected now would not be called; use "
                         f"train='attention' (or write the attention with F.scaled_dot_product_attention)")
    targets = []
    for path in paths:
        mod = optimized.get_submodule(path) if path else optimized
        prefix = f"{path}." if path else ""
        targets += [prefix + n for n, m in mod.named_modules() if n and isinstance(m, torch.nn.Linear)]
    if not targets:
        raise ValueError(f"finetune(train='lora'): the rewritten attention modules {paths} have no nn.Linear layer to "
                         f"adapt; use train='attention'")
    config = peft.LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                             target_modules=targets, lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(config, optimized)
    return [(n, p) for n, p in optimized.named_parameters() if "lora_" in n]


def _merge_lora(optimized) -> None:
    """Fold the adapters into the weights and put the original linear modules back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, m) for n, m in optimized.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = optimized.get_submodule(parent_name) if parent_name else optimized
        setattr(parent, child, layer.get_base_layer())


def _check_teacher(optimized, teacher) -> None:
    if teacher is optimized:
        raise ValueError("finetune: teacher is the optimized model itself; pass the original model (optimize() "
                         "returns a copy and leaves it untouched) or teacher=None (a frozen copy running its own "
                         "attention)")
    if not isinstance(teacher, torch.nn.Module) and not callable(teacher):
        raise TypeError(f"finetune: teacher must be an nn.Module (the original model) or None, got "
                        f"{type(teacher).__name__}")
    if isinstance(teacher, torch.nn.Module):
        mine = {id(p) for p in optimized.parameters()}
        shared = [n for n, p in teacher.named_parameters() if id(p) in mine]
        if shared:
            raise ValueError(f"finetune: the teacher shares {len(shared)} parameter tensors with the optimized model "
                             f"(e.g. {shared[0]!r}), so training would change the teacher too (optimize(..., "
                             f"inplace=True)?); pass an unshared original, or teacher=None")


class _FrozenOriginal:
    """``teacher=None``: a frozen deep copy of the optimized model that runs its own attention."""

    def __init__(self, optimized):
        self.model = copy.deepcopy(optimized).requires_grad_(False).eval()

    def __call__(self, *a, **kw):
        from .switch import set_original_attention

        with set_original_attention(self.model):
            return self.model(*a, **kw)


def finetune(optimized: torch.nn.Module, teacher: Optional[torch.nn.Module], batches, *, train: str = "attention",
             steps: int = 100, lr: float = 1e-4, max_seconds: Optional[float] = None, weight_decay: float = 0.0,
             grad_clip: Optional[float] = 1.0, warmup: Optional[int] = None, loss_fn: Optional[Callable] = None,
             lora_rank: int = 8, lora_alpha: Optional[float] = None,
             callback: Optional[Callable] = None) -> FinetuneResult:
    """Distil ``optimized`` (a model returned by :func:`vmonarch_opt.optimize`) toward ``teacher``'s
    outputs on ``batches``, in place; returns a :class:`FinetuneResult`.

    Args:
        teacher: the original model (dense attention); run in eval mode, never modified. ``None``: a frozen copy of
            ``optimized`` made now, run with its own attention (``set_original_attention``): costs
            a second copy of the weights.
        batches: a list of batches (cycled), an iterable (a DataLoader is restarted when it ends, an
            iterator stops training when exhausted) or a function ``step -> batch``; each batch is
            what the model is called with (dict → ``model(**b)``, tuple/list → ``model(*b)``, tensor).
        train: ``"attention"`` (default), ``"all"`` or ``"lora"`` (see the module docstring).
        steps, max_seconds: stop after this many optimizer steps, or this much wall time.
        lr, weight_decay, grad_clip: AdamW's learning rate and weight decay; the gradient norm is
            clipped to ``grad_clip`` (None: no clipping).
        warmup: steps over which the learning rate rises linearly to ``lr`` (default: a tenth of
            ``steps``, at most 100): Adam's first updates move every weight by about ``lr`` whatever
            its gradient, which a model that is already close to its target does not need.
        loss_fn: ``loss_fn(student_out, teacher_out, batch) -> scalar``; default
            :func:`distillation_loss` (MSE over the outputs' floating-point tensors). Add a
            ground-truth term here when the batches carry targets.
        lora_rank, lora_alpha: the adapters' rank and scale (alpha; default = rank).
        callback: ``callback(step, loss)`` after every step (e.g. logging).
    """
    if getattr(optimized, "__dict__", {}).get("vmonarch") is None:
        raise VMonarchError(f"finetune: this {type(optimized).__name__} was not optimized by vmonarch_opt.optimize; "
                            f"pass the module optimize() returned")
    if train not in TRAIN_CHOICES:
        raise ValueError(f"finetune: train={train!r}; choose one of {TRAIN_CHOICES}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"finetune: steps={steps!r}; give a number of optimizer steps ≥ 1")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"finetune: lr={lr!r}; give a learning rate > 0")
    warmup = min(100, steps // 10) if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"finetune: warmup={warmup!r}; give a number of steps ≥ 0")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"finetune: max_seconds={max_seconds!r}; give a time > 0 or None")
    if teacher is None:
        teacher = _FrozenOriginal(optimized)
    else:
        _check_teacher(optimized, teacher)
    if train == "lora":
        _import_peft()  # before anything changes
    source = _batch_source(batches)
    loss_fn = loss_fn or distillation_loss

    flags = {id(p): p.requires_grad for p in optimized.parameters()}
    was_training = optimized.training
    teacher_modes = [(m, m.training) for m in teacher.modules()] if isinstance(teacher, torch.nn.Module) else []
    if train == "all":
        named = [(n, p) for n, p in optimized.named_parameters()]
    elif train == "attention":
        named = _attention_parameters(optimized)
    else:
        named = _inject_lora(optimized, lora_rank, lora_alpha)
    chosen = {id(p) for _, p in named}
    result = FinetuneResult(train=train, steps=0, seconds=0.0, stopped="steps",
                            parameters=[n for n, _ in named], trained_numel=sum(p.numel() for _, p in named))
    try:
        for p in optimized.parameters():
            p.requires_grad_(id(p) in chosen)
        params = [p for _, p in named]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warmup + 1)))
        optimized.train()
        for m, _ in teacher_modes:
            m.training = False  # targets without dropout or batch-statistics updates
        t0 = time.perf_counter()
        for step in itertools.count():
            if step >= steps:
                break
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                result.stopped = "max_seconds"
                break
            try:
                batch = source(step)
            except StopIteration:
                result.stopped = "batches exhausted"
                break
            with torch.no_grad():
                target = call_model(teacher, batch)
            out = call_model(optimized, batch)
            loss = loss_fn(out, target, batch)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"finetune: the loss is {loss.item()} at step {step}; lower lr= (now {lr:g}) "
                                         f"or check the batches for non-finite values")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            ramp.step()
            result.losses.append(float(loss.detach()))
            result.steps = step + 1
            if callback is not None:
                callback(step, result.losses[-1])
        result.seconds = time.perf_counter() - t0
    finally:
        if train == "lora":
            _merge_lora(optimized)
        for p in optimized.parameters():
            if id(p) in chosen:
                p.grad = None  # the last step's gradients: not the user's, and memory
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        optimized.train(was_training)
        for m, mode in teacher_modes:
            m.training = mode
    return result
