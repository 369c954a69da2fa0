"""Streaming generation with a KV cache: the causal Wan fixture (``vmonarch_fixtures/causal_wan.py``),
what ``optimize`` finds in it (KV-cache sites on a streaming call, block-causal sites on the
training call), streaming through optimized copies, the example and the streaming benchmark's CPU
path. Tiny shapes: a 2-layer model, chunks of 3 frames of 4×5 tokens."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings

import pytest
import torch

import vmonarch_opt
from conftest import assert_kernels_ran
from vmonarch_fixtures.causal_wan import (append_kv, block_causal_mask, stream_generate, streaming_batch,
                                          tiny_causal_wan, training_batch)

ROOT = os.path.join(os.path.dirname(__file__), "..")
ATTN1 = ("blocks.0.attn1", "blocks.1.attn1")


@pytest.fixture(scope="module")
def tiny():
    """(model, noise of 9 latent frames = 3 chunks, text, streaming batch of chunk 2)."""
    model = tiny_causal_wan()
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, 9, 8, 10, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    return model, noise, text, streaming_batch(model, noise, text, chunk=2, steps=1)


@contextlib.contextmanager
def _quiet():
    """Without the runtime's once-per-site note that a KV-cache plan follows the cache length."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*keys are a KV cache.*")
        yield


# ------------------------------------------------------------------------------ the fixture itself
def test_block_causal_mask_and_cache_helpers():
    m = block_causal_mask(5, 2, 2)[0, 0]  # frames 0-1 | 2-3 | 4, 2 tokens each
    assert m.shape == (10, 10) and m.dtype == torch.bool
    assert m[0, :4].all() and not m[0, 4:].any()       # chunk 0 sees itself only
    assert m[5, :8].all() and not m[5, 8:].any()       # chunk 1 sees chunks 0 and 1
    assert m[9].all()                                  # the short last chunk sees everything
    kv = [dict(key=torch.randn(1, 4, 2, 3), value=torch.randn(1, 4, 2, 3))]
    two = append_kv(append_kv(None, kv), kv)
    assert two[0]["key"].shape == (1, 8, 2, 3) and torch.equal(two[0]["key"][:, 4:], kv[0]["key"])
    window = append_kv(two, kv, max_frames=3, tokens_per_frame=2)  # rolling window of 3 frames
    assert window[0]["value"].shape == (1, 6, 2, 3) and torch.equal(window[0]["value"][:, 2:], kv[0]["value"])
    assert torch.equal(window[0]["value"][:, :2], kv[0]["value"][:, 2:])
    with pytest.raises(ValueError, match="layers"):
        append_kv(two, kv + kv)


def test_streaming_equals_block_causal_training(tiny):
    """The last chunk denoised with the KV cache of the earlier (clean, timestep 0) chunks equals the
    rows of that chunk in the training forward over the whole clip (block-causal mask, per-frame
    timesteps 0 then t); the earlier chunks' rows do not see later frames."""
    model, noise, text, _ = tiny
    cache = None
    with torch.no_grad():
        for c in range(2):
            kv = model(noise[:, :, 3 * c:3 * c + 3], torch.zeros(1), text, kv_cache=cache, return_kv=True,
                       return_dict=False)[1]
            cache = append_kv(cache, kv)
        last = model(noise[:, :, 6:], torch.tensor([700.0]), text, kv_cache=cache, return_dict=False)[0]
        ts = torch.tensor([[0.0] * 6 + [700.0] * 3])
        full = model(**training_batch(noise, text, ts))[0]
        moved = noise.clone()
        moved[:, :, 6:] += 1.0
        full_moved = model(**training_batch(moved, text, ts))[0]
        same_t = model(**training_batch(noise, text, 300.0))[0]
        per_frame = model(**training_batch(noise, text, torch.full((1, 9), 300.0)))[0]
    assert torch.isfinite(full).all() and full.shape == noise.shape
    torch.testing.assert_close(last, full[:, :, 6:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_moved[:, :, :6], full[:, :, :6], rtol=0, atol=1e-6)  # causal
    assert (full_moved[:, :, 6:] - full[:, :, 6:]).abs().max() > 1e-2
    torch.testing.assert_close(per_frame, same_t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one chunk"):
        model(noise, torch.zeros(1), text, kv_cache=cache)


# ------------------------------------------------------------------------------ detection
def test_kv_cache_sites_detected_and_dense_streams_exactly(tiny):
    """On a streaming call, every self-attention is a KV-cache site with its cached frames; pinned
    to our dense op it streams exactly as the model does, following the cache as it grows (0, 3, 6
    cached frames), with no fallback."""
    model, noise, text, batch = tiny
    with _quiet():
        opt = vmonarch_opt.optimize(model, batch, methods=("dense",), budget=None, min_seq_len=0)
        ref, _, _ = stream_generate(model, noise, text, steps=2)
        out, records, _ = stream_generate(opt, noise, text, steps=2)
    rep = opt.report
    for sid in ATTN1:
        row = rep.site(sid)
        assert row["site"]["kind"] == "cached" and row["site"]["cached_frames"] == 6
        assert row["site"]["seq_q"] == 60 and row["site"]["seq_k"] == 180 and tuple(row["site"]["grid"]) == (3, 4, 5)
        assert row["plan"]["method"] == "dense" and row["plan"]["args"]["cached_frames"] == 6
        assert "KV cache: 6 cached frames before the 3 new ones" in rep.why(sid)
        assert rep.site(sid.replace("attn1", "attn2"))["site"]["kind"] == "cross"
    assert [r["cached_frames"] for r in records] == [0, 3, 6]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_kernels_ran(opt)
    assert all(c["ran"] == 9 for c in vmonarch_opt.stats(opt).values())  # 3 chunks x (2 steps + cache forward)


def test_monarch_rt_on_kv_cache_sites(tiny):
    """``methods=("monarch_rt",)`` on the streaming call: the KV-cache sites run MonarchRT's cached
    form (key grid 9×4×5, 6 cached frames) and stream with every call on our op, the first chunk's
    too (no cache: plain MonarchRT), finite and close to the model's video."""
    model, noise, text, batch = tiny
    with _quiet():
        opt = vmonarch_opt.optimize(model, batch, methods=("monarch_rt",), budget=None, min_seq_len=0)
        ref, _, _ = stream_generate(model, noise, text, steps=2)
        out, _, _ = stream_generate(opt, noise, text, steps=2)
    rep = opt.report
    for sid in ATTN1:
        plan = rep.site(sid)["plan"]
        assert plan["method"] == "monarch_rt" and plan["args"]["cached_frames"] == 6
        assert list(plan["args"]["grid"]) == [9, 4, 5] and "KV cache: 6 cached frames" in rep.why(sid)
    assert torch.isfinite(out).all()
    assert_kernels_ran(opt)
    assert all(c["ran"] == 9 for c in vmonarch_opt.stats(opt).values())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5, rel


def test_vmoba_on_kv_cache_and_block_causal_sites(tiny):
    """``methods=("vmoba",)``: the KV-cache sites run VMoBA's cached form (key blocks over the key
    grid 9×4×5, the new queries selecting among all of them) and stream with every call on our op;
    on the training call (block-causal) the sites run chunk by chunk and are causal: the first two
    chunks' outputs do not move when the last chunk's input does."""
    model, noise, text, batch = tiny
    with _quiet():
        vm = vmonarch_opt.optimize(model, batch, methods=("vmoba",), budget=None, min_seq_len=0)
        ref, _, _ = stream_generate(model, noise, text, steps=2)
        out, _, _ = stream_generate(vm, noise, text, steps=2)
    for sid in ATTN1:
        plan = vm.report.site(sid)["plan"]
        assert plan["method"] == "vmoba" and plan["args"]["cached_frames"] == 6
        assert list(plan["args"]["grid"]) == [9, 4, 5]
    assert torch.isfinite(out).all()
    assert_kernels_ran(vm)
    assert all(c["ran"] == 9 for c in vmonarch_opt.stats(vm).values())
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.5
    ts = torch.tensor([[0.0] * 6 + [500.0] * 3])
    batch = training_batch(noise, text, ts)
    moved = training_batch(noise + torch.cat([torch.zeros_like(noise[:, :, :6]), torch.ones_like(noise[:, :, 6:])], 2),
                           text, ts)
    train = vmonarch_opt.optimize(model, batch, methods=("vmoba",), budget=None, min_seq_len=0)
    assert all(train.report.site(sid)["plan"]["method"] == "vmoba"
               and train.report.site(sid)["plan"]["args"]["causal_chunk"] == 3 for sid in ATTN1)
    with torch.no_grad():
        a, b = train(**batch)[0], train(**moved)[0]
    assert_kernels_ran(train)
    assert torch.isfinite(a).all() and (a - b)[:, :, 6:].abs().max() > 0
    torch.testing.assert_close(b[:, :, :6], a[:, :, :6], rtol=0, atol=1e-5)


def test_block_causal_sites_detected_and_run_causally(tiny):
    """On the training call (whole clip, block-causal mask) every self-attention gets chunks of 3
    frames: dense is exact, and MonarchRT runs causally (the first two chunks' outputs do not move
    when the last chunk's input does) and computes what a MonarchRT copy streaming with a KV cache
    computes: the last chunk's rows agree."""
    model, noise, text, stream_batch = tiny
    ts = torch.tensor([[0.0] * 6 + [500.0] * 3])
    batch = training_batch(noise, text, ts)
    moved = training_batch(noise + torch.cat([torch.zeros_like(noise[:, :, :6]), torch.ones_like(noise[:, :, 6:])], 2),
                           text, ts)
    dense = vmonarch_opt.optimize(model, batch, methods=("dense",), budget=None, min_seq_len=0)
    rt = vmonarch_opt.optimize(model, batch, methods=("monarch_rt",), budget=None, min_seq_len=0)
    with torch.no_grad():
        ref = model(**batch)[0]
        torch.testing.assert_close(dense(**batch)[0], ref, rtol=1e-5, atol=1e-5)
        a, b = rt(**batch)[0], rt(**moved)[0]
    for opt in (dense, rt):
        for sid in ATTN1:
            row = opt.report.site(sid)
            assert row["site"]["kind"] == "self" and row["site"]["causal_chunk"] == 3
            assert row["plan"]["args"]["causal_chunk"] == 3
            assert "block-causal mask: chunks of 3 frames" in opt.report.why(sid)
        assert_kernels_ran(opt)
    assert all(opt.report.site(s)["plan"]["method"] == "monarch_rt" for s in ATTN1)
    assert torch.isfinite(a).all() and (a - ref).abs().max() > 0  # an approximation, not the dense path
    torch.testing.assert_close(b[:, :, :6], a[:, :, :6], rtol=0, atol=1e-5)
    with _quiet():
        streaming = vmonarch_opt.optimize(model, stream_batch, methods=("monarch_rt",), budget=None, min_seq_len=0)
        cache = None
        with torch.no_grad():
            for c in range(2):  # the context chunks at timestep 0, as in the training call
                kv = streaming(noise[:, :, 3 * c:3 * c + 3], torch.zeros(1), text, kv_cache=cache, return_kv=True,
                               return_dict=False)[1]
                cache = append_kv(cache, kv)
            last = streaming(noise[:, :, 6:], torch.tensor([500.0]), text, kv_cache=cache, return_dict=False)[0]
    assert_kernels_ran(streaming)
    torch.testing.assert_close(last, a[:, :, 6:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["vmoba", "dense"])
def test_streamed_last_chunk_equals_block_causal_rows(tiny, method):
    """A copy optimized on the block-causal training call and one optimized on a streaming call
    compute the same last chunk: the chunk-by-chunk form re-derives the plan for each visible grid
    as the streaming plan does for each cache length."""
    model, noise, text, stream_batch = tiny
    ts = torch.tensor([[0.0] * 6 + [500.0] * 3])
    batch = training_batch(noise, text, ts)
    with _quiet():
        train = vmonarch_opt.optimize(model, batch, methods=(method,), budget=None, min_seq_len=0)
        streaming = vmonarch_opt.optimize(model, stream_batch, methods=(method,), budget=None, min_seq_len=0)
        with torch.no_grad():
            a = train(**batch)[0]
            cache = None
            for c in range(2):
                kv = streaming(noise[:, :, 3 * c:3 * c + 3], torch.zeros(1), text, kv_cache=cache, return_kv=True,
                               return_dict=False)[1]
                cache = append_kv(cache, kv)
            last = streaming(noise[:, :, 6:], torch.tensor([500.0]), text, kv_cache=cache, return_dict=False)[0]
    assert_kernels_ran(train)
    assert_kernels_ran(streaming)
    torch.testing.assert_close(last, a[:, :, 6:], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ example and benchmark
def test_stream_example_runs(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from stream_causal_wan import main

    assert main(["--frames", "6", "--steps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "chunks.json").read_text())
    assert [r["cached_frames"] for r in res["chunks"]] == [0, 3]
    assert all(r["err_dense_op"] < 1e-4 and r["ref_max"] > 0 for r in res["chunks"])
    assert all(c["ran"] == 4 and not c["fell_back"] for c in res["stats_dense"].values())
    assert json.loads((tmp_path / "report.json").read_text())["rows"]
    from safetensors.torch import load_file

    lat = load_file(str(tmp_path / "latents.safetensors"))
    assert set(lat) == {"original", "dense_op", "optimized"} and lat["original"].shape == (1, 4, 6, 8, 10)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_streaming_benchmark_smoke(tmp_path, monkeypatch):
    """``benchmarks/streaming.py --smoke``: the dense generation and one optimized copy per method, the
    per-chunk errors, the attention-only timing of the site's op and the targets, into JSON and $OUT."""
    from benchmarks.streaming import main

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert main(["--smoke", "--methods", "monarch_rt,vmoba", "--json", str(tmp_path / "s.json")]) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["meta"]["chunks"] == 2 and res["meta"]["forwards_per_chunk"] == 2
    rows = {r["method"]: r for r in res["results"]}
    assert set(rows) == {"dense SDPA", "monarch_rt", "vmoba"}
    for r in rows.values():
        assert r["total_s"] > 0 and r["latent_fps"] > 0 and len(r["chunk_s"]) == len(r["chunk_err"]) == 2
        assert r["attention"]["op_ms"] > 0 and r["attention"]["kv"][2] == 2 * r["attention"]["q"][2]
    for name in ("monarch_rt", "vmoba"):
        rt = rows[name]
        assert rt["plan"]["method"] == name and rt["plan"]["args"]["cached_frames"] == 3
        assert 0 < rt["video_err"] < 0.5 and all(c["ran"] == 4 and not c["fell_back"] for c in rt["stats"].values())
        assert rt["attention"]["op_finite"] and 0 < rt["attention"]["op_err"] < 0.5
    assert {t["what"].split(":")[0] for t in res["targets"]} == {"monarch_rt", "vmoba"}
    section = (tmp_path / "out" / "streaming_section.md").read_text()
    assert section.index("Targets") > section.index("| method")
