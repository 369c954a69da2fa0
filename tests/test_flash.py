"""Dense flash attention: reference statistics and the Triton kernel (TRITON_INTERPRET=1 on CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from vmonarch_opt.kernels import flash_reference
from vmonarch_opt.kernels.flash_reference import attention_stats_reference


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
