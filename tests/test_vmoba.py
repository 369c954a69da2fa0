"""VMoBA block-sparse attention: reference semantics and the Triton kernels (TRITON_INTERPRET=1)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from vmonarch_opt.kernels.dispatch import vmoba_select
from vmonarch_opt.kernels.vmoba.layout import PARTITIONS, QUERY_GROUP, vmoba_layout, vmoba_partition_for_layer
from vmonarch_opt.kernels.vmoba.reference import (vmoba_attention_from_selection, vmoba_attention_reference,
                                                  vmoba_flops, vmoba_select_reference)


def _qkv(B, H, N, D, dtype=torch.float32, spread=1.0):
    return [(torch.randn(B, H, N, D) * (spread if i < 2 else 1.0)).to(dtype) for i in range(3)]


# ---------------------------------------------------------------- layout / partition cycle
def test_partition_cycle():
    assert [vmoba_partition_for_layer(i) for i in range(7)] == ["1d", "2d", "3d"] * 2 + ["1d"]
    with pytest.raises(ValueError):
        vmoba_partition_for_layer(-1)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_layout_geometry(partition):
    grid, chunk = (5, 7, 9), (2, 3, 4)  # nothing divides
    lay = vmoba_layout(grid, chunk, partition)
    T, H, W = grid
    assert sorted(lay.perm.tolist()) == list(range(T * H * W))
    exp = {"1d": (2, 7, 9), "2d": (5, 3, 4), "3d": (2, 3, 4)}[partition]
    assert lay.chunk == exp
    t, h, w = lay.perm // (H * W), (lay.perm // W) % H, lay.perm % W
    for c in range(lay.num_blocks):
        sl = slice(int(lay.block_off[c]), int(lay.block_off[c] + lay.block_len[c]))
        for coord, e in zip((t[sl], h[sl], w[sl]), exp):
            assert int(coord.max() - coord.min()) < e  # inside one chunk
            assert int(coord.min()) % e == 0
    assert int(lay.group_len.sum()) == T * H * W and int(lay.group_len.max()) <= QUERY_GROUP
    for g in range(lay.num_groups):
        c = int(lay.group_block[g])
        assert int(lay.group_start[g] + lay.group_len[g]) <= int(lay.block_len[c])


def test_bad_arguments():
    q, k, v = _qkv(1, 2, 30, 16)
    kw = dict(grid=(2, 3, 5), chunk=(1, 2, 2))
    vmoba_attention_reference(q, k, v, **kw)
    with pytest.raises(ValueError, match="text_before"):
        vmoba_attention_reference(q, k, v, grid=(2, 3, 4), chunk=(1, 2, 2))
    with pytest.raises(ValueError, match="partition"):
        vmoba_attention_reference(q, k, v, partition="4d", **kw)
    with pytest.raises(ValueError, match="threshold"):
        vmoba_attention_reference(q, k, v, threshold=0.0, **kw)
    with pytest.raises(ValueError, match="topk"):
        vmoba_attention_reference(q, k, v, topk=-2, **kw)
    with pytest.raises(ValueError, match="chunk"):
        vmoba_attention_reference(q, k, v, grid=(2, 3, 5), chunk=(0, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        vmoba_attention_reference(q, k, v, grid=(2, 3), chunk=(1, 2, 2))
    with pytest.raises(ValueError, match="scale"):
        vmoba_attention_reference(q, k, v, scale=float("nan"), **kw)


# ---------------------------------------------------------------- reference semantics
@pytest.mark.parametrize("partition", PARTITIONS)
def test_reference_threshold_one_is_dense(partition):
    tb, ta = 5, 3
    q, k, v = _qkv(2, 2, tb + 4 * 5 * 6 + ta, 32)
    out = vmoba_attention_reference(q, k, v, grid=(4, 5, 6), chunk=(3, 2, 4), text_before=tb,
                                    text_after=ta, partition=partition, threshold=1.0)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5


def _brute_selection(q, k, lay, threshold, topk, scale):
    """Independent per-head greedy: rank the other pairs by P and keep until the target."""
    B, H = q.shape[:2]
    tb, nv = lay.text_before, lay.n_video
    C, G = lay.num_blocks, lay.num_groups
    out = torch.zeros(B, H, G, C, dtype=torch.bool)
    for b, h in itertools.product(range(B), range(H)):
        qv, kv = q[b, h, tb:tb + nv].double(), k[b, h, tb:tb + nv].double()
        kbar = torch.stack([kv[lay.perm[lay.block_off[c]:lay.block_off[c] + lay.block_len[c]]].mean(0)
                            for c in range(C)])
        qbar = torch.stack([qv[lay.perm[lay.block_off[lay.group_block[g]] + lay.group_start[g]:
                                        lay.block_off[lay.group_block[g]] + lay.group_start[g]
                                        + lay.group_len[g]]].mean(0) for g in range(G)])
        P = torch.softmax(scale * qbar @ kbar.T, -1)
        for g in range(G):
            out[b, h, g, lay.group_block[g]] = True
        if topk == 0 and threshold >= 1:
            out[b, h] = True
            continue
        others = [(P[g, c].item(), g, c) for g in range(G) for c in range(C) if c != lay.group_block[g]]
        others.sort(key=lambda t: -t[0])
        if topk:
            need, weight = (min(topk, C) - 1) * G, (lambda g, p: 1.0)
        else:
            own = sum(P[g, lay.group_block[g]].item() * lay.group_len[g].item() for g in range(G))
            need, weight = threshold * nv - own, (lambda g, p: p * lay.group_len[g].item())
        acc = 0.0
        for p, g, c in others:
            if acc >= need:
                break
            out[b, h, g, c] = True
            acc += weight(g, p)
    return out


@pytest.mark.parametrize("threshold,topk,partition", [(0.25, 0, "3d"), (0.6, 0, "2d"),
                                                      (0.4, 0, "1d"), (0.25, 3, "3d")])
def test_reference_selection_rule(threshold, topk, partition):
    grid, tb = (4, 9, 10), 3
    q, k, _ = _qkv(2, 2, tb + 360, 16, spread=2.0)
    lay = vmoba_layout(grid, (2, 4, 4), partition, tb, 0)
    sel = vmoba_select_reference(q, k, layout=lay, threshold=threshold, topk=topk, scale=0.25)
    brute = _brute_selection(q, k, lay, threshold, topk, 0.25)
    assert torch.equal(sel.mask(), brute)
    assert (sel.kv_cnt == sel.mask().sum(-1)).all()
    # own block always present, lists ascending and padded with -1
    own = lay.group_block.view(1, 1, -1, 1)
    assert (sel.kv_idx.long() == own).any(-1).all()
    for row, n in zip(sel.kv_idx.view(-1, lay.num_blocks), sel.kv_cnt.view(-1)):
        assert torch.all(row[:n][1:] > row[:n][:-1]) and torch.all(row[n:] == -1)


def test_threshold_monotone_and_topk_density():
    grid = (6, 8, 8)
    q, k, v = _qkv(1, 3, 384, 32)
    dens = [vmoba_select(q, k, grid=grid, chunk=(2, 4, 4), threshold=t).density
            for t in (0.1, 0.3, 0.6, 0.9, 1.0)]
    assert all(a <= b for a, b in zip(dens, dens[1:])) and dens[-1] == 1.0 and dens[0] < 0.5
    sel = vmoba_select(q, k, grid=grid, chunk=(2, 4, 4), topk=3)
    assert abs(sel.kv_cnt.float().mean().item() - 3.0) < 1e-6  # 3 blocks per group on average


def test_flops_counting():
    tb, ta, grid = 4, 2, (3, 4, 5)
    N = tb + 60 + ta
    q, k, v = _qkv(2, 3, N, 16)
    dense = vmoba_select(q, k, grid=grid, chunk=(1, 2, 2), text_before=tb, text_after=ta,
                         threshold=1.0)
    assert vmoba_flops(dense, 16) == 4 * 2 * 3 * N * N * 16
    sparse = vmoba_select(q, k, grid=grid, chunk=(1, 2, 2), text_before=tb, text_after=ta,
                          threshold=0.2)
    assert vmoba_flops(sparse, 16) < vmoba_flops(dense, 16)
    # token-level check of the count against an explicit mask
    lay = sparse.layout
    m = sparse.mask()
    kb = torch.repeat_interleave(torch.arange(lay.num_blocks), lay.block_len)
    qg = torch.repeat_interleave(torch.arange(lay.num_groups), lay.group_len)
    video = int(m[:, :, qg][..., kb].sum())
    nt = tb + ta
    assert vmoba_flops(sparse, 16) == 4 * 16 * (video + 2 * 3 * (60 * nt + nt * N))


def test_reference_matches_masked_dense():
    """Sparse output equals dense SDPA with the equivalent token mask."""
    tb, ta, grid = 3, 2, (3, 5, 6)
    N = tb + 90 + ta
    q, k, v = _qkv(2, 2, N, 16, dtype=torch.float64)
    sel = vmoba_select(q, k, grid=grid, chunk=(2, 2, 3), text_before=tb, text_after=ta,
                       threshold=0.3)
    out = vmoba_attention_from_selection(q, k, v, sel, 0.25)
    lay = sel.layout
    kb = torch.repeat_interleave(torch.arange(lay.num_blocks), lay.block_len)
    qg = torch.repeat_interleave(torch.arange(lay.num_groups), lay.group_len)
    vid = torch.zeros(2, 2, 90, 90, dtype=torch.bool)
    pm = sel.mask()[:, :, qg][..., kb]  # block-order x block-order
    vid[:, :, lay.perm[:, None], lay.perm[None, :]] = pm
    mask = torch.ones(2, 2, N, N, dtype=torch.bool)
    mask[:, :, tb:tb + 90, tb:tb + 90] = vid
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    assert rel_err(out, ref) < 1e-12


# ---------------------------------------------------------------- Triton kernels (interpreter)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vmonarch_opt.kernels.tuning import force_config  # noqa: E402
from vmonarch_opt.kernels.vmoba import kernel as vmoba_mod  # noqa: E402
from vmonarch_opt.kernels.vmoba.kernel import (vmoba_attention_triton,  # noqa: E402
                                        vmoba_attention_with_selection, vmoba_select_triton)


def _same_selection(a, b):
    assert torch.equal(a.kv_cnt, b.kv_cnt), "selected-pair counts differ from the reference"
    assert torch.equal(a.kv_idx, b.kv_idx)


def _pooled_bruteforce(q, k, v, sel, scale):
    """Pooled-rest VMoBA written token by token in float64: the oracle of the reference."""
    lay = sel.layout
    B, H, N, D = q.shape
    tb, nv = lay.text_before, lay.n_video
    out = torch.empty(B, H, N, D, dtype=torch.float64)
    blocks = [lay.perm[int(o):int(o + n)] + tb for o, n in zip(lay.block_off, lay.block_len)]
    text = list(range(tb)) + list(range(tb + nv, N))
    group_of = torch.empty(nv, dtype=torch.long)
    for g in range(lay.num_groups):
        c = int(lay.group_block[g])
        start = int(lay.block_off[c] + lay.group_start[g])
        group_of[lay.perm[start:start + int(lay.group_len[g])]] = g
    mask = sel.mask()
    for b, h, i in itertools.product(range(B), range(H), range(N)):
        qi = q[b, h, i].double()
        if i < tb or i >= tb + nv:  # text query: dense
            p = torch.softmax(scale * k[b, h].double() @ qi, 0)
            out[b, h, i] = p @ v[b, h].double()
            continue
        g = int(group_of[i - tb])
        vals, logits = [], []
        for c, idx in enumerate(blocks):
            kc, vc = k[b, h, idx].double(), v[b, h, idx].double()
            if mask[b, h, g, c]:
                logits.append(scale * kc @ qi)
                vals.append(vc)
            else:  # one pooled key: mean key, + log(block size), mean value
                logits.append((scale * kc.mean(0) @ qi + math.log(len(idx)))[None])
                vals.append(vc.mean(0, keepdim=True))
        if text:
            logits.append(scale * k[b, h, text].double() @ qi)
            vals.append(v[b, h, text].double())
        p = torch.softmax(torch.cat(logits), 0)
        out[b, h, i] = p @ torch.cat(vals)
    return out


@pytest.mark.parametrize("partition", PARTITIONS)
def test_reference_pooled_rest_matches_bruteforce(partition):
    tb, ta, grid = 3, 2, (3, 4, 5)
    q, k, v = _qkv(2, 2, tb + 60 + ta, 8, dtype=torch.float64, spread=1.5)
    sel = vmoba_select(q, k, grid=grid, chunk=(2, 3, 2), text_before=tb, text_after=ta,
                       partition=partition, threshold=0.3)
    assert 0 < sel.density < 1
    out = vmoba_attention_from_selection(q, k, v, sel, 0.3, pooled_rest=True)
    assert rel_err(out, _pooled_bruteforce(q, k, v, sel, 0.3)) < 1e-12
    assert rel_err(out, vmoba_attention_from_selection(q, k, v, sel, 0.3)) > 1e-3  # it changes rows


def test_reference_pooled_rest_exact_cases():
    """Exact where the pooled keys are exact: every block selected (dense), uniform attention
    (q = 0: the pooled rest restores the dropped mass exactly), identical keys in each block."""
    tb, ta, grid, chunk = 2, 1, (2, 4, 6), (1, 2, 3)
    N = tb + 48 + ta
    q, k, v = _qkv(1, 2, N, 16, dtype=torch.float64)
    kw = dict(grid=grid, chunk=chunk, text_before=tb, text_after=ta)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert rel_err(vmoba_attention_reference(q, k, v, threshold=1.0, pooled_rest=True, **kw), dense) < 1e-12
    z = torch.zeros_like(q)
    sparse = vmoba_attention_reference(z, k, v, topk=1, pooled_rest=True, **kw)
    assert rel_err(sparse, F.scaled_dot_product_attention(z, k, v)) < 1e-12
    lay = vmoba_layout(grid, chunk, "3d", tb, ta)
    kc = k.clone()
    for o, n in zip(lay.block_off, lay.block_len):  # every key of a block equal to its first
        idx = lay.perm[int(o):int(o + n)] + tb
        kc[:, :, idx] = kc[:, :, idx[:1]]
    dense_c = F.scaled_dot_product_attention(q, kc, v)
    assert rel_err(vmoba_attention_reference(q, kc, v, topk=2, pooled_rest=True, **kw), dense_c) < 1e-12
    assert rel_err(vmoba_attention_reference(q, kc, v, topk=2, **kw), dense_c) > 1e-2


def test_pooled_rest_flops():
    tb, ta, grid = 4, 2, (3, 4, 5)
    q, k, v = _qkv(2, 3, tb + 60 + ta, 16)
    sel = vmoba_select(q, k, grid=grid, chunk=(1, 2, 2), text_before=tb, text_after=ta, threshold=0.2)
    C = sel.layout.num_blocks
    assert vmoba_flops(sel, 16, pooled_rest=True) - vmoba_flops(sel, 16) == 4 * 16 * 2 * 3 * 60 * C


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(1, 3), H=st.integers(2, 5), W=st.integers(2, 6),
       chunk=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
       partition=st.sampled_from(PARTITIONS), tb=st.integers(0, 5), ta=st.integers(0, 3),
       D=st.sampled_from([64, 80, 96, 128]), B=st.integers(1, 2), heads=st.integers(1, 2),
       mode=st.sampled_from(["t0.2", "t0.5", "t0.8", "k2"]), half=st.booleans(),
       pooled=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_vs_reference_random(T, H, W, chunk, partition, tb, ta, D, B, heads, mode, half,
                                    pooled, seed):
    torch.manual_seed(seed)
    dt = torch.float16 if half else torch.float32
    N = tb + T * H * W + ta
    q, k, v = _qkv(B, heads, N, D, dt, spread=1.5)
    threshold, topk = (float(mode[1:]), 0) if mode[0] == "t" else (0.25, int(mode[1:]))
    kw = dict(grid=(T, H, W), chunk=chunk, text_before=tb, text_after=ta, partition=partition,
              threshold=threshold, topk=topk, pooled_rest=pooled)
    lay = vmoba_layout((T, H, W), chunk, partition, tb, ta)
    s_k = vmoba_select_triton(q, k, layout=lay, threshold=threshold, topk=topk, scale=D ** -0.5)
    s_r = vmoba_select_reference(q, k, layout=lay, threshold=threshold, topk=topk, scale=D ** -0.5)
    _same_selection(s_k, s_r)
    out = vmoba_attention_triton(q, k, v, **kw)
    ref = vmoba_attention_reference(q, k, v, **kw)
    assert out.dtype == dt
    assert rel_err(out, ref) < (3e-3 if half else 2e-5)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_kernel_threshold_one_is_dense(partition):
    tb, ta, grid = 3, 2, (3, 4, 5)
    q, k, v = _qkv(2, 1, tb + 60 + ta, 64)
    kw = dict(grid=grid, chunk=(2, 3, 2), text_before=tb, text_after=ta, partition=partition,
              threshold=1.0)
    dense = F.scaled_dot_product_attention(q, k, v)
    out = vmoba_attention_triton(q, k, v, **kw)  # routed to the dense flash kernel
    assert rel_err(out, dense) < 2e-5
    sel = vmoba_select(q, k, **kw)  # the block-sparse kernel with every block selected
    assert sel.density == 1.0
    assert rel_err(vmoba_attention_with_selection(q, k, v, sel, 0.125), dense) < 2e-5


def test_kernel_selection_own_block_and_structure():
    grid = (2, 8, 8)
    q, k, _ = _qkv(2, 2, 128, 32, spread=3.0)
    for kw in (dict(threshold=0.1), dict(threshold=0.5), dict(topk=2)):
        lay = vmoba_layout(grid, (1, 4, 4), "3d")
        s = vmoba_select_triton(q, k, layout=lay, scale=0.2, **{"threshold": 0.25, "topk": 0, **kw})
        _same_selection(s, vmoba_select_reference(q, k, layout=lay, scale=0.2,
                                                  **{"threshold": 0.25, "topk": 0, **kw}))
        own = lay.group_block.view(1, 1, -1, 1)
        assert (s.kv_idx.long() == own).any(-1).all()
        assert ((s.kv_idx >= 0).sum(-1) == s.kv_cnt).all()


@pytest.mark.parametrize("mode,tch", [(0, 32), (1, 32), (2, 32), (1, 2), (2, 2)])
def test_kernel_kv_modes_and_poisoned_output(monkeypatch, mode, tch):
    """Gathered (0) and block-order tile-list (1 pointer loads, 2 TMA descriptors) key/value
    paths, tile starts read in chunks of tch (2: several chunks per row); every output element
    written."""
    with force_config("vmoba", (32, 16, 4, 1, mode)):
        monkeypatch.setattr(vmoba_mod, "_TCH", tch)
        tb, ta, grid = 4, 3, (3, 5, 6)
        q, k, v = _qkv(1, 2, tb + 90 + ta, 64)
        sel = vmoba_select(q, k, grid=grid, chunk=(2, 2, 4), text_before=tb, text_after=ta,
                           threshold=0.4)
        for pooled in (False, True):
            out = torch.full_like(q, float("nan"))
            vmoba_attention_with_selection(q, k, v, sel, 0.125, out=out, pooled_rest=pooled)
            assert torch.isfinite(out).all()
            ref = vmoba_attention_from_selection(q, k, v, sel, 0.125, pooled_rest=pooled)
            assert rel_err(out, ref) < 2e-5


def test_block_order_copy_and_tile_lists():
    """The selection's fused block-order copy equals a gather through the permutation, and the
    tile lists of kv_mode 1/2 cover exactly the tokens of each row's selected blocks, once."""
    tb, ta, grid = 3, 2, (3, 5, 7)
    q, k, v = _qkv(2, 2, tb + 105 + ta, 64)
    lay = vmoba_layout(grid, (2, 2, 4), "3d", tb, ta)
    sel = vmoba_select_triton(q, k, layout=lay, threshold=0.5, topk=0, scale=0.125, v=v)
    perm = lay.perm.long() + tb
    kp, vp = sel.block_kv
    assert torch.equal(kp, k[:, :, perm]) and torch.equal(vp, v[:, :, perm])
    dl = vmoba_mod._device_layout(lay, q.device)
    for BN in (16, 32):
        plan = vmoba_mod._sparse_plan(sel, dl, (32, BN, 4, 1, 1))
        idx, cnt = sel.kv_idx.reshape(-1, lay.num_blocks), sel.kv_cnt.reshape(-1)
        for r in range(cnt.numel()):
            want = sorted(p for c in idx[r, :cnt[r]].tolist()
                          for p in range(int(lay.block_off[c]), int(lay.block_off[c] + lay.block_len[c])))
            got = [p for s in plan["full"][r, :plan["nfull"][r]].tolist() for p in range(s, s + BN)]
            got += [p for s, n in zip(plan["tail"][r, :plan["ntail"][r]].tolist(),
                                      plan["tlen"][r, :plan["ntail"][r]].tolist())
                    for p in range(s, s + n)]
            assert sorted(got) == want, f"row {r}: tiles do not cover the selected blocks"
        assert sorted(plan["order"].tolist()) == list(range(cnt.numel()))


def test_kernel_selection_keeps_block_means_for_the_pooled_rest():
    """With ``pooled`` the selection pass keeps every block's mean key and value (one read of
    k/v for both); the attention uses them, or runs the group pass again for a selection
    without them: same output."""
    from vmonarch_opt.kernels.vmoba.layout import block_means
    tb, ta, grid = 2, 3, (3, 5, 6)
    q, k, v = _qkv(2, 2, tb + 90 + ta, 80)
    lay = vmoba_layout(grid, (2, 2, 4), "3d", tb, ta)
    sel = vmoba_select_triton(q, k, layout=lay, threshold=0.3, topk=0, scale=0.1, v=v, copy_kv=False,
                              pooled=True)
    assert sel.block_kv is None and sel.block_means is not None
    kbar, vbar = sel.block_means  # float32 [B*H, C, padded head_dim]
    C = lay.num_blocks
    for got, x in ((kbar, k), (vbar, v)):
        assert rel_err(got[..., :80].reshape(2, 2, C, 80), block_means(x, lay)) < 1e-6
    plain = vmoba_select_triton(q, k, layout=lay, threshold=0.3, topk=0, scale=0.1)
    assert plain.block_means is None
    a = vmoba_attention_with_selection(q, k, v, sel, 0.1, pooled_rest=True)
    b = vmoba_attention_with_selection(q, k, v, plain, 0.1, pooled_rest=True)
    assert rel_err(a, b) < 1e-6
    assert rel_err(a, vmoba_attention_from_selection(q, k, v, plain, 0.1, pooled_rest=True)) < 2e-5


def test_pooled_inputs_are_cuda_graph_safe():
    """CUDA-graph capture forbids host<->device copies and data-dependent shapes. The pooled rest's
    launch inputs used to make both on every call (a boolean index in ``selection.mask()``, the
    block sizes uploaded for log2): the mask now uses no nonzero/index_put, and log2(block size)
    is made once per layout and device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(2, 2, 96, 64)
    lay = vmoba_layout((4, 4, 6), (2, 2, 3), "3d")
    sel = vmoba_select_reference(q, k, layout=lay, threshold=0.25, topk=2, scale=0.125)
    with Record() as rec:
        m = sel.mask()
    assert not [o for o in rec.ops if "nonzero" in o or "index_put" in o or "masked_select" in o], rec.ops
    assert m.shape == sel.kv_idx.shape and torch.equal(m.sum(-1).int(), sel.kv_cnt)
    a = vmoba_mod._pooled_args(q, k, v, sel)[3]
    b = vmoba_mod._pooled_args(q, k, v, sel)[3]
    assert a is b and torch.equal(a, torch.log2(lay.block_len.float()))


@pytest.mark.parametrize("tb,ta", [(3, 2), (4, 0), (0, 5)])
def test_kernel_text_rows_through_torch_sdpa(monkeypatch, tb, ta):
    """The text query rows by torch's SDPA (the CUDA fp16/bf16 path, forced here on CPU) match the
    reference, with and without the pooled rest."""
    q, k, v = _qkv(2, 2, tb + 60 + ta, 64, spread=1.5)
    monkeypatch.setattr(vmoba_mod, "sdpa_text_rows", lambda q: True)
    for pooled in (False, True):
        kw = dict(grid=(3, 4, 5), chunk=(1, 2, 3), text_before=tb, text_after=ta, partition="3d", topk=3,
                  pooled_rest=pooled)
        out = vmoba_attention_triton(q, k, v, **kw)
        assert torch.isfinite(out).all() and rel_err(out, vmoba_attention_reference(q, k, v, **kw)) < 2e-5
