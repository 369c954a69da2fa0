"""Find the block-causal masks and KV caches of causal video models (``methods/causal.py`` runs them).

**Block-causal masks.** A causal video DiT trained or run chunk by chunk (Self-Forcing,
diffusion forcing, SkyReels-V2's autoregressive mode) passes SDPA a mask under which the queries
of frame chunk ``c`` see the keys of chunks ``≤ c``: every query row sees a *prefix* of the keys,
and the prefix ends at a chunk boundary. The census (``census.py``) records, for each SDPA call's
mask, its *staircase*: the runs of query rows that see the same key prefix (``staircase``), or
nothing when some row is not a prefix (a window, a padding pattern, a bias). Once the video grid is
known, ``chunk_frames`` reads the chunk size from it: runs of ``C·H·W`` rows, each seeing the keys up
to its own end. The mask is checked again on every call (``check_block_causal``: one read of the
mask, remembered for the tensor while it is unchanged, since every layer of a forward passes the
same one); one that changed makes the call run the model's own attention.

**KV caches.** A self-attention whose keys are the cached tokens followed by the new ones has
fewer queries than keys and keys that are not only projections of the queries' tokens (detection
marks it ``kind = "cached"``). It is rewritten when the keys are whole frames of the queries' grid:
``N_k = T_k·H·W`` for the query grid ``(T_q, H, W)`` (``cached_key_frames``), the key grid being
``(T_k, H, W)`` with the ``T_k − T_q`` cached frames first. A cache that grows (or a sliding window
with sink frames) changes ``N_k`` from call to call; each new length re-derives the plan
(``passes/regrid.py``), as another video size does.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

__all__ = ["staircase", "chunk_frames", "check_block_causal", "block_causal_ok", "cached_key_frames", "mark_structure",
           "STAIRCASE_ROWS"]

STAIRCASE_ROWS = 2048  # query rows read per step when reading a mask's staircase (bounds the temporary)


def _visible(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Bool of what ``mask`` lets through; None for an additive mask that is not 0 / −∞ (a bias)."""
    if mask.dtype == torch.bool:
        return mask
    if not torch.is_floating_point(mask):
        return None
    finite = torch.isfinite(mask) & (mask > -1e4)
    if bool((mask[finite] != 0).any()):
        return None
    return finite


def _square(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``[N_q, N_k]`` pattern of a mask that is the same for every batch element and head
    (leading dimensions of size 1), or None."""
    if mask.dim() < 2 or any(d != 1 for d in mask.shape[:-2]):
        return None
    return mask.reshape(mask.shape[-2], mask.shape[-1])


def staircase(mask: torch.Tensor) -> Optional[tuple]:
    """``((row start, row end, keys seen), ...)``: the runs of query rows of ``mask`` that see the
    same prefix ``[0, keys seen)`` of the keys, or None when a row sees anything but a prefix (or
    the mask is a bias, or differs across batch/heads). Reads the mask once, ``STAIRCASE_ROWS``
    rows at a time."""
    m = _square(mask)
    if m is None:
        return None
    m = _visible(m)
    if m is None:
        return None
    n_q, n_k = m.shape
    ar = torch.arange(n_k, device=m.device)
    ends = []
    for r0 in range(0, n_q, STAIRCASE_ROWS):
        rows = m[r0:r0 + STAIRCASE_ROWS]
        cnt = rows.sum(-1)
        if not bool((rows == (ar[None, :] < cnt[:, None])).all()):
            return None
        ends.append(cnt)
    ends = torch.cat(ends).tolist()
    runs, start = [], 0
    for i in range(1, n_q + 1):
        if i == n_q or ends[i] != ends[start]:
            runs.append((start, i, int(ends[start])))
            start = i
    return tuple(runs)


def chunk_frames(runs: Optional[tuple], grid: tuple, n: int) -> Optional[int]:
    """Frames per chunk ``C`` when ``runs`` (a ``staircase``) is the block-causal mask of chunks of
    ``C`` frames over the video grid ``(T, H, W)`` of ``n = T·H·W`` tokens (queries and keys), else
    None. A mask that hides nothing (one chunk) is not block-causal."""
    if not runs or not grid:
        return None
    T, H, W = (int(x) for x in grid)
    hw = H * W
    if T * hw != n or runs[0][0] != 0 or runs[0][1] % hw:
        return None
    C = runs[0][1] // hw
    if C < 1 or C >= T:
        return None
    expect = [(s * hw, min(T, s + C) * hw, min(T, s + C) * hw) for s in range(0, T, C)]
    return C if list(runs) == expect else None


_checked: dict = {}  # id(mask) -> (weakref to it, version, chunk, tokens per frame, verdict)


def check_block_causal(mask: torch.Tensor, frames: int, hw: int, chunk: int) -> bool:
    """``mask`` is the block-causal mask of chunks of ``chunk`` frames over ``frames`` frames of
    ``hw`` tokens: query rows of chunk ``c`` see exactly the keys of chunks ``≤ c``. One read of the
    mask (per chunk, its visible block must be all True and the rest all False); the verdict is
    remembered while the same tensor, unchanged, comes back (every layer of a forward)."""
    key = id(mask)
    hit = _checked.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version and hit[2:4] == (chunk, hw):
        return hit[4]
    ok = _check(mask, frames, hw, chunk)
    if len(_checked) > 64:
        _checked.clear()
    try:
        _checked[key] = (weakref.ref(mask), mask._version, chunk, hw, ok)
    except TypeError:  # a tensor subclass without weak references: check every call
        pass
    return ok


def _check(mask: torch.Tensor, frames: int, hw: int, chunk: int) -> bool:
    ok = block_causal_ok(mask, frames, hw, chunk)
    return ok is not None and bool(ok)


def block_causal_ok(mask: torch.Tensor, frames: int, hw: int, chunk: int) -> Optional[torch.Tensor]:
    """A 0-d bool tensor: ``mask`` (bool, or additive 0 / −∞) is the block-causal mask of chunks of
    ``chunk`` frames; None when its shape alone rules it out. No data-dependent Python: compiled
    code (``torch.cond`` in the runtime) decides with it in the graph."""
    n = frames * hw
    m = _square(mask)
    if m is None or tuple(m.shape) != (n, n):
        return None
    if m.dtype == torch.bool:
        vis, ok = m, torch.ones((), dtype=torch.bool, device=m.device)
    elif torch.is_floating_point(m):
        vis = torch.isfinite(m) & (m > -1e4)
        ok = ~(vis & (m != 0)).any()  # a visible entry must add 0: not a bias
    else:
        return None
    for s in range(0, frames, chunk):
        r0, e = s * hw, min(frames, s + chunk) * hw
        ok = ok & vis[r0:e, :e].all()
        if e < n:
            ok = ok & ~vis[r0:e, e:].any()
    return ok


def cached_key_frames(n_q: int, n_k: int, grid: Optional[tuple]) -> Optional[int]:
    """Key frames ``T_k`` when ``n_k`` keys are whole frames of the query grid ``(T_q, H, W)``
    (``n_q = T_q·H·W``) and there are more keys than queries; else None."""
    if not grid:
        return None
    T, H, W = (int(x) for x in grid)
    hw = H * W
    if T * hw != n_q or n_k <= n_q or n_k % hw:
        return None
    return n_k // hw


def mark_structure(sites: list, staircases: dict) -> None:
    """Set ``causal_chunk`` / ``cached_frames`` (or ``structure_note``) of each site from its grid
    and, for masked SDPA sites, the staircase the census recorded for that call
    (``staircases[(module path, ordinal)]``)."""
    for s in sites:
        if s.kind == "cached":
            if s.text_before or s.text_after:
                s.structure_note = "the queries hold text tokens besides the video"
            elif s.has_mask:
                s.structure_note = "a mask on KV-cache attention"
            else:
                tk = cached_key_frames(s.seq_q, s.seq_k, s.grid)
                if tk is None:
                    s.structure_note = (f"its {s.seq_k} keys are not whole frames of the queries' grid "
                                        f"{'×'.join(map(str, s.grid)) if s.grid else '(none found)'}")
                else:
                    s.cached_frames = tk - int(s.grid[0])
            continue
        if not s.has_mask or s.seq_q != s.seq_k or s.form != "sdpa":
            continue
        key = (s.module_path, s.ordinal)
        if key not in staircases:
            continue
        runs = staircases[key]
        if runs is None:
            s.structure_note = ("some query sees keys that are not a prefix of the sequence (a window, another "
                                "pattern, a bias, or a mask that differs across batch or heads)")
            continue
        if s.text_before or s.text_after:
            s.structure_note = "a block-causal mask over text tokens as well as the video"
            continue
        C = chunk_frames(runs, s.grid, s.seq_q)
        if C is None:
            s.structure_note = ("every query sees a prefix of the keys, but not in whole chunks of frames of "
                                f"the grid {'×'.join(map(str, s.grid)) if s.grid else '(none found)'}")
        else:
            s.causal_chunk = C
