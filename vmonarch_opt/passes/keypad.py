"""Joint attention with a key-padding mask on its text tokens (HunyuanVideo-style).

Video DiTs with joint text+video attention often pass a mask that only hides the padding of the
text prompt: ``[B, 1, 1, N]`` (or ``[B, N]``), every video key visible. That case is handled
exactly: per batch element, the padded text tokens are dropped, the structured kernel runs on
video + valid text tokens, and the padded text *queries* (whose outputs the model discards, but
which must still be what the model computes) attend densely to the valid keys. Any other mask —
one that hides video keys, or an additive mask that is not a 0/−∞ padding mask — is reported as
unsupported and the call runs the model's own attention.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def is_key_padding_shape(mask_shape: Optional[tuple], seq_k: int) -> bool:
    """``[B, 1, 1, N]``, ``[B, 1, N]`` or ``[B, N]`` (any B), N = number of keys."""
    if not mask_shape or mask_shape[-1] != seq_k:
        return False
    return len(mask_shape) in (2, 3, 4) and all(d == 1 for d in mask_shape[1:-1])


def valid_keys(mask: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
    """[batch, N] bool of visible keys, or None if ``mask`` is not a padding mask."""
    if mask.dtype == torch.bool:
        m = mask
    else:
        finite = torch.isfinite(mask) & (mask > -1e4)
        if not bool(((mask == 0) | ~finite).all()):
            return None  # a real additive bias, not padding
        m = finite
    m = m.reshape(m.shape[0], -1) if m.dim() > 1 else m.unsqueeze(0)
    if m.shape[0] not in (1, batch):
        return None
    return m.expand(batch, m.shape[-1])


def run_key_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   text_before: int, text_after: int, scale: float,
                   call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]
                   ) -> Optional[torch.Tensor]:
    """Attention of [B, H, N, D] q/k/v under a text key-padding ``mask``; None if it is not one.

    ``call(q, k, v, text_before, text_after)`` runs the structured kernel on an unmasked sequence.
    """
    b, n = q.shape[0], q.shape[-2]
    valid = valid_keys(mask, b)
    if valid is None:
        return None
    nv = n - text_before - text_after
    video = slice(text_before, text_before + nv)
    if not bool(valid[:, video].all()):
        return None  # video keys are masked: not a text padding mask
    out = torch.empty_like(q)
    for i in range(b):
        keep = valid[i].nonzero().squeeze(-1)
        drop = (~valid[i]).nonzero().squeeze(-1)
        if drop.numel() == 0:
            out[i:i + 1] = call(q[i:i + 1], k[i:i + 1], v[i:i + 1], text_before, text_after)
            continue
        tb = int(valid[i, :text_before].sum())
        ta = int(valid[i, text_before + nv:].sum())
        qi, ki, vi = (t[i:i + 1].index_select(-2, keep) for t in (q, k, v))
        out[i:i + 1].index_copy_(-2, keep, call(qi, ki, vi, tb, ta))
        qd = q[i:i + 1].index_select(-2, drop)
        out[i:i + 1].index_copy_(-2, drop, F.scaled_dot_product_attention(qd, ki, vi, scale=scale))
    return out
