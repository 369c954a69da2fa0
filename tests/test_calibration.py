"""Calibration: per-site statistics, candidate errors and costs, choices under a budget (CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

import vmonarch_opt
from vmonarch_opt import Budget, DenseConfig, MonarchConfig, VMoBAConfig
from vmonarch_opt.profiles.allocation import _global_allocation
from vmonarch_opt.profiles.calibrate import candidate_configs
from vmonarch_opt.site import AttentionSite
from conftest import rel_err

T, H, W, D, HEADS = 4, 6, 6, 16, 2
N = T * H * W


class Attn(torch.nn.Module):
    """A model that is just attention over the q/k/v it is given: the data alone decides."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def frame_local(seed=0):
    """Each query attends (almost only) to keys of its own frame."""
    g = _gen(seed)
    c = torch.randn(1, HEADS, T, 1, D, generator=g)
    c = 8 * c / c.norm(dim=-1, keepdim=True)
    q = (c + 0.4 * torch.randn(1, HEADS, T, H * W, D, generator=g)).reshape(1, HEADS, N, D)
    k = (c + 0.4 * torch.randn(1, HEADS, T, H * W, D, generator=g)).reshape(1, HEADS, N, D)
    return q, k, torch.randn(1, HEADS, N, D, generator=g)


def sharp_random(seed=0):
    """Peaked attention on random keys anywhere: no block structure."""
    g = _gen(seed)
    return (1.7 * torch.randn(1, HEADS, N, D, generator=g), 1.7 * torch.randn(1, HEADS, N, D, generator=g),
            torch.randn(1, HEADS, N, D, generator=g))


def uniform(seed=0):
    """All keys equal: every query attends uniformly (Monarch is exact, block-sparse is not)."""
    g = _gen(seed)
    k = torch.randn(1, 1, 1, D, generator=g).expand(1, HEADS, N, D).contiguous()
    return torch.randn(1, HEADS, N, D, generator=g), k, torch.randn(1, HEADS, N, D, generator=g)


def _calib(batch, budget, **kw):
    return vmonarch_opt.calibrate(Attn(), batch, budget=budget, grid=(T, H, W), min_seq_len=0, progress=False, **kw)


def _only(profile):
    (row,) = [r for r in profile.sites.values() if r["status"] in ("calibrated", "pinned")]
    return row


def test_choice_follows_the_data():
    tight = Budget(max_rel_error=0.02)
    local = _only(_calib(frame_local(), tight))
    ok = [c for c in local["candidates"] if c["meets_budget"] and c["flops"] < local["dense"]["flops"]]
    assert ok and local["choice"]["config"] == min(ok, key=lambda c: c["flops"])["config"]  # the cheapest in budget
    assert local["choice"]["error"] <= 0.02 and local["choice"]["flops"] < local["dense"]["flops"]
    assert sum(local["stats"]["own_frame_mass"]) / HEADS > 0.95

    sharp = _only(_calib(sharp_random(), tight))
    assert sharp["choice"]["config"] == {"method": "dense"}
    assert all(not c["meets_budget"] for c in sharp["candidates"]) and len(sharp["candidates"]) >= 6
    assert "no candidate meets the error budget" in sharp["choice"]["why"]
    # the same data under a loose budget does get a structured method: the budget decides
    loose = _only(_calib(sharp_random(), Budget(max_rel_error=2.0)))
    assert loose["choice"]["config"]["method"] != "dense"

    uni = _only(_calib(uniform(), tight))
    assert uni["choice"]["config"]["method"] == "monarch" and uni["choice"]["error"] < 1e-5
    # statistics: uniform attention has entropy log N and no block concentration
    st = uni["stats"]
    assert all(abs(e - 1) < 1e-4 for e in st["entropy_norm"])
    assert all(abs(c - st["top_blocks"] / st["blocks"]) < 1e-4 for c in st["concentration"])
    assert sum(sharp["stats"]["concentration"]) / HEADS > 0.3  # a few random blocks hold the mass


def test_candidate_errors_are_measured_against_dense():
    q, k, v = frame_local(1)
    prof = _calib((q, k, v), Budget(max_rel_error=0.05))
    row = _only(prof)
    ref = F.scaled_dot_product_attention(q, k, v)
    for c in row["candidates"]:
        cfg = c["config"]
        if cfg["method"] == "monarch":
            out = torch.ops.vmonarch.monarch_attention(q, k, v, [T, H, W], cfg["block"], 0, 0, cfg["steps"],
                                                       D ** -0.5, cfg["recompute"])
        else:
            out = torch.ops.vmonarch.vmoba_attention(q, k, v, [T, H, W], cfg["chunk"], 0, 0, cfg["partition"],
                                                     cfg["threshold"], cfg["topk"], D ** -0.5, cfg["pooled_rest"],
                                                     cfg["selection"], cfg["scope"] or "")
            assert 0 < c["density"] <= 1
        assert abs(rel_err(out, ref) - c["error"]) < 1e-4 * max(1.0, c["error"]), c["label"]
        assert c["meets_budget"] == (c["error"] <= 0.05)
        assert len(c["error_per_head"]) == HEADS
        assert c["flops"] > 0


def test_several_batches_take_the_worst_error():
    b1, b2 = uniform(0), sharp_random(0)
    prof = _calib([dict(q=b1[0], k=b1[1], v=b1[2]), dict(q=b2[0], k=b2[1], v=b2[2])], Budget(max_rel_error=0.02))
    row = _only(prof)
    assert prof.data["batches"] == 2 and row["batches"] == 2
    assert row["choice"]["config"]["method"] == "dense"  # fine on batch 1, not on batch 2


def test_methods_restrict_candidates_and_per_site_budget():
    prof = _calib(frame_local(), Budget(max_rel_error=0.02), methods=("vmoba", "dense"))
    row = _only(prof)
    assert row["candidates"] and all(c["config"]["method"] == "vmoba" for c in row["candidates"])
    prof = _calib(uniform(), Budget(max_rel_error=0.5, per_site={"<root>": 0.0}))
    assert not any(c["meets_budget"] for c in _only(prof)["candidates"])  # no structured method is exact here
    assert _only(prof)["choice"]["config"]["method"] == "dense"
    assert _only(prof)["limit"] == 0.0


def test_overrides_pin_sites():
    prof = _calib(sharp_random(), Budget(max_rel_error=0.01), overrides={"*": MonarchConfig(block=(1, 6, 6))})
    row = _only(prof)
    assert row["status"] == "pinned" and row["choice"]["config"]["block"] == [1, 6, 6]
    assert row["choice"]["error"] > 0.01  # measured and reported, but the pin wins


def _site(grid, n_text=0):
    t, h, w = grid
    n = t * h * w + n_text
    return AttentionSite(site_id="a", module_path="a", ordinal=0, form="sdpa", batch=1, heads=2, kv_heads=2,
                         seq_q=n, seq_k=n, head_dim=16, head_dim_v=16, dtype="float32", layout="[B,H,N,D]",
                         grid=grid, text_before=n_text)


def test_candidate_lists():
    labels = [(lay, cfg) for lay, cfg in candidate_configs(_site((8, 6, 10)), Budget(), layer=1)]
    blocks = {cfg.block for lay, cfg in labels if cfg.method == "monarch"}
    assert {(1, 6, 10), (2, 6, 10), (1, 3, 5)} <= blocks
    assert {cfg.steps for _, cfg in labels if cfg.method == "monarch"} == {1, 2}
    vm = [cfg for _, cfg in labels if cfg.method == "vmoba" and cfg.selection == "group"]
    token = [cfg for _, cfg in labels if cfg.method == "vmoba" and cfg.selection == "token"]
    assert [(v.threshold, v.topk, v.pooled_rest) for v in token] == [(0.25, 0, False), (0.25, 0, True)]
    thr = [(v.threshold, v.pooled_rest) for v in vm if v.topk == 0]
    assert thr == [(t, p) for t in (0.25, 0.5, 0.75) for p in (False, True)]
    # global top-k at 1/8 of the blocks: 2d partition of (8, 6, 10) in 2×3 tiles = 12 blocks -> 2
    assert [(v.topk, v.pooled_rest) for v in vm if v.topk] == [(2, False), (2, True)]
    assert all(v.partition == "2d" for v in vm)
    vm1 = [c for _, c in candidate_configs(_site((8, 6, 10)), Budget(vmoba_pooled=(True,), vmoba_topk=()))
           if c.method == "vmoba"]
    assert len(vm1) == 4 and all(c.pooled_rest for c in vm1)  # 3 group thresholds + the token rule's
    with pytest.raises(ValueError, match="vmoba_pooled"):
        Budget(vmoba_pooled=())
    with pytest.raises(ValueError, match="vmoba_topk"):
        Budget(vmoba_topk=(1.0,))
    # no grid: 1D blocks of ~sqrt(N)
    s = _site((8, 6, 10))
    s.grid = None
    one_d = candidate_configs(s, Budget(vmoba_thresholds=(), vmoba_topk=(), vmoba_token_thresholds=()))
    assert one_d and all(cfg.block[:2] == (1, 1) and cfg.block[2] == math.isqrt(479) + 1 for _, cfg in one_d)
    # explicit candidates
    given = candidate_configs(s, Budget(candidates=[VMoBAConfig(threshold=0.3), DenseConfig()]))
    assert [cfg.threshold for _, cfg in given] == [0.3]


def test_global_mean_error_allocation():
    def row(errs_flops, dense=100.0):
        cands = [dict(error=e, flops=f, meets_budget=True, time_ms=None) for e, f in errs_flops]
        return dict(candidates=cands, dense=dict(flops=dense, time_ms=None), limit=1.0)

    rows = {"a": row([(0.02, 10), (0.001, 50)]), "b": row([(0.05, 10), (0.001, 90)])}
    assert _global_allocation(rows, 1.0, "flops") == {"a": 0, "b": 0}  # loose: cheapest everywhere
    pick = _global_allocation(rows, 0.02, "flops")  # mean of the cheapest (0.035) is too much
    err = (rows["a"]["candidates"][pick["a"]]["error"] + rows["b"]["candidates"][pick["b"]]["error"]) / 2
    assert err <= 0.02 and pick == {"a": 0, "b": 1}
    assert _global_allocation(rows, 0.0, "flops") == {"a": None, "b": None}


def test_budget_validation():
    with pytest.raises(ValueError, match="max_rel_error"):
        Budget(max_rel_error=-1)
    with pytest.raises(ValueError, match="cost"):
        Budget(cost="speed")
    with pytest.raises(ValueError, match="layouts"):
        Budget(layouts=("diagonal",))
    with pytest.raises(TypeError, match="Budget"):
        vmonarch_opt.calibrate(Attn(), uniform(), budget=0.05)
    assert Budget.from_dict(Budget(per_site={"x*": 0.1}).to_dict()) == Budget(per_site={"x*": 0.1})


def test_untuned_block_nests_and_is_thread_local():
    import threading

    from vmonarch_opt.kernels.tuning import tuning_enabled, untuned

    assert tuning_enabled()
    with untuned():
        assert not tuning_enabled()
        with untuned(False):  # a no-op block keeps the outer setting
            assert not tuning_enabled()
        seen = []
        t = threading.Thread(target=lambda: seen.append(tuning_enabled()))
        t.start()
        t.join()
        assert seen == [True]  # other threads keep tuning
    assert tuning_enabled()
    with untuned(False):
        assert tuning_enabled()


def test_masked_dense_is_the_models_masked_attention_with_its_entropy():
    """Padding-masked sites: one dense pass gives the reference (torch SDPA with the mask) and
    the entropy of the masked attention (explicit -Σ p log p), per batch element's visible keys;
    under a valid × valid mask the padded queries get what SDPA gives them (zeros)."""
    from vmonarch_opt.profiles.calibrate import masked_dense

    g = _gen(7)
    B, Hh, Nq, Dd = 3, 2, 45, 16
    q, k, v = (torch.randn(B, Hh, Nq, Dd, generator=g) for _ in range(3))
    valid = torch.ones(B, Nq, dtype=torch.bool)
    valid[0, 40:] = False  # 5 padded text keys
    valid[2, 30:] = False
    for mask in (valid, torch.where(valid, 0.0, float("-inf"))):  # bool and additive forms
        out, ent, n_keys = masked_dense(q, k, v, 0.25, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=0.25)
        assert rel_err(out, ref) < 1e-5
        logits = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~valid[:, None, None, :], float("-inf"))
        p = logits.softmax(-1)
        expect = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
        torch.testing.assert_close(ent, expect, rtol=1e-4, atol=1e-4)
        assert n_keys == round((40 + 45 + 30) / 3)
    outer = valid[:, None, :, None] & valid[:, None, None, :]  # HunyuanVideo 1.5: padded queries see nothing
    out, _, _ = masked_dense(q, k, v, 0.25, outer)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=outer, scale=0.25)) < 1e-5
    assert out[0, :, 40:].abs().max() == 0 and out[0, :, :40].abs().min() > 0
    with pytest.raises(ValueError, match="not a text padding mask"):
        masked_dense(q, k, v, 0.25, torch.randn(B, Nq))  # a real additive bias is not padding
    none_visible = valid.clone()
    none_visible[1] = False
    with pytest.raises(ValueError, match="hides every key"):
        masked_dense(q, k, v, 0.25, none_visible)


def test_output_budget_on_the_tiny_video_dit():
    """Budget(output_rel_error=e): candidates are measured in the model, the chosen combination's
    model-output error is verified ≤ e (and is what the report's validation measures), and a
    profile made this way reproduces its plan."""
    from vmonarch_fixtures.tiny_dit import calib_batch, load_tiny_video_dit

    model = load_tiny_video_dit()
    batch = calib_batch(1, 4, 16, detail=model.data_detail)
    budget = Budget(max_rel_error=0.5, output_rel_error=0.03)
    opt = vmonarch_opt.optimize(model, batch, budget=budget, min_seq_len=0)
    prof = opt.vmonarch.profile
    ob = prof.data["output_budget"]
    assert ob["target"] == 0.03 and 0 < ob["measured"] <= 0.03 and ob["candidates_measured"] > 6
    tot = opt.report.totals
    assert tot["flops_after"] < tot["flops_before"]
    assert tot["output_error"] == pytest.approx(ob["measured"], rel=1e-3)  # the validation run agrees
    rows = [r for r in prof.sites.values() if r["status"] == "calibrated"]
    assert all("output_error" in c for r in rows for c in r["candidates"] if c["meets_budget"]
               and c["flops"] < r["dense"]["flops"])
    chosen = [r for r in rows if r["choice"]["config"]["method"] != "dense"]
    assert chosen and all("output budget" in r["choice"]["why"] for r in rows)
    assert "output_rel_error=0.03 (model output error of the choice" in str(prof)
    again = vmonarch_opt.optimize(model, batch, profile=prof)
    assert again.report.totals["flops_after"] == tot["flops_after"]
    with pytest.raises(ValueError, match="not both"):
        Budget(mean_rel_error=0.1, output_rel_error=0.1)
    with pytest.raises(ValueError, match="output_rel_error"):
        Budget(output_rel_error=-1)


def test_output_budget_measured_on_sampled_videos():
    """Budget(output_rel_error=e) with evaluate=sampler: candidates are measured on the sampled videos,
    the chosen combination's sampled videos are within e of the dense ones (checked here by sampling
    the optimized model), and misuse of evaluate fails with a message that names the fix."""
    from vmonarch_opt.errors import VMonarchError
    from vmonarch_fixtures.tiny_dit import calib_batch, load_tiny_video_dit, sample

    model = load_tiny_video_dit()
    batch = calib_batch(1, 4, 16, detail=model.data_detail)

    def videos(m):
        return sample(m, [5, 6], steps=3, frames=4, height=16, width=16)

    budget = Budget(max_rel_error=0.5, output_rel_error=0.05)
    opt = vmonarch_opt.optimize(model, batch, budget=budget, min_seq_len=0, evaluate=videos)
    ob = opt.vmonarch.profile.data["output_budget"]
    assert ob["measured_on"] == "evaluate (videos)" and ob["candidates_measured"] > 6
    assert ob["forwards"] == ob["candidates_measured"] + 2 + 1  # reference twice, candidates, one round
    assert opt.report.totals["flops_after"] < opt.report.totals["flops_before"]
    dense = videos(model)
    assert rel_err(videos(opt), dense) == pytest.approx(ob["measured"], rel=1e-4) and ob["measured"] <= 0.05
    rows = [r for r in opt.vmonarch.profile.sites.values() if r["status"] == "calibrated"]
    assert any("evaluate() output" in r["choice"]["why"] for r in rows)
    assert "measured on evaluate (videos)" in str(opt.vmonarch.profile)
    assert torch.equal(videos(model), dense)  # the user's model is untouched

    def bad(evaluate, err, match, **kw):
        with pytest.raises(err, match=match):
            vmonarch_opt.optimize(model, batch, min_seq_len=0, evaluate=evaluate,
                                  **{"budget": budget, **kw})

    bad(lambda m: sample(m, [5], steps=2, frames=8, height=16, width=16), VMonarchError, "same video size")
    bad(lambda m: m(**batch) + torch.randn(1), VMonarchError, "not deterministic")
    bad(lambda m: torch.ones(3), VMonarchError, "never called site")
    bad(lambda m: "video", TypeError, "must return a tensor")
    bad("videos", TypeError, "evaluate must be a function")
    bad(videos, ValueError, "output budget is measured on", budget=Budget())
    bad(videos, ValueError, "nothing is calibrated", profile=opt.vmonarch.profile)


def test_output_budget_never_picks_a_candidate_that_blows_up(monkeypatch):
    """A candidate whose model output has NaN/inf counts as infinitely wrong (a NaN compares as
    neither larger nor smaller and must not slip through the allocation)."""
    from vmonarch_fixtures.tiny_dit import calib_batch, load_tiny_video_dit
    from vmonarch_opt import runtime

    model = load_tiny_video_dit()
    batch = calib_batch(1, 4, 16, detail=model.data_detail)
    real = runtime.run_site

    def poisoned(site, a, original):
        out = real(site, a, original)
        return out * float("nan") if site.site_id == "blocks.1.attn" else out

    monkeypatch.setattr(runtime, "run_site", poisoned)
    opt = vmonarch_opt.optimize(model, batch, budget=Budget(max_rel_error=0.5, output_rel_error=0.2),
                                min_seq_len=0, evaluate=lambda m: m(**batch), validate=False)
    rows = opt.vmonarch.profile.sites
    assert rows["blocks.1.attn"]["choice"]["config"]["method"] == "dense"
    errs = [c["output_error"] for c in rows["blocks.1.attn"]["candidates"] if "output_error" in c]
    assert errs and all(e == math.inf for e in errs)
    assert any(r["choice"]["config"]["method"] != "dense" for r in rows.values())  # others still structured
    assert 0 < opt.vmonarch.profile.data["output_budget"]["measured"] <= 0.2


def test_a_candidate_that_raises_is_skipped_with_its_reason(monkeypatch):
    """A candidate whose kernel cannot run (e.g. does not compile on a new GPU) is never chosen:
    calibration warns, records the error in the profile and chooses among the others."""
    import sys

    cal = sys.modules["vmonarch_opt.profiles.calibrate"]  # (the package exports the function calibrate)
    real = cal._run_candidate

    def run(cfg, *a, **kw):
        if isinstance(cfg, VMoBAConfig):
            raise RuntimeError("PTX compilation failed\nmore lines")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(cal, "_run_candidate", run)
    with pytest.warns(RuntimeWarning, match=r"candidate vmoba .* failed at site .*PTX compilation failed"):
        prof = _calib(frame_local(), Budget(max_rel_error=0.5), methods=("monarch", "vmoba"))
    row = _only(prof)
    failed = row["failed_candidates"]
    assert failed and all(f["label"].startswith("vmoba") for f in failed)
    assert all(f["error"] == "RuntimeError: PTX compilation failed" for f in failed)
    assert row["candidates"] and all(not c["label"].startswith("vmoba") for c in row["candidates"])
    assert row["choice"]["config"]["method"] == "monarch"
