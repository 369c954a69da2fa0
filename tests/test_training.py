"""Training through the optimizer (CPU: the ops' backward differentiates the pure-PyTorch references):
gradients, attention dropout, torch.compile, activation checkpointing, VMoBA's per-step selection,
and the fine-tuning helper ``vmonarch_opt.finetune``."""
import copy
import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vmonarch_opt
from vmonarch_fixtures import models
from vmonarch_opt import VMoBAConfig
from vmonarch_opt.kernels.monarch.reference import monarch_attention_reference
from vmonarch_opt.kernels.vmoba import reference as vmoba_reference
from vmonarch_opt.runtime import lowering, prepare_qkv
from conftest import rel_err
from handwritten_models import MulScale, Stack, _Base

VMOBA_TOP2 = {"*.attn1": VMoBAConfig(topk=2, selection="group")}  # Wan's self-attention sites, 2 of 12 key blocks per query group


def _optimized(model, batch, method, **kw):
    args = dict(min_seq_len=0, budget=None)
    args.update(dict(overrides=VMOBA_TOP2) if method == "vmoba" else dict(methods=(method,)))
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vmonarch_opt.optimize(model, batch, **args)


def _call(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out[0] if isinstance(out, tuple) else out


def _grads(model, batch, fn=None) -> dict:
    """Gradients of a fixed scalar of the output with respect to every parameter."""
    model.zero_grad(set_to_none=True)
    out = _call(model if fn is None else fn, batch)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * w).sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _close(got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want)
    for n in want:
        assert got[n] is not None and want[n] is not None, f"{n}: no gradient"
        assert torch.isfinite(got[n]).all(), n
        scale = max(want[n].abs().max().item(), 1e-6)
        assert (got[n] - want[n]).abs().max().item() <= tol * scale, n


def _ran_only(opt, calls: int) -> None:
    """Every rewritten site ran its plan ``calls`` times and never fell back."""
    st = vmonarch_opt.stats(opt)
    assert st, "no rewritten site"
    for sid, c in st.items():
        assert c["ran"] == calls and not c["fell_back"], (sid, c)


def _reference_attention(plan, a, original):
    """A rewritten site computed by its method's pure-PyTorch reference, differentiated by plain
    autograd (no custom op, no custom backward): the oracle of the ops' backward."""
    q, k, v, scale = prepare_qkv(a)
    p = plan.args
    if plan.method == "monarch":
        out = monarch_attention_reference(q, k, v, grid=tuple(p["grid"]), block=tuple(p["block"]),
                                          text_before=p["text_before"], text_after=p["text_after"],
                                          steps=p["steps"], scale=scale, recompute=p["recompute"])
    else:
        out = vmoba_reference.vmoba_attention_reference(
            q, k, v, grid=tuple(p["grid"]), chunk=tuple(p["chunk"]), text_before=p["text_before"],
            text_after=p["text_after"], partition=p["partition"], threshold=p["threshold"], topk=p["topk"],
            scale=scale, pooled_rest=p["pooled_rest"])
    return out.reshape(a["query"].shape[:-1] + (a["value"].shape[-1],))


# ------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("which", ["wan", "handwritten"])
def test_dense_sites_train_exactly_like_the_original(which):
    """Through the dense op every parameter gets the original model's gradient, and the sites keep
    their plans in training mode."""
    if which == "wan":
        model, batch = models.wan()
    else:
        model, batch = Stack(MulScale).eval(), torch.randn(2, 30, 32)
    opt = _optimized(model, batch, "dense")
    model.train(), opt.train()
    want, got = _grads(model, batch), _grads(opt, batch)
    _close(got, want, 1e-5)
    assert all(r["plan"]["method"] in ("dense", "original") for r in opt.report.rows)
    _ran_only(opt, 1)


@pytest.mark.parametrize("method", ["monarch", "vmoba"])
def test_structured_sites_gradients_are_reference_autograd(method):
    """Every parameter's gradient through the ops equals plain autograd through the references."""
    model, batch = models.wan()
    opt = _optimized(model, batch, method)
    opt.train()
    got = _grads(opt, batch)
    with lowering(_reference_attention):
        want = _grads(opt, batch)
    _close(got, want, 1e-5)
    assert sum(r["plan"]["method"] == method for r in opt.report.rows) == 2
    _ran_only(opt, 1)  # the lowered call is not counted; the op call is


def test_vmoba_selection_is_recomputed_every_step(monkeypatch):
    """The selection is a constant of the step (the backward reuses the forward's) and is made again
    from each step's q/k: another input, another selection."""
    seen = []
    select = vmoba_reference.vmoba_select_reference

    def spy(q, k, **kw):
        sel = select(q, k, **kw)
        seen.append(sel.kv_idx.clone())
        return sel

    monkeypatch.setattr(vmoba_reference, "vmoba_select_reference", spy)
    model, batch = models.wan()
    opt = _optimized(model, batch, "vmoba")
    opt.train()
    adam = torch.optim.AdamW(opt.parameters(), lr=1e-3)
    other = dict(batch, hidden_states=torch.randn(batch["hidden_states"].shape,
                                                  generator=torch.Generator().manual_seed(5)))
    steps = []
    for b in (batch, other):
        seen.clear()
        _call(opt, b).square().mean().backward()
        adam.step()
        adam.zero_grad()
        assert len(seen) == 4  # 2 sites: forward, then the backward's recomputation in reverse order
        assert torch.equal(seen[0], seen[3]) and torch.equal(seen[1], seen[2])
        steps.append(seen[:2])
    assert any(not torch.equal(a, b) for a, b in zip(*steps))


# ------------------------------------------------------------------------------ attention dropout
class ModuleDropout(_Base):
    """nn.Dropout on the attention probabilities."""

    def __init__(self, dim=32, heads=2):
        super().__init__(dim, heads)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(self.drop((q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1)) @ v)


class FunctionalDropout(_Base):
    """F.dropout on the attention probabilities, training=self.training."""

    def forward(self, x):
        q, k, v = self.split(x)
        p = (q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1)
        return self.merge(F.dropout(p, 0.5, training=self.training) @ v)


class SdpaDropout(_Base):
    """SDPA with dropout_p in training mode only (what most attention code does)."""

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0))


class OutputDropout(_Base):
    """No attention dropout, but a functional dropout after the projection, whose mode a trace fixes."""

    def forward(self, x):
        q, k, v = self.split(x)
        o = self.merge((q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1) @ v)
        return F.dropout(o, 0.5, training=self.training)


@pytest.mark.parametrize("cls,kind", [(ModuleDropout, "dropout"), (FunctionalDropout, "dropout"),
                                      (SdpaDropout, "dropout"), (OutputDropout, "handwritten")])
def test_dropout_in_training_mode_is_honoured_by_the_models_own_attention(cls, kind):
    """Optimized in eval mode: in training mode the calls with dropout run the model's own code
    (same random numbers: the same output and gradients as the original model), counted as
    fallbacks with the reason; back in eval mode the kernel runs."""
    model, x = Stack(cls).eval(), torch.randn(2, 30, 32)
    opt = _optimized(model, x, "dense")
    assert [r["plan"]["method"] for r in opt.report.rows] == ["dense", "dense"]
    model.train(), opt.train()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.manual_seed(3)
        got = _grads(opt, x)
        torch.manual_seed(3)
        want = _grads(model, x)
    _close(got, want, 1e-6)
    st = vmonarch_opt.stats(opt)
    for sid, c in st.items():
        assert c["ran"] == 0 and c["fell_back"] == {kind: 1}, (sid, c)
        assert "dropout" in c["why"][kind] and "eval mode" in c["why"][kind]
    assert any("dropout" in str(m.message) for m in w)
    with torch.no_grad():
        torch.manual_seed(3)
        dropped = opt(x)
        opt.eval(), model.eval()
        assert rel_err(opt(x), model(x)) < 1e-5 and rel_err(dropped, model(x)) > 1e-2
    assert all(c["ran"] == 1 for c in vmonarch_opt.stats(opt).values())


def test_dropout_fallback_under_torch_compile_has_no_graph_break():
    model, x = Stack(ModuleDropout).eval(), torch.randn(1, 30, 32)
    opt = _optimized(model, x, "monarch", grid=(2, 3, 5))
    opt.train()
    torch._dynamo.reset()
    compiled = torch.compile(opt, backend="aot_eager", fullgraph=True)
    a, b = compiled(x), compiled(x)
    assert not torch.equal(a, b)  # dropout is applied
    a.sum().backward()
    assert all(c["fell_back"] == {"dropout": 2} and c["ran"] == 0 for c in vmonarch_opt.stats(opt).values())
    opt.eval()
    with torch.no_grad():
        compiled(x)  # recompiles for eval mode: the kernel runs
    assert all(c["ran"] == 1 for c in vmonarch_opt.stats(opt).values())


# ------------------------------------------------------------------------------ compile, checkpointing
def _step(model, batch, fn):
    """One training step: (gradients, parameters after AdamW)."""
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grads = {n: g.clone() for n, g in _grads(model, batch, fn).items()}
    adam.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True: no graph break) with AOT autograd: the forward graph keeps
    our op, and the step's gradients and updated weights match eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model, batch = models.wan()
    opt = _optimized(model, batch, "monarch").train()
    twin = copy.deepcopy(opt)
    ops = Counter()

    def forward_compiler(gm, _inputs):
        ops.update(str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("vmonarch."))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(opt, backend=aot_autograd(fw_compiler=forward_compiler), fullgraph=True)
    got_g, got_p = _step(opt, batch, compiled)
    want_g, want_p = _step(twin, batch, twin)
    assert ops == Counter({"vmonarch.monarch_attention.default": 2})
    _close(got_g, want_g, 1e-4)
    _close(got_p, want_p, 1e-4)
    _ran_only(opt, 1)  # counted inside the compiled graph


@pytest.mark.parametrize("method", ["monarch", "vmoba"])
def test_activation_checkpointing_recomputes_the_same_attention(method):
    """diffusers' gradient checkpointing (torch.utils.checkpoint, use_reentrant=False) around each
    block: the same gradients; the recomputation runs our op again (VMoBA: the same selection, or
    the non-reentrant checkpoint would refuse the recomputed tensors)."""
    model, batch = models.wan()
    opt = _optimized(model, batch, method).train()
    ckpt = copy.deepcopy(opt)
    ckpt.enable_gradient_checkpointing()
    _close(_grads(ckpt, batch), _grads(opt, batch), 1e-5)
    _ran_only(ckpt, 2)


# ------------------------------------------------------------------------------ finetune()
def _distance(student, teacher, batches) -> float:
    with torch.no_grad():
        return sum(vmonarch_opt.distillation_loss(student(**b), teacher(**b)).item() for b in batches)


def _wan_batches(batch, n=2):
    g = torch.Generator().manual_seed(11)
    return [dict(batch, hidden_states=torch.randn(batch["hidden_states"].shape, generator=g)) for _ in range(n)]


def test_finetune_attention_distils_and_never_touches_the_teacher():
    model, batch = models.wan()
    teacher_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _optimized(model, batch, "monarch")
    before = {n: p.detach().clone() for n, p in opt.named_parameters()}
    batches = _wan_batches(batch)
    start = _distance(opt, model, batches)
    model.train()  # run in eval mode during finetune(), its mode put back
    res = vmonarch_opt.finetune(opt, model, batches, train="attention", steps=12, lr=3e-3)
    assert res.steps == 12 and res.stopped == "steps" and len(res.losses) == 12
    assert _distance(opt, model, batches) < 0.7 * start
    # the teacher: same weights, flags, mode; no gradients
    assert all(torch.equal(v, teacher_state[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # the student: only the rewritten sites' modules (blocks.*.attn1) trained; flags and mode put back
    changed = {n for n, p in opt.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn1." in n for n in changed) and set(res.parameters) >= changed
    assert not opt.training and all(p.requires_grad for p in opt.parameters())
    assert vmonarch_opt.stats(opt)["blocks.0.attn1"]["ran"] > 12


def test_finetune_all_with_a_frozen_copy_as_teacher_stops_with_its_batches():
    model, batch = models.wan()
    opt = _optimized(model, batch, "vmoba")
    before = {n: p.detach().clone() for n, p in opt.named_parameters()}
    res = vmonarch_opt.finetune(opt, None, iter(_wan_batches(batch, 3)), train="all", steps=10, lr=1e-3)
    assert res.steps == 3 and res.stopped == "batches exhausted"
    assert res.trained_numel == sum(p.numel() for p in opt.parameters())
    assert sum(not torch.equal(p, before[n]) for n, p in opt.named_parameters()) > len(before) // 2
    assert all(map(math.isfinite, res.losses))


def test_finetune_refuses_what_would_go_wrong():
    model, batch = models.wan()
    opt = _optimized(model, batch, "monarch")
    with pytest.raises(vmonarch_opt.VMonarchError, match="not optimized"):
        vmonarch_opt.finetune(model, None, [batch])
    with pytest.raises(ValueError, match="teacher is the optimized model"):
        vmonarch_opt.finetune(opt, opt, [batch])
    inplace = _optimized(copy.deepcopy(model), batch, "monarch", inplace=True)
    shared = copy.deepcopy(model)
    shared.proj_out.weight = inplace.proj_out.weight
    with pytest.raises(ValueError, match="shares 1 parameter"):
        vmonarch_opt.finetune(inplace, shared, [batch])
    with pytest.raises(ValueError, match="train='everything'"):
        vmonarch_opt.finetune(opt, model, [batch], train="everything")
    with pytest.raises(TypeError, match=r"wrap it in a list"):
        vmonarch_opt.finetune(opt, model, batch)
    with pytest.raises(ValueError, match="steps=0"):
        vmonarch_opt.finetune(opt, model, [batch], steps=0)
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install peft"):
            vmonarch_opt.finetune(opt, model, [batch], train="lora")
    else:  # with peft: adapters train, are merged back, and the state_dict keys stay the model's
        keys = list(opt.state_dict())
        res = vmonarch_opt.finetune(opt, model, [batch], train="lora", steps=2, lr=1e-3)
        assert res.parameters and all("lora_" in n for n in res.parameters)
        assert list(opt.state_dict()) == keys


# ------------------------------------------------------------------------------ the example
def test_finetune_example_runs_at_smoke_scale(tmp_path):
    import json
    import os
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from finetune_sparse import main

    out = tmp_path / "tuned.safetensors"
    assert main(["--smoke", "--methods", "monarch", "--weights-out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    r = res[0]
    assert r["method"] == "monarch" and r["flop_cut"] >= 0.85 and r["steps"] > 0
    for key in ("psnr_before", "psnr_after", "ssim_before", "ssim_after", "loss_before", "loss_after", "loss_dense"):
        assert r[key] == r[key] and r[key] > 0, key  # a number, not NaN
    state = load_file(str(r["weights"]))
    assert r["weights"].endswith("tuned.monarch.safetensors") and state
