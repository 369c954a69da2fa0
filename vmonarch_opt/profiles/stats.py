"""Per-site, per-head attention statistics, measured on one site's q/k/v at a time.

* **Entropy** of every query row's attention distribution, from the dense flash pass that also
  yields the reference output (``flash_attention_triton(return_stats=True)`` on CUDA, the
  pure-torch ``attention_stats_reference`` elsewhere). Reported per head as the mean over rows
  and its spread (standard deviation over rows), in nats, plus the mean normalised by
  ``log(N_keys)`` (1 = uniform attention, 0 = one key).
* **Block concentration** on the video grid: the video keys are cut into blocks (3D cubes of
  about a quarter of each grid dimension, ~√N-token runs without a grid); for sampled video query
  rows we take the attention distribution over the video keys and measure the mass held by the
  top ``top_fraction`` of the blocks (uniform attention: ≈ ``top_fraction``; block-local: ≈ 1),
  the mass in the query's own block, and the mass in the query's own frame. Rows are sampled
  evenly over the video tokens (``sample_rows`` per head): it is a statistic, not an exact
  integral, and it never materialises the N×N matrix.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["dense_with_stats", "masked_dense_with_stats", "entropy_stats", "block_concentration", "stat_blocks"]

_CHUNK_ELEMS = 1 << 25  # cap on the largest [rows, keys] temporary per head chunk


def dense_with_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Dense attention ``(out, lse, entropy)``: our Triton flash kernel on CUDA, the reference elsewhere."""
    from ..kernels.dispatch import dense_with_stats as run

    return run(q, k, v, scale)


def masked_dense_with_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            valid: torch.Tensor):
    """``dense_with_stats`` under a key-padding mask ``valid`` ([B, N_keys] bool, True = visible):
    the model's masked attention and the entropy of that attention, in one dense pass per batch
    element over its visible keys (a batch element without visible keys raises)."""
    outs, lses, ents = [], [], []
    for b in range(q.shape[0]):
        idx = valid[b].nonzero().squeeze(1)
        if idx.numel() == 0:
            raise ValueError("calibration: a key-padding mask hides every key of a batch element")
        o, lse, ent = dense_with_stats(q[b:b + 1], k[b:b + 1, :, idx], v[b:b + 1, :, idx], scale)
        outs.append(o), lses.append(lse), ents.append(ent)
    return torch.cat(outs), torch.cat(lses), torch.cat(ents)


def entropy_stats(entropy: torch.Tensor, n_keys: int) -> dict:
    """Per head (averaged over the batch): mean row entropy, its spread over rows, and the mean
    normalised by log(n_keys)."""
    e = entropy.float()  # [B, H, N]
    mean = e.mean(dim=(0, 2))
    spread = e.std(dim=2, unbiased=False).mean(dim=0) if e.shape[2] > 1 else torch.zeros_like(mean)
    norm = mean / math.log(n_keys) if n_keys > 1 else torch.zeros_like(mean)
    return {"entropy": mean.tolist(), "entropy_spread": spread.tolist(), "entropy_norm": norm.tolist()}


def stat_blocks(grid: Optional[tuple], nv: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block id and frame id (None without a grid) of every video token, in (t, h, w) order."""
    if grid:
        T, H, W = grid
        ct, ch, cw = (max(1, -(-g // 4)) for g in (T, H, W))
        t = torch.arange(T).view(T, 1, 1).expand(T, H, W)
        h = torch.arange(H).view(1, H, 1).expand(T, H, W)
        w = torch.arange(W).view(1, 1, W).expand(T, H, W)
        nh, nw = -(-H // ch), -(-W // cw)
        blk = ((t // ct) * nh + h // ch) * nw + w // cw
        return blk.reshape(-1), (t.reshape(-1) if T > 1 else None)
    size = max(1, math.isqrt(max(nv - 1, 0)) + 1)
    return torch.arange(nv) // size, None


def block_concentration(q: torch.Tensor, k: torch.Tensor, scale: float, grid: Optional[tuple],
                        text_before: int, text_after: int, *, top_fraction: float = 0.1,
                        sample_rows: int = 128) -> dict:
    """Per head: mass of the top blocks, own-block mass and own-frame mass (see module docstring)."""
    B, H, N, D = q.shape
    nv = N - text_before - text_after
    if nv < 2:
        return {}
    blk, frame = stat_blocks(grid, nv)
    C = int(blk.max()) + 1
    top = max(1, math.ceil(top_fraction * C))
    r = min(sample_rows, nv)
    rows = torch.linspace(0, nv - 1, r).round().long()
    dev = q.device
    blk_d, rows_d = blk.to(dev), rows.to(dev)
    qs = q[:, :, text_before + rows_d].float()  # [B, H, r, D]
    kv = k[:, :, text_before:text_before + nv]
    own_blk = blk_d[rows_d]
    heads_per = max(1, _CHUNK_ELEMS // max(1, B * r * nv))
    top_mass, own_mass, frame_mass = [], [], []
    for h0 in range(0, H, heads_per):
        h1 = min(H, h0 + heads_per)
        p = torch.softmax(torch.matmul(qs[:, h0:h1], kv[:, h0:h1].float().transpose(-1, -2)) * scale, dim=-1)
        mass = torch.zeros(B, h1 - h0, r, C, device=dev).index_add_(-1, blk_d, p)
        top_mass.append(mass.topk(top, dim=-1).values.sum(-1).mean(dim=(0, 2)))
        own_mass.append(mass.gather(-1, own_blk.view(1, 1, r, 1).expand(B, h1 - h0, r, 1))[..., 0].mean(dim=(0, 2)))
        if frame is not None:
            fr = frame.to(dev)
            same = (fr[rows_d][:, None] == fr[None, :]).to(p.dtype)  # [r, nv]
            frame_mass.append((p * same).sum(-1).mean(dim=(0, 2)))
        del p, mass
    out = {"blocks": C, "top_blocks": top, "top_fraction": top_fraction, "sampled_rows": r,
           "concentration": torch.cat(top_mass).tolist(), "own_block_mass": torch.cat(own_mass).tolist()}
    if frame_mass:
        out["own_frame_mass"] = torch.cat(frame_mass).tolist()
    return out
