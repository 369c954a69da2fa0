"""Pure-PyTorch reference for dense softmax attention with per-row statistics.

``attention_stats_reference(q, k, v, scale=None) -> (out, lse, entropy)``

For every query row ``i`` with logits ``s_ij = scale * q_i . k_j`` and probabilities
``p_ij = softmax_j(s_ij)``:

* ``out_i     = sum_j p_ij v_j``                      (returned in ``q.dtype``)
* ``lse_i     = log sum_j exp(s_ij)``                 (float32, natural log)
* ``entropy_i = -sum_j p_ij log p_ij = lse_i - sum_j p_ij s_ij``   (float32, nats)

The Triton kernel (``kernel.py``) computes the same three quantities online in one pass; this
reference is written for clarity. It works in float32 (float64 when the inputs are float64) and
processes the query rows in chunks so that the logits it materialises never exceed about
256 MB, whatever the sequence length.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["attention_stats_reference", "check_attention_inputs"]

_CHUNK_BYTES = 256 * 1024 * 1024


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: Optional[float], who: str) -> float:
    """Validate q/k/v in the SDPA layout and return the effective softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{who}: {name} must be [batch, heads, seq, head_dim], got shape "
                             f"{tuple(t.shape)}; reshape/transposing to the SDPA layout fixes this")
        if not t.is_floating_point():
            raise ValueError(f"{who}: {name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{who}: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        raise ValueError(f"{who}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and "
                         f"heads (expand GQA key/value heads to the query head count first)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{who}: q and k head_dim differ ({q.shape[3]} vs {k.shape[3]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{who}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{who}: q, k, v must be on one device")
    if k.shape[2] == 0:
        raise ValueError(f"{who}: attention over zero keys is undefined (k has seq length 0)")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"{who}: scale must be a positive finite number or None, got {scale}")
    return scale


def attention_stats_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                              scale: Optional[float] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense attention output plus per-row logsumexp and entropy (see module docstring).

    Returns ``out`` [B, H, Nq, D] in ``q.dtype`` and ``lse``, ``entropy`` [B, H, Nq] in float32.
    """
    s = check_attention_inputs(q, k, v, scale, "attention_stats_reference")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(cdt)
    vf = v.to(cdt)
    out = torch.empty(B, H, Nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    ent = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    # logits + probabilities + product: ~3 live [B, H, rows, Nk] buffers
    per_row = 3 * B * H * Nk * torch.finfo(cdt).bits // 8
    rows = max(1, min(Nq, _CHUNK_BYTES // max(per_row, 1)))
    for r0 in range(0, Nq, rows):
        r1 = min(Nq, r0 + rows)
        logits = torch.matmul(q[:, :, r0:r1].to(cdt), kf.transpose(-1, -2)) * s
        row_lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - row_lse[..., None])
        out[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
        lse[:, :, r0:r1] = row_lse.float()
        # sum_j p_j (lse - s_j): every term >= 0, no cancellation between lse and E[s]
        ent[:, :, r0:r1] = (p * (row_lse[..., None] - logits)).sum(-1).float()
        del logits, p
    return out, lse, ent
