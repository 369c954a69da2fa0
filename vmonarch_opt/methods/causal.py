"""Block-causal and KV-cache attention for every method: how a plan with ``causal_chunk`` or
``cached_frames`` runs, and what it costs.

Two structures of causal video models are rewritten (``passes/causal.py`` finds them):

* **block-causal** (``args["causal_chunk"] = C`` frames): self-attention over a video grid
  ``(T, H, W)`` under a mask that lets query frame ``t`` see the key frames before
  ``min(T, (t // C + 1) * C)``: chunk ``c`` (frames ``[cC, (c+1)C)``) sees chunks ``≤ c``
  (Self-Forcing / diffusion-forcing training, SkyReels-V2's autoregressive mode);
* **KV cache** (``args["cached_frames"] = F``): the keys are whole frames of the grid
  ``args["grid"] = (T_k, H, W)`` (the cached frames, then the new ones) and the queries are the
  last ``T_k - F`` frames (streaming generation, one chunk at a time).

A method says what it can do with the hooks ``cached_unsupported`` / ``run_cached`` /
``cached_flops`` and its ``causal_mode`` (``Method``). A block-causal plan runs chunk by chunk:

* ``"cached"``: chunk ``c``'s queries run against the keys of chunks ``≤ c`` as a KV-cache call
  (``cached_frames = cC``) — each query's own visible keys, nothing more. The same function as
  the streaming model computes when it attends to its cache, so a model trained block-causally
  runs identically with a KV cache.
* ``"prefix"``: chunk ``c``'s rows of the method run on the prefix of chunks ``≤ c`` (queries and
  keys), the plan re-derived for the prefix grid. Causal — only tokens of chunks ``≤ c`` are
  read — for any method, at ``(chunks + 1) / 2`` times the work: for methods whose factors need
  the queries of every key block (Monarch's R step), which a KV cache does not hold.

Under ``torch.compile`` the chunk loop unrolls (static shapes); every call is a custom op.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

__all__ = ["is_causal_plan", "chunk_calls", "apply", "cost", "unsupported", "block_causal_visible",
           "CAUSAL_KEYS", "dense_causal_flops", "structure_args", "calls", "Call"]

#: the plan arguments of the two structures
CAUSAL_KEYS = ("causal_chunk", "cached_frames")


def is_causal_plan(args: dict) -> bool:
    """The plan has a block-causal or KV-cache structure."""
    return bool(args.get("causal_chunk") or args.get("cached_frames"))


def chunk_calls(frames: int, chunk: int) -> list[tuple[int, int]]:
    """``[(first frame, end frame)]`` of the query chunks of a block-causal grid of ``frames``
    frames in chunks of ``chunk``; chunk ``(s, e)`` sees key frames ``[0, e)``."""
    return [(s, min(frames, s + chunk)) for s in range(0, frames, chunk)]


def _grid(args: dict) -> tuple:
    return tuple(int(x) for x in args["grid"])


def unsupported(method, args: dict) -> Optional[str]:
    """Why ``method`` cannot run a plan with these causal arguments, or None."""
    if not is_causal_plan(args):
        return None
    if args.get("causal_chunk") and args.get("cached_frames"):
        return "block-causal attention over a KV cache (both at once) is not supported"
    if args.get("text_before") or args.get("text_after"):
        return "text tokens inside block-causal or KV-cache attention are not supported"
    if args.get("cached_frames"):
        return method.cached_unsupported(args)
    if args.get("causal_chunk"):
        why = method.causal_unsupported(args)
        if why is None and method.causal_mode == "cached":
            T, H, W = _grid(args)
            C = int(args["causal_chunk"])
            for s, e in chunk_calls(T, C)[1:]:
                why = method.cached_unsupported(_cached_args(method, args, e, s))
                if why is not None:
                    return f"chunk of frames {s}..{e - 1} over its {e} visible frames: {why}"
        return why
    return None


def structure_args(method, args: dict, site) -> dict:
    """``args`` (resolved for ``site``'s query grid) with the site's block-causal or KV-cache
    structure added: ``causal_chunk``, or the key grid and ``cached_frames``."""
    if getattr(site, "causal_chunk", 0):
        return {**args, "grid": list(site.grid), "causal_chunk": int(site.causal_chunk)}
    F = int(getattr(site, "cached_frames", 0) or 0)
    if not F:
        return args
    T, H, W = (int(x) for x in site.grid)
    key_grid = (T + F, H, W)
    if method.uses_grid:
        args = method.adapt_args(args, (T, H, W), key_grid)
    return {**args, "grid": list(key_grid), "cached_frames": F}


def _cached_args(method, args: dict, end: int, start: int) -> dict:
    """A block-causal plan's arguments for chunk ``[start, end)`` as a KV-cache call: the plan
    re-derived for the visible grid ``(end, H, W)`` (as a streaming plan is for that cache length),
    the first ``start`` frames cached."""
    return {**_prefix_args(method, args, end), "grid": [end, *_grid(args)[1:]], "cached_frames": start}


def _prefix_args(method, args: dict, end: int) -> dict:
    T, H, W = _grid(args)
    out = {k: v for k, v in args.items() if k not in CAUSAL_KEYS}
    if end == T or not method.uses_grid:
        return {**out, "grid": [end, H, W]} if "grid" in out else out
    return method.adapt_args(out, (T, H, W), (end, H, W))


class Call(NamedTuple):
    """One call ``apply`` makes: query rows ``[r0, r1)`` against keys ``[0, k1)``; ``rows`` keeps
    rows ``[rows, ...)`` of a "prefix" call's output; ``cached``: a ``run_cached`` call."""

    r0: int
    r1: int
    k1: int
    args: dict
    cached: bool
    rows: int = 0


def calls(method, args: dict, n_q: int, n_k: int) -> list[Call]:
    """The method calls that run a plan with ``args`` on ``n_q`` queries and ``n_k`` keys: one
    (``run``, or ``run_cached`` with a KV cache), or one per chunk of a block-causal plan in the
    method's ``causal_mode``. ``apply``, ``cost`` and measured-FLOP methods share it."""
    if args.get("cached_frames"):
        return [Call(0, n_q, n_k, args, True)]
    C = int(args.get("causal_chunk") or 0)
    if not C:
        return [Call(0, n_q, n_k, args, False)]
    T, H, W = _grid(args)
    hw = H * W
    if n_q != T * hw or n_k != T * hw:
        raise ValueError(f"block-causal plan for grid {(T, H, W)}: {n_q} queries and {n_k} keys, not {T * hw}")
    out = []
    for s, e in chunk_calls(T, C):
        if method.causal_mode == "cached" and s:
            out.append(Call(s * hw, e * hw, e * hw, _cached_args(method, args, e, s), True))
        elif method.causal_mode == "cached":
            out.append(Call(0, e * hw, e * hw, _prefix_args(method, args, e), False))
        else:
            out.append(Call(0, e * hw, e * hw, _prefix_args(method, args, e), False, rows=s * hw))
    return out


def apply(method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: dict, scale: float,
          lowering: bool = False) -> torch.Tensor:
    """``method``'s output under ``args`` (``Method.apply``): ``run`` without causal arguments,
    ``run_cached`` with a KV cache, chunk by chunk under a block-causal mask. ``lowering``: the
    same calls through the method's ONNX decomposition (``lower``; a KV-cache call only for methods
    with ``lowers_cached``)."""
    plan = calls(method, args, q.shape[-2], k.shape[-2])
    if lowering:
        run_cached = run = method.lower
        if any(c.cached for c in plan) and not method.lowers_cached:
            raise NotImplementedError(f"{method.name} has no ONNX lowering of its KV-cache form")
    else:
        run, run_cached = method.run, method.run_cached
    if len(plan) == 1 and plan[0].r0 == 0 and plan[0].r1 == q.shape[-2] and plan[0].k1 == k.shape[-2]:
        return (run_cached if plan[0].cached else run)(q, k, v, args, scale)
    parts = []
    for c in plan:
        ks, vs = k[..., :c.k1, :], v[..., :c.k1, :]
        out = (run_cached if c.cached else run)(q[..., c.r0:c.r1, :], ks, vs, c.args, scale)
        parts.append(out[..., c.rows:, :] if c.rows else out)
    return torch.cat(parts, dim=-2)


def cost(method, shape, args: dict, density: Optional[float] = None) -> Optional[int]:
    """Attention FLOPs of a plan (``Method.cost``): ``flops`` without causal arguments, else the
    sum over the calls ``apply`` makes (None when one of them is not known)."""
    total = 0
    for c in calls(method, args, shape.seq_q, shape.seq_k):
        sub = dataclasses.replace(shape, seq_q=c.r1 - c.r0, seq_k=c.k1)
        f = (method.cached_flops if c.cached else method.flops)(sub, c.args, density)
        if f is None:
            return None
        total += int(f)
    return total


def block_causal_visible(frames: int, tokens_per_frame: int, chunk: int, device=None) -> torch.Tensor:
    """``[N, N]`` bool: query i may attend to key j under the block-causal mask (tests, lowering)."""
    f = torch.arange(frames * tokens_per_frame, device=device) // tokens_per_frame
    end = torch.clamp((f // chunk + 1) * chunk, max=frames)
    return f[None, :] < end[:, None]


def dense_causal_flops(shape, args: dict) -> int:
    """FLOPs of exact attention under the plan's structure (every visible query-key pair)."""
    if args.get("cached_frames"):
        return shape.dense_flops
    C = int(args.get("causal_chunk") or 0)
    if not C:
        return shape.dense_flops
    T, H, W = _grid(args)
    hw = H * W
    pairs = sum((e - s) * hw * e * hw for s, e in chunk_calls(T, C))
    return 4 * shape.batch * shape.heads * pairs * shape.head_dim

