"""What the report says is what runs: call counters, NaN never hidden, FLOPs say how they were
obtained, attention that detection does not recognise is named."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import vmonarch_opt
from handwritten_models import SdpaForms, Stack, _Base
from vmonarch_fixtures import models
from vmonarch_opt import CalibrationBatchError
from vmonarch_opt.metrics import rel_error


def _stack(n=60):
    torch.manual_seed(0)
    return Stack(SdpaForms).eval(), torch.randn(1, n, 32)


# ------------------------------------------------------------------------------ call counters
def test_calls_that_ran_and_fell_back_are_counted_with_their_reason():
    model, x = _stack()
    opt = vmonarch_opt.optimize(model, x, methods=("monarch",), grid=(3, 4, 5), min_seq_len=0, budget=None)
    assert {s: c["ran"] for s, c in vmonarch_opt.stats(opt).items()} == {
        "blocks.0.attn#0": 0, "blocks.0.attn#1": 0, "blocks.1.attn#0": 0, "blocks.1.attn#1": 0}
    with torch.no_grad():
        opt(x)
        opt(x)
        with pytest.warns(RuntimeWarning, match="differs from the calibrated"):
            opt(torch.randn(1, 40, 32))  # another length, and the grid was given: nothing to follow
        with vmonarch_opt.set_original_attention(opt):
            opt(x)
    for sid, c in vmonarch_opt.stats(opt).items():
        assert c["ran"] == 2 and c["fell_back"] == {"shape": 1, "switched": 1}, sid
        assert "differs from the calibrated" in c["why"]["shape"]
    text = str(opt.report)
    assert text.count(" 2/2 ") == 4
    assert all("fell back to the model's own attention: 1× shape (N_q=40" in opt.report.why(sid)
               for sid in vmonarch_opt.stats(opt))
    assert "calls since optimize(): 8 ran our kernels, 8 fell back" in text
    data = opt.report.data
    assert data["totals"]["calls"] == {"ran": 8, "fell_back": 8}
    assert data["rows"][0]["calls"]["fell_back"] == {"shape": 1, "switched": 1}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_calls_are_counted_under_torch_compile_without_graph_breaks(backend):
    model, batch = models.wan()
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    compiled = torch.compile(opt, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        for _ in range(3):
            out = compiled(**batch)
        ref = opt(**batch)
    assert rel_error(out, ref) < 1e-4
    counts = vmonarch_opt.stats(opt)
    assert counts and all(c == {"ran": 4, "fell_back": {}, "why": {}} for c in counts.values())


def test_validation_does_not_claim_a_site_whose_call_fell_back(monkeypatch):
    """A padding-shaped mask that turns out not to be a padding pattern: the call runs the model's
    own attention, and the report must say so (it used to say the method ran)."""
    import vmonarch_opt.runtime as runtime

    model, batch = models.hunyuan15(pad=1)
    monkeypatch.setattr(runtime, "run_key_padded", lambda *a, **k: None)  # "not a padding pattern"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    joint = [r for r in opt.report.rows if r["site"]["kind"] == "joint"]
    assert joint and all(r["plan"]["method"] == "original" for r in joint)
    assert all("fell back to the model's own attention (its mask is not a padding mask" in r["plan"]["reason"]
               for r in joint)


# ------------------------------------------------------------------------------ NaN never hidden
def test_rel_error_counts_nan_and_inf_as_infinite_and_none_as_unmeasurable():
    x = torch.randn(4, 5)
    assert rel_error(x, x) == 0.0
    assert rel_error(x * float("nan"), x) == math.inf
    assert rel_error(x, x * float("inf")) == math.inf
    assert rel_error({"sample": x + 1e-3}, {"sample": x}) == pytest.approx(1e-3 * 20 ** 0.5 / x.norm().item(), rel=1e-4)
    assert rel_error("not", "tensors") is None


def test_a_nan_output_is_reported_as_infinite_error_not_zero(monkeypatch):
    import vmonarch_opt.runtime as runtime

    real = runtime.call_method
    monkeypatch.setattr(runtime, "call_method", lambda *a: real(*a) * float("nan"))
    model, x = _stack()
    opt = vmonarch_opt.optimize(model, x, methods=("monarch",), grid=(3, 4, 5), min_seq_len=0, budget=None)
    assert all(r["error"] == math.inf for r in opt.report.rows)
    assert opt.report.totals["output_error"] == math.inf
    assert "inf" in str(opt.report)


def test_nan_or_inf_in_the_calibration_batch_is_refused_naming_the_input():
    model, batch = models.wan()
    bad = dict(batch)
    bad["hidden_states"] = batch["hidden_states"].clone()
    bad["hidden_states"][0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(CalibrationBatchError, match=r"NaN in input 'hidden_states' at position \(0, 1, 2, 3, 4\)"):
        vmonarch_opt.optimize(model, bad)
    bad["hidden_states"][0, 1, 2, 3, 4] = float("inf")
    with pytest.raises(CalibrationBatchError, match="Inf in batch 1, input 'hidden_states'"):
        vmonarch_opt.calibrate(model, [batch, bad])


# ------------------------------------------------------------------------------ FLOPs
def test_flops_not_known_show_as_unknown_and_the_legend_says_how_flops_are_obtained():
    model, batch = models.wan()
    opt = vmonarch_opt.optimize(model, batch, methods=("vmoba",), min_seq_len=0, budget=None, validate=False)
    rows = [r for r in opt.report.table_rows() if r[4] == "vmoba"]
    assert rows and all(r[6].endswith("→?") and r[7] == "?" for r in rows)
    assert opt.report.totals["flops_after"] is None and opt.report.totals["flop_cut"] is None
    text = str(opt.report)
    assert "(? fewer)" in text and "vmoba: measured: the block selection on the calibration batch" in text
    measured = vmonarch_opt.optimize(model, batch, methods=("vmoba", "monarch"), min_seq_len=0, budget=None,
                                     overrides={"blocks.0.*": "monarch"})
    assert "monarch: analytic: counted from the plan" in str(measured.report)
    assert all(r["plan"]["flops_after"] for r in measured.report.rows)


def test_vmoba_flops_from_its_density_count_the_pooled_keys():
    from vmonarch_opt.kernels.dispatch import vmoba_select
    from vmonarch_opt.kernels.vmoba.reference import vmoba_flops
    from vmonarch_opt.methods import Shape, get

    q, k = torch.randn(2, 3, 4 + 120 + 3, 16), torch.randn(2, 3, 4 + 120 + 3, 16)
    args = dict(grid=[4, 5, 6], chunk=[2, 3, 3], text_before=4, text_after=3, partition="3d", threshold=0.3,
                topk=0, pooled_rest=True)
    sel = vmoba_select(q, k, grid=(4, 5, 6), chunk=(2, 3, 3), text_before=4, text_after=3, threshold=0.3)
    shape = Shape(2, 3, q.shape[2], k.shape[2], 16)
    assert get("vmoba").flops(shape, args, sel.density) == vmoba_flops(sel, 16, pooled_rest=True)
    assert get("vmoba").flops(shape, {**args, "pooled_rest": False}, sel.density) == vmoba_flops(sel, 16)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("grid,block,tb,ta", [((3, 4, 6), (1, 4, 6), 5, 0), ((4, 6, 5), (2, 3, 5), 2, 7)])
def test_monarch_flop_count_equals_what_the_reference_computes(grid, block, tb, ta):
    from vmonarch_opt.kernels.monarch.reference import monarch_attention_reference, monarch_flops

    n = tb + math.prod(grid) + ta
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    for steps in (1, 2):
        counted = _counted(lambda: monarch_attention_reference(q, k, v, grid=grid, block=block, text_before=tb,
                                                               text_after=ta, steps=steps))
        assert counted == monarch_flops(2, 3, n, 16, grid=grid, block=block, text_before=tb, text_after=ta,
                                        steps=steps)


@pytest.mark.parametrize("grid,chunk,tb,ta", [((3, 4, 6), (1, 2, 3), 5, 0), ((4, 6, 5), (2, 3, 5), 2, 7)])
def test_vmoba_flop_count_equals_what_the_reference_computes(grid, chunk, tb, ta):
    """With every block selected the reference computes every pair (plus one pooled key per block
    with the pooled rest): the analytic count must match it exactly."""
    from vmonarch_opt.kernels.dispatch import vmoba_select
    from vmonarch_opt.kernels.vmoba.reference import vmoba_attention_from_selection, vmoba_flops

    n = tb + math.prod(grid) + ta
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    sel = vmoba_select(q, k, grid=grid, chunk=chunk, text_before=tb, text_after=ta, threshold=1.0)
    for pooled in (False, True):
        counted = _counted(lambda: vmoba_attention_from_selection(q, k, v, sel, 0.25, pooled_rest=pooled))
        assert counted == vmoba_flops(sel, 16, pooled_rest=pooled)


# ------------------------------------------------------------------------------ never silent
class TwoBiases(_Base):
    """softmax(q·kᵀ·s + rel_bias + mask) · v: two additive terms, a form detection does not rewrite."""

    def __init__(self, dim=32, heads=2, n=60):
        super().__init__(dim, heads)
        self.rel = nn.Parameter(torch.randn(heads, n, n) * 0.1)

    def forward(self, x):
        q, k, v = self.split(x)
        s = (q @ k.transpose(-2, -1)) * self.d ** -0.5 + self.rel + torch.zeros(1, 1, 1, x.shape[1])
        return self.merge(torch.softmax(s, dim=-1) @ v)


def test_attention_in_a_form_detection_does_not_know_is_named():
    model, x = Stack(TwoBiases).eval(), torch.randn(1, 60, 32)
    with pytest.warns(RuntimeWarning, match="form that detection does not recognise.*blocks.0.attn"):
        opt = vmonarch_opt.optimize(model, x, min_seq_len=0)
    assert opt.report.data["meta"]["unrecognised"]["softmaxes"] == {"blocks.0.attn": 1, "blocks.1.attn": 1}
    assert "not optimized: attention written in a form that detection does not recognise" in str(opt.report)


def test_a_model_without_attention_says_so():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    with pytest.warns(RuntimeWarning, match="0 attention sites found in Sequential"):
        opt = vmonarch_opt.optimize(model, torch.randn(2, 8))
    assert opt.report.rows == []


def test_a_hand_written_site_called_unlike_when_traced_warns_once_and_is_counted():
    from handwritten_models import MulScale

    torch.manual_seed(0)
    model, x = Stack(MulScale).eval(), torch.randn(1, 60, 32)
    opt = vmonarch_opt.optimize(model, x, methods=("monarch",), grid=(3, 4, 5), min_seq_len=0, budget=None)
    with torch.no_grad():
        opt(x)
        opt.double()  # optimized in float32, now run in float64: the traced graph does not apply
        with pytest.warns(RuntimeWarning, match="called unlike when traced.*float64"):
            out = opt(x.double())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per site and reason
            opt(x.double())
        expected = model.double()(x.double())
    assert torch.equal(out, expected)  # the module's own code ran
    for sid, c in vmonarch_opt.stats(opt).items():
        assert c["ran"] == 1 and c["fell_back"] == {"handwritten": 2}, sid
        assert "float64" in c["why"]["handwritten"]
    assert all("2× the hand-written attention was called unlike when traced" in opt.report.why(sid)
               for sid in vmonarch_opt.stats(opt))


def test_the_speed_line_times_the_original_model_without_our_hooks(monkeypatch):
    """The 'original' forward of the report's timing runs nothing of ours: no site handler, no grid
    hook (it used to run through the interception layer with the switch flipped)."""
    import vmonarch_opt.pipeline as pipeline
    import vmonarch_opt.runtime as runtime
    from vmonarch_opt.passes.regrid import GridTracker

    calls = {"run_site": 0, "grid": 0}
    real_run, real_call = runtime.run_site, GridTracker._on_call

    def run_site(*a):
        calls["run_site"] += 1
        return real_run(*a)

    def on_call(self, *a):
        calls["grid"] += 1
        return real_call(self, *a)

    monkeypatch.setattr(runtime, "run_site", run_site)
    monkeypatch.setattr(GridTracker, "_on_call", on_call)
    monkeypatch.setattr(pipeline, "on_cuda", lambda b: True)  # the timing path, with CPU clocks
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(pipeline, "SLOW_FORWARD_MS", float("inf"))  # 3 timed forwards however loaded the CPU
    model, batch = models.wan()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    assert set(opt.report.totals["forward_ms"]) == {"original", "optimized"}
    # 4 routed sites (2 rewritten, 2 cross-attentions left as they are); validation: 1 forward,
    # optimized timing: 4 timed forwards + 1 profiled (GPU busy fraction); original timing: none
    assert calls == {"run_site": 4 + 16 + 4, "grid": 5}
    with torch.no_grad():  # routing and hooks are back after timing
        opt(**batch)
    assert calls == {"run_site": 24 + 4, "grid": 6}
    assert all(c["ran"] == 1 for c in vmonarch_opt.stats(opt).values())  # timing calls are not counted


def test_optimize_reports_its_stages_through_logging(caplog):
    import logging

    model, x = _stack()
    with caplog.at_level(logging.INFO, logger="vmonarch_opt"):
        vmonarch_opt.optimize(model, x, methods=("monarch",), grid=(3, 4, 5), min_seq_len=0)
    done = [r.getMessage() for r in caplog.records if " done in " in r.getMessage()]
    assert [m.split(": ")[2].split(" done")[0] for m in done] == ["analyse", "plan", "calibrate", "validate",
                                                                  "apply", "time"]
    assert all(m.startswith("vmonarch_opt: Stack: ") for m in done)


def test_calibrate_names_what_it_could_not_see_like_optimize():
    model, x = Stack(TwoBiases).eval(), torch.randn(1, 60, 32)
    with pytest.warns(RuntimeWarning, match="form that detection does not recognise.*blocks.0.attn"):
        vmonarch_opt.calibrate(model, x, min_seq_len=0, progress=False)
    with pytest.warns(RuntimeWarning, match="0 attention sites found in Sequential"):
        vmonarch_opt.calibrate(nn.Sequential(nn.Linear(8, 8)), torch.randn(2, 8), progress=False)
