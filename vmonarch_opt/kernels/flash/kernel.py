"""Dense flash-attention forward in Triton, optionally with per-row logsumexp and entropy.

``flash_attention_triton(q, k, v, *, scale=None, return_stats=False)`` computes
``softmax(scale * q k^T) v`` for q [B, H, Nq, D], k/v [B, H, Nk, D] (any strides with a unit
last stride; fp16/bf16 with fp32 accumulation, fp32 with IEEE fp32 dots). With
``return_stats=True`` it also returns, per query row, ``lse = log sum_j exp(s_j)`` and the
attention entropy ``H = -sum_j p_j log p_j`` (float32 [B, H, Nq]) from the same single pass.

The online softmax runs in base 2 (``y = s * log2(e)``) with a running max ``m``, running sum
``l = sum 2^(y - m)`` and, for the entropy, ``w = sum 2^(y - m) (y - m)`` (the running
``u = sum e^(x-m) x`` (online entropy) taken relative to the running max, which avoids the
cancellation of ``lse - u/l`` at large logits). When the max moves from m to m',
``alpha = 2^(m - m')`` and ``w <- alpha (w + l (m - m'))``, ``l <- alpha l``. At the end
``lse = ln2 (m + log2 l)`` and ``H = ln2 (log2 l - w / l)``. Nothing of size Nq x Nk is stored.

Two code paths compute the same function: a pointer-based kernel (any strides, any head_dim,
used under ``TRITON_INTERPRET=1`` with small fixed tiles) and, on Hopper, a kernel that loads
through TMA tensor descriptors (head_dim 64 or 128). The CUDA launch configuration is picked
once per (device, dtype, head_dim, stats, size bucket) by timing a few candidates.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import check_attention_inputs
from ..out_layout import empty_attention_out
from ..tuning import interpreting, tuning_cache, tuning_enabled

try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older triton
    TensorDescriptor = None

__all__ = ["flash_attention_triton"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": keeps 0 * (-inf) NaNs out of the entropy sums


@triton.jit
def _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale, col_ok,
                 MASKED: tl.constexpr, STATS: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax (base-2 logits; see the module docstring)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASKED:
        qk = tl.where(col_ok[None, :], qk, _NEG)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    y = qk * qk_scale - m_new[:, None]
    p = tl.math.exp2(y)
    alpha = tl.math.exp2(m_i - m_new)
    if STATS:
        w_i = alpha * (w_i + l_i * (m_i - m_new)) + tl.sum(p * y, 1)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i, w_i


@triton.jit
def _finish_rows(acc, m_i, l_i, w_i, O, LSE, ENT, o_row, o_col, row_ok, d_ok, st_off,
                 STATS: tl.constexpr):
    """Normalise and store output rows (pointer store) and the optional stats."""
    out = acc / l_i[:, None]
    tl.store(O + o_row[:, None] + o_col[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if STATS:
        log2l = tl.math.log2(l_i)
        tl.store(LSE + st_off, (m_i + log2l) * 0.6931471805599453, mask=row_ok)
        tl.store(ENT + st_off, (log2l - w_i / l_i) * 0.6931471805599453, mask=row_ok)


@triton.jit(do_not_specialize=["H", "Nq", "Nk", "D"])
def _flash_fwd_ptr(Q, K, V, O, LSE, ENT,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                   H, Nq, Nk, D, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   STATS: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq
    d_ok = offs_d < D
    qb = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kb = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vb = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(qb + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        rows = (start_n + offs_n).to(tl.int64)
        if EVEN_D:
            k = tl.load(kb + rows[:, None] * skn + offs_d[None, :])
            v = tl.load(vb + rows[:, None] * svn + offs_d[None, :])
        else:
            k = tl.load(kb + rows[:, None] * skn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(vb + rows[:, None] * svn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale, offs_n < BLOCK_N,
                                          False, STATS, DOT_PREC)
    if n_full < Nk:
        cols = n_full + offs_n
        col_ok = cols < Nk
        rows = cols.to(tl.int64)
        k = tl.load(kb + rows[:, None] * skn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(vb + rows[:, None] * svn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale, col_ok,
                                          True, STATS, DOT_PREC)
    o_row = b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64) * som
    _finish_rows(acc, m_i, l_i, w_i, O, LSE, ENT, o_row, offs_d, row_ok, d_ok,
                 bh.to(tl.int64) * Nq + offs_m, STATS)


@triton.jit(do_not_specialize=["H", "Nq", "Nk"])
def _flash_fwd_tma(desc_q, desc_k, desc_v, O, LSE, ENT, sob, soh, som,
                   H, Nq, Nk, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   STATS: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = desc_q.load([b, h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        k = desc_k.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale, offs_n < BLOCK_N,
                                          False, STATS, DOT_PREC)
    if n_full < Nk:  # out-of-range rows of the tail tile are zero-filled by TMA, masked here
        k = desc_k.load([b, h, n_full, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, h, n_full, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc, m_i, l_i, w_i = _online_tile(q, k, v, acc, m_i, l_i, w_i, qk_scale,
                                          n_full + offs_n < Nk, True, STATS, DOT_PREC)
    row_ok = offs_m < Nq
    o_row = b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64) * som
    _finish_rows(acc, m_i, l_i, w_i, O, LSE, ENT, o_row, offs_d, row_ok, offs_d < HEAD_DIM,
                 bh.to(tl.int64) * Nq + offs_m, STATS)


# ----------------------------------------------------------------------------- launch
_GL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma)
_CUDA_CANDIDATES = [
    (128, 128, 8, 3, True), (128, 64, 4, 3, True), (128, 128, 8, 2, True), (128, 64, 8, 4, True),
    (128, 128, 8, 3, False), (128, 64, 4, 3, False), (128, 64, 8, 4, False), (64, 64, 4, 3, False),
]
_TUNED = tuning_cache("flash")


def _head_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _tma_ok(q, k, v, D) -> bool:
    if TensorDescriptor is None or interpreting() or not q.is_cuda:
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9 or D not in (64, 128):
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or any((s * t.element_size()) % 16 for s in t.stride()[:-1]) \
                or t.data_ptr() % 16:
            return False
    return True


def _launch(cfg, q, k, v, out, lse, ent, scale, stats):
    BM, BN, warps, stages, use_tma = cfg
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    HD = _head_pad(D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(Nq, BM), B * H)
    qk_scale = scale * _LOG2E
    lse_arg = lse if stats else out
    ent_arg = ent if stats else out
    if use_tma:
        dq = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, BM, HD])
        dk = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, BN, HD])
        dv = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, BN, HD])
        _flash_fwd_tma[grid](dq, dk, dv, out, lse_arg, ent_arg,
                             out.stride(0), out.stride(1), out.stride(2), H, Nq, Nk, qk_scale,
                             HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, STATS=stats, DOT_PREC=prec,
                             num_warps=warps, num_stages=stages)
    else:
        _flash_fwd_ptr[grid](q, k, v, out, lse_arg, ent_arg,
                             q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                             k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                             out.stride(0), out.stride(1), out.stride(2),
                             H, Nq, Nk, D, qk_scale,
                             HEAD_DIM=HD, BLOCK_M=BM, BLOCK_N=BN, STATS=stats,
                             EVEN_D=(HD == D), DOT_PREC=prec, num_warps=warps, num_stages=stages)


def _bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pick_config(q, k, v, out, lse, ent, scale, stats):
    if _TUNED.forced is not None:  # tuning.force_config("flash", ...)
        return _TUNED.forced
    D = q.shape[-1]
    if interpreting() or not q.is_cuda:
        return (16, 16, 4, 1, False)
    tma = _tma_ok(q, k, v, D)
    key = (q.device.index, q.dtype, D, stats, tma, _bucket(q.shape[2]), _bucket(k.shape[2]),
           q.shape[0] * q.shape[1] >= 8)
    hit = _TUNED.get(key)
    if hit is None and stats:  # the stats variant reuses the plain kernel's tuned tiles
        hit = _TUNED.get(key[:3] + (False,) + key[4:])
    if hit is not None:
        return hit
    if not tuning_enabled():  # small tiles, no TMA: compiles for every head_dim, dtype and CUDA device
        return (64, 32, 4, 2, False)
    cands = [c for c in _CUDA_CANDIDATES if tma or not c[4]]
    if D > 128 or q.dtype == torch.float32:
        cands = [(64, 32, 4, 2, False), (64, 64, 4, 2, False)]
    best, best_t = None, float("inf")
    for cfg in cands:
        try:
            t = triton.testing.do_bench(
                lambda: _launch(cfg, q, k, v, out, lse, ent, scale, stats),
                warmup=5, rep=20, return_mode="median")
        except Exception:  # a config that does not compile/fit is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError("flash_attention_triton: no launch configuration compiled on this "
                           "device; set VMONARCH_FORCE_REFERENCE=1 to use the reference")
    _TUNED.put(key, best)
    return best


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           scale: Optional[float] = None, return_stats: bool = False):
    """Dense attention; with ``return_stats`` also per-row ``lse`` and ``entropy`` (float32)."""
    s = check_attention_inputs(q, k, v, scale, "flash_attention_triton")
    if q.dtype not in _GL_DTYPES:
        raise ValueError(f"flash_attention_triton: dtype {q.dtype} unsupported; use float16, "
                         f"bfloat16 or float32")
    if q.shape[-1] > 256:
        raise ValueError(f"flash_attention_triton: head_dim {q.shape[-1]} > 256 is unsupported")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Nq, D = q.shape
    out = empty_attention_out(q)  # q's layout, like torch's SDPA (out_layout.py)
    lse = ent = None
    if return_stats:
        lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
        ent = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    if Nq > 0:
        cfg = _pick_config(q, k, v, out, lse, ent, s, return_stats)
        _launch(cfg, q, k, v, out, lse, ent, s, return_stats)
    return (out, lse, ent) if return_stats else out


def sdpa_text_rows(q: torch.Tensor) -> bool:
    """Whether the text query rows of joint attention go to torch's SDPA: on CUDA in fp16/bf16
    (cuDNN / FlashAttention), which is 1.3–2.8× our split-K Triton pass and 1.0–1.5× ``_flash_into``
    there (H200, torch 2.11: FramePack's 4587 text/history rows × 18051 keys 4.5 → 1.9 ms;
    HunyuanVideo 1.5's 1049 × 26489 1.34 → 0.71 ms; CogVideoX's 226 × 17776 0.48 → 0.20 ms; the
    "Text query rows" table in BENCHMARKS.md). Elsewhere (CPU, the interpreter, fp32) our kernels."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not interpreting()


def text_rows_sdpa_into(q, k, v, out, text_before: int, n_video: int, scale: float) -> None:
    """Exact attention of the text query rows (the ``text_before`` first rows and those after the
    ``n_video`` video rows) over all keys, by one torch SDPA call, written into ``out``."""
    N = q.shape[2]
    if text_before == 0 or text_before + n_video == N:  # text on one side only: one slice of rows
        rows = slice(0, text_before) if text_before else slice(n_video, N)
        out[:, :, rows] = F.scaled_dot_product_attention(q[:, :, rows], k, v, scale=scale)
        return
    idx = torch.cat([torch.arange(text_before, device=q.device), torch.arange(text_before + n_video, N, device=q.device)])
    out.index_copy_(2, idx, F.scaled_dot_product_attention(q.index_select(2, idx), k, v, scale=scale).to(out.dtype))


def _flash_into(q, k, v, out, scale):
    """Pointer-path launch writing into a (strided) ``out`` view; used for VMoBA's text rows."""
    if q.shape[2] == 0:
        return
    D = q.shape[-1]
    if interpreting() or not q.is_cuda:
        cfg = (16, 16, 4, 1, False)
    elif D > 128 or q.dtype == torch.float32:
        cfg = (64, 32, 4, 2, False)
    else:
        cfg = (64, 64, 4, 3, False)
    _launch(cfg, q, k, v, out, None, None, scale, False)
