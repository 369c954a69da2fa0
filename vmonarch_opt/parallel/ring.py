"""Ring (sequence-split) context parallelism at one site: the sequence is split across the ranks in
contiguous runs of tokens (rank order), each rank holds the q/k/v of its own run, and each rank
must return the attention output of its own query rows over *all* keys.

* **Dense** (and the exact fallback of every other method): the ranks all-gather K and V (one
  ``[N, 2D]`` gather per head, the traffic of ring attention), then each rank attends its queries
  to every rank's K/V chunk and merges the partial outputs by log-sum-exp — exact.
* A structured method takes the split through its own ``ring_run`` hook when its
  ``ring_unsupported`` hook accepts the split (Monarch with whole frame blocks per rank: only the
  per-block R-step factors are gathered, see ``kernels/monarch/ring.py``); otherwise the site
  runs the exact dense ring and the call is counted as a ``context_parallel`` fallback with the
  method's reason (``vmonarch_opt.stats``, the report's "ran/fell back" column).

The gathers are differentiable (``all_gather_tensor_autograd``); the per-chunk dense pass uses
``kernels.dispatch.dense_with_stats`` (our flash kernel with statistics on CUDA, which has no
backward: ring sites are for inference on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import methods as registry
from ..errors import VMonarchError
from ..runtime import RAN, mismatch, prepare_qkv

__all__ = ["SequenceSplit", "dense_ring", "merge_partials", "ring_site"]


def even_sizes(total: int, world: int) -> tuple:
    """Tokens per rank when ``total`` tokens are split in ``world`` contiguous runs the way diffusers
    does it (``tensor_split``: the first ``total % world`` ranks get one more)."""
    base, extra = divmod(int(total), int(world))
    return tuple(base + (1 if r < extra else 0) for r in range(world))


@dataclass(frozen=True)
class SequenceSplit:
    """Which run of the sequence each rank holds: ``sizes[r]`` tokens, in rank order."""

    group: Any
    rank: int
    sizes: tuple

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def offsets(self) -> tuple:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def all_gather(self, t: torch.Tensor, dim: int, sizes: Optional[tuple] = None) -> torch.Tensor:
        """Every rank's ``t`` concatenated along ``dim`` in rank order; rank ``r``'s holds
        ``sizes[r]`` (default: ``self.sizes``) along ``dim``. Differentiable."""
        import torch.distributed._functional_collectives as funcol

        sizes = tuple(self.sizes if sizes is None else sizes)
        dim = dim % t.dim()
        if t.shape[dim] != sizes[self.rank]:
            raise VMonarchError(f"ring context parallel: this rank holds {t.shape[dim]} rows along dim {dim}, expected "
                                f"{sizes[self.rank]} of the split {sizes}")
        most = max(sizes)
        if t.shape[dim] < most:  # uneven runs: pad to the longest, trim after
            pad = list(t.shape)
            pad[dim] = most - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim=dim)
        g = funcol.all_gather_tensor_autograd(t.contiguous(), gather_dim=dim, group=self.group)
        g = funcol.wait_tensor(g) if isinstance(g, funcol.AsyncCollectiveTensor) else g
        if all(s == most for s in sizes):
            return g
        return torch.cat([c.narrow(dim, 0, s) for c, s in zip(g.split(most, dim=dim), sizes)], dim=dim)


def merge_partials(out: Optional[torch.Tensor], lse: Optional[torch.Tensor], o: torch.Tensor, o_lse: torch.Tensor):
    """Merge the attention ``(o, l)`` of the same queries over another set of keys into the running
    ``(out, lse)`` (float32; ``lse`` natural log, ``[..., N]``). Exact: softmax over the union."""
    o, o_lse = o.float(), o_lse.float()
    if out is None:
        return o, o_lse
    new = torch.logaddexp(lse, o_lse)
    return out * torch.exp(lse - new)[..., None] + o * torch.exp(o_lse - new)[..., None], new


def dense_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, split: SequenceSplit) -> torch.Tensor:
    """Exact attention of this rank's queries ``q [B, H, n_r, D]`` over every rank's keys: K and V
    all-gathered, one dense pass per rank's chunk, partial outputs merged by log-sum-exp."""
    from ..kernels.dispatch import dense_with_stats

    dk = k.shape[-1]
    kv = split.all_gather(torch.cat([k, v], dim=-1), dim=2)
    out = lse = None
    for part in kv.split(list(split.sizes), dim=2):
        if part.shape[2] == 0:
            continue
        o, o_lse, _ = dense_with_stats(q, part[..., :dk].contiguous(), part[..., dk:].contiguous(), scale)
        out, lse = merge_partials(out, lse, o, o_lse)
    return out.to(q.dtype)


def _split_of(n_local: int, group, uneven: bool, device) -> SequenceSplit:
    """The split of this call: equal runs (diffusers' default sharding asserts it), or with
    ``uneven`` (diffusers' ``ring_anything``) the ranks' run lengths exchanged on every call — on
    every rank alike, so that no rank skips a collective the others enter."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if not uneven:
        return SequenceSplit(group=group, rank=rank, sizes=(n_local,) * world)
    dev = "cpu" if "gloo" in str(dist.get_backend(group)) else device
    got = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(got, torch.tensor([n_local], dtype=torch.int64, device=dev), group=group)
    return SequenceSplit(group=group, rank=rank, sizes=tuple(int(x) for x in got))


def ring_site(rt, a: dict, group, uneven: bool = False) -> torch.Tensor:
    """One intercepted SDPA call of a site whose sequence is split across the ranks of ``group``
    (``rt``: the site's ``SiteRuntime``; ``a``: the bound SDPA arguments on this rank's tokens;
    ``uneven``: the runs may differ in length). Runs the plan's ring form, or exact dense ring
    attention with the reason counted as a fallback."""
    plan = rt.plan
    q, v = a["query"], a["value"]
    if a["attn_mask"] is not None or a["is_causal"] or a["dropout_p"]:
        what = "an attention mask" if a["attn_mask"] is not None else ("is_causal" if a["is_causal"] else "dropout")
        raise VMonarchError(f"vmonarch_opt: site {plan.site_id} runs under ring context parallel with {what}, which "
                            f"vmonarch_opt's ring attention does not take; use Ulysses (ulysses_degree) for this model")
    q4, k4, v4, scale = prepare_qkv(a)
    if k4.shape[-2] != q4.shape[-2]:
        raise VMonarchError(f"vmonarch_opt: site {plan.site_id} under ring context parallel got {q4.shape[-2]} queries "
                            f"and {k4.shape[-2]} keys on this rank; ring attention splits one sequence of both")
    split = _split_of(q4.shape[-2], group, uneven, q4.device)

    def dense() -> torch.Tensor:
        return dense_ring(q4, k4, v4, scale, split)

    if not plan.rewritten:
        out = dense()  # the model's own attention, computed exactly across the ranks
    elif rt.switch is not None and rt.switch.original:
        rt.record("switched", q)
        out = dense()
    else:
        why = _unfit(rt, plan, a, split)
        method = registry.get(plan.method)
        if why is not None:
            rt.fall_back(why[0], q, f"{why[1]}; ran exact dense ring attention")
            out = dense()
        elif not method.structured:  # exact attention by definition: the dense ring is this method
            out = dense()
            rt.record(RAN, q)
        else:
            reason = method.ring_unsupported(plan.args, split.sizes)
            if reason is not None:
                rt.fall_back("context_parallel", q, f"ring context parallel: {reason}; ran exact dense ring "
                                                    f"attention instead")
                out = dense()
            else:
                out = method.ring_run(q4, k4, v4, plan.args, scale, split)
                rt.record(RAN, q)
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def _unfit(rt, plan, a: dict, split: SequenceSplit) -> Optional[tuple]:
    """``(kind, message)`` when this call does not fit the plan (another sequence length or grid,
    dtype, ...), else None."""
    if split.total != plan.seq_q:
        return "shape", (f"{split.total} tokens across the ranks, not the {plan.seq_q} it was optimized for (under "
                         f"ring context parallel plans are not re-derived for other video sizes)")
    grid = plan.args.get("grid")
    grids = rt.tracker.grids if rt.tracker is not None else None
    if grid and grids and tuple(grid) not in {tuple(g) for g in grids}:
        return "shape", f"the input's token grid is not the {tuple(grid)} it was optimized for"
    local = plan.replace(seq_q=a["query"].shape[-2], seq_k=a["key"].shape[-2])
    return mismatch(local, a)
