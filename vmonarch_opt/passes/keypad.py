"""Joint attention with a padding mask on its text tokens (HunyuanVideo-style).

Video DiTs with joint text+video attention often pass a mask that only hides the padding of the
text prompt: a key-padding mask ``[B, 1, 1, N]`` (or ``[B, N]``), every video key visible, or
(HunyuanVideo 1.5) its outer product ``[B, 1, N, N]`` = valid query × valid key, which also hides
every key from the padded queries. Both are handled exactly: per batch element, the padded text
tokens are dropped, the structured kernel runs on video + valid text tokens, and the padded text
*queries* (whose outputs the model discards, but which must still be what the model computes) run
the model's attention with their rows of the mask. Any other mask — one that hides video keys,
one that is not a padding pattern, or an additive mask that is not 0/−∞ — is reported as
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


def is_padding_mask_shape(mask_shape: Optional[tuple], seq_q: int, seq_k: int) -> bool:
    """A key-padding shape, or ``[B, 1, N, N]`` (query × key, N = seq_q = seq_k) that may be the
    outer product of one: whether it is one is checked on every call (``valid_keys``)."""
    if is_key_padding_shape(mask_shape, seq_k):
        return True
    return (mask_shape is not None and len(mask_shape) == 4 and mask_shape[1] == 1
            and seq_q == seq_k and tuple(mask_shape[2:]) == (seq_q, seq_k))


def _visible(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Bool of what ``mask`` lets through, or None for an additive mask that is not 0 / −∞."""
    if mask.dtype == torch.bool:
        return mask
    finite = torch.isfinite(mask) & (mask > -1e4)
    if not bool(((mask == 0) | ~finite).all()):
        return None  # a real additive bias, not padding
    return finite


def valid_keys(mask: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
    """[batch, N] bool of visible keys, or None if ``mask`` is not a padding mask: a key-padding
    mask, or a ``[B, 1, N, N]`` mask that is exactly valid-query × valid-key of one padding vector.

    The latter is checked in about one read of the mask, no N×N temporary (at 26k tokens the
    mask is 0.7 GB per call): its diagonal is the valid vector V; an all-True mask is V × V with
    nothing padded; otherwise the rows and columns outside V are empty (a slice per padded token)
    and the mask holds |V|² entries, so it is all of V × V."""
    m = _visible(mask)
    if m is None:
        return None
    if m.dim() == 4 and m.shape[-2] > 1:
        if m.shape[1] != 1 or m.shape[-2] != m.shape[-1]:
            return None
        m = m[:, 0]
        valid = m.diagonal(dim1=-2, dim2=-1)  # query i sees key i iff token i is valid
        for b in range(m.shape[0]):
            pad = (~valid[b]).nonzero().squeeze(-1)
            if pad.numel() == 0:  # nothing padded: V × V is everything (one fast reduction)
                if not bool(m[b].all()):
                    return None
                continue
            if bool(m[b].index_select(0, pad).any() | m[b].index_select(1, pad).any()):
                return None  # a padded token's row or column is not empty
            nv = valid.shape[-1] - pad.numel()
            if _count_true(m[b]) != nv * nv:
                return None  # not valid × valid: a window, causal, or block mask
        m = valid
    else:
        m = m.reshape(m.shape[0], -1) if m.dim() > 1 else m.unsqueeze(0)
    if m.shape[0] not in (1, batch):
        return None
    return m.expand(batch, m.shape[-1])


def _count_true(m: torch.Tensor) -> int:
    """Number of True entries of a bool tensor, reading it as int64 words where it can (bool
    storage is one 0/1 byte; torch's bool sum/count_nonzero run at a fifth of that speed)."""
    flat = m.reshape(-1)
    n8 = flat.numel() // 8 * 8
    if n8 == 0 or not flat.is_contiguous() or flat.storage_offset() % 8:
        return int(torch.count_nonzero(flat))
    words = flat[:n8].view(torch.int64)
    per_word = (words * 0x0101010101010101) >> 56  # byte sum of each word (≤ 8: no carry out)
    return int(per_word.sum()) + int(torch.count_nonzero(flat[n8:]))


def padded_query_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, i: int,
                      rows: torch.Tensor, scale: float) -> torch.Tensor:
    """What the model's attention gives batch element ``i``'s queries ``rows`` (the padded ones)
    under ``mask``: SDPA on those rows with their own rows of the mask (all keys hidden under an
    outer-product mask, the valid keys under a key-padding mask)."""
    m = mask[i if mask.shape[0] > 1 else 0] if mask.dim() > 1 else mask
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m
    if m.shape[-2] > 1:
        m = m.index_select(-2, rows)
    return F.scaled_dot_product_attention(q[i:i + 1].index_select(-2, rows), k[i:i + 1], v[i:i + 1],
                                          attn_mask=m, scale=scale)


def run_key_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   text_before: int, text_after: int, scale: float,
                   call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]
                   ) -> Optional[torch.Tensor]:
    """Attention of [B, H, N, D] q/k/v under a text padding ``mask``; None if it is not one.

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
    if bool(valid.all()):
        return call(q, k, v, text_before, text_after)  # nothing padded: one call for the whole batch
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
        out[i:i + 1].index_copy_(-2, drop, padded_query_rows(q, k, v, mask, i, drop, scale))
    return out
