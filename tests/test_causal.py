"""Block-causal masks and KV caches: detection, planning, run-time checks and the chunked forms
(issue 20, items 2 and 3). The methods' own forms are tested in their files; here: the shared
machinery, with the dense method (exact) and Monarch (causal through its prefix form)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vmonarch_opt
from vmonarch_opt import methods as registry
from vmonarch_opt.methods import Shape, causal
from vmonarch_opt.passes.causal import cached_key_frames, check_block_causal, chunk_frames, staircase

from conftest import assert_kernels_ran, rel_err


def _mask(T, hw, C, additive=False):
    m = causal.block_causal_visible(T, hw, C)[None, None]
    if additive:
        return torch.zeros(m.shape).masked_fill(~m, float("-inf"))
    return m


# ----------------------------------------------------------------------------- reading masks
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("T,C", [(6, 2), (7, 3), (5, 1)])
def test_staircase_finds_the_chunk(T, C, additive):
    hw = 6
    runs = staircase(_mask(T, hw, C, additive))
    assert runs is not None
    assert chunk_frames(runs, (T, 2, 3), T * hw) == C
    assert chunk_frames(runs, (T, 3, 2), T * hw) == C  # only H*W matters
    assert chunk_frames(runs, (T * 2, 1, 3), T * hw) in (None, 2 * C)  # other frame sizes: other chunks


def test_staircase_rejects_what_is_not_block_causal():
    T, hw = 4, 6
    n = T * hw
    i = torch.arange(n)
    window = (i[None, :] - i[:, None]).abs() <= 3
    assert staircase(window[None, None]) is None  # a window: rows are not prefixes
    token_causal = i[None, :] <= i[:, None]
    runs = staircase(token_causal)
    assert runs is not None and chunk_frames(runs, (T, 2, 3), n) is None  # prefixes, not whole frames
    assert chunk_frames(staircase(torch.ones(1, 1, n, n, dtype=torch.bool)), (T, 2, 3), n) is None  # hides nothing
    bias = torch.zeros(1, 1, n, n).masked_fill(~_mask(T, hw, 2), float("-inf"))
    bias[..., 0, 0] = 0.5  # a real bias: not a 0/-inf mask
    assert staircase(bias) is None
    per_head = torch.cat([_mask(T, hw, 2), _mask(T, hw, 1)], dim=1)  # differs across heads
    assert staircase(per_head) is None
    shifted = _mask(T, hw, 2).clone()
    shifted[..., 0, hw * 2] = True  # one more key for one row
    assert chunk_frames(staircase(shifted), (T, 2, 3), n) is None


def test_check_block_causal_rechecks_a_changed_mask():
    T, hw, C = 6, 4, 2
    m = _mask(T, hw, C)
    assert check_block_causal(m, T, hw, C)
    assert not check_block_causal(m, T, hw, 3)
    m[..., 0, T * hw - 1] = True  # changed in place: the remembered verdict must not be reused
    assert not check_block_causal(m, T, hw, C)
    assert check_block_causal(_mask(T, hw, C, additive=True), T, hw, C)


def test_cached_key_frames():
    assert cached_key_frames(3 * 20, 9 * 20, (3, 4, 5)) == 9
    assert cached_key_frames(3 * 20, 9 * 20 + 7, (3, 4, 5)) is None  # not whole frames
    assert cached_key_frames(3 * 20, 3 * 20, (3, 4, 5)) is None  # no cache
    assert cached_key_frames(3 * 20, 9 * 20, None) is None


# ----------------------------------------------------------------------------- chunked forms
def _qkv(B=2, H=2, N=60, D=16, Nk=None):
    Nk = Nk or N
    return torch.randn(B, H, N, D), torch.randn(B, H, Nk, D), torch.randn(B, H, Nk, D)


def test_dense_block_causal_and_cached_are_exact():
    T, Hg, Wg, C = 5, 3, 4, 2
    hw = Hg * Wg
    q, k, v = _qkv(N=T * hw)
    dense = registry.get("dense")
    args = {"grid": [T, Hg, Wg], "causal_chunk": C, "text_before": 0, "text_after": 0}
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(T, hw, C))
    assert rel_err(dense.apply(q, k, v, args, 0.25 ** 1), F.scaled_dot_product_attention(
        q, k, v, attn_mask=_mask(T, hw, C), scale=0.25)) < 1e-6
    assert rel_err(dense.apply(q, k, v, args, 16 ** -0.5), want) < 1e-6
    # FLOPs: the visible pairs only
    pairs = int(_mask(T, hw, C).sum())
    assert dense.cost(Shape(2, 2, T * hw, T * hw, 16), args) == 4 * 2 * 2 * pairs * 16
    # KV cache: the last 2 frames against all 5
    qn = q[:, :, 3 * hw:]
    kv_args = {"grid": [T, Hg, Wg], "cached_frames": 3}
    assert rel_err(dense.apply(qn, k, v, kv_args, 0.3), F.scaled_dot_product_attention(qn, k, v, scale=0.3)) < 1e-6


def test_monarch_prefix_form_is_causal():
    """Monarch runs a block-causal plan on each chunk's visible prefix: a query's output depends on
    no token of a later chunk (queries, keys or values)."""
    T, Hg, Wg, C = 6, 2, 4, 2
    hw = Hg * Wg
    q, k, v = _qkv(B=1, N=T * hw)
    monarch = registry.get("monarch")
    args = {"grid": [T, Hg, Wg], "block": [1, Hg, Wg], "text_before": 0, "text_after": 0, "steps": 1,
            "recompute": False, "causal_chunk": C}
    out = monarch.apply(q, k, v, args, 0.25)
    assert torch.isfinite(out).all()
    later = slice(4 * hw, None)  # the last chunk
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, later] = torch.randn_like(t[:, :, later])
    out2 = monarch.apply(q2, k2, v2, args, 0.25)
    torch.testing.assert_close(out2[:, :, :4 * hw], out[:, :, :4 * hw], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, later], out[:, :, later])
    # the unrestricted plan reads the later chunk everywhere
    full = {k_: v_ for k_, v_ in args.items() if k_ != "causal_chunk"}
    assert not torch.allclose(monarch.apply(q2, k2, v2, full, 0.25)[:, :, :hw], monarch.apply(q, k, v, full, 0.25)[:, :, :hw])
    assert monarch.cost(Shape(1, 2, T * hw, T * hw, 16), args) > monarch.cost(Shape(1, 2, T * hw, T * hw, 16), full)


def test_causal_unsupported_reasons():
    dense, monarch = registry.get("dense"), registry.get("monarch")
    kv = {"grid": [6, 2, 4], "cached_frames": 3, "text_before": 0, "text_after": 0}
    assert causal.unsupported(dense, kv) is None
    assert "KV cache" in causal.unsupported(monarch, {**kv, "block": [1, 2, 4], "steps": 1, "recompute": False})
    assert "text tokens" in causal.unsupported(dense, {**kv, "text_before": 3})
    assert "both" in causal.unsupported(dense, {**kv, "causal_chunk": 2})


# ----------------------------------------------------------------------------- a real block-causal model
def test_skyreels_v2_block_causal_dense_exact_and_causal():
    from vmonarch_fixtures.models import skyreels_v2

    model, batch = skyreels_v2(frames=6, causal_block_size=2)
    with torch.no_grad():
        ref = model(**batch)[0]
    opt = vmonarch_opt.optimize(model, batch, methods=("dense",), budget=None, min_seq_len=0)
    rows = {r["site"]["site_id"]: r for r in opt.report.rows}
    attn1 = [r for sid, r in rows.items() if sid.endswith("attn1")]
    assert attn1 and all(r["plan"]["args"].get("causal_chunk") == 2 for r in attn1)
    assert all("block-causal mask: chunks of 2 frames" in r["plan"]["reason"] for r in attn1)
    with torch.no_grad():
        out = opt(**batch)[0]
    assert rel_err(out, ref) < 1e-5
    assert_kernels_ran(opt)


@pytest.mark.parametrize("method", ["monarch", "monarch_rt"])
def test_skyreels_v2_structured_methods_stay_causal(method):
    """The optimized model is as causal as the model: changing the last chunk's input frames leaves
    the earlier frames' output unchanged."""
    from vmonarch_fixtures.models import skyreels_v2

    model, batch = skyreels_v2(frames=6, causal_block_size=2)
    opt = vmonarch_opt.optimize(model, batch, methods=(method,), budget=None, min_seq_len=0)
    assert any(r["plan"]["method"] == method and r["plan"]["args"].get("causal_chunk") == 2 for r in opt.report.rows)
    b2 = dict(batch)
    b2["hidden_states"] = batch["hidden_states"].clone()
    b2["hidden_states"][:, :, 4:] = torch.randn_like(b2["hidden_states"][:, :, 4:])
    with torch.no_grad():
        out, out2, ref = opt(**batch)[0], opt(**b2)[0], model(**batch)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out2[:, :, :4], out[:, :, :4], rtol=1e-5, atol=1e-6)
    assert rel_err(out, ref) < 0.5
    assert_kernels_ran(opt)


def test_skyreels_v2_mask_checked_on_every_call():
    """A site planned block-causal runs the model's own attention, with the reason, when the mask
    it gets is another one (here: the model's autoregressive mode switched off: no mask)."""
    from vmonarch_fixtures.models import skyreels_v2

    model, batch = skyreels_v2(frames=6, causal_block_size=2)
    opt = vmonarch_opt.optimize(model, batch, methods=("dense",), budget=None, min_seq_len=0)
    opt.register_to_config(num_frame_per_block=1)  # bidirectional now: no mask passed
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = opt(**batch)[0]
        ref = model.__class__.forward  # noqa: F841
    assert any("bidirectional" in str(w.message) for w in caught)
    stats = vmonarch_opt.stats(opt)
    assert all(c["fell_back"] for sid, c in stats.items() if sid.endswith("attn1"))
    model.register_to_config(num_frame_per_block=1)
    with torch.no_grad():
        assert rel_err(out, model(**batch)[0]) < 1e-6


def test_window_mask_stays_original_with_reason():
    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
            self.qkv = nn.Linear(32, 96)

        def forward(self, x):
            h = self.patch(x).flatten(2).transpose(1, 2)
            q, k, v = (t.unflatten(-1, (2, 16)).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
            n = q.shape[2]
            i = torch.arange(n)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(i[None] - i[:, None]).abs() <= 5)

    m = Windowed().eval()
    x = torch.randn(1, 4, 4, 4, 6)
    opt = vmonarch_opt.optimize(m, (x,), budget=None, min_seq_len=0)
    (row,) = opt.report.rows
    assert row["plan"]["method"] == "original" and "not block-causal" in row["plan"]["reason"], row["plan"]


# ----------------------------------------------------------------------------- KV caches
class CachedAttention(nn.Module):
    """Patch embedding, then one self-attention over [cache ‖ new] keys/values (a streaming step)."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv3d(4, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cache_k=None, cache_v=None):
        h = self.patch(x).flatten(2).transpose(1, 2)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        if cache_k is not None:
            k, v = torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).flatten(2))


def _kv_inputs(new=2, cached=4, H=3, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, new, 2 * H, 2 * W, generator=g)
    ck = torch.randn(1, 2, cached * H * W, 16, generator=g) if cached else None
    cv = torch.randn(1, 2, cached * H * W, 16, generator=g) if cached else None
    return (x, ck, cv)


def test_kv_cache_site_found_planned_and_followed():
    model = CachedAttention().eval()
    batch = _kv_inputs(new=2, cached=4)
    opt = vmonarch_opt.optimize(model, batch, methods=("dense",), budget=None, min_seq_len=0)
    (row,) = opt.report.rows
    assert row["site"]["kind"] == "cached" and row["site"]["cached_frames"] == 4, row["site"]
    assert row["plan"]["args"]["cached_frames"] == 4 and row["plan"]["args"]["grid"] == [6, 3, 4]
    assert "KV cache: 4 cached frames" in row["plan"]["reason"]
    with torch.no_grad():
        assert rel_err(opt(*batch), model(*batch)) < 1e-6
        # the cache grows (and is empty for the first chunk): the plan follows each length
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for cached in (0, 6, 8):
                b = _kv_inputs(new=2, cached=cached, seed=cached + 1)
                assert rel_err(opt(*b), model(*b)) < 1e-6
        assert any("KV cache" in str(w.message) for w in caught)
    assert_kernels_ran(opt)
    assert vmonarch_opt.stats(opt)[row["site"]["site_id"]]["ran"] == 4


def test_kv_cache_not_whole_frames_stays_original():
    model = CachedAttention().eval()
    x, ck, cv = _kv_inputs(new=2, cached=4)
    ck, cv = ck[:, :, :-5], cv[:, :, :-5]  # 5 keys short of whole frames
    opt = vmonarch_opt.optimize(model, (x, ck, cv), methods=("dense",), budget=None, min_seq_len=0)
    (row,) = opt.report.rows
    assert row["site"]["kind"] == "cached" and row["plan"]["method"] == "original"
    assert "not whole frames" in row["plan"]["reason"]


def test_kv_cache_monarch_explains_and_calibration_picks_another():
    model = CachedAttention().eval()
    batch = _kv_inputs(new=2, cached=4)
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), budget=None, min_seq_len=0)
    (row,) = opt.report.rows
    assert row["plan"]["method"] == "original" and "KV cache keeps only keys" in row["plan"]["reason"]


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("method", ["dense", "monarch", "monarch_rt"])
def test_block_causal_onnx_lowering_matches(method, tmp_path):
    """Block-causal plans export as one decomposition per chunk; onnxruntime gives the optimized
    model's output."""
    from vmonarch_fixtures.models import skyreels_v2

    model, batch = skyreels_v2(frames=4, height=2, width=3, layers=1, causal_block_size=2)
    opt = vmonarch_opt.optimize(model, batch, methods=(method,), budget=None, min_seq_len=0)
    from vmonarch_opt.deploy import export_onnx

    res = export_onnx(opt, batch, str(tmp_path / "m.onnx"))
    lowered = {s["site"]: s["lowered"] for s in res.sites}
    attn1 = [sid for sid in lowered if sid.endswith("attn1")]
    assert attn1 and all("block-causal" in lowered[sid] for sid in attn1), lowered
    assert res.max_rel_error is not None and res.max_rel_error < 1e-4, res


def test_kv_cache_monarch_rt_follows_the_cache_and_exports(tmp_path):
    from vmonarch_opt.deploy import export_onnx

    model = CachedAttention().eval()  # attention in the root module's own forward (routed at the root)
    batch = _kv_inputs(new=2, cached=4)
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch_rt",), budget=None, min_seq_len=0)
    (row,) = opt.report.rows
    assert row["plan"]["method"] == "monarch_rt" and row["plan"]["args"]["cached_frames"] == 4, row["plan"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cached in (4, 0, 6, 9):
            b = _kv_inputs(new=2, cached=cached, seed=cached + 1)
            out, ref = opt(*b), model(*b)
            assert torch.isfinite(out).all() and rel_err(out, ref) < 0.5
    assert_kernels_ran(opt)
    res = export_onnx(opt, batch, str(tmp_path / "kv.onnx"))
    assert "KV cache" in res.sites[0]["lowered"] and res.max_rel_error < 1e-4, res


def test_anyflow_far_flex_attention_is_named_not_skipped():
    """AnyFlow-FAR's causal self-attention is flex_attention with a BlockMask over full and
    FAR-compressed tokens (two token grids): not rewritten, and the report says so by module."""
    from vmonarch_fixtures.models import anyflow_far

    model, batch = anyflow_far()
    with pytest.warns(RuntimeWarning, match="flex_attention ran in blocks.0.attn1"):
        opt = vmonarch_opt.optimize(model, batch, budget=None, min_seq_len=0)
    assert "not optimized: flex_attention ran in blocks.0.attn1" in str(opt.report)
    assert all(r["plan"]["method"] == "original" for r in opt.report.rows)
    with torch.no_grad():
        assert torch.equal(opt(**batch)[0], model(**batch)[0])


def test_block_causal_compiles_fullgraph_and_checks_the_mask_in_graph():
    """Compiled with fullgraph: the mask check is a tensor and torch.cond picks our op or the
    model's masked attention; a mask that is not the planned one gets the model's result, counted."""
    T, Hg, Wg, C = 4, 2, 3, 2
    hw = Hg * Wg

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
            self.qkv = nn.Linear(32, 96)

        def forward(self, x, mask):
            h = self.patch(x).flatten(2).transpose(1, 2)
            q, k, v = (t.unflatten(-1, (2, 16)).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Masked()

        def forward(self, x, mask):
            return self.block(x, mask)

    model = Outer().eval()
    x = torch.randn(1, 4, T, 2 * Hg, 2 * Wg)
    mask = _mask(T, hw, C)
    opt = vmonarch_opt.optimize(model, (x, mask), methods=("monarch_rt",), budget=None, min_seq_len=0)
    (row,) = opt.report.rows
    assert row["plan"]["args"]["causal_chunk"] == C
    other = torch.ones_like(mask)
    with torch.no_grad():
        eager = opt(x, mask)
        compiled = torch.compile(opt, fullgraph=True)
        torch.testing.assert_close(compiled(x, mask), eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled(x, other), model(x, other), rtol=1e-5, atol=1e-6)
    calls = vmonarch_opt.stats(opt)[row["site"]["site_id"]]
    assert calls["ran"] == 2 and calls["fell_back"] == {"not_causal": 1}, calls


def test_block_causal_training_gradients():
    """Fine-tuning a block-causal model through the optimizer: dense matches the model's own
    gradients; monarch_rt's are finite and flow to every attention projection."""
    from vmonarch_fixtures.models import skyreels_v2

    model, batch = skyreels_v2(frames=4, height=2, width=3, layers=1, causal_block_size=2)
    for method in ("dense", "monarch_rt"):
        opt = vmonarch_opt.optimize(model, batch, methods=(method,), budget=None, min_seq_len=0)
        opt.train()
        model.zero_grad()
        opt.zero_grad()
        opt(**batch)[0].square().mean().backward()
        model(**batch)[0].square().mean().backward()
        ours = dict(opt.named_parameters())
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = ours[name].grad
            assert g is not None and torch.isfinite(g).all(), name
            if method == "dense":
                torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        assert ours["blocks.0.attn1.to_q.weight"].grad.abs().sum() > 0
        assert_kernels_ran(opt)


def test_block_causal_profile_round_trip(tmp_path):
    """A calibrated block-causal site saves its structure with the profile and reuses it."""
    from vmonarch_fixtures.models import skyreels_v2
    from vmonarch_opt.profiles.budget import Budget

    model, batch = skyreels_v2(frames=4, height=2, width=3, layers=1, causal_block_size=2)
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch_rt", "dense"), budget=Budget(max_rel_error=0.9),
                                min_seq_len=0)
    path = tmp_path / "p.json"
    opt.vmonarch.profile.save(str(path))
    again = vmonarch_opt.optimize(model, batch, profile=vmonarch_opt.load_profile(str(path)))
    for a, b in zip(opt.report.rows, again.report.rows):
        assert a["plan"]["method"] == b["plan"]["method"] and a["plan"]["args"] == b["plan"]["args"]
    row = next(r for r in again.report.rows if r["site"]["site_id"] == "blocks.0.attn1")
    assert row["plan"]["args"]["causal_chunk"] == 2 and "block-causal" in row["plan"]["reason"]
    assert row["plan"]["reason"].startswith("calibrated")


def test_kv_cache_dense_reason_names_the_refusing_method():
    model = CachedAttention().eval()
    batch = _kv_inputs(new=2, cached=4)
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch", "dense"), budget=None, min_seq_len=0)
    (row,) = opt.report.rows
    assert row["plan"]["method"] == "dense"
    assert row["plan"]["reason"].startswith("dense: monarch: Monarch's R step"), row["plan"]["reason"]
    cal = vmonarch_opt.optimize(model, batch, methods=("monarch", "dense"), min_seq_len=0)
    (row,) = cal.report.rows
    assert "no structured candidate applies" in row["plan"]["reason"] and "monarch: Monarch's R step" in row["plan"]["reason"]
    assert "24→72" in str(cal.report)  # the shape column shows queries → keys


@pytest.mark.parametrize("method", ["dense", "monarch_rt"])
def test_self_attention_plan_takes_a_cache_later(method):
    """Optimized on the first chunk (no cache: plain self-attention), the site runs its method's
    KV-cache form when later calls bring a cache of whole frames."""
    model = CachedAttention().eval()
    first = _kv_inputs(new=2, cached=0)[:1]
    opt = vmonarch_opt.optimize(model, first, methods=(method,), budget=None, min_seq_len=0)
    (row,) = opt.report.rows
    assert row["site"]["kind"] == "self" and row["plan"]["method"] == method
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cached in (2, 4):
            b = _kv_inputs(new=2, cached=cached, seed=cached)
            out, ref = opt(*b), model(*b)
            assert rel_err(out, ref) < (1e-6 if method == "dense" else 0.5)
    assert any("KV cache" in str(w.message) for w in caught)
    stats = vmonarch_opt.stats(opt)[row["site"]["site_id"]]
    assert stats["ran"] == 2 and not stats["fell_back"], stats


def test_kv_cache_compiled_follows_the_cache():
    """Under torch.compile the growing cache re-derives the plan per length as in eager mode."""
    model = CachedAttention().eval()
    opt = vmonarch_opt.optimize(model, _kv_inputs(new=2, cached=4), methods=("monarch_rt",), budget=None,
                                min_seq_len=0)
    compiled = torch.compile(opt)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cached in (4, 6, 8):
            b = _kv_inputs(new=2, cached=cached, seed=cached)
            torch.testing.assert_close(compiled(*b), opt(*b), rtol=1e-5, atol=1e-6)
    stats = vmonarch_opt.stats(opt)["<root>"]
    assert stats["ran"] == 6 and not stats["fell_back"], stats
