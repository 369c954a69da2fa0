"""Deployment: torch.compile (fullgraph, inductor), torch.export (+ save/load) and ONNX export of
optimized models; the ONNX lowerings of the ops against the references."""
import io
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import vmonarch_opt
from vmonarch_fixtures import models
from vmonarch_opt.deploy import OnnxExportError, export_onnx
from vmonarch_opt.deploy.lowering import dense_lowered, monarch_lowered, vmoba_lowered
from vmonarch_opt.kernels.monarch.reference import monarch_attention_reference
from vmonarch_opt.kernels.vmoba.reference import vmoba_attention_reference
from conftest import rel_err
from handwritten_models import Einsum, MulScale, SdpaForms, Stack

import onnx  # noqa: E402  (the [test] extra: a missing package fails, never skips)
import onnxruntime as ort  # noqa: E402
import onnxscript  # noqa: E402,F401

VM_OPS = ("vmonarch.monarch_attention", "vmonarch.vmoba_attention", "vmonarch.dense_attention")


def _qkv(b, h, n, d, scale=1.0):
    return [torch.randn(b, h, n, d) * scale for _ in range(3)]


# ------------------------------------------------------------------------------ lowerings vs refs
MONARCH_CASES = [  # grid, block, text_before, text_after, steps, recompute
    ((3, 4, 5), (1, 4, 5), 0, 0, 1, False),    # frame blocks
    ((3, 4, 5), (2, 3, 2), 2, 3, 2, False),    # partial tiles on every axis, text on both sides
    ((3, 4, 5), (2, 3, 2), 0, 4, 3, True),     # recompute
    ((1, 1, 17), (1, 1, 5), 3, 0, 1, False),   # 1D blocks with padding
    ((2, 5, 3), (2, 5, 3), 3, 0, 1, False),    # one block: dense
    ((4, 3, 3), (1, 2, 2), 0, 0, 4, True),
]


@pytest.mark.parametrize("grid,block,tb,ta,steps,recompute", MONARCH_CASES)
def test_monarch_lowering_matches_reference(grid, block, tb, ta, steps, recompute):
    n = tb + ta + grid[0] * grid[1] * grid[2]
    q, k, v = _qkv(2, 3, n, 24, scale=2.0)
    kw = dict(grid=grid, block=block, text_before=tb, text_after=ta, steps=steps, scale=0.3, recompute=recompute)
    assert rel_err(monarch_lowered(q, k, v, **kw), monarch_attention_reference(q, k, v, **kw)) < 1e-5


VMOBA_CASES = [  # grid, chunk, text_before, text_after, partition, threshold, topk
    ((3, 4, 5), (2, 2, 2), 0, 0, "3d", 0.25, 0),
    ((3, 4, 5), (2, 2, 3), 2, 3, "1d", 0.5, 0),
    ((3, 4, 5), (1, 2, 2), 2, 0, "2d", 0.1, 0),
    ((3, 4, 5), (2, 2, 2), 0, 3, "3d", 0.25, 2),   # global top-k
    ((3, 4, 5), (2, 2, 2), 0, 3, "3d", 1.0, 0),    # everything kept: dense
    ((2, 14, 10), (2, 7, 10), 1, 0, "3d", 0.3, 0),  # 140-token blocks: two query groups per block
]


@pytest.mark.parametrize("grid,chunk,tb,ta,partition,threshold,topk", VMOBA_CASES)
def test_vmoba_lowering_matches_reference(grid, chunk, tb, ta, partition, threshold, topk):
    n = tb + ta + grid[0] * grid[1] * grid[2]
    q, k, v = _qkv(2, 2, n, 16)
    kw = dict(grid=grid, chunk=chunk, text_before=tb, text_after=ta, partition=partition, threshold=threshold,
              topk=topk, scale=0.3)
    assert rel_err(vmoba_lowered(q, k, v, **kw), vmoba_attention_reference(q, k, v, **kw)) < 1e-5
    kw["pooled_rest"] = True
    assert rel_err(vmoba_lowered(q, k, v, **kw), vmoba_attention_reference(q, k, v, **kw)) < 1e-5


@pytest.mark.parametrize("method", ["monarch", "vmoba", "dense"])
def test_lowering_key_mask_equals_dropping_the_padded_text(method):
    """key_valid=False on text keys == running the reference on the sequence without them (what
    passes/keypad.py does at run time); padded text queries attend densely to the valid keys."""
    grid, tb, ta = (2, 3, 4), 3, 4
    n = tb + 24 + ta
    q, k, v = _qkv(2, 2, n, 16)
    key_valid = torch.ones(2, n, dtype=torch.bool)
    key_valid[0, 1:tb] = False          # element 0: 2 of 3 leading text tokens padded
    key_valid[1, n - 3:] = False        # element 1: 3 of 4 trailing text tokens padded
    if method == "monarch":
        fn, ref = monarch_lowered, monarch_attention_reference
        cfg = dict(grid=grid, block=(1, 3, 4), steps=2, scale=0.25)
    elif method == "vmoba":
        fn, ref = vmoba_lowered, vmoba_attention_reference
        cfg = dict(grid=grid, chunk=(1, 2, 2), partition="3d", threshold=0.3, scale=0.25)
    else:
        fn = lambda q, k, v, text_before, text_after, key_valid=None, **_: dense_lowered(q, k, v, 0.25, key_valid)  # noqa: E731
        ref = lambda q, k, v, **_: F.scaled_dot_product_attention(q, k, v, scale=0.25)  # noqa: E731
        cfg = {}
    out = fn(q, k, v, text_before=tb, text_after=ta, key_valid=key_valid, **cfg)
    for i in range(2):
        keep = key_valid[i].nonzero().squeeze(-1)
        drop = (~key_valid[i]).nonzero().squeeze(-1)
        ntb, nta = int(key_valid[i, :tb].sum()), int(key_valid[i, tb + 24:].sum())
        qi, ki, vi = (t[i:i + 1, :, keep] for t in (q, k, v))
        want = ref(qi, ki, vi, text_before=ntb, text_after=nta, **cfg)
        assert rel_err(out[i:i + 1, :, keep], want) < 1e-5
        padded = F.scaled_dot_product_attention(q[i:i + 1, :, drop], ki, vi, scale=0.25)
        assert rel_err(out[i:i + 1, :, drop], padded) < 1e-5


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def wan_monarch():
    model, batch = models.wan()
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    with torch.no_grad():
        ref = opt(**batch)[0]
    return opt, batch, ref


@pytest.fixture(scope="module")
def handwritten_vmoba():
    torch.manual_seed(1)
    model = Stack(Einsum, depth=1).eval()
    x = torch.randn(2, 48, 32)
    opt = vmonarch_opt.optimize(model, x, methods=("vmoba",), min_seq_len=0, grid=(3, 4, 4), budget=None)
    return opt, x


def _vm_nodes(graph) -> Counter:
    return Counter(str(n.target).replace(".default", "") for n in graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("vmonarch."))


# -------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("which", ["monarch", "vmoba", "dense"])
def test_op_fake_strides_match_real_on_transposed_inputs(which):
    """Compiled graphs trust the fake implementation's strides (inductor asserts them, AOT views
    with them): with q/k/v transposed views, as models pass them, fake and real must agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # q as models pass it: a transposed [B, N, H, D] view; also a padded one (a slice of a wider
    # projection, as inductor may pad buffers), a contiguous one and one head
    layouts = [lambda: torch.randn(1, 24, 2, 16).transpose(1, 2),
               lambda: torch.randn(1, 24, 2, 24)[..., :16].transpose(1, 2),
               lambda: torch.randn(1, 2, 24, 16), lambda: torch.randn(1, 24, 1, 16).transpose(1, 2)]
    q, k, v = (layouts[0]() for _ in range(3))
    if which == "monarch":
        op, args = torch.ops.vmonarch.monarch_attention, ([2, 3, 4], [1, 3, 4], 0, 0, 1, 0.25, False)
    elif which == "vmoba":
        op, args = torch.ops.vmonarch.vmoba_attention, ([2, 3, 4], [1, 2, 2], 0, 0, "3d", 0.5, 0, 0.25)
    else:
        op, args = torch.ops.vmonarch.dense_attention, (0.25,)
    real = op(q, k, v, *args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) for t in (q, k, v)), *args)
    assert fake.shape == real.shape and fake.stride() == real.stride(), (fake.stride(), real.stride())
    # q's layout, as torch's SDPA returns: the model's transpose back to [B, N, H, D] is free
    assert real.transpose(1, 2).is_contiguous()
    assert op(q.contiguous(), k, v, *args).is_contiguous()
    for make in layouts[1:]:
        q2, k2, v2 = make(), make(), make()
        real = op(q2, k2, v2, *args)
        with FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(t) for t in (q2, k2, v2)), *args)
        assert fake.stride() == real.stride(), (q2.stride(), fake.stride(), real.stride())


def test_compile_fullgraph_diffusers_wan_keeps_our_ops(wan_monarch):
    opt, batch, ref = wan_monarch
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)  # fake-tensor tracing of our ops included

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(opt, backend=backend, fullgraph=True)(**batch)[0]
    assert len(graphs) == 1  # fullgraph: no graph break
    assert _vm_nodes(graphs[0].graph) == Counter({"vmonarch.monarch_attention": 2})
    assert rel_err(out, ref) < 1e-5


def test_compile_inductor_diffusers_wan_at_two_video_sizes(wan_monarch):
    """Inductor, fullgraph, diffusers Wan: our ops get exactly the strides they were traced with
    (their outputs follow q's layout), and at another video size the compiled model runs the
    plans re-derived for the new token grid, like the eager model (no graph break, no error)."""
    opt, batch, ref = wan_monarch
    _, other = models.wan(frames=2, height=5)
    torch._dynamo.reset()
    comp = torch.compile(opt, backend="inductor", fullgraph=True)
    with torch.no_grad():
        out = comp(**batch)[0]
        out_other = comp(**other)[0]
        with pytest.warns(RuntimeWarning, match=r"token grid is now \(2, 5, 5\)"):
            want_other = opt(**other)[0]
        dense_other = models.wan()[0](**other)[0]  # the same seeded model, not optimized
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out_other, want_other) < 1e-5
    assert rel_err(out_other, dense_other) > 1e-4  # Monarch ran at the new size


def test_compile_inductor_handwritten_model(handwritten_vmoba):
    """Inductor, fullgraph: the normalised hand-written attention runs our op; same output."""
    opt, x = handwritten_vmoba
    from torch._inductor.compile_fx import compile_fx

    seen = Counter()

    def backend(gm, example_inputs):
        seen.update(_vm_nodes(gm.graph))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        ref = opt(x)
        out = torch.compile(opt, backend=backend, fullgraph=True)(x)
    assert seen == Counter({"vmonarch.vmoba_attention": 1})
    assert rel_err(out, ref) < 1e-5


def test_compile_with_gradients_matches_eager():
    """Fine-tuning path: compiled forward + backward through the ops' autograd (recomputed reference)."""
    torch.manual_seed(2)
    model = Stack(MulScale)
    x = torch.randn(2, 30, 32)
    opt = vmonarch_opt.optimize(model, x, methods=("monarch",), min_seq_len=0, grid=(2, 3, 5), budget=None)
    opt.train()

    def grads(fn):
        opt.zero_grad()
        fn(x).square().mean().backward()
        return [p.grad.clone() for p in opt.parameters()]

    want = grads(opt)
    torch._dynamo.reset()
    got = grads(torch.compile(opt, backend="aot_eager", fullgraph=True))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4


# --------------------------------------------------------------------------------- torch.export
def test_export_contains_our_ops_and_round_trips(wan_monarch):
    opt, batch, ref = wan_monarch
    ep = torch.export.export(opt, (), batch)
    assert _vm_nodes(ep.graph) == Counter({"vmonarch.monarch_attention": 2})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert _vm_nodes(loaded.graph) == Counter({"vmonarch.monarch_attention": 2})
    with torch.no_grad():
        out = loaded.module()(**batch)[0]
    assert rel_err(out, ref) < 1e-5


# ----------------------------------------------------------------------------------------- ONNX
def _ort_outputs(path, inputs):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), tensors)})


def _check_graph(path, must_have):
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ops = Counter(n.op_type for n in m.graph.node)
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node), "non-standard ONNX op in the graph"
    for op in must_have:
        assert ops[op] > 0, (op, ops)
    return ops


def test_onnx_wan_monarch(wan_monarch, tmp_path):
    opt, batch, ref = wan_monarch
    path = str(tmp_path / "wan.onnx")
    res = export_onnx(opt, batch, path)
    assert [s["site"] for s in res.sites] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert all(s["method"] == "monarch" for s in res.sites)
    assert res.max_rel_error < 1e-5
    _check_graph(path, ["MatMul", "Softmax", "Log", "Transpose"])
    (got,) = _ort_outputs(path, [batch[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")])
    assert rel_err(torch.from_numpy(got), ref) < 1e-5
    assert "blocks.0.attn1" in str(res)


def test_onnx_cogvideox_vmoba_with_text_tokens_dynamic_batch(tmp_path):
    model, batch = models.cogvideox(batch=2)
    opt = vmonarch_opt.optimize(model, batch, methods=("vmoba",), min_seq_len=0, budget=None)
    rows = [r for r in opt.report.rows if r["plan"]["method"] == "vmoba"]
    assert len(rows) == 2 and rows[0]["site"]["text_before"] == 7
    with torch.no_grad():
        ref = opt(**batch)[0]
        dense = model(**batch)[0]
    assert rel_err(ref, dense) > 1e-3  # really sparse: not the dense answer
    path = str(tmp_path / "cog.onnx")
    res = export_onnx(opt, batch, path, dynamic_batch=True)
    assert len(res.sites) == 2 and res.max_rel_error < 1e-5
    _check_graph(path, ["TopK", "CumSum", "ArgMax", "Softmax", "MatMul"])
    names = ("hidden_states", "encoder_hidden_states", "timestep")
    (got,) = _ort_outputs(path, [batch[k] for k in names])
    assert rel_err(torch.from_numpy(got), ref) < 1e-5
    one = {k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}  # batch of 1 at run time
    with torch.no_grad():
        want = opt(**one)[0]
    (got,) = _ort_outputs(path, [one[k] for k in names])
    assert got.shape[0] == 1 and rel_err(torch.from_numpy(got), want) < 1e-5


def test_onnx_hunyuan_text_padding_mask_in_graph(tmp_path):
    """Joint attention with a text key-padding mask: the mask is handled in the graph, so other
    prompts' padding at run time still matches PyTorch."""
    model, batch = models.hunyuan(batch=2)
    batch["encoder_attention_mask"][0, 4:] = 0
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    path = str(tmp_path / "hy.onnx")
    res = export_onnx(opt, batch, path)
    assert len(res.sites) == 2 and all("key-padding" in s["lowered"] for s in res.sites)
    other = dict(batch, encoder_attention_mask=torch.ones(2, 7))
    other["encoder_attention_mask"][1, 2:] = 0
    with torch.no_grad():
        want = opt(**other)[0]
    got = _ort_outputs(path, list(other.values()))[0]
    assert rel_err(torch.from_numpy(got), want) < 1e-5


@pytest.mark.parametrize("cls,method", [(MulScale, "monarch"), (SdpaForms, "dense")])
def test_onnx_handwritten(cls, method, tmp_path):
    torch.manual_seed(3)
    model = Stack(cls).eval()
    x = torch.randn(2, 40, 32)
    opt = vmonarch_opt.optimize(model, x, methods=(method,), min_seq_len=0, budget=None)
    n_sites = 4 if cls is SdpaForms else 2
    assert sum(r["plan"]["method"] == method for r in opt.report.rows) == n_sites
    path = str(tmp_path / "hw.onnx")
    res = export_onnx(opt, x, path)
    assert len(res.sites) == n_sites
    with torch.no_grad():
        ref = opt(x)
    (got,) = _ort_outputs(path, [x])
    assert rel_err(torch.from_numpy(got), ref) < 1e-5


def test_onnx_unsupported_site_names_it(wan_monarch, handwritten_vmoba, tmp_path):
    opt, _, _ = wan_monarch
    _, other = models.wan(frames=2)  # not the shape the sites were optimized for
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the eager reference run falls back, and warns
        with pytest.raises(OnnxExportError, match=r"site blocks\.0\.attn1 \(monarch\).*differs from the calibrated"):
            export_onnx(opt, other, str(tmp_path / "bad.onnx"))
        # strict=False exports such a site as the model's own attention, and says so
        hw, x = handwritten_vmoba
        res = export_onnx(hw, x[:, :40], str(tmp_path / "fallback.onnx"), strict=False)
    assert [s["site"] for s in res.sites] == ["blocks.0.attn"]
    assert "model's own attention" in res.sites[0]["lowered"] and res.max_rel_error < 1e-5


def test_onnx_vmoba_pooled_rest(tmp_path):
    """VMoBA with the pooled rest lowers to ONNX: onnxruntime matches the optimized model."""
    torch.manual_seed(1)
    model = Stack(Einsum, depth=1).eval()
    x = torch.randn(2, 48, 32)
    cfg = vmonarch_opt.VMoBAConfig(topk=2, pooled_rest=True)
    opt = vmonarch_opt.optimize(model, x, methods=("vmoba",), overrides={"*": cfg}, min_seq_len=0,
                                grid=(3, 4, 4), budget=None)
    assert "pooled" in str(opt.report)
    path = str(tmp_path / "pooled.onnx")
    res = export_onnx(opt, x, path)
    assert [s["site"] for s in res.sites] == ["blocks.0.attn"] and res.max_rel_error < 1e-5
    with torch.no_grad():
        ref = opt(x)
    (got,) = _ort_outputs(path, [x])
    assert rel_err(torch.from_numpy(got), ref) < 1e-5


def test_export_onnx_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export_onnx(lambda x: x, torch.zeros(1), str(tmp_path / "x.onnx"))
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(torch.nn.Linear(2, 2), 3, str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="batch >= 2"):
        export_onnx(torch.nn.Linear(2, 2), torch.zeros(1, 2), str(tmp_path / "x.onnx"), dynamic_batch=True)


# ------------------------------------------------------------------------------------------ CLI
def tiny_factory(depth: int = 1):
    """(model, example_inputs) for the CLI test: vmonarch-opt export-onnx test_deploy:tiny_factory."""
    torch.manual_seed(4)
    return Stack(MulScale, depth=depth).eval(), torch.randn(1, 36, 32)


def test_cli_export_onnx(tmp_path, capsys):
    from vmonarch_opt.cli import main

    out = tmp_path / "cli.onnx"
    rc = main(["export-onnx", "test_deploy:tiny_factory", "--kwargs", '{"depth": 2}', "--methods", "monarch",
               "--no-calibrate", "--min-seq-len", "0", "-o", str(out), "--report", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists() and (tmp_path / "r.json").exists()
    assert "blocks.1.attn: monarch" in text and "onnxruntime vs PyTorch" in text
    onnx.checker.check_model(str(out))
    with pytest.raises(SystemExit, match="MODULE:FUNCTION"):
        main(["export-onnx", "no_colon_here", "-o", str(out)])
    with pytest.raises(SystemExit, match="no attribute"):
        main(["export-onnx", "test_deploy:nope", "-o", str(out)])


def test_cli_export_onnx_with_profile(tmp_path, capsys):
    """A calibration profile's per-site choices are what gets exported."""
    from vmonarch_opt import profiles
    from vmonarch_opt.cli import main

    model, x = tiny_factory(depth=2)
    prof = profiles.calibrate(model, x, methods=("monarch", "dense"), min_seq_len=0, progress=False,
                              budget=profiles.Budget(max_rel_error=1.0),
                              overrides={"blocks.1.*": "dense"})
    prof.save(str(tmp_path / "p.json"))
    out = tmp_path / "p.onnx"
    rc = main(["export-onnx", "test_deploy:tiny_factory", "--kwargs", '{"depth": 2}', "--profile",
               str(tmp_path / "p.json"), "--min-seq-len", "0", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "blocks.0.attn: monarch" in text and "blocks.1.attn: dense" in text
