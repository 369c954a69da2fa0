"""Optimized models under context parallelism, on CPU: 2 processes joined by gloo.

Process start-up dominates, so one spawned job runs every check on both ranks and returns what it
measured; the tests below assert on it. Ring forms of the kernels are also checked in one process
(simulated ranks), where odd sizes are cheap.
"""
from __future__ import annotations

import math
import time
import warnings

import pytest
import torch

from vmonarch_fixtures.distributed import run_ranks

P = 2  # ranks
WAN = dict(frames=4, height=4, width=5, heads=2)  # 80 tokens: 2 frames per rank, 1 head per rank under Ulysses
GRID = (4, 4, 5)


# ------------------------------------------------------------------------------- in the ranks
def _plans(model) -> dict:
    return {sid: (p.method, dict(p.args)) for sid, p in model.vmonarch.plans.items()}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / b.norm()).item()


def _out(model, batch):
    with torch.no_grad():
        return model(**batch)[0] if isinstance(batch, dict) else model(batch)


def _wan():
    from vmonarch_fixtures import models

    return models.wan(**WAN)


def _ulysses(world):
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=world)


def _ring(world):
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ring_degree=world)


def _job(rank: int, world: int) -> dict:
    """Every multi-process check, on each rank; returns what the tests assert."""
    warnings.simplefilter("ignore")
    import vmonarch_opt
    from handwritten_models import UlyssesStack
    from vmonarch_fixtures.distributed import enable_context_parallel
    from vmonarch_opt import Budget, MonarchConfig, VMoBAConfig, VMonarchError
    from vmonarch_opt.parallel import Comm

    res: dict = {}
    pinned = {"blocks.0.attn1": MonarchConfig(), "blocks.1.attn1": VMoBAConfig()}

    # 1. Ulysses, optimize then enable_parallelism: the per-rank calls (all tokens, 1 of 2 heads) run
    # the plans made for the whole model, and give the single-process output
    model, batch = _wan()
    ulysses_opt = vmonarch_opt.optimize(model, batch, overrides=pinned, budget=None, min_seq_len=0)
    single = _out(ulysses_opt, batch)
    enable_context_parallel(ulysses_opt, _ulysses(world))
    res["ulysses_after"] = dict(err=_rel(_out(ulysses_opt, batch), single), stats=vmonarch_opt.stats(ulysses_opt),
                                plans=_plans(ulysses_opt))

    # 2. the other order needs inplace=True (diffusers' hooks cannot be deep-copied)
    model, batch = _wan()
    enable_context_parallel(model, _ulysses(world))
    try:
        vmonarch_opt.optimize(model, batch, min_seq_len=0)
        res["copy_refused"] = None
    except VMonarchError as e:
        res["copy_refused"] = str(e)

    # 3. enable then optimize in place, calibrated: each rank measures its head, the ranks merge
    budget = Budget(max_rel_error=0.5, monarch_steps=(1,))
    opt = vmonarch_opt.optimize(model, batch, inplace=True, methods=("monarch", "dense"), budget=budget,
                                min_seq_len=0)
    prof = opt.vmonarch.profile
    chosen = prof.choices()
    ref_model, _ = _wan()  # one process, the plans the ranks agreed on pinned
    ref = vmonarch_opt.optimize(ref_model, batch, overrides=chosen, budget=None, min_seq_len=0)
    single_prof = vmonarch_opt.calibrate(ref_model, batch, methods=("monarch", "dense"), budget=budget, min_seq_len=0)
    # ... and optimizing before enable_parallelism, every rank on all heads, agreed in a
    # process_group(replicated=True) block: the one-process choice
    with vmonarch_opt.parallel.process_group(replicated=True):
        rep = vmonarch_opt.optimize(_wan()[0], batch, methods=("monarch", "dense"), budget=budget, min_seq_len=0)
    res["replicated"] = dict(plans=_plans(rep), merged=rep.vmonarch.profile.data["context_parallel"],
                             rows={sid: r["candidates"] for sid, r in rep.vmonarch.profile.sites.items()
                                   if r["status"] == "calibrated"},
                             single_choices={sid: str(c) for sid, c in single_prof.choices().items()},
                             choices={sid: str(c) for sid, c in rep.vmonarch.profile.choices().items()})
    res["ulysses_before"] = dict(
        plans=_plans(opt), err=_rel(_out(opt, batch), _out(ref, batch)), stats=vmonarch_opt.stats(opt),
        heads=[s.heads for s in opt.vmonarch.sites if s.kind == "self"],
        rows={sid: r["candidates"] for sid, r in prof.sites.items() if r["status"] == "calibrated"},
        single_rows={sid: r["candidates"] for sid, r in single_prof.sites.items() if r["status"] == "calibrated"},
        merged=prof.data.get("context_parallel"))

    # 4. ring, optimize then enable: dense exact (log-sum-exp merge), Monarch frame blocks from the
    # gathered R-step factors, VMoBA (no ring form) as exact dense ring attention with the reason
    # (3 blocks: one site each; one process runs the VMoBA site dense for the reference)
    from vmonarch_fixtures import models

    sites = {"blocks.0.attn1": "dense", "blocks.1.attn1": MonarchConfig(), "blocks.2.attn1": VMoBAConfig()}
    model, batch = models.wan(**WAN, layers=3)
    opt = vmonarch_opt.optimize(model, batch, overrides=sites, budget=None, min_seq_len=0)
    ref = vmonarch_opt.optimize(model, batch, overrides={**sites, "blocks.2.attn1": "dense"}, budget=None,
                                min_seq_len=0)
    vmoba_single = _out(opt, batch)
    enable_context_parallel(opt, _ring(world))
    out = _out(opt, batch)
    res["ring"] = dict(err=_rel(out, _out(ref, batch)), err_vmoba=_rel(out, vmoba_single),
                       stats=vmonarch_opt.stats(opt), plans=_plans(opt))

    # 5. a hand-written Ulysses model inside process_group(): calibrated across the ranks
    torch.manual_seed(0)
    hand = UlyssesStack(ulysses=True).eval()
    torch.manual_seed(0)
    plain = UlyssesStack(ulysses=False).eval()
    x = torch.randn(1, 60, 32, generator=torch.Generator().manual_seed(1))
    hb = Budget(max_rel_error=0.6, monarch_steps=(1,))
    with vmonarch_opt.parallel.process_group():
        opt = vmonarch_opt.optimize(hand, x, grid=(3, 4, 5), methods=("monarch",), budget=hb, min_seq_len=0)
    ref = vmonarch_opt.optimize(plain, x, grid=(3, 4, 5), overrides=opt.vmonarch.profile.choices(), budget=None,
                                min_seq_len=0)
    res["handwritten"] = dict(plans=_plans(opt), err=_rel(_out(opt, x), _out(ref, x)), stats=vmonarch_opt.stats(opt),
                              ref_plans=_plans(ref))

    # 6. benchmarks/context_parallel.py --smoke, its per-rank part: one device, then Ulysses on both
    from benchmarks.context_parallel import measure

    cfg = dict(smoke=True, layers=0, methods=["monarch"], runs=1, warmup=0)
    res["bench"] = {1: measure(rank, 1, cfg), world: measure(rank, world, cfg)}

    # 7. a local step that fails on one rank fails on every rank, naming it
    comm = Comm.of(None, origin="test", timeout=10.0)  # gloo: a monitored barrier first
    try:
        comm.exchange("a local step", lambda: 1 / (rank - 1))
        res["exchange"] = None
    except VMonarchError as e:
        res["exchange"] = str(e)

    # 8. a rank that fails inside a forward (between diffusers' all-to-alls): the other rank errors
    # within the group's timeout instead of hanging (the failed rank leaves the group)
    if rank == 1:
        ulysses_opt.blocks[1].register_forward_pre_hook(lambda *a: 1 / 0)
    t0 = time.monotonic()
    try:
        _out(ulysses_opt, _wan()[1])
        res["forward_failure"] = None
    except Exception as e:  # noqa: BLE001  rank 1: ZeroDivisionError; rank 0: the collective's error
        res["forward_failure"] = (type(e).__name__, str(e)[:200], time.monotonic() - t0)
    return res


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_job, P, timeout=20.0, deadline=400.0)


# ------------------------------------------------------------------------------- the tests
def test_ulysses_optimize_then_enable_runs_our_methods_on_every_rank(ranks):
    for r in ranks:
        u = r["ulysses_after"]
        assert u["err"] < 1e-5, u
        # one forward in one process, then one under Ulysses
        assert all(c["ran"] == 2 and not c["fell_back"] for c in u["stats"].values()), u["stats"]
        assert {m for m, _ in u["plans"].values()} >= {"monarch", "vmoba"}
    assert ranks[0]["ulysses_after"]["plans"] == ranks[1]["ulysses_after"]["plans"]


def test_enable_then_optimize_needs_inplace(ranks):
    for r in ranks:
        msg = r["copy_refused"]
        assert msg and "inplace=True" in msg and "deepcopy" in msg


def test_ulysses_enable_then_optimize_calibrates_across_the_ranks(ranks):
    a, b = (r["ulysses_before"] for r in ranks)
    assert a["plans"] == b["plans"] and a["rows"] == b["rows"]  # one choice on every rank
    assert a["heads"] == [1, 1]  # each rank's sites hold 1 of the 2 heads
    assert a["merged"]["ranks"] == P
    assert any(m == "monarch" for m, _ in a["plans"].values())
    for r in (a, b):
        assert r["err"] < 1e-5  # the output of one process running the agreed plans
        assert all(c["ran"] == 1 and not c["fell_back"] for c in r["stats"].values()), r["stats"]
    # merged per-head errors: rank 0's head then rank 1's, as one process measures the 2 heads; the
    # site error is the worst rank's (≥ the error over both heads)
    for sid, cands in a["rows"].items():
        for c, s in zip(cands, a["single_rows"][sid]):
            assert c["label"] == s["label"]
            assert len(c["error_per_head"]) == 2
            assert c["error_per_head"] == pytest.approx(s["error_per_head"], rel=1e-4, abs=1e-6)
            assert c["error"] == pytest.approx(max(c["error_per_head"]), rel=1e-4) and c["error"] >= s["error"] - 1e-6


def test_optimize_before_enable_agrees_in_a_replicated_group(ranks):
    a, b = (r["replicated"] for r in ranks)
    assert a["plans"] == b["plans"] and a["merged"]["heads"] == "replicated"
    assert a["choices"] == a["single_choices"]  # the ranks measured what one process measures
    for sid, cands in a["rows"].items():
        assert all(len(c["error_per_head"]) == 2 for c in cands)  # rank 0's list, not one per rank


def test_ring_dense_is_exact_monarch_matches_one_process_vmoba_falls_back(ranks):
    for r in ranks:
        g = r["ring"]
        assert [m for m, _ in g["plans"].values() if m != "original"] == ["dense", "monarch", "vmoba"]
        # dense exact, Monarch from the gathered R-step factors, VMoBA as exact dense ring attention
        assert g["err"] < 1e-5 and g["err_vmoba"] > 1e-3, g
        s = g["stats"]
        for sid in ("blocks.0.attn1", "blocks.1.attn1"):  # one process, then ring
            assert s[sid]["ran"] == 2 and not s[sid]["fell_back"], s
        v = s["blocks.2.attn1"]
        assert v["ran"] == 1 and v["fell_back"] == {"context_parallel": 1}, v
        assert "vmoba has no sequence-split (ring) form" in v["why"]["context_parallel"]


def test_handwritten_ulysses_model_agrees_and_matches_one_process(ranks):
    a, b = (r["handwritten"] for r in ranks)
    assert a["plans"] == b["plans"] == a["ref_plans"]
    assert any(m == "monarch" for m, _ in a["plans"].values())
    for r in (a, b):
        assert r["err"] < 1e-5
        assert all(c["ran"] >= 1 and not c["fell_back"] for c in r["stats"].values())


def test_benchmark_smoke_path(ranks):
    from benchmarks.context_parallel import summarize

    results, rows = summarize({d: [r["bench"][d] for r in ranks] for d in (1, P)})
    got = {(x["degree"], x["attention"]): x for x in results}
    assert set(got) == {(1, "dense"), (1, "monarch"), (P, "dense"), (P, "monarch")}
    assert all("error" not in x and x["step_ms"] > 0 for x in results)
    opt = got[(P, "monarch")]
    assert opt["sites_ran_ours"] == opt["sites"] == 2 and 0 < opt["flop_cut"] < 1
    assert opt["rel_error_vs_dense"] == pytest.approx(got[(1, "monarch")]["rel_error_vs_dense"], rel=1e-4)
    assert opt["scaling_efficiency"] == pytest.approx(got[(1, "monarch")]["step_ms"] / (P * opt["step_ms"]))
    assert len(rows) == 4


def test_a_failed_rank_fails_every_rank(ranks):
    for r in ranks:
        assert "failed on 1 of 2 ranks" in r["exchange"] and "rank 1: ZeroDivisionError" in r["exchange"]
    # inside a forward: rank 1 raised; rank 0, waiting in the next all-to-all, got an error too
    assert ranks[1]["forward_failure"][0] == "ZeroDivisionError"
    name, msg, seconds = ranks[0]["forward_failure"]
    assert name != "ZeroDivisionError" and seconds < 20 + 10, ranks[0]["forward_failure"]  # the group's timeout: 20 s


# ------------------------------------------------------------------------------- one process
def _simulated_ring(q, k, v, sizes, fn_factors, fn_rows):
    offs = [sum(sizes[:r]) for r in range(len(sizes))]
    runs = [(o, o + s) for o, s in zip(offs, sizes)]
    f = torch.cat([fn_factors(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in runs], dim=1)
    return torch.cat([fn_rows(q[:, :, a:b], f) for a, b in runs], dim=2)


@pytest.mark.parametrize("grid,block,sizes,D,dtype", [
    ((4, 3, 5), (1, 3, 5), (30, 30), 64, torch.float32),       # frame blocks, 2 frames per rank
    ((5, 2, 3), (2, 2, 3), (12, 12, 6), 80, torch.float32),    # frame pairs, a partial last block
    ((1, 4, 6), (1, 2, 6), (12, 12), 96, torch.float16),       # row bands of one frame
    ((1, 1, 17), (1, 1, 5), (10, 7), 128, torch.float32),      # 1D blocks, uneven runs
])
def test_monarch_ring_form_equals_the_reference(grid, block, sizes, D, dtype):
    from vmonarch_opt.kernels.monarch.layout import make_layout
    from vmonarch_opt.kernels.monarch.reference import monarch_attention_reference
    from vmonarch_opt.kernels.monarch.ring import monarch_ring_factors, monarch_ring_rows, ring_unsupported

    N = sum(sizes)
    q, k, v = (torch.randn(2, 3, N, D).to(dtype) for _ in range(3))
    assert ring_unsupported(grid, block, 0, 0, 1, sizes) is None
    B = make_layout(N, grid, block).B
    out = _simulated_ring(q, k, v, sizes, lambda a, b, c: monarch_ring_factors(a, b, c, block_tokens=B, scale=0.2),
                          lambda a, f: monarch_ring_rows(a, f, block_tokens=B))
    ref = monarch_attention_reference(q, k, v, grid=grid, block=block, scale=0.2)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert _rel(out, ref) < tol


def test_monarch_ring_form_refuses_what_it_cannot_split():
    from vmonarch_opt.kernels.monarch.ring import ring_unsupported

    assert "whole Monarch blocks" in ring_unsupported((4, 3, 5), (2, 3, 5), 0, 0, 1, (15, 45))
    assert "not runs of the sequence" in ring_unsupported((4, 3, 5), (1, 2, 5), 0, 0, 1, (30, 30))
    assert "text tokens" in ring_unsupported((4, 3, 5), (1, 3, 5), 1, 0, 1, (31, 30))
    assert "steps=2" in ring_unsupported((4, 3, 5), (1, 3, 5), 0, 0, 2, (30, 30))


@pytest.mark.parametrize("sizes", [(7, 7), (9, 4, 1)])
def test_log_sum_exp_merge_is_exact(sizes):
    from vmonarch_opt.kernels.flash.reference import attention_stats_reference
    from vmonarch_opt.parallel.ring import merge_partials

    N = sum(sizes)
    q = torch.randn(2, 2, 5, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, N, 16, dtype=torch.float64), torch.randn(2, 2, N, 16, dtype=torch.float64)
    out = lse = None
    for part_k, part_v in zip(k.split(list(sizes), 2), v.split(list(sizes), 2)):
        o, o_lse, _ = attention_stats_reference(q, part_k, part_v, scale=0.3)
        out, lse = merge_partials(out, lse, o, o_lse)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    assert _rel(out, ref) < 1e-6
    assert torch.allclose(lse.double(), torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1), atol=1e-5)
    assert math.isfinite(out.abs().max().item())


def _guarded(plan_args: dict, takeover: bool, cp: dict):
    """A routed module stub whose processor carries a diffusers-like parallel config ``cp``, its
    guard and the handler of one site planned with ``plan_args``."""
    from types import SimpleNamespace

    from vmonarch_opt.parallel.guard import GuardedHandler, ModuleGuard
    from vmonarch_opt.plan import SitePlan
    from vmonarch_opt.runtime import SiteRuntime

    mesh = SimpleNamespace(get_group=lambda: "ring group")
    config = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_anything=False, _ring_mesh=mesh, **cp))
    module = torch.nn.Identity()
    module.processor = SimpleNamespace(_parallel_config=config)
    rt = SiteRuntime(SitePlan("s", "monarch", args=plan_args, seq_q=60, seq_k=60, head_dim=16))
    guard = ModuleGuard(module, [rt], takeover, "site s is joint attention with text tokens")
    return module, config, rt, guard, GuardedHandler(rt, guard)


def test_ulysses_joint_site_runs_the_models_attention_with_the_reason():
    module, _, rt, guard, handler = _guarded({"text_before": 7, "text_after": 0}, False,
                                             dict(ring_degree=1, ulysses_degree=2))
    guard.pre(module, ())
    q = torch.randn(1, 1, 60, 16)
    with pytest.warns(RuntimeWarning, match="text tokens are not where the plan has them"):
        out = handler(dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False), lambda: "the model's own")
    assert out == "the model's own" and rt.counts["context_parallel"] == 1
    guard.post(module, (), None)
    assert guard.mode is None


def test_ring_guard_takes_over_self_attention_and_puts_the_config_back():
    module, config, rt, guard, _ = _guarded({"text_before": 0, "text_after": 0}, True,
                                            dict(ring_degree=2, ulysses_degree=1))
    guard.pre(module, ())
    assert guard.mode == "ring" and guard.group == "ring group" and module.processor._parallel_config is None
    guard.post(module, (), None)
    assert module.processor._parallel_config is config and guard.mode is None
    # a module it cannot take over keeps diffusers' ring attention, and says so on every call
    module, config, rt, guard, _ = _guarded({"text_before": 7, "text_after": 0}, False,
                                            dict(ring_degree=2, ulysses_degree=1))
    with pytest.warns(RuntimeWarning, match="diffusers' own ring attention ran"):
        guard.pre(module, ())
    assert module.processor._parallel_config is config and rt.counts["context_parallel"] == 1
    assert "joint attention with text tokens" in rt.last_fallback["context_parallel"]


def test_optimize_refuses_hooked_copies_and_ring_before_optimize():
    from types import SimpleNamespace

    from diffusers.hooks import HookRegistry, ModelHook

    import vmonarch_opt

    model, batch = _wan()
    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(ModelHook(), "a hook")
    with pytest.raises(vmonarch_opt.VMonarchError, match=r"deepcopy.*inplace=True"):
        vmonarch_opt.optimize(model, batch, min_seq_len=0)
    model, batch = _wan()
    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1))
    with pytest.raises(vmonarch_opt.VMonarchError, match=r"ring context parallelism .* already enabled.*optimize\(\)"):
        vmonarch_opt.optimize(model, batch, inplace=True, min_seq_len=0)


def test_session_keeps_joint_sites_dense_under_ulysses():
    from types import SimpleNamespace

    from vmonarch_opt.parallel.session import Session
    from vmonarch_opt.plan import SitePlan

    sites = [SimpleNamespace(site_id="joint", text_before=7, text_after=0),
             SimpleNamespace(site_id="video", text_before=0, text_after=0)]
    plans = {s.site_id: SitePlan(s.site_id, "monarch", args={"grid": [3, 4, 5]}) for s in sites}
    out = Session(kind="ulysses").restrict(sites, plans)
    assert out["video"] is plans["video"] and not out["joint"].rewritten
    assert "joint attention stays dense" in out["joint"].reason
    assert Session().restrict(sites, plans) is plans


def test_benchmark_needs_two_gpus(capsys, monkeypatch):
    from benchmarks.context_parallel import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["--no-append"]) == 0
    assert "needs at least 2 GPUs; found 1: nothing to measure" in capsys.readouterr().out
