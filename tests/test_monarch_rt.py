"""MonarchRT (method ``monarch_rt``): the reference against a brute-force construction of its
attention matrix, the exactly dense configurations, the Triton forward and backward kernels
(TRITON_INTERPRET=1 on CPU) against the reference, the ops, FLOPs, the method's hooks, optimize()
on a tiny diffusers Wan with a profile round trip, and the ONNX lowering."""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vmonarch_opt
from conftest import rel_err
from vmonarch_fixtures import models
from vmonarch_opt import Budget, MonarchRTConfig, load_profile
from vmonarch_opt import methods as registry
from vmonarch_opt.deploy.lowering import monarch_rt_lowered
from vmonarch_opt.kernels import dispatch
from vmonarch_opt.kernels.monarch.reference import monarch_attention_reference
from vmonarch_opt.kernels.monarch_rt.backward import monarch_rt_backward_triton
from vmonarch_opt.kernels.monarch_rt.kernel import monarch_rt_r_pass_triton, monarch_rt_triton
from vmonarch_opt.kernels.monarch_rt.layout import make_rt_layout
from vmonarch_opt.kernels.out_layout import empty_attention_out
from vmonarch_opt.kernels.tuning import force_config
from vmonarch_opt.kernels.monarch_rt.reference import (CBAR_EPS, monarch_rt_flops, monarch_rt_reference,
                                                       monarch_rt_reference_details)
from vmonarch_opt.methods import Shape


def _qkv(b, h, n, d, dtype=torch.float32, scale=1.0, seed=0, count=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, h, n, d, generator=g) * scale).to(dtype) for _ in range(count)]


def _n(grid, tb=0, ta=0):
    return tb + math.prod(grid) + ta


# ------------------------------------------------------------------------------ brute force
def _brute_force(q, k, v, grid, tiling, tb, ta, steps, scale):
    """Output and the N x N attention matrix from the definition, token by token (float64, one head)."""
    T, H, W = grid
    f, hr, wr = tiling
    hc, b2 = H // hr, W // wr
    b1, A = f * hc, (T // f) * hr * wr
    nv, N = T * H * W, q.shape[0]
    text = list(range(tb)) + list(range(tb + nv, N))

    def tok(a, r, c):
        t = (a // (hr * wr)) * f + r // hc
        h = ((a // wr) % hr) * hc + r % hc
        return tb + (t * H + h) * W + (a % wr) * b2 + c

    P = torch.zeros(N, N, dtype=torch.float64)
    for t in text:
        P[t] = torch.softmax(scale * k @ q[t], 0)
    rows = [(g, kk) for g in range(A) for kk in range(b1)]
    for a in range(A):
        qbar = {(g, kk, j): q[tok(a, kk, j)] for g, kk in rows for j in range(b2)}
        for step in range(steps):
            R, AK, CL = {}, {}, {}
            for (g, kk) in rows:
                keys = torch.stack([k[tok(g, kk, l)] for l in range(b2)])
                for j in range(b2):
                    r = torch.softmax(scale * keys @ qbar[g, kk, j], 0)
                    R[g, kk, j] = r
                    AK[g, kk, j] = scale * r @ keys
                    CL[g, kk, j] = (r * torch.log(r)).sum()
            Lw = {}
            for i in range(b1):
                for j in range(b2):
                    x = q[tok(a, i, j)]
                    z = [x @ AK[g, kk, j] - CL[g, kk, j] for g, kk in rows] + [scale * x @ k[t] for t in text]
                    Lw[i, j] = torch.softmax(torch.stack(z), 0)
            if step == steps - 1:
                for i in range(b1):
                    for j in range(b2):
                        row = tok(a, i, j)
                        for n, (g, kk) in enumerate(rows):
                            for l in range(b2):
                                P[row, tok(g, kk, l)] = Lw[i, j][n] * R[g, kk, j][l]
                        for n, t in enumerate(text):
                            P[row, t] = Lw[i, j][len(rows) + n]
            else:
                for n, (g, kk) in enumerate(rows):
                    for j in range(b2):
                        c = sum(Lw[i, j][n] for i in range(b1))
                        qbar[g, kk, j] = sum(Lw[i, j][n] * q[tok(a, i, j)] for i in range(b1)) / max(c, CBAR_EPS)
    return P @ v, P


@pytest.mark.parametrize("grid,tiling,tb,ta,steps", [
    ((2, 2, 3), (1, 1, 1), 2, 1, 1),     # frames are tiles, text on both sides
    ((4, 2, 2), (2, 1, 1), 0, 2, 2),     # frame pairs, two alternating steps
    ((2, 4, 4), (1, 2, 2), 1, 0, 1),     # quarter-frame tiles
    ((2, 2, 4), (1, 1, 2), 0, 0, 3),
])
def test_reference_equals_the_factorised_attention_matrix(grid, tiling, tb, ta, steps):
    q, k, v = _qkv(1, 1, _n(grid, tb, ta), 6, torch.float64, scale=1.5)
    out = monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, text_before=tb, text_after=ta, steps=steps)
    want, P = _brute_force(q[0, 0], k[0, 0], v[0, 0], grid, tiling, tb, ta, steps, 6 ** -0.5)
    assert torch.allclose(P.sum(1), torch.ones(P.shape[0], dtype=torch.float64), atol=1e-12)  # a distribution per row
    assert rel_err(out[0, 0], want) < 1e-12
    assert rel_err(out[0, 0], F.scaled_dot_product_attention(q, k, v)[0, 0]) > 1e-3   # and not dense attention


@pytest.mark.parametrize("grid,tiling", [
    ((3, 1, 5), (1, 1, 1)),      # H = 1: one row per tile
    ((2, 4, 3), (1, 4, 1)),      # h_reduce = H: one row per tile
    ((2, 3, 4), (1, 1, 4)),      # w_reduce = W: one key per row
    ((1, 6, 4), (1, 6, 2)),      # one frame, one row per tile, two tiles per row
])
def test_exactly_dense_configurations(grid, tiling):
    """One row per tile (the R-step query is the query itself, and the L logit of a row its exact
    log-sum-exp) or one column per row (every block one key): exactly dense, at every step."""
    tb, ta = 2, 1
    assert make_rt_layout(_n(grid, tb, ta), grid, tiling, tb, ta).exact
    q, k, v = _qkv(2, 2, _n(grid, tb, ta), 8, torch.float64, scale=2.0)
    dense = F.scaled_dot_product_attention(q, k, v)
    for steps in (1, 2):
        out = monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, text_before=tb, text_after=ta, steps=steps)
        assert rel_err(out, dense) < 1e-12
        assert rel_err(monarch_rt_lowered(q, k, v, grid=grid, tiling=tiling, text_before=tb, text_after=ta,
                                          steps=steps), dense) < 1e-12
    assert not make_rt_layout(24, (2, 3, 4), (1, 1, 1)).exact


def test_kernels_exact_where_the_factorisation_is():
    """Forward and backward kernels at one row per tile (H = 1) with text: dense attention."""
    grid, tiling, tb, ta = (3, 1, 5), (1, 1, 1), 2, 1
    q, k, v, do = _qkv(1, 1, _n(grid, tb, ta), 16, scale=2.0, count=4)
    kw = dict(grid=grid, tiling=tiling, text_before=tb, text_after=ta, chunk_tiles=3)
    out = monarch_rt_triton(q, k, v, **kw)
    got = monarch_rt_backward_triton(q, k, v, out, do, **kw)
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    dense = F.scaled_dot_product_attention(qq, kk, vv)
    want = torch.autograd.grad(dense, (qq, kk, vv), do.double())
    assert rel_err(out, dense.detach()) < 2e-6
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-5


def test_one_tile_is_monarch_with_row_blocks():
    """A single tile (one frame, tiling (1, 1, 1)): every query tile is the whole grid, so the
    R-step query of row k is q[k, j], Monarch's with one block per row."""
    grid = (1, 4, 5)
    q, k, v = _qkv(2, 2, _n(grid, 3, 2), 8, torch.float64)
    for steps in (1, 2):
        a = monarch_rt_reference(q, k, v, grid=grid, tiling=(1, 1, 1), text_before=3, text_after=2, steps=steps)
        b = monarch_attention_reference(q, k, v, grid=grid, block=(1, 1, 5), text_before=3, text_after=2, steps=steps)
        assert rel_err(a, b) < 1e-12


def test_layout_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"h_reduce=3 does not divide H=4.*h_reduce in \[1, 2, 4\]"):
        make_rt_layout(24, (2, 4, 3), (1, 3, 1))
    with pytest.raises(ValueError, match="f_tied=2 does not divide T=3"):
        monarch_rt_reference(*_qkv(1, 1, 36, 8), grid=(3, 4, 3), tiling=(2, 1, 1))
    with pytest.raises(ValueError, match="sequence length 25"):
        make_rt_layout(25, (2, 4, 3), (1, 1, 1))
    with pytest.raises(ValueError, match="three integers"):
        make_rt_layout(24, (2, 4, 3), (1, 1))
    with pytest.raises(ValueError, match="steps"):
        monarch_rt_reference(*_qkv(1, 1, 24, 8), grid=(2, 4, 3), tiling=(1, 1, 1), steps=0)


# ------------------------------------------------------------------------------ Triton forward
# under the interpreter every tile is 16 wide: b2 = 20 takes two column and two key tiles; b1 = 18
# rows and 18 key rows take two row tiles and two key-row tiles in the L passes; b2 = 16 is even
FWD_CASES = [  # grid, tiling, text_before, text_after, head_dim, dtype, batch, heads, chunk_tiles
    ((2, 2, 20), (1, 1, 1), 0, 0, 64, torch.float32, 2, 1, None),
    ((2, 9, 16), (2, 1, 1), 1, 1, 64, torch.float16, 1, 1, None),
    ((2, 4, 3), (2, 2, 1), 3, 2, 80, torch.float32, 1, 1, None),
    ((3, 4, 5), (1, 2, 1), 2, 0, 96, torch.float16, 1, 1, 2),
    ((2, 3, 4), (1, 1, 2), 0, 3, 64, torch.float16, 1, 1, 1),
    ((4, 2, 3), (2, 1, 1), 1, 1, 128, torch.float32, 1, 1, 1),
]


@pytest.mark.parametrize("grid,tiling,tb,ta,d,dtype,b,h,chunk", FWD_CASES)
def test_kernel_matches_reference(grid, tiling, tb, ta, d, dtype, b, h, chunk):
    q, k, v = _qkv(b, h, _n(grid, tb, ta), d, dtype, seed=d + tb)
    kw = dict(grid=grid, tiling=tiling, text_before=tb, text_after=ta)
    out = monarch_rt_triton(q, k, v, chunk_tiles=chunk, **kw)
    ref = monarch_rt_reference(q.float(), k.float(), v.float(), **kw)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < (2e-5 if dtype == torch.float32 else 3e-3)


def test_kernel_strided_inputs_and_every_output_written(monkeypatch):
    """q/k/v as transposed views of [b, N, h, D], a forced R-pass tile config, and every allocation
    poisoned with NaN: every output element is written (video rows by the L pass, text rows by the
    dense pass) and no scratch entry is read unwritten."""
    import vmonarch_opt.kernels.monarch_rt.kernel as rk

    real_empty = torch.empty

    def poisoned(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    grid, tiling, tb, ta = (2, 4, 3), (1, 2, 1), 2, 3
    q, k, v = (t.transpose(1, 2) for t in _qkv(1, _n(grid, tb, ta), 2, 64))
    monkeypatch.setattr(rk.torch, "empty", poisoned)
    monkeypatch.setattr(rk.torch, "empty_like", lambda x, **kw: poisoned(x.shape, dtype=x.dtype, device=x.device))
    monkeypatch.setattr(rk, "empty_attention_out", lambda q: empty_attention_out(q).fill_(float("nan")))
    with force_config("monarch_rt", (16, 32, 4, 1)):   # R pass: 32 keys per tile, 16 columns
        out = rk.monarch_rt_triton(q, k, v, grid=grid, tiling=tiling, text_before=tb, text_after=ta, scale=0.3)
    monkeypatch.undo()
    assert not torch.isnan(out).any()
    ref = monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, text_before=tb, text_after=ta, scale=0.3)
    assert rel_err(out, ref) < 2e-5


def test_r_pass_factors_and_online_entropy():
    """The R pass alone: AK, Y and the online entropy term equal the reference's, and CL equals
    sum R log R of the materialised R-step probabilities."""
    grid, tiling = (2, 3, 4), (1, 1, 2)
    q, k, v = _qkv(1, 1, _n(grid, 2), 64)
    ak, cl, y = monarch_rt_r_pass_triton(q, k, v, grid=grid, tiling=tiling, text_before=2)
    det = monarch_rt_reference_details(q.double(), k.double(), v.double(), grid=grid, tiling=tiling, text_before=2)
    assert rel_err(ak, det["ak"]) < 2e-5 and rel_err(y, det["y"]) < 2e-5
    idx, s = det["idx"], det["scale"]
    qt, kt = q.double().reshape(1, -1, 64)[:, idx], k.double().reshape(1, -1, 64)[:, idx]
    r = torch.softmax(s * torch.einsum("cakjd,cgkld->cagkjl", qt, kt), -1)
    assert (cl.double() - torch.special.xlogy(r, r).sum(-1)).abs().max() < 1e-5


def test_kernel_refuses_what_it_does_not_cover():
    q = torch.randn(1, 1, 24, 16)
    with pytest.raises(ValueError, match="steps=2"):
        monarch_rt_triton(q, q, q, grid=(2, 3, 4), tiling=(1, 1, 1), steps=2)
    with pytest.raises(ValueError, match="dtype"):
        monarch_rt_triton(q.double(), q.double(), q.double(), grid=(2, 3, 4), tiling=(1, 1, 1))
    with pytest.raises(ValueError, match="w_reduce=3 does not divide W=4"):
        monarch_rt_backward_triton(q, q, q, q, q, grid=(2, 3, 4), tiling=(1, 1, 3))


# ------------------------------------------------------------------------------ Triton backward
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}   # kernel gradients vs float64 reference autograd
BWD_CASES = [  # grid, tiling, text_before, text_after, head_dim, dtype, batch, heads, chunk_tiles
    ((2, 2, 20), (1, 1, 1), 2, 1, 64, torch.float32, 1, 1, None),
    ((4, 2, 3), (2, 1, 1), 0, 2, 80, torch.float16, 2, 1, 1),
    ((2, 2, 4), (1, 1, 2), 0, 0, 96, torch.float32, 1, 1, 3),   # 4 tiles in chunks of 3
    ((2, 9, 16), (2, 1, 1), 0, 0, 64, torch.float32, 1, 1, None),
]


def _reference_grads(q, k, v, do, **kw):
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    return torch.autograd.grad(monarch_rt_reference(qq, kk, vv, **kw), (qq, kk, vv), do.double())


@pytest.mark.parametrize("grid,tiling,tb,ta,d,dtype,b,h,chunk", BWD_CASES)
def test_backward_kernels_match_float64_reference(grid, tiling, tb, ta, d, dtype, b, h, chunk):
    q, k, v, do = _qkv(b, h, _n(grid, tb, ta), d, dtype, seed=d, count=4)
    kw = dict(grid=grid, tiling=tiling, text_before=tb, text_after=ta)
    out = monarch_rt_triton(q, k, v, chunk_tiles=chunk, **kw)
    got = monarch_rt_backward_triton(q, k, v, out, do, chunk_tiles=chunk, **kw)
    want = _reference_grads(q, k, v, do, **kw)
    for name, a, w in zip("qkv", got, want):
        assert a.dtype == dtype and a.shape == q.shape
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert rel_err(a, w) < TOL[dtype], f"d{name}"


def test_gradcheck_reference_tiny():
    """The oracle itself: float64 finite differences of the reference (steps 1 and 2, text tokens)."""
    for steps in (1, 2):
        q, k, v = (torch.randn(1, 1, 2 + 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        fn = lambda q, k, v: monarch_rt_reference(q, k, v, grid=(2, 2, 2), tiling=(1, 1, 1),  # noqa: E731
                                                  text_before=2, steps=steps)
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("steps", [1, 2])
def test_op_autograd_runs_the_backward_kernels_where_they_cover(monkeypatch, steps):
    """With the kernels on (VMONARCH_INTERPRET_KERNELS=1) steps=1 differentiates through the
    backward op, steps=2 through the reference; both give the reference's gradients. GQA: k/v
    heads expanded before the op, the expansion's gradient sums them."""
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    calls = []
    real = dispatch.monarch_rt_attention_backward
    monkeypatch.setattr(dispatch, "monarch_rt_attention_backward",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grid, tb = (2, 2, 3), 1
    q, do = _qkv(1, 2, _n(grid, tb), 32, count=2)
    k1, v1 = _qkv(1, 1, _n(grid, tb), 32, seed=1, count=2)
    args = [list(grid), [1, 1, 1], tb, 0, steps, 0.2, 0]

    def run(q, k1, v1):
        return torch.ops.vmonarch.monarch_rt_attention(q, k1.repeat_interleave(2, 1), v1.repeat_interleave(2, 1),
                                                       *args)

    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k1, v1))
    got = torch.autograd.grad(run(qq, kk, vv), (qq, kk, vv), do)
    assert len(calls) == (1 if steps == 1 else 0)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k1, v1))
    ref = monarch_rt_reference(qd, kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1), grid=grid,
                               tiling=(1, 1, 1), text_before=tb, steps=steps, scale=0.2)
    want = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2e-5


def test_opcheck_forward_and_backward_ops(monkeypatch):
    """Schema, fake implementation and autograd registration of the op (reference path), and the
    backward op's schema and fake implementation against the kernels' real outputs."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 2, _n((2, 2, 3), 1), 16))
    args = [[2, 2, 3], [1, 1, 1], 1, 0, 1, 0.25, 0]
    torch.library.opcheck(torch.ops.vmonarch.monarch_rt_attention.default, (q, k, v, *args))
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    q, k, v, do = (t.detach() for t in _qkv(1, 1, _n((2, 2, 3), 1), 16, count=4))
    out = torch.ops.vmonarch.monarch_rt_attention(q, k, v, *args)
    torch.library.opcheck(torch.ops.vmonarch.monarch_rt_attention_backward.default, (q, k, v, out, do, *args),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("grid,tiling,tb,ta", [((4, 4, 6), (2, 2, 3), 5, 0), ((2, 6, 4), (1, 2, 1), 2, 7)])
def test_flop_count_equals_what_the_reference_computes(grid, tiling, tb, ta):
    n = _n(grid, tb, ta)
    q, k, v = _qkv(2, 3, n, 16)
    for steps in (1, 2):
        with FlopCounterMode(display=False) as fc:
            monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, text_before=tb, text_after=ta, steps=steps)
        want = monarch_rt_flops(2, 3, n, 16, grid=grid, tiling=tiling, text_before=tb, text_after=ta, steps=steps)
        assert fc.get_total_flops() == want
        args = dict(grid=list(grid), tiling=list(tiling), text_before=tb, text_after=ta, steps=steps)
        assert registry.get("monarch_rt").flops(Shape(2, 3, n, n, 16), args) == want


def test_cost_per_query_is_key_tiles_times_row_length_plus_key_rows():
    """Without text, at one step: 2 FLOPs x D x (3 matmuls over key tiles x b2 columns + 2 over the
    key rows) per video query; Wan2.1-1.3B 480p with (1, 1, 1) does ~14x fewer FLOPs than dense."""
    grid, D = (21, 30, 52), 128
    lay = make_rt_layout(math.prod(grid), grid, (1, 1, 1))
    per_query = 2 * D * (3 * lay.n_tiles * lay.b2 + 2 * lay.n_tiles * lay.b1)
    ours = monarch_rt_flops(1, 1, lay.N, D, grid=grid, tiling=(1, 1, 1))
    assert ours == lay.Nv * per_query
    assert 14 < Shape(1, 1, lay.N, lay.N, D).dense_flops / ours < 15


# ------------------------------------------------------------------------------ method hooks
def _site(grid, tb=0, ta=0, sid="blocks.0.attn1"):
    n = _n(grid, tb, ta) if grid else 50
    return SimpleNamespace(site_id=sid, grid=grid, seq_q=n, seq_k=n, text_before=tb, text_after=ta, batch=1, heads=2,
                           head_dim=16)


def test_method_hooks():
    m = registry.get("monarch_rt")
    assert "monarch_rt" in registry.names() and "monarch_rt" not in registry.default_methods()
    assert m.default_rank is not None and m.opt_in
    assert "no video grid" in m.unsupported(_site(None))
    assert "exactly dense" in m.unsupported(_site((5, 4, 1)))
    site = _site((4, 6, 5), tb=3)
    assert m.unsupported(site) is None
    assert "w_reduce=2 does not divide W=5" in m.check_config(MonarchRTConfig(w_reduce=2), site)
    assert "integer" in m.check_config(MonarchRTConfig(h_reduce=0), site)
    with pytest.raises(ValueError, match="w_reduce=2 does not divide W=5"):
        m.resolve_args(MonarchRTConfig(w_reduce=2), site, 0)
    cands = [c for _, c in m.candidates(site, Budget(), 0)]
    assert cands == [MonarchRTConfig(), MonarchRTConfig(h_reduce=2), MonarchRTConfig(f_tied=2)]  # W=5: no w_reduce 2
    assert m.candidates(_site((4, 1, 5)), Budget(), 0) == [("monarch_rt", MonarchRTConfig(f_tied=2))]  # (1,1,1): exact
    cfg = MonarchRTConfig(f_tied=2, h_reduce=3, w_reduce=1)
    args = m.resolve_args(cfg, site, 0)
    assert args == dict(grid=[4, 6, 5], tiling=[2, 3, 1], text_before=3, text_after=0, steps=1)
    assert m.config_from_args(args) == cfg and m.describe(cfg) == "monarch_rt 2×3×1 s1"
    assert m.params(args) == "f_tied=2 h_reduce=3 w_reduce=1 steps=1"
    assert registry.config_from_dict(registry.config_to_dict(cfg), strict=True) == cfg
    # another grid: parameters that still divide are kept, the others fall back to 1
    new = m.adapt_args(args, (4, 6, 5), (3, 6, 5))
    assert new["grid"] == [3, 6, 5] and new["tiling"] == [1, 3, 1]
    assert m.rederive(cfg, "monarch_rt", _site((4, 4, 5))) == MonarchRTConfig(f_tied=2, h_reduce=1)
    assert m.rederive(cfg, "monarch_rt", _site((6, 9, 7))) == cfg


# ------------------------------------------------------------------------------ optimize on a diffusers Wan
def test_optimize_wan_calibrates_and_reports_monarch_rt_and_its_profile_round_trips(tmp_path):
    model, batch = models.wan(frames=4)
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch_rt",), min_seq_len=0,
                                budget=Budget(max_rel_error=10.0))
    rows = {r["site"]["site_id"]: r for r in opt.report.rows}
    self_rows = [r for sid, r in rows.items() if sid.endswith("attn1")]
    assert len(self_rows) == 2 and all(r["plan"]["method"] == "monarch_rt" for r in self_rows)
    # loose budget: the cheapest candidate, frame pairs (grid 4×4×5: f_tied=2 divides, w_reduce=2 does not)
    assert all(r["plan"]["args"]["tiling"] == [2, 1, 1] for r in self_rows)
    assert all(r["plan"]["flops_after"] < r["plan"]["flops_before"] for r in self_rows)
    text = str(opt.report)
    assert "f_tied=2 h_reduce=1 w_reduce=1 steps=1" in text and "monarch_rt" in text
    labels = {c["label"] for c in opt.vmonarch.profile.sites["blocks.0.attn1"]["candidates"]}
    assert labels == {"monarch_rt 1×1×1 s1", "monarch_rt 1×2×1 s1", "monarch_rt 2×1×1 s1"}
    with torch.no_grad():
        out = opt(**batch)[0]
        dense = model(**batch)[0]
    assert torch.isfinite(out).all() and 1e-4 < rel_err(out, dense) < 0.2
    assert all(c["ran"] == 1 for sid, c in vmonarch_opt.stats(opt).items() if sid.endswith("attn1"))
    # the profile keeps the tiling through save and load
    path = opt.vmonarch.profile.save(tmp_path / "rt.json")
    loaded = load_profile(path)
    assert set(loaded.choices().values()) == {MonarchRTConfig(f_tied=2)}
    assert loaded.sites["blocks.1.attn1"]["choice"]["label"] == "monarch_rt 2×1×1 s1"
    with torch.no_grad():
        # three frames: f_tied=2 no longer divides T, the plan falls back to frames as tiles
        m3, b3 = models.wan(frames=3)
        with pytest.warns(RuntimeWarning, match=r"tiling \(1, 1, 1\)"):
            o3 = opt(**b3)[0]
    assert torch.isfinite(o3).all()


# ------------------------------------------------------------------------------ ONNX lowering
@pytest.mark.parametrize("grid,tiling,tb,ta,steps", [
    ((2, 4, 6), (2, 2, 3), 3, 2, 1),
    ((3, 4, 5), (1, 2, 1), 0, 0, 2),
    ((4, 2, 6), (2, 1, 2), 2, 0, 3),
])
def test_lowering_matches_the_op(grid, tiling, tb, ta, steps):
    q, k, v = _qkv(2, 3, _n(grid, tb, ta), 16, scale=2.0)
    args = [list(grid), list(tiling), tb, ta, steps, 0.3, 0]
    want = torch.ops.vmonarch.monarch_rt_attention(q, k, v, *args)
    got = monarch_rt_lowered(q, k, v, grid=grid, tiling=tiling, text_before=tb, text_after=ta, steps=steps, scale=0.3)
    assert rel_err(got, want) < 1e-5


def test_lowering_key_mask_equals_dropping_the_padded_text():
    grid, tb, ta = (2, 3, 4), 3, 4
    n = _n(grid, tb, ta)
    q, k, v = _qkv(2, 2, n, 16)
    key_valid = torch.ones(2, n, dtype=torch.bool)
    key_valid[0, 1:tb] = False
    key_valid[1, n - 3:] = False
    cfg = dict(grid=grid, tiling=(1, 1, 2), steps=2, scale=0.25)
    out = monarch_rt_lowered(q, k, v, text_before=tb, text_after=ta, key_valid=key_valid, **cfg)
    for i in range(2):
        keep = key_valid[i].nonzero().squeeze(-1)
        ntb, nta = int(key_valid[i, :tb].sum()), int(key_valid[i, tb + 24:].sum())
        want = monarch_rt_reference(*(t[i:i + 1, :, keep] for t in (q, k, v)), text_before=ntb, text_after=nta, **cfg)
        assert rel_err(out[i:i + 1, :, keep], want) < 1e-5


def test_lowering_exports_to_standard_onnx_ops(tmp_path):
    """The lowering (text on both sides, two steps) through torch.onnx.export: standard ONNX ops
    only, and onnxruntime computes the op's output."""
    import onnx
    import onnxruntime as ort

    grid, tiling, tb, ta = (2, 2, 3), (1, 1, 1), 2, 1
    q, k, v = _qkv(1, 2, _n(grid, tb, ta), 8)

    class Lowered(torch.nn.Module):
        def forward(self, q, k, v):
            return monarch_rt_lowered(q, k, v, grid=grid, tiling=tiling, text_before=tb, text_after=ta, steps=2,
                                      scale=0.3)

    path = str(tmp_path / "rt.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Lowered(), (q, k, v), dynamo=True, verbose=False).save(path)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert {"MatMul", "Exp", "Log", "Transpose"} <= {n.op_type for n in m.graph.node}
    sess = ort.InferenceSession(path)
    (got,) = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), (q, k, v))})
    want = torch.ops.vmonarch.monarch_rt_attention(q, k, v, list(grid), list(tiling), tb, ta, 2, 0.3, 0)
    assert rel_err(torch.from_numpy(got), want) < 1e-5
