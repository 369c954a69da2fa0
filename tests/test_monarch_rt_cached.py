"""MonarchRT's KV-cache form (``cached_frames``): q holds the last T - F frames of the key grid
(T, H, W), k/v all of it; query tiles are the new frames' tiles, key tiles every tile. The
reference against a brute-force N_q x N_k construction of its attention matrix, the exactly dense
configurations, the Triton forward and backward kernels (TRITON_INTERPRET=1 on CPU) against the
reference, the ops (opcheck, autograd through the kernels, FLOPs), the method's KV-cache hooks,
the ONNX lowering, and block-causal attention run chunk by chunk through the cached form."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import rel_err
from vmonarch_opt import methods as registry
from vmonarch_opt.deploy.lowering import monarch_rt_lowered
from vmonarch_opt.kernels import dispatch
from vmonarch_opt.kernels.monarch_rt.backward import monarch_rt_backward_triton
from vmonarch_opt.kernels.monarch_rt.kernel import monarch_rt_r_pass_triton, monarch_rt_triton
from vmonarch_opt.kernels.monarch_rt.layout import make_rt_layout
from vmonarch_opt.kernels.monarch_rt.reference import (CBAR_EPS, monarch_rt_flops, monarch_rt_reference,
                                                       monarch_rt_reference_details)
from vmonarch_opt.kernels.out_layout import empty_attention_out
from vmonarch_opt.methods import Shape


def _qkv(b, h, grid, cached, d, dtype=torch.float32, scale=1.0, seed=0):
    """Fresh q (the last T - cached frames), k, v (every frame) and a grad_out shaped like q."""
    g = torch.Generator().manual_seed(seed)
    T, H, W = grid
    nk, nq = T * H * W, (T - cached) * H * W
    q, do = ((torch.randn(b, h, nq, d, generator=g) * scale).to(dtype) for _ in range(2))
    k, v = ((torch.randn(b, h, nk, d, generator=g) * scale).to(dtype) for _ in range(2))
    return q, k, v, do


# ------------------------------------------------------------------------------ brute force
def _brute_force(q, k, v, grid, tiling, cached, steps, scale, visible=None):
    """Output and the N_q x N_k attention matrix from the definition, token by token (float64, one
    head). q: the rows of the query tiles (tiles of frames >= ``cached``), k/v: every token of
    ``grid``; ``visible(a)``: the key tiles query tile a sees (default: all)."""
    T, H, W = grid
    f, hr, wr = tiling
    hc, b2 = H // hr, W // wr
    b1, A = f * hc, (T // f) * hr * wr
    first = (cached // f) * hr * wr           # the first query tile
    off = cached * H * W                      # q's first row in the key sequence

    def tok(a, r, c):
        t = (a // (hr * wr)) * f + r // hc
        h = ((a // wr) % hr) * hc + r % hc
        return (t * H + h) * W + (a % wr) * b2 + c

    P = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for a in range(first, A):
        rows = [(g, kk) for g in (visible(a) if visible else range(A)) for kk in range(b1)]
        qbar = {(g, kk, j): q[tok(a, kk, j) - off] for g, kk in rows for j in range(b2)}
        for step in range(steps):
            R, AK, CL = {}, {}, {}
            for g, kk in rows:
                keys = torch.stack([k[tok(g, kk, l)] for l in range(b2)])
                for j in range(b2):
                    r = torch.softmax(scale * keys @ qbar[g, kk, j], 0)
                    R[g, kk, j], AK[g, kk, j], CL[g, kk, j] = r, scale * r @ keys, (r * torch.log(r)).sum()
            Lw = {(i, j): torch.softmax(torch.stack([q[tok(a, i, j) - off] @ AK[g, kk, j] - CL[g, kk, j]
                                                     for g, kk in rows]), 0)
                  for i in range(b1) for j in range(b2)}
            if step == steps - 1:
                for i in range(b1):
                    for j in range(b2):
                        for n, (g, kk) in enumerate(rows):
                            for l in range(b2):
                                P[tok(a, i, j) - off, tok(g, kk, l)] = Lw[i, j][n] * R[g, kk, j][l]
            else:
                for n, (g, kk) in enumerate(rows):
                    for j in range(b2):
                        c = sum(Lw[i, j][n] for i in range(b1))
                        qbar[g, kk, j] = sum(Lw[i, j][n] * q[tok(a, i, j) - off] for i in range(b1)) / max(c, CBAR_EPS)
    return P @ v, P


@pytest.mark.parametrize("grid,tiling,cached,steps", [
    ((3, 2, 3), (1, 1, 1), 2, 1),     # frames are tiles, one new frame
    ((4, 2, 4), (2, 1, 2), 2, 1),     # frame pairs split in w: two query tiles, four key tiles
    ((3, 4, 2), (1, 2, 1), 1, 2),     # two alternating steps
])
def test_reference_equals_the_factorised_attention_matrix(grid, tiling, cached, steps):
    q, k, v, _ = _qkv(1, 1, grid, cached, 6, torch.float64, scale=1.5)
    out = monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, steps=steps, cached_frames=cached)
    want, P = _brute_force(q[0, 0], k[0, 0], v[0, 0], grid, tiling, cached, steps, 6 ** -0.5)
    assert out.shape == q.shape
    assert torch.allclose(P.sum(1), torch.ones(P.shape[0], dtype=torch.float64), atol=1e-12)  # a distribution per row
    assert P[:, :cached * grid[1] * grid[2]].sum(1).min() > 1e-3        # the cached keys are attended
    assert rel_err(out[0, 0], want) < 1e-12
    assert rel_err(out[0, 0], F.scaled_dot_product_attention(q, k, v)[0, 0]) > 1e-3   # and not dense attention


def test_the_cache_form_is_the_new_frames_rows_of_full_attention():
    """MonarchRT's streaming semantics: a query tile's R-step queries are its own tokens, so the new
    frames' rows against the whole cache equal those rows of self-attention on the whole grid;
    cached_frames=0 is the op without a cache."""
    grid, tiling = (4, 3, 4), (1, 1, 2)
    q, k, v, _ = _qkv(2, 2, grid, 0, 8, torch.float64, seed=3)
    full = monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, steps=2)
    assert rel_err(monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, steps=2, cached_frames=0), full) == 0
    for cached in (1, 3):
        n0 = cached * 12
        got = monarch_rt_reference(q[:, :, n0:], k, v, grid=grid, tiling=tiling, steps=2, cached_frames=cached)
        assert rel_err(got, full[:, :, n0:]) < 1e-12


@pytest.mark.parametrize("grid,tiling,cached", [
    ((3, 1, 5), (1, 1, 1), 2),      # H = 1: one row per tile
    ((3, 4, 3), (1, 4, 1), 1),      # h_reduce = H: one row per tile
    ((4, 3, 4), (2, 1, 4), 2),      # w_reduce = W: one key per row
])
def test_exactly_dense_configurations(grid, tiling, cached):
    """One row per tile or one column per row: the new frames' queries against every key exactly."""
    assert make_rt_layout(math.prod(grid), grid, tiling, cached_frames=cached).exact
    q, k, v, _ = _qkv(2, 2, grid, cached, 8, torch.float64, scale=2.0)
    dense = F.scaled_dot_product_attention(q, k, v)
    for steps in (1, 2):
        kw = dict(grid=grid, tiling=tiling, steps=steps, cached_frames=cached)
        assert rel_err(monarch_rt_reference(q, k, v, **kw), dense) < 1e-12
        assert rel_err(monarch_rt_lowered(q, k, v, **kw), dense) < 1e-12


def test_kernels_exact_where_the_factorisation_is():
    """Forward and backward kernels with a cache at one row per tile (H = 1): dense attention."""
    grid, cached = (3, 1, 5), 2
    q, k, v, do = _qkv(1, 1, grid, cached, 16, scale=2.0)
    kw = dict(grid=grid, tiling=(1, 1, 1), cached_frames=cached)
    out = monarch_rt_triton(q, k, v, **kw)
    got = monarch_rt_backward_triton(q, k, v, out, do, **kw)
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    dense = F.scaled_dot_product_attention(qq, kk, vv)
    want = torch.autograd.grad(dense, (qq, kk, vv), do.double())
    assert rel_err(out, dense.detach()) < 2e-6
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) < 2e-5


def test_errors_name_the_fix():
    q, k, v, _ = _qkv(1, 1, (4, 2, 3), 1, 8)
    with pytest.raises(ValueError, match=r"f_tied=2 must divide cached_frames=1.*use f_tied in \[1\]"):
        monarch_rt_reference(q, k, v, grid=(4, 2, 3), tiling=(2, 1, 1), cached_frames=1)
    with pytest.raises(ValueError, match="f_tied=2 must divide cached_frames=1"):
        monarch_rt_triton(q, k, v, grid=(4, 2, 3), tiling=(2, 1, 1), cached_frames=1)
    with pytest.raises(ValueError, match="takes video tokens only.*text_before=text_after=0"):
        make_rt_layout(26, (4, 2, 3), (1, 1, 1), text_before=2, cached_frames=1)
    with pytest.raises(ValueError, match="q has 18 rows but the last 2 frames"):
        monarch_rt_reference(q, k, v, grid=(4, 2, 3), tiling=(1, 1, 1), cached_frames=2)
    with pytest.raises(ValueError, match="leaves no query frame"):
        make_rt_layout(24, (4, 2, 3), (1, 1, 1), cached_frames=4)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="cached_frames must be an integer >= 0"):
            make_rt_layout(24, (4, 2, 3), (1, 1, 1), cached_frames=bad)
    with pytest.raises(ValueError, match="k and v must have one shape"):
        monarch_rt_reference(q, k, v[:, :, :-1], grid=(4, 2, 3), tiling=(1, 1, 1), cached_frames=1)
    with pytest.raises(ValueError, match="key sequence length 24 != .*grid \\(5, 2, 3\\)"):
        monarch_rt_reference(q, k, v, grid=(5, 2, 3), tiling=(1, 1, 1), cached_frames=2)


# ------------------------------------------------------------------------------ Triton forward
# under the interpreter every tile is 16 wide: b2 = 20 takes two column and two key tiles; b1 = 18
# rows and 36 key rows take two row tiles and several key-row tiles in the L passes
FWD_CASES = [  # grid, tiling, cached, head_dim, dtype, batch, heads, chunk_tiles
    ((3, 3, 5), (1, 1, 1), 2, 64, torch.float32, 2, 1, None),
    ((3, 3, 5), (1, 1, 1), 1, 80, torch.float16, 1, 2, 1),
    ((4, 2, 20), (2, 1, 1), 2, 96, torch.float32, 1, 1, None),
    ((4, 9, 4), (2, 1, 1), 2, 128, torch.float16, 1, 1, None),
    ((5, 2, 6), (1, 1, 2), 3, 64, torch.float16, 2, 1, 3),     # 4 query tiles in chunks of 3
]


@pytest.mark.parametrize("grid,tiling,cached,d,dtype,b,h,chunk", FWD_CASES)
def test_kernel_matches_reference(grid, tiling, cached, d, dtype, b, h, chunk):
    q, k, v, _ = _qkv(b, h, grid, cached, d, dtype, seed=d + cached)
    kw = dict(grid=grid, tiling=tiling, cached_frames=cached)
    out = monarch_rt_triton(q, k, v, chunk_tiles=chunk, **kw)
    ref = monarch_rt_reference(q.float(), k.float(), v.float(), **kw)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < (2e-5 if dtype == torch.float32 else 3e-3)


def test_kernel_writes_every_output_and_reads_no_unwritten_scratch(monkeypatch):
    """Strided q/k/v, every allocation poisoned with NaN: the new frames' rows are all written and
    the cached frames' tiles are never query tiles (their scratch would be NaN)."""
    import vmonarch_opt.kernels.monarch_rt.kernel as rk

    real_empty = torch.empty

    def poisoned(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    grid, tiling, cached = (4, 4, 3), (2, 2, 1), 2
    q, k, v, _ = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(1, 2, grid, cached, 64))
    monkeypatch.setattr(rk.torch, "empty", poisoned)
    monkeypatch.setattr(rk.torch, "empty_like", lambda x, **kw: poisoned(x.shape, dtype=x.dtype, device=x.device))
    monkeypatch.setattr(rk, "empty_attention_out", lambda q: empty_attention_out(q).fill_(float("nan")))
    out = rk.monarch_rt_triton(q, k, v, grid=grid, tiling=tiling, scale=0.3, cached_frames=cached, chunk_tiles=1)
    monkeypatch.undo()
    assert not torch.isnan(out).any()
    ref = monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, scale=0.3, cached_frames=cached)
    assert rel_err(out, ref) < 2e-5


def test_r_pass_factors_of_the_query_tiles():
    grid, tiling, cached = (3, 2, 4), (1, 1, 2), 1
    q, k, v, _ = _qkv(1, 1, grid, cached, 64)
    ak, cl, y = monarch_rt_r_pass_triton(q, k, v, grid=grid, tiling=tiling, cached_frames=cached)
    det = monarch_rt_reference_details(q.double(), k.double(), v.double(), grid=grid, tiling=tiling,
                                       cached_frames=cached)
    assert ak.shape == det["ak"].shape == (1, 4, 6, 2, 2, 64)        # 4 query tiles x 6 key tiles
    assert rel_err(ak, det["ak"]) < 2e-5 and rel_err(y, det["y"]) < 2e-5 and rel_err(cl, det["cl"]) < 2e-5


# ------------------------------------------------------------------------------ Triton backward
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}   # kernel gradients vs float64 reference autograd
BWD_CASES = [  # grid, tiling, cached, head_dim, dtype, batch, heads, chunk_tiles
    ((3, 3, 5), (1, 1, 1), 2, 64, torch.float32, 2, 1, None),
    ((4, 2, 20), (2, 1, 1), 2, 80, torch.float16, 1, 1, 1),
    ((4, 9, 4), (2, 1, 1), 2, 64, torch.float32, 1, 1, None),
    ((5, 2, 6), (1, 1, 2), 3, 96, torch.float32, 1, 1, 3),
]


def _reference_grads(q, k, v, do, **kw):
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    return torch.autograd.grad(monarch_rt_reference(qq, kk, vv, **kw), (qq, kk, vv), do.double())


@pytest.mark.parametrize("grid,tiling,cached,d,dtype,b,h,chunk", BWD_CASES)
def test_backward_kernels_match_float64_reference(grid, tiling, cached, d, dtype, b, h, chunk):
    q, k, v, do = _qkv(b, h, grid, cached, d, dtype, seed=d)
    kw = dict(grid=grid, tiling=tiling, cached_frames=cached)
    out = monarch_rt_triton(q, k, v, chunk_tiles=chunk, **kw)
    got = monarch_rt_backward_triton(q, k, v, out, do, chunk_tiles=chunk, **kw)
    want = _reference_grads(q, k, v, do, **kw)
    n0 = cached * grid[1] * grid[2]
    for name, a, w in zip("qkv", got, want):
        assert a.dtype == dtype and a.shape == w.shape
        assert torch.isfinite(a).all(), f"d{name} not finite"
        assert rel_err(a, w) < TOL[dtype], f"d{name}"
        if name != "q":   # the cached keys get gradient from the new frames' queries
            assert rel_err(a[:, :, :n0], w[:, :, :n0]) < TOL[dtype] and w[:, :, :n0].abs().max() > 1e-3


def test_gradcheck_reference_tiny():
    """The oracle: float64 finite differences of the cached reference (steps 1 and 2)."""
    for steps in (1, 2):
        q = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(1, 1, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
        fn = lambda q, k, v: monarch_rt_reference(q, k, v, grid=(2, 2, 2), tiling=(1, 1, 1),  # noqa: E731
                                                  steps=steps, cached_frames=1)
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ------------------------------------------------------------------------------ ops
def test_op_autograd_runs_the_backward_kernels(monkeypatch):
    """With the kernels on, the op with cached_frames differentiates through the backward op; GQA:
    k/v heads expanded before the op, the expansion's gradient sums them."""
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    calls = []
    real = dispatch.monarch_rt_attention_backward
    monkeypatch.setattr(dispatch, "monarch_rt_attention_backward",
                        lambda *a, **kw: calls.append(kw["cached_frames"]) or real(*a, **kw))
    grid, cached = (3, 2, 3), 2
    q, k1, v1, do = _qkv(1, 2, grid, cached, 32)
    k1, v1 = k1[:, :1], v1[:, :1]
    args = [list(grid), [1, 1, 1], 0, 0, 1, 0.2, cached]

    def run(q, k1, v1):
        return torch.ops.vmonarch.monarch_rt_attention(q, k1.repeat_interleave(2, 1), v1.repeat_interleave(2, 1),
                                                       *args)

    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k1, v1))
    got = torch.autograd.grad(run(qq, kk, vv), (qq, kk, vv), do)
    assert calls == [cached]
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k1, v1))
    ref = monarch_rt_reference(qd, kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1), grid=grid,
                               tiling=(1, 1, 1), scale=0.2, cached_frames=cached)
    want = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.isfinite(a).all() and rel_err(a, b) < 2e-5
    # cached_frames = 0 on the kernels is the kernel call without a cache
    q0, k0, v0, _ = _qkv(1, 2, grid, 0, 32)
    assert torch.equal(torch.ops.vmonarch.monarch_rt_attention(q0, k0, v0, *args[:-1], 0),
                       monarch_rt_triton(q0, k0, v0, grid=grid, tiling=(1, 1, 1), scale=0.2))


def test_opcheck_forward_and_backward_ops(monkeypatch):
    """Schema, fake implementation (output like q; dk/dv like k) and autograd registration of the op
    with a cache (reference path), and the backward op against the kernels' real outputs."""
    grid, cached = (3, 2, 2), 1
    q, k, v, do = _qkv(1, 2, grid, cached, 16)
    args = [list(grid), [1, 1, 1], 0, 0, 1, 0.25, cached]
    torch.library.opcheck(torch.ops.vmonarch.monarch_rt_attention.default,
                          tuple(t.clone().requires_grad_(True) for t in (q, k, v)) + tuple(args))
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    out = torch.ops.vmonarch.monarch_rt_attention(q, k, v, *args)
    torch.library.opcheck(torch.ops.vmonarch.monarch_rt_attention_backward.default, (q, k, v, out, do, *args),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("grid,tiling,cached,steps", [((4, 4, 6), (2, 2, 3), 2, 1), ((3, 6, 4), (1, 2, 1), 1, 2)])
def test_flop_count_equals_what_the_reference_computes(grid, tiling, cached, steps):
    q, k, v, _ = _qkv(2, 3, grid, cached, 16)
    nk = math.prod(grid)
    with FlopCounterMode(display=False) as fc:
        monarch_rt_reference(q, k, v, grid=grid, tiling=tiling, steps=steps, cached_frames=cached)
    want = monarch_rt_flops(2, 3, nk, 16, grid=grid, tiling=tiling, steps=steps, cached_frames=cached)
    assert fc.get_total_flops() == want
    # no work on the cached frames' tiles: the share of the new frames in the full grid's count
    full = monarch_rt_flops(2, 3, nk, 16, grid=grid, tiling=tiling, steps=steps)
    assert want * grid[0] == full * (grid[0] - cached)
    args = dict(grid=list(grid), tiling=list(tiling), text_before=0, text_after=0, steps=steps, cached_frames=cached)
    m = registry.get("monarch_rt")
    assert m.cached_flops(Shape(2, 3, q.shape[2], nk, 16), args) == want
    with pytest.raises(ValueError, match="seq_q"):
        m.cached_flops(Shape(2, 3, nk, nk, 16), args)


# ------------------------------------------------------------------------------ method hooks, lowering
def _args(grid, tiling, cached, tb=0, steps=1):
    return dict(grid=list(grid), tiling=list(tiling), text_before=tb, text_after=0, steps=steps, cached_frames=cached)


def test_method_kv_cache_hooks():
    m = registry.get("monarch_rt")
    assert m.causal_mode == "cached"
    assert m.cached_unsupported(_args((7, 4, 5), (1, 2, 1), 6)) is None
    assert m.cached_unsupported(_args((6, 4, 5), (2, 1, 1), 4)) is None
    assert "f_tied=2 must divide cached_frames=3" in m.cached_unsupported(_args((6, 4, 5), (2, 1, 1), 3))
    assert "h_reduce=3 does not divide H=4" in m.cached_unsupported(_args((6, 4, 5), (1, 3, 1), 3))
    assert "text_before=text_after=0" in m.cached_unsupported(_args((6, 4, 5), (1, 1, 1), 3, tb=2))
    assert "exactly dense" in m.cached_unsupported(_args((6, 1, 5), (1, 1, 1), 5))    # one new frame of one row
    assert "no query frame" in m.cached_unsupported(_args((6, 4, 5), (1, 1, 1), 6))
    # block-causal plans: every chunk's cached form must run (the last chunk may be shorter)
    causal = dict(_args((7, 4, 5), (1, 1, 1), 0), causal_chunk=3)
    assert m.causal_unsupported(causal) is None
    assert "f_tied=2 does not divide T=7" in m.causal_unsupported(
        {**causal, "grid": [7, 4, 5], "tiling": [2, 1, 1], "causal_chunk": 2})
    assert m.causal_unsupported({**causal, "grid": [8, 4, 5], "tiling": [2, 1, 1], "causal_chunk": 2}) is None
    assert "f_tied=2 must divide the chunk" in m.causal_unsupported({**causal, "grid": [6, 4, 5], "tiling": [2, 1, 1]})
    assert "chunk 1 (frames 3..3 of 4, chunk 3): query grid 1×1×5" in m.causal_unsupported(
        {**causal, "grid": [4, 1, 5]})       # the last chunk: one frame of one row, exactly dense
    grid, cached = (3, 3, 4), 1
    q, k, v, _ = _qkv(2, 2, grid, cached, 16)
    args = _args(grid, (1, 1, 2), cached, steps=2)
    out = m.run_cached(q, k, v, args, 0.3)
    want = monarch_rt_reference(q, k, v, grid=grid, tiling=(1, 1, 2), steps=2, scale=0.3, cached_frames=cached)
    assert out.shape == q.shape and rel_err(out, want) < 1e-6
    assert rel_err(m.lower(q, k, v, args, 0.3), want) < 1e-5


@pytest.mark.parametrize("grid,tiling,cached,steps", [((4, 2, 6), (2, 1, 3), 2, 1), ((3, 4, 5), (1, 2, 1), 2, 2)])
def test_lowering_matches_the_op(grid, tiling, cached, steps):
    q, k, v, _ = _qkv(2, 3, grid, cached, 16, scale=2.0)
    want = torch.ops.vmonarch.monarch_rt_attention(q, k, v, list(grid), list(tiling), 0, 0, steps, 0.3, cached)
    got = monarch_rt_lowered(q, k, v, grid=grid, tiling=tiling, steps=steps, scale=0.3, cached_frames=cached)
    assert got.shape == q.shape and rel_err(got, want) < 1e-5


def test_cached_lowering_exports_to_standard_onnx_ops(tmp_path):
    """The cached lowering (two steps) through torch.onnx.export; onnxruntime computes the op."""
    import warnings

    import onnx
    import onnxruntime as ort

    grid, tiling, cached = (4, 2, 3), (2, 1, 1), 2
    q, k, v, _ = _qkv(1, 2, grid, cached, 8)

    class Lowered(torch.nn.Module):
        def forward(self, q, k, v):
            return monarch_rt_lowered(q, k, v, grid=grid, tiling=tiling, steps=2, scale=0.3, cached_frames=cached)

    path = str(tmp_path / "rt_cached.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Lowered(), (q, k, v), dynamo=True, verbose=False).save(path)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    sess = ort.InferenceSession(path)
    (got,) = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), (q, k, v))})
    want = torch.ops.vmonarch.monarch_rt_attention(q, k, v, list(grid), list(tiling), 0, 0, 2, 0.3, cached)
    assert got.shape == tuple(q.shape) and rel_err(torch.from_numpy(got), want) < 1e-5


# ------------------------------------------------------------------------------ block-causal by chunks
@pytest.mark.parametrize("grid,tiling,chunk", [((5, 2, 3), (1, 1, 1), 2), ((6, 2, 4), (2, 1, 2), 2)])
def test_block_causal_chunks_through_the_cached_form(grid, tiling, chunk):
    """Chunk c's queries with cached_frames = c * chunk against the keys of chunks <= c (the
    reference and the Triton kernel) equal chunk c's rows of the brute-force block-causal
    factorisation, where a query tile sees the key tiles of earlier or equal chunks (the last
    chunk may be shorter)."""
    T, H, W = grid
    f, hr, wr = tiling
    q, k, v, _ = _qkv(1, 1, grid, 0, 16, torch.float64, seed=7)
    s = 16 ** -0.5

    def visible(a):
        end = min(T, ((a // (hr * wr)) * f // chunk + 1) * chunk)
        return [g for g in range((T // f) * hr * wr) if (g // (hr * wr)) * f < end]

    want, P = _brute_force(q[0, 0], k[0, 0], v[0, 0], grid, tiling, 0, 1, s, visible)
    hw = H * W
    for t0 in range(0, T - chunk, chunk):      # causal: no weight on a later chunk's keys
        assert P[t0 * hw:(t0 + chunk) * hw, (t0 + chunk) * hw:].abs().max() == 0
    assert rel_err(want, monarch_rt_reference(q, k, v, grid=grid, tiling=tiling)[0, 0]) > 1e-3   # not the full one
    counted = 0
    for c, t0 in enumerate(range(0, T, chunk)):
        end = min(T, t0 + chunk)
        rows = slice(t0 * hw, end * hw)
        kw = dict(grid=(end, H, W), tiling=tiling, cached_frames=c * chunk)
        qc, kc, vc = q[:, :, rows], k[:, :, :end * hw], v[:, :, :end * hw]
        with FlopCounterMode(display=False) as fc:
            assert rel_err(monarch_rt_reference(qc, kc, vc, **kw)[0, 0], want[rows]) < 1e-12
        counted += fc.get_total_flops()
        got = monarch_rt_triton(qc.float(), kc.float(), vc.float(), **kw)
        assert rel_err(got[0, 0], want[rows]) < 2e-5
    # the method's block-causal plan (Method.apply / cost, "cached" mode) computes and counts the same
    m = registry.get("monarch_rt")
    args = dict(_args(grid, tiling, 0), causal_chunk=chunk)
    del args["cached_frames"]
    assert m.causal_unsupported(args) is None
    assert rel_err(m.apply(q, k, v, args, s)[0, 0], want) < 1e-12
    assert m.cost(Shape(1, 1, T * hw, T * hw, 16), args) == counted
