"""Pure-PyTorch reference of Monarch attention (MonarchAttention / VMonarch) on a video token grid.

This is the CPU path of ``vmonarch::monarch_attention`` and the oracle of the Triton kernel's
tests. It is written for clarity; the Triton kernel in ``kernel.py`` computes the same function.

Notation (docs/design.md). The video tokens are split into M blocks of B positions by the layout
(``layout.py``): token (i, j) is position j of block i; ``idx[i, j]`` is its sequence
index and ``valid[i, j]`` whether it exists (partial tiles are padded). Attention row of video
query (i, j) is restricted to ``a[(m, l)] = L[j, i, m] * R[m, j, l]``: pick block m with
probability ``L``, then key l inside block m with probability ``R``. Each row maximises
``<a, s> + H(a)`` over that family (softmax maximises it over all distributions).

Alternating updates, s = softmax scale, ``steps`` = T (T=1: only the final pass):

* start with the R-step query ``Qbar[m, j] = q[m, j]`` (zero at padding: uniform R there);
* R-step: ``R[m, j] = softmax_l(s * Qbar[m, j] . k[m, l])`` over the valid keys of block m;
  ``A_L[m, j] = s * sum_l R k[m, l]``; ``cL[m, j] = sum_l R log R`` (entropy term, computed
  online as ``sum_l R x_l - logsumexp_l x_l``); in the final pass also ``Y[m, j] = sum_l R v``;
* L-step for query (i, j): block logits ``z[i, j, m] = q[i, j] . A_L[m, j] - cL[m, j]``;
  text keys t (joint attention) enter the same softmax with their exact logits
  ``s * q[i, j] . k_t``; ``L[j, i, :]`` is the softmax over [blocks, text keys];
* between steps: ``Qbar[m, j] = sum_i L[j, i, m] q[i, j] / sum_i L[j, i, m]``
  (the L-weighted mean of the block's queries, over valid queries i);
* final: ``out[i, j] = sum_m L[j, i, m] Y[m, j] + sum_t L[j, i, t] v_t``.

Text tokens: text *query* rows attend densely to all N keys (exact). Video query rows combine
the Monarch distribution over video keys and the exact text keys in one normalised softmax:
at the Monarch solution, ``z[i, j, m]`` is exactly the maximal objective ``<a, s> + H(a)`` of
the row restricted to block m (a lower bound of the logsumexp over block m's keys, with equality
when R is that row's own softmax), so block m enters the softmax like a single key with logit
``z`` and value ``Y[m, j]``. With one video block (M = 1) this is exactly dense attention.

Stability: every normalisation is guarded. ``recompute=False`` uses the plain update
``Qbar = Abar / max(cbar, 1e-30)``. ``recompute=True`` (VMonarch-style recomputation) recomputes
each R-step query from fresh scores instead of trusting the drifted iterate: the weights
``L[j, i, m] / cbar[m, j]`` are normalised in the log domain over i (a softmax of
``log L``, so a vanishing cbar cannot blow up the division), and where the L-mass
``cbar[m, j]`` of a block has collapsed below ``RESET_MASS`` the factor is re-initialised from
the block's own fresh query ``q[m, j]`` (the T=1 factor). ``recompute`` has no effect at steps=1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .layout import MonarchLayout, check_qkv, check_steps, make_layout, resolve_scale

__all__ = ["monarch_attention_reference", "monarch_flops", "dense_attention_flops",
           "monarch_reference_details", "RESET_MASS", "PLAIN_CBAR_EPS"]

RESET_MASS = 1e-4        # recompute=True: re-initialise R[m, j] when cbar[m, j] < RESET_MASS
PLAIN_CBAR_EPS = 1e-30   # recompute=False: Qbar = Abar / max(cbar, PLAIN_CBAR_EPS)
_CHUNK_ELEMS = 1 << 26   # bound on the largest temporary (elements) per batch*head chunk


def dense_attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int) -> int:
    """FLOPs of dense attention: QK^T and PV, 2 FLOPs per multiply-add: 4*B*H*Nq*Nk*D."""
    return 4 * int(batch) * int(heads) * int(seq_q) * int(seq_k) * int(head_dim)


def monarch_flops(batch: int, heads: int, seq: int, head_dim: int, *, grid, block, text_before: int = 0,
                  text_after: int = 0, steps: int = 1) -> int:
    """Matmul FLOPs of Monarch attention (2 per multiply-add), padding included.

    Per R-step: scores and R K (4*M*B^2*D), the final one also R V (+2*M*B^2*D).
    Per L-step: block logits q . A_L (2*B*M^2*D); between steps Abar = L^T q (+2*B*M^2*D);
    final: L Y (+2*B*M^2*D). Text: video queries x text keys (2*Nv*nt*D logits per L-step, +2*Nv*nt*D
    for the final L V_text), text queries x all keys densely (4*nt*N*D).
    """
    lay = make_layout(seq, grid, block, text_before, text_after)
    T_ = check_steps(steps)
    M, B, D, nt = lay.M, lay.B, int(head_dim), lay.n_text
    r_step = 4 * M * B * B * D
    l_step = 4 * B * M * M * D
    text_l = 2 * lay.Nv * nt * D
    per_head = (T_ - 1) * (r_step + l_step + text_l) + (r_step + 2 * M * B * B * D) + l_step + 2 * text_l
    per_head += 4 * nt * lay.N * D
    return int(batch) * int(heads) * per_head


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _text_rows(q, k, v, text_idx, scale):
    """Dense softmax attention of the text query rows over all keys. q,k,v: [c, N, D]."""
    qt = q[:, text_idx]
    p = torch.softmax(scale * qt @ k.transpose(-1, -2), dim=-1)
    return p @ v


def _r_step(qbar, kb, vb, valid, scale, final):
    """R-step of every block. qbar, kb, vb: [c, M, B, D]; valid: [M, B].

    Returns A_L [c, M, B, D] (already times scale), cL [c, M, B] (sum R log R), Y (or None).
    """
    s = scale * torch.einsum("cmjd,cmld->cmjl", qbar, kb)                 # [c, M, B(j), B(l)]
    kmask = valid[None, :, None, :]
    s = s.masked_fill(~kmask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                       # finite: each block has a valid key
    r = torch.exp(s - lse[..., None])
    a_l = scale * torch.einsum("cmjl,cmld->cmjd", r, kb)
    # entropy term online-style: sum_l R * x_l - logsumexp (masked keys have R = 0)
    c_l = (r * s.masked_fill(~kmask, 0.0)).sum(-1) - lse
    y = torch.einsum("cmjl,cmld->cmjd", r, vb) if final else None
    return a_l, c_l, y


def _l_logits(qb, a_l, c_l, kt, scale):
    """Block logits z [c, B(j), M(i), M(m)] and text logits zt [c, B(j), M(i), nt] (or None)."""
    z = torch.einsum("cijd,cmjd->cjim", qb, a_l) - c_l.transpose(1, 2)[:, :, None, :]
    zt = scale * torch.einsum("cijd,ctd->cjit", qb, kt) if kt is not None else None
    return z, zt


def _video_chunk(q, k, v, lay: MonarchLayout, idx, valid, text_idx, steps, scale, recompute, want):
    """Monarch output for the video rows of one chunk of (batch*head). q,k,v: [c, N, D]."""
    vmask = valid[None, :, :, None]
    qb = q[:, idx] * vmask                                                 # [c, M, B, D]
    kb = k[:, idx] * vmask
    vb = v[:, idx] * vmask
    kt = k[:, text_idx] if lay.n_text else None
    vt = v[:, text_idx] if lay.n_text else None
    qbar = qb
    for step in range(steps):
        final = step == steps - 1
        a_l, c_l, y = _r_step(qbar, kb, vb, valid, scale, final)
        z, zt = _l_logits(qb, a_l, c_l, kt, scale)
        full = torch.cat([z, zt], -1) if zt is not None else z
        lse_row = torch.logsumexp(full, dim=-1)                            # [c, B(j), M(i)]
        if final:
            p = torch.exp(z - lse_row[..., None])
            out = torch.einsum("cjim,cmjd->cijd", p, y)
            if zt is not None:
                out = out + torch.einsum("cjit,ctd->cijd", torch.exp(zt - lse_row[..., None]), vt)
            if want is not None:
                want.update(a_l=a_l, c_l=c_l, y=y, lse_row=lse_row, z=z, zt=zt)
            return out
        log_l = (z - lse_row[..., None]).masked_fill(~valid.T[None, :, :, None], float("-inf"))  # [c,j,i,m]
        if recompute:
            w = torch.softmax(log_l, dim=2)                                # normalised over queries i
            newq = torch.einsum("cjim,cijd->cmjd", w, qb)
            log_cbar = torch.logsumexp(log_l, dim=2).transpose(1, 2)       # [c, M, B]
            reset = (log_cbar < math.log(RESET_MASS))[..., None]
            qbar = torch.where(reset, qb, newq)
        else:
            lw = torch.exp(log_l)
            cbar = lw.sum(2).transpose(1, 2)                               # [c, M, B]
            abar = torch.einsum("cjim,cijd->cmjd", lw, qb)
            qbar = abar / cbar.clamp_min(PLAIN_CBAR_EPS)[..., None]
    raise AssertionError("unreachable")


def _run(q, k, v, lay, steps, scale, recompute, want=None):
    b, h, N, D = q.shape
    cdt = _compute_dtype(q.dtype)
    qf, kf, vf = (x.reshape(b * h, N, D).to(cdt) for x in (q, k, v))
    idx, valid = lay.token_index(q.device)
    text_idx = lay.text_index(q.device)
    out = torch.empty(b * h, N, D, dtype=cdt, device=q.device)
    M, B = lay.M, lay.B
    per = max(M * B * B, B * M * (M + lay.n_text), M * B * D) * 3
    chunk = max(1, _CHUNK_ELEMS // max(per, 1))
    if want is not None:
        chunk = b * h
    flat_idx, flat_valid = idx.reshape(-1), valid.reshape(-1)
    for c0 in range(0, b * h, chunk):
        sl = slice(c0, min(b * h, c0 + chunk))
        ov = _video_chunk(qf[sl], kf[sl], vf[sl], lay, idx, valid, text_idx, steps, scale, recompute, want)
        ov = ov.reshape(ov.shape[0], M * B, D)
        out[sl, flat_idx[flat_valid]] = ov[:, flat_valid]
        if lay.n_text:
            out[sl, text_idx] = _text_rows(qf[sl], kf[sl], vf[sl], text_idx, scale)
    return out.reshape(b, h, N, D)


def monarch_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, block,
                                text_before: int = 0, text_after: int = 0, steps: int = 1,
                                scale: Optional[float] = None, recompute: bool = False) -> torch.Tensor:
    """Monarch attention, pure PyTorch. q, k, v: ``[batch, heads, N, head_dim]``, any float dtype.

    ``N = text_before + T*H*W + text_after`` with grid = (T, H, W); ``block`` = (bt, bh, bw)
    tile of the grid per Monarch block (partial edge tiles are padded and masked). Computes in
    float32 (float64 for float64 inputs) and returns ``q.dtype``. See the module docstring for
    the algorithm, text-token handling and ``recompute``.
    """
    check_qkv(q, k, v)
    lay = make_layout(q.shape[2], grid, block, text_before, text_after)
    steps = check_steps(steps)
    sc = resolve_scale(scale, q.shape[-1])
    return _run(q, k, v, lay, steps, sc, bool(recompute)).to(q.dtype)


def monarch_reference_details(q, k, v, *, grid, block, text_before=0, text_after=0, steps=1, scale=None,
                              recompute=False):
    """Output plus the final-pass factors, for tests and diagnostics (small inputs only).

    Returns a dict: ``out`` [b, h, N, D]; ``a_l`` [b*h, M, B, D], ``c_l`` (sum R log R) and
    ``y`` of the final R-step; ``z`` [b*h, B, M(i), M(m)] block logits, ``zt`` text logits,
    ``lse_row`` [b*h, B, M(i)]: the Monarch objective value of each video row (its estimate of
    the row's logsumexp over all keys; padded rows included), plus ``layout``, ``idx``, ``valid``.
    """
    check_qkv(q, k, v)
    lay = make_layout(q.shape[2], grid, block, text_before, text_after)
    sc = resolve_scale(scale, q.shape[-1])
    want = {}
    out = _run(q, k, v, lay, check_steps(steps), sc, bool(recompute), want)
    idx, valid = lay.token_index(q.device)
    want.update(out=out, layout=lay, idx=idx, valid=valid, scale=sc)
    return want
