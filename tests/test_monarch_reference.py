"""Monarch attention reference: exactness with one block, float64 dense-materialised Monarch
formula, entropy term, objective bounds, odd layouts, adversarial inputs, argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from vmonarch_opt.kernels.monarch.layout import make_layout
from vmonarch_opt.kernels.monarch.reference import (dense_attention_flops, monarch_attention_reference,
                                                   monarch_flops, monarch_reference_details)


def _qkv(b, h, n, d, dtype=torch.float32, scale=1.0):
    return [torch.randn(b, h, n, d, dtype=dtype) * scale for _ in range(3)]


@pytest.mark.parametrize("tb,ta", [(0, 0), (5, 0), (0, 3), (4, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_block_is_dense_sdpa(tb, ta, dtype):
    grid = (2, 3, 5)
    n = tb + 30 + ta
    q, k, v = _qkv(2, 3, n, 16, dtype, scale=1.5)
    ref = F.scaled_dot_product_attention(q, k, v)
    out = monarch_attention_reference(q, k, v, grid=grid, block=grid, text_before=tb, text_after=ta)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    # more steps cannot change anything with one block (recompute either way)
    for rc in (False, True):
        out3 = monarch_attention_reference(q, k, v, grid=grid, block=grid, text_before=tb, text_after=ta,
                                           steps=3, recompute=rc)
        assert rel_err(out3, ref) < tol


def _dense_monarch_matrix(q, k, lay, scale):
    """Float64 materialised N_v x N_v Monarch attention matrix for T=1, no text (one head).

    Written from the definition, token by token: a[(i,j),(m,l)] = L[j,i,m] * R[m,j,l] with
    R[m,j,:] = softmax over block m's keys of the scores of query (m,j) (zero query at padding)
    and L[j,i,:] = softmax_m( <a_{(i,j)},s> + H ) of the block-restricted objective.
    """
    idx, valid = lay.token_index()
    M, B = lay.M, lay.B
    nv = lay.Nv
    off = lay.text_before
    S = scale * q @ k.T                                            # [N, N] float64
    R = torch.zeros(M, B, nv, dtype=torch.float64)                 # R[m, j] as a row over video keys
    for m in range(M):
        keys = [int(idx[m, l]) for l in range(B) if valid[m, l]]
        for j in range(B):
            qv = q[int(idx[m, j])] if valid[m, j] else torch.zeros_like(q[0])
            sc = scale * torch.stack([qv @ k[t] for t in keys])
            r = torch.softmax(sc, 0)
            for t, rv in zip(keys, r):
                R[m, j, t - off] = rv
    A = torch.zeros(nv, nv, dtype=torch.float64)
    for i in range(M):
        for j in range(B):
            if not valid[i, j]:
                continue
            row = int(idx[i, j])
            obj = []
            for m in range(M):
                r = R[m, j]
                ent = -(r[r > 0] * r[r > 0].log()).sum()
                obj.append((r * S[row, off:off + nv]).sum() + ent)
            Lrow = torch.softmax(torch.stack(obj), 0)
            A[row - off] = sum(Lrow[m] * R[m, j] for m in range(M))
    return A


@pytest.mark.parametrize("grid,block", [((3, 2, 4), (1, 2, 4)),      # frame blocks
                                        ((3, 3, 4), (1, 2, 3)),      # spatial tiles, partial
                                        ((1, 1, 11), (1, 1, 4))])    # 1D blocks, partial last
def test_t1_matches_dense_materialised_float64(grid, block):
    lay = make_layout(math.prod(grid), grid, block)
    q, k, v = _qkv(1, 1, lay.N, 8, torch.float64, scale=1.3)
    A = _dense_monarch_matrix(q[0, 0], k[0, 0], lay, 8 ** -0.5)
    assert torch.allclose(A.sum(-1), torch.ones(lay.Nv, dtype=torch.float64))
    want = A @ v[0, 0]
    out = monarch_attention_reference(q, k, v, grid=grid, block=block)
    assert rel_err(out[0, 0], want) < 1e-12
    # fp32 inputs, fp32 compute
    out32 = monarch_attention_reference(q.float(), k.float(), v.float(), grid=grid, block=block)
    assert rel_err(out32[0, 0], want) < 1e-5


def test_entropy_term_equals_dense_neg_entropy():
    grid, block = (2, 3, 4), (1, 2, 3)
    q, k, v = _qkv(2, 2, 24, 16, torch.float64, scale=2.0)
    det = monarch_reference_details(q, k, v, grid=grid, block=block)
    idx, valid = det["idx"], det["valid"]
    qb = q.reshape(4, 24, 16)[:, idx] * valid[None, :, :, None]
    kb = k.reshape(4, 24, 16)[:, idx]
    s = det["scale"] * torch.einsum("cmjd,cmld->cmjl", qb, kb).masked_fill(~valid[None, :, None, :], -torch.inf)
    r = torch.softmax(s, -1)
    neg_h = torch.special.xlogy(r, r).sum(-1)
    assert (det["c_l"] - neg_h).abs().max() < 1e-12
    assert (det["c_l"] <= 1e-12).all()          # -H <= 0
    a_l = det["scale"] * torch.einsum("cmjl,cmld->cmjd", r, kb)
    assert rel_err(det["a_l"], a_l) < 1e-12


@pytest.mark.parametrize("text", [(0, 0), (3, 2)])
def test_objective_lower_bound_and_monotone_in_steps(text):
    # video-ish inputs: the summed row objective increases with T and never exceeds the exact lse
    tb, ta = text
    grid, block = (4, 3, 3), (1, 3, 3)
    n = tb + 36 + ta
    q, k, v = _qkv(1, 2, n, 16, torch.float64, scale=1.6)
    lse_exact = torch.logsumexp(0.25 * q @ k.transpose(-1, -2), -1).reshape(2, n)
    prev = None
    for steps in (1, 2, 3, 5):
        for rc in (False, True):
            det = monarch_reference_details(q, k, v, grid=grid, block=block, text_before=tb, text_after=ta,
                                            steps=steps, recompute=rc)
            idx, valid = det["idx"], det["valid"]
            lse = det["lse_row"].transpose(1, 2)          # [c, M(i), B(j)]
            assert (lse[:, valid] <= lse_exact[:, idx[valid]] + 1e-10).all()
            tot = lse[:, valid].sum().item()
            if not rc:
                if prev is not None:
                    assert tot >= prev - 1e-9
                prev = tot


def test_video_structured_inputs_are_well_approximated():
    # frame blocks on video-structured q/k/v: small error vs dense, whatever the number of steps
    from benchmarks.video_inputs import make_video_qkv
    q, k, v = make_video_qkv(grid=(4, 6, 6), heads=3, head_dim=32, dtype=torch.float64, seed=1)
    dense = F.scaled_dot_product_attention(q, k, v)
    for s in (1, 3):
        for rc in (False, True):
            out = monarch_attention_reference(q, k, v, grid=(4, 6, 6), block=(1, 6, 6), steps=s, recompute=rc)
            assert rel_err(out, dense) < 0.1


@pytest.mark.parametrize("case", ["scale20", "dup_keys", "const_rows", "huge_q"])
@pytest.mark.parametrize("recompute", [False, True])
def test_adversarial_inputs_stay_finite(case, recompute):
    grid, block = (3, 4, 5), (1, 4, 5)
    tb = 3
    n = tb + 60
    q, k, v = _qkv(1, 2, n, 16)
    if case == "scale20":
        q = q * 20
    elif case == "dup_keys":
        k[:, :, tb:] = k[:, :, tb:tb + 1] + 1e-6 * torch.randn_like(k[:, :, tb:])
        q = q * 10
    elif case == "const_rows":
        q[:] = 3.0
        k[:] = 1.0
    elif case == "huge_q":
        q = q * 1e3
    dense = F.scaled_dot_product_attention(q, k, v)
    for steps in (1, 2, 4):
        out = monarch_attention_reference(q, k, v, grid=grid, block=block, text_before=tb, steps=steps,
                                          recompute=recompute)
        assert torch.isfinite(out).all()
        # every output row is a convex combination of value rows: bounded by their range
        assert (out <= v.amax(2, keepdim=True) + 1e-4).all() and (out >= v.amin(2, keepdim=True) - 1e-4).all()
        if case == "const_rows":
            assert rel_err(out, dense) < 1e-5             # uniform attention is exactly Monarch
    # text rows are exact whatever the video part does
    assert rel_err(out[:, :, :tb], dense[:, :, :tb]) < 1e-5


def test_odd_sizes_batch_heads_dtypes():
    grid, block = (3, 5, 7), (2, 2, 3)               # partial tiles along every axis
    q, k, v = _qkv(2, 3, 2 + 105 + 1, 24)
    out = monarch_attention_reference(q, k, v, grid=grid, block=block, text_before=2, text_after=1, steps=2)
    assert out.shape == q.shape and torch.isfinite(out).all()
    out64 = monarch_attention_reference(q.double(), k.double(), v.double(), grid=grid, block=block,
                                        text_before=2, text_after=1, steps=2)
    assert rel_err(out, out64) < 1e-5
    h = monarch_attention_reference(q.half(), k.half(), v.half(), grid=grid, block=block, text_before=2,
                                    text_after=1, steps=2)
    assert h.dtype == torch.float16 and rel_err(h, out64) < 2e-3
    # batch / head independence
    one = monarch_attention_reference(q[1:, 2:], k[1:, 2:], v[1:, 2:], grid=grid, block=block, text_before=2,
                                      text_after=1, steps=2)
    assert rel_err(one, out[1:, 2:]) < 1e-6


def test_permutation_equivariance_of_blocks_is_not_assumed_but_layouts_agree():
    # frame blocks as (1,H,W) on a (T,H,W) grid == 1D blocks of size H*W on the flattened grid
    q, k, v = _qkv(1, 2, 4 + 48, 16)
    a = monarch_attention_reference(q, k, v, grid=(4, 3, 4), block=(1, 3, 4), text_before=4, steps=2)
    b = monarch_attention_reference(q, k, v, grid=(1, 1, 48), block=(1, 1, 12), text_before=4, steps=2)
    assert rel_err(a, b) < 1e-6


def test_flops():
    d = dense_attention_flops(1, 12, 32760, 32760, 128)
    assert d == 4 * 12 * 32760 ** 2 * 128
    m = monarch_flops(1, 12, 32760, 128, grid=(21, 30, 52), block=(1, 30, 52))
    n, B, M = 32760, 1560, 21
    assert m == 12 * (6 * n * B * 128 + 4 * n * M * 128)
    assert 13 < d / m < 15                               # frame blocks: ~14x fewer FLOPs at Wan 480p
    m2 = monarch_flops(2, 12, 32760, 128, grid=(21, 30, 52), block=(1, 30, 52), steps=2)
    assert m2 > 2 * m
    mt = monarch_flops(1, 1, 30 + 4, 8, grid=(2, 3, 5), block=(2, 3, 5), text_before=4)
    assert mt > 0


@pytest.mark.parametrize("kw,match", [
    (dict(grid=(2, 3, 4), block=(1, 3, 4)), "sequence length"),
    (dict(grid=(2, 3, 5), block=(1, 4, 5)), "larger than grid"),
    (dict(grid=(2, 3, 5), block=(0, 3, 5)), ">= 1"),
    (dict(grid=(2, 3), block=(1, 3, 5)), "three"),
    (dict(grid=(2, 3, 5), block=(1, 3, 5), steps=0), "steps"),
    (dict(grid=(2, 3, 5), block=(1, 3, 5), text_before=-1), "text_before"),
    (dict(grid=(2, 3, 5), block=(1, 3, 5), scale=-1.0), "scale"),
])
def test_bad_arguments(kw, match):
    q, k, v = _qkv(1, 1, 30, 8)
    with pytest.raises(ValueError, match=match):
        monarch_attention_reference(q, k, v, **kw)


def test_bad_shapes():
    q, k, v = _qkv(1, 1, 30, 8)
    with pytest.raises(ValueError, match="same shape"):
        monarch_attention_reference(q, k[:, :, :20], v, grid=(2, 3, 5), block=(1, 3, 5))
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        monarch_attention_reference(q[0], k[0], v[0], grid=(2, 3, 5), block=(1, 3, 5))
