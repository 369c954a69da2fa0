"""An optimized model is an object users copy, pickle, save and move: ``copy.deepcopy`` gives an
independent model (its own weights, plans, switch, grid tracker), and ``pickle`` / ``torch.save``
round-trip it to a model that runs as the original did."""
import copy
import functools
import pickle
import warnings

import pytest
import torch

import vmonarch_opt
from vmonarch_fixtures import models
from conftest import rel_err
from handwritten_models import Einsum, Stack


OPTS = dict(methods=("monarch",), min_seq_len=0, budget=None)


def _out(model, batch):
    with torch.no_grad():
        return model(**batch)[0]


def _wan():
    model, batch = models.wan()
    return model, batch, vmonarch_opt.optimize(model, batch, **OPTS)


def _routed_modules(opt):
    return [opt.get_submodule(p) for p in opt.vmonarch.modules]


def _scale_attention_weights(opt, factor):
    """Change the weights of the modules whose attention is rewritten (in place)."""
    with torch.no_grad():
        for m in _routed_modules(opt):
            for p in m.parameters():
                p.mul_(factor)


def _twin(model, opt_copy):
    """The unoptimized ``model`` with ``opt_copy``'s weights."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(opt_copy.state_dict())
    return twin


def _optimized_twin(model, opt_copy, batch, **opts):
    """``model`` with ``opt_copy``'s weights, optimized afresh: what the copy must compute."""
    return vmonarch_opt.optimize(_twin(model, opt_copy), batch, **opts)


def _hook_owners(fn) -> set:
    """ids of the objects a hook function is bound to (a bound method's self, a partial's
    arguments, a closure's cells)."""
    if isinstance(fn, functools.partial):
        return _hook_owners(fn.func) | {id(a) for a in fn.args}
    if hasattr(fn, "__self__"):
        return {id(fn.__self__)}
    return {id(c.cell_contents) for c in (getattr(fn, "__closure__", None) or ())}


def _hooks(model) -> list:
    return [fn for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for fn in d.values()]


# ------------------------------------------------------------------------------------ deepcopy
def test_deepcopy_runs_its_own_weights():
    model, batch, opt = _wan()
    ref = _out(opt, batch)
    dup = copy.deepcopy(opt)
    assert torch.equal(_out(dup, batch), ref)
    # changed weights: the copy computes what optimizing a model with those weights computes
    _scale_attention_weights(dup, 1.5)
    twin_opt = _optimized_twin(model, dup, batch, **OPTS)
    assert dup.vmonarch.plans == twin_opt.vmonarch.plans
    assert torch.equal(_out(dup, batch), _out(twin_opt, batch))
    assert rel_err(_out(dup, batch), ref) > 1e-3
    # zeroed attention weights: the copy's output changes, the source's does not
    _scale_attention_weights(dup, 0.0)
    assert rel_err(_out(dup, batch), ref) > 1e-3
    assert torch.equal(_out(opt, batch), ref)
    for m in _routed_modules(opt):
        assert all(p.abs().sum() > 0 for p in m.parameters())


def test_deepcopy_changes_dtype_on_its_own():
    model, batch, opt = _wan()
    ref, own = _out(opt, batch), _out(model, batch)
    dup = copy.deepcopy(opt).to(torch.bfloat16)
    low = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vmonarch_opt", category=RuntimeWarning)  # no dense fallback
        out = _out(dup, low)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1.5e-2  # bf16 rounding of the same Monarch computation (about 6e-3)
    assert rel_err(out, own) > 2 * rel_err(out, ref)  # Monarch, not the model's own attention
    assert torch.equal(_out(opt, batch), ref)  # the source still runs in float32
    assert all(p.dtype == torch.float32 for p in opt.parameters())


def test_deepcopy_has_its_own_switch_plans_report_and_tracker():
    model, batch, opt = _wan()
    own, fast = _out(model, batch), _out(opt, batch)
    dup = copy.deepcopy(opt)
    st, ds = opt.vmonarch, dup.vmonarch
    assert ds is not st and ds.switch is not st.switch and ds.tracker is not st.tracker
    assert ds.plans == st.plans and ds.sites == st.sites
    assert dup.report is ds.report and dup.report is not opt.report and dup.report.data == opt.report.data
    assert all(rt.switch is ds.switch and rt.tracker is ds.tracker for rt in ds.runtimes.values())
    assert all(a is not b for a, b in zip(ds.runtimes.values(), st.runtimes.values()))
    # the switch of the copy switches the copy only
    vmonarch_opt.set_original_attention(dup)
    assert torch.equal(_out(dup, batch), own)
    assert torch.equal(_out(opt, batch), fast)
    with vmonarch_opt.set_original_attention(opt):
        vmonarch_opt.set_original_attention(dup, False)
        assert torch.equal(_out(dup, batch), fast)
        assert torch.equal(_out(opt, batch), own)
    assert torch.equal(_out(opt, batch), fast)
    # the hooks on the copy (grid tracker; context-parallel guards of its attention modules) are the
    # copy's, none the source's
    assert ds.tracker._model is dup
    hooks = _hooks(dup)
    assert len(hooks) == len(_hooks(opt)) > 0
    mine = {id(ds.tracker)} | {id(g) for g in ds.parallel.guards.values()}
    theirs = {id(st.tracker)} | {id(g) for g in st.parallel.guards.values()}
    assert all(g.module is dup.get_submodule(p) for p, g in ds.parallel.guards.items())
    for fn in hooks:
        owners = _hook_owners(fn)
        assert owners & mine and not owners & theirs, fn
    # restore() of the copy removes the copy's route and hooks, not the source's
    vmonarch_opt.restore(dup)
    assert not _hooks(dup) and "forward" not in vars(dup.get_submodule(st.modules[0]))
    assert torch.equal(_out(dup, batch), own)
    assert len(_hooks(opt)) == len(hooks) and torch.equal(_out(opt, batch), fast)


def test_deepcopy_follows_another_video_size_with_its_weights():
    model, batch, opt = _wan()
    _, other = models.wan(frames=2, height=5)
    dup = copy.deepcopy(opt)
    _scale_attention_weights(dup, 1.5)
    with pytest.warns(RuntimeWarning, match=r"token grid is now \(2, 5, 5\).*block \(1, 5, 5\)"):
        out = _out(dup, other)
    twin = _twin(model, dup)
    direct = vmonarch_opt.optimize(twin, other, **OPTS)  # the plans optimize() makes at that size
    assert rel_err(out, _out(direct, other)) < 1e-6
    assert rel_err(out, _out(twin, other)) > 1e-4  # Monarch ran, not the model's own attention


def test_deepcopy_of_a_compiled_copy_runs_its_weights():
    """torch.compile (fullgraph) of a copy: no graph break, the copy's weights."""
    model, batch, opt = _wan()
    dup = copy.deepcopy(opt)
    _scale_attention_weights(dup, 1.5)
    twin_opt = _optimized_twin(model, dup, batch, **OPTS)
    torch._dynamo.reset()
    comp = torch.compile(dup, backend="aot_eager", fullgraph=True)
    assert rel_err(_out(comp, batch), _out(twin_opt, batch)) < 1e-6


# ------------------------------------------------------------------------------ pickle / save
def _same_state(a, b):
    assert a.vmonarch.plans == b.vmonarch.plans
    assert a.vmonarch.sites == b.vmonarch.sites
    assert a.report.data == b.report.data and str(a.report) == str(b.report)
    assert a.vmonarch.modules == b.vmonarch.modules


def _check_loaded(loaded, model, opt, batch):
    """A model that came back from pickle runs like the source, on its own state."""
    _same_state(loaded, opt)
    assert torch.equal(_out(loaded, batch), _out(opt, batch))
    with vmonarch_opt.set_original_attention(loaded):
        assert torch.equal(_out(loaded, batch), _out(model, batch))
        assert not torch.equal(_out(opt, batch), _out(model, batch))  # the source still optimized


def test_pickle_round_trip():
    model, batch, opt = _wan()
    loaded = pickle.loads(pickle.dumps(opt))
    _check_loaded(loaded, model, opt, batch)
    _, other = models.wan(frames=2, height=5)
    with pytest.warns(RuntimeWarning, match=r"token grid is now \(2, 5, 5\)"):
        out = _out(loaded, other)
    with pytest.warns(RuntimeWarning, match=r"token grid is now \(2, 5, 5\)"):
        assert torch.equal(out, _out(opt, other))
    assert loaded.vmonarch.tracker._model is loaded
    assert all(rt.switch is loaded.vmonarch.switch for rt in loaded.vmonarch.runtimes.values())


def test_torch_save_and_load_round_trip(tmp_path):
    model, batch, opt = _wan()
    path = tmp_path / "opt.pt"
    torch.save(opt, path)
    loaded = torch.load(path, weights_only=False)
    _check_loaded(loaded, model, opt, batch)
    torch._dynamo.reset()
    comp = torch.compile(loaded, backend="aot_eager", fullgraph=True)
    assert rel_err(_out(comp, batch), _out(opt, batch)) < 1e-6


def test_a_pickled_copy_of_a_model_optimized_in_place_can_be_restored():
    model, batch = models.wan()
    own = _out(model, batch)
    vmonarch_opt.optimize(model, batch, inplace=True, **OPTS)
    fast = _out(model, batch)
    loaded = pickle.loads(pickle.dumps(model))
    assert torch.equal(_out(loaded, batch), fast)
    vmonarch_opt.restore(loaded)
    assert torch.equal(_out(loaded, batch), own) and not _hooks(loaded)
    assert not any("forward" in vars(m) for m in loaded.modules())
    assert torch.equal(_out(model, batch), fast)  # the source stays optimized


# ------------------------------------------------------------------------- hand-written attention
@pytest.fixture
def handwritten():
    torch.manual_seed(1)
    model = Stack(Einsum).eval()
    x = torch.randn(2, 48, 32)
    opts = dict(methods=("vmoba",), min_seq_len=0, grid=(3, 4, 4), budget=None)
    opt = vmonarch_opt.optimize(model, x, **opts)
    assert all(r["plan"]["method"] == "vmoba" and r["site"]["form"] == "handwritten" for r in opt.report.rows)
    return model, x, opt, opts


def test_handwritten_deepcopy_runs_its_own_weights_and_dtype(handwritten):
    model, x, opt, opts = handwritten
    with torch.no_grad():
        ref = opt(x)
        dup = copy.deepcopy(opt)
        assert torch.equal(dup(x), ref)
        _scale_attention_weights(dup, 1.5)
        twin_opt = _optimized_twin(model, dup, (x,), **opts)
        # the same VMoBA arguments (the measured density differs: it depends on the weights)
        assert ({s: (p.method, p.args) for s, p in dup.vmonarch.plans.items()}
                == {s: (p.method, p.args) for s, p in twin_opt.vmonarch.plans.items()})
        assert torch.equal(dup(x), twin_opt(x))
        assert rel_err(dup(x), ref) > 1e-3
        assert torch.equal(opt(x), ref)
        # float64: the traced graph was made for float32 calls, so the copy runs its module's own
        # code, in float64, with its own weights
        twin = _twin(model, dup)
        dup.double()
        out = dup(x.double())
        assert out.dtype == torch.float64
        assert torch.equal(out, twin.double()(x.double()))
        assert torch.equal(opt(x), ref)


def test_handwritten_switch_pickle_and_save_round_trip(handwritten, tmp_path):
    model, x, opt, _ = handwritten
    with torch.no_grad():
        ref, own = opt(x), model(x)
        with vmonarch_opt.set_original_attention(opt):
            dense = opt(x)  # the normalised graph's SDPA in place of the hand-written softmax
        assert rel_err(dense, own) < 1e-5 and rel_err(ref, own) > 1e-3
        dup = copy.deepcopy(opt)
        with vmonarch_opt.set_original_attention(dup):
            assert torch.equal(dup(x), dense)
            assert torch.equal(opt(x), ref)
        copies = (lambda: pickle.loads(pickle.dumps(opt)), lambda: _saved_and_loaded(opt, tmp_path / "hw.pt"))
        for loaded in (make() for make in copies):  # each made when reached: its call counts are opt's
            _same_state(loaded, opt)
            assert torch.equal(loaded(x), ref)
            assert set(loaded.vmonarch.normalized) == set(opt.vmonarch.normalized)
            with vmonarch_opt.set_original_attention(loaded):
                assert torch.equal(loaded(x), dense)
            assert torch.equal(opt(x), ref)
    torch._dynamo.reset()
    with torch.no_grad():
        assert rel_err(torch.compile(loaded, backend="aot_eager", fullgraph=True)(x), ref) < 1e-6


def _saved_and_loaded(model, path):
    torch.save(model, path)
    return torch.load(path, weights_only=False)
