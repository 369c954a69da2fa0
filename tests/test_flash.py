"""Dense flash attention: reference statistics and the Triton kernel (TRITON_INTERPRET=1 on CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from vmonarch_opt.kernels.flash import reference as flash_reference
from vmonarch_opt.kernels.flash.reference import attention_stats_reference


def _dense64(q, k, v, scale):
    """Float64 dense attention with explicit p log p entropy (independent of the references)."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.matmul(p, v.double()), lse, ent


def _qkv(B, H, Nq, Nk, D, dtype=torch.float32, spread=1.0):
    q = torch.randn(B, H, Nq, D) * spread
    k = torch.randn(B, H, Nk, D) * spread
    v = torch.randn(B, H, Nk, D)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0])
def test_reference_stats_vs_float64(spread):
    q, k, v = _qkv(2, 3, 37, 53, 64, spread=spread)
    out, lse, ent = attention_stats_reference(q, k, v)
    o64, l64, e64 = _dense64(q, k, v, 1 / 8)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and ent.dtype == torch.float32
    assert rel_err(out, o64) < 1e-5
    assert rel_err(lse, l64) < 1e-6
    assert rel_err(ent, e64) < 1e-4
    assert (ent >= -1e-5).all() and (ent <= math.log(53) + 1e-4).all()


def test_reference_chunks_rows(monkeypatch):
    q, k, v = _qkv(1, 2, 70, 40, 32)
    full = attention_stats_reference(q, k, v, scale=0.3)
    monkeypatch.setattr(flash_reference, "_CHUNK_BYTES", 2 * 40 * 4 * 3 * 7)  # 7 rows per chunk
    chunked = attention_stats_reference(q, k, v, scale=0.3)
    for a, b in zip(full, chunked):
        assert torch.equal(a, b)


def test_reference_errors():
    q, k, v = _qkv(1, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        attention_stats_reference(q[0], k, v)
    with pytest.raises(ValueError, match="scale"):
        attention_stats_reference(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="GQA"):
        attention_stats_reference(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="dtype"):
        attention_stats_reference(q, k.double(), v)


# ---------------------------------------------------------------- Triton kernel (interpreter)
from vmonarch_opt.kernels.flash import kernel as flash_mod  # noqa: E402
from vmonarch_opt.kernels.flash.kernel import flash_attention_triton  # noqa: E402
from vmonarch_opt.kernels.tuning import force_config  # noqa: E402


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 2), H=st.integers(1, 2), Nq=st.integers(1, 70), Nk=st.integers(1, 70),
       D=st.sampled_from([64, 80, 96, 128]), half=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_vs_sdpa_random_shapes(B, H, Nq, Nk, D, half, seed):
    torch.manual_seed(seed)
    dt = torch.float16 if half else torch.float32
    q, k, v = _qkv(B, H, Nq, Nk, D, dt)
    out = flash_attention_triton(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert out.dtype == dt and out.shape == q.shape
    assert rel_err(out, ref) < (2e-3 if half else 1e-5)


@pytest.mark.parametrize("D,spread,dt", [(64, 1.0, torch.float32), (80, 3.0, torch.float16),
                                         (128, 6.0, torch.float32)])
def test_kernel_stats_vs_float64(D, spread, dt):
    q, k, v = _qkv(2, 2, 45, 67, D, dt, spread=spread)
    out, lse, ent = flash_attention_triton(q, k, v, scale=0.1, return_stats=True)
    o64, l64, e64 = _dense64(q, k, v, 0.1)
    tol = 2e-3 if dt == torch.float16 else 1e-5
    assert rel_err(out, o64) < tol
    assert rel_err(lse, l64) < 1e-6
    assert (ent - e64).abs().max().item() < 1e-4 * max(1.0, e64.abs().max().item())
    ro, rl, re = attention_stats_reference(q, k, v, scale=0.1)
    assert rel_err(lse, rl) < 1e-6 and (ent - re).abs().max().item() < 1e-4


def test_kernel_tma_path_and_strided_inputs():
    """The tensor-descriptor kernel (Hopper path) computes the same thing, on transposed views."""
    with force_config("flash", (32, 16, 4, 1, True)):
        q = torch.randn(2, 41, 2, 64).transpose(1, 2)  # [B, H, N, D] view of a [B, N, H, D] tensor
        k = torch.randn(2, 50, 2, 64).transpose(1, 2)
        v = torch.randn(2, 50, 2, 64).transpose(1, 2)
        out, lse, ent = flash_attention_triton(q, k, v, return_stats=True)
        o64, l64, e64 = _dense64(q, k, v, 1 / 8)
        assert rel_err(out, o64) < 1e-5 and rel_err(lse, l64) < 1e-6 and rel_err(ent, e64) < 1e-5


def test_kernel_overwrites_poisoned_outputs():
    q, k, v = _qkv(2, 3, 50, 29, 80)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 3, 50), float("nan"))
    ent = torch.full((2, 3, 50), float("nan"))
    flash_mod._launch((16, 16, 4, 1, False), q, k, v, out, lse, ent, 0.2, True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(ent).all()
    o64, l64, e64 = _dense64(q, k, v, 0.2)
    assert rel_err(out, o64) < 1e-5 and rel_err(ent, e64) < 1e-5


def test_kernel_errors():
    q, k, v = _qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_triton(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="scale"):
        flash_attention_triton(q, k, v, scale=0.0)
