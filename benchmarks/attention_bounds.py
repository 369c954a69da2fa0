"""Oracle bounds: how close could *any* sparse attention get on the fixture's layers?

    python benchmarks/attention_bounds.py  # GPU: seconds; CPU: ~10 min

Per layer and head of the shipped tiny video DiT (its own q/k/v on procedural videos noised to each
t of ``--ts``), the relative attention error ``‖o − o_dense‖ / ‖o_dense‖`` of

* **token oracle, top ρ**: every query keeps its own ρ·N keys of largest true attention weight and
  renormalises over them. This is what every top-k sparse method approximates, at any block
  granularity, with a perfect selector: a head this is several percent off at ρ = 15 % cannot be
  approximated by sparse attention at an 85 % cut, however the keys are chosen;
* **block oracle**: VMoBA's layout (4×4×4 query groups and key blocks), each group keeping the 8 of
  64 key blocks (12.5 %) that hold most of its true attention mass, without and with the pooled
  rest — the shipped kernel's layout with a perfect selector;
* **VMoBA as shipped**: the same layout, top-8 by its own selection, pooled rest.

Then the same in video terms: ``--seeds`` videos sampled (as ``fidelity.py`` does) with every layer's
attention replaced by each oracle / by VMoBA, PSNR vs the dense videos at that attention-FLOP cut.

Each cell is measured over ``--videos`` procedural videos together and is the worst over the noise
levels (how sparse a head is depends a lot on the video: one head of layer 4 is 0.6 % off at ρ = 10 %
on one video and 5.6 % on another). The table is appended to BENCHMARKS.md (unless
``--no-append``) and written to ``$OUT/attention_bounds.json`` / ``_section.md``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
from vmonarch_opt.kernels.vmoba.layout import VMoBASelection, vmoba_layout  # noqa: E402
from vmonarch_opt.kernels.vmoba.reference import (vmoba_attention_from_selection,  # noqa: E402
                                                  vmoba_attention_reference)
from vmonarch_fixtures.tiny_dit import (attention_replaced, calib_batch, load_tiny_video_dit,  # noqa: E402
                                        record_qkv, sample)
from benchmarks.fidelity import psnr, to_unit  # noqa: E402
from benchmarks.publish import command_line, now, publish  # noqa: E402


def _rel(o: torch.Tensor, ref: torch.Tensor) -> float:
    return ((o.float() - ref.float()).norm() / ref.float().norm()).item()


def token_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rho: float, chunk: int = 1024) -> torch.Tensor:
    """Attention ``[B, H, N, D]`` where every query keeps only its ``ceil(rho * N)`` keys of largest
    true weight (ties at the cut kept) and renormalises over them."""
    n_keep = max(1, min(k.shape[-2], math.ceil(rho * k.shape[-2])))
    scale = q.shape[-1] ** -0.5
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for s in range(0, q.shape[-2], chunk):
        logits = (q[..., s:s + chunk, :].float() @ k.float().transpose(-1, -2)) * scale
        cut = logits.topk(n_keep, dim=-1).values[..., -1:]
        p = logits.masked_fill(logits < cut, float("-inf")).softmax(-1)
        out[..., s:s + chunk, :] = p @ v.float()
    return out


def block_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, chunk, keep: int,
                 pooled_rest: bool) -> torch.Tensor:
    """VMoBA attention (reference) with each query group's ``keep`` key blocks of most true attention
    mass (the group's own block always kept, as VMoBA does)."""
    lay = vmoba_layout(grid, chunk, "3d")
    B, H, N, _ = q.shape
    scale = q.shape[-1] ** -0.5
    key_block = torch.repeat_interleave(torch.arange(lay.num_blocks), lay.block_len).to(q.device)
    q_group = torch.repeat_interleave(torch.arange(lay.num_groups), lay.group_len).to(q.device)
    perm = lay.perm.to(q.device)
    qp, kp = q[:, :, perm].float(), k[:, :, perm].float()
    mass = torch.zeros(B, H, lay.num_groups, lay.num_blocks, device=q.device)
    for s in range(0, N, 1024):
        p = ((qp[:, :, s:s + 1024] @ kp.transpose(-1, -2)) * scale).softmax(-1)
        pb = torch.zeros(*p.shape[:3], lay.num_blocks, device=q.device).index_add_(3, key_block, p)
        mass.index_add_(2, q_group[s:s + 1024], pb)
    own = torch.zeros_like(mass, dtype=torch.bool)
    own[:, :, torch.arange(lay.num_groups), lay.group_block.to(q.device)] = True
    mass = mass.masked_fill(own, float("inf"))
    top = mass.topk(min(keep, lay.num_blocks), dim=-1).indices.sort(-1).values
    kv_idx = torch.full(mass.shape, -1, dtype=torch.int32, device=q.device)
    kv_idx[..., :top.shape[-1]] = top.to(torch.int32)
    cnt = torch.full(mass.shape[:3], top.shape[-1], dtype=torch.int32, device=q.device)
    sel = VMoBASelection(layout=lay, kv_idx=kv_idx, kv_cnt=cnt, threshold=0.0, topk=keep)
    return vmoba_attention_from_selection(q, k, v, sel, scale, pooled_rest=pooled_rest)


RHOS = (0.05, 0.10, 0.15)


def bounds(model, frames: int, size: int, ts, videos: int = 4, keep: int = 8) -> list[dict]:
    """One dict per (layer, head): the worst error over ``ts`` of each approximation, each measured
    over a batch of ``videos`` procedural videos (how sparse a head is depends a lot on the content)."""
    dev = next(model.parameters()).device
    grid = (frames, size // model.patch, size // model.patch)
    chunk = tuple(-(-g // 4) for g in grid)  # 4 blocks per dimension: 64 blocks on the 16^3 grid
    worst: dict = {}
    for t in ts:
        b = calib_batch(videos, frames, size, t=t, seed=1234, device=dev, detail=model.data_detail)
        for layer, (q, k, v) in enumerate(record_qkv(model, **b)):
            for h in range(q.shape[1]):
                qh, kh, vh = q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1]
                ref = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float())
                errs = {f"token oracle {int(100 * r)}%": _rel(token_oracle(qh, kh, vh, r), ref) for r in RHOS}
                for pooled in (False, True):
                    name = f"block oracle top-{keep}" + (" + pooled" if pooled else "")
                    errs[name] = _rel(block_oracle(qh, kh, vh, grid, chunk, keep, pooled), ref)
                errs[f"vmoba top-{keep} + pooled"] = _rel(vmoba_attention_reference(
                    qh, kh, vh, grid=grid, chunk=chunk, partition="3d", topk=keep, pooled_rest=True), ref)
                row = worst.setdefault((layer, h), {})
                for name, e in errs.items():
                    row[name] = max(row.get(name, 0.0), e)
    return [dict(layer=layer, head=h, **errs) for (layer, h), errs in sorted(worst.items())]


def video_bounds(model, frames: int, size: int, seeds, steps: int, keep: int = 8) -> list[dict]:
    """Sampled videos (20 Euler steps by default, as fidelity.py) with every layer's attention replaced
    by an oracle or by VMoBA as shipped: mean PSNR vs the dense videos and the attention-FLOP cut
    (the fraction of query-key pairs not computed). The oracles need the full attention to choose,
    so they bound quality at that cut; they are not a method."""
    grid = (frames, size // model.patch, size // model.patch)
    chunk = tuple(-(-g // 4) for g in grid)
    n_blocks = math.prod(-(-g // c) for g, c in zip(grid, chunk))
    n_tok = math.prod(grid)
    skw = dict(steps=steps, frames=frames, height=size, width=size)
    dense = to_unit(sample(model, seeds, **skw))
    block_cut = 1 - keep / n_blocks  # equal blocks on the default grid (the pooled rest adds one key per block)
    cands = [(f"token oracle {int(100 * r)}%", 1 - math.ceil(r * n_tok) / n_tok,
              lambda q, k, v, r=r: token_oracle(q, k, v, r).to(q.dtype)) for r in RHOS]
    cands += [(f"block oracle top-{keep} + pooled", block_cut - n_blocks / n_tok,
               lambda q, k, v: block_oracle(q, k, v, grid, chunk, keep, True).to(q.dtype)),
              (f"vmoba top-{keep} + pooled", block_cut - n_blocks / n_tok,
               lambda q, k, v: vmoba_attention_reference(q, k, v, grid=grid, chunk=chunk, partition="3d",
                                                         topk=keep, pooled_rest=True))]
    rows = []
    for name, cut, fn in cands:
        with attention_replaced(model, fn):
            p = psnr(to_unit(sample(model, seeds, **skw)), dense)
        rows.append(dict(name=name, flop_cut=cut, psnr=sum(p) / len(p)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="safetensors (default: the shipped fixture)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ts", default="0.9,0.5,0.1", help="noise levels of the inputs (worst one reported)")
    ap.add_argument("--videos", type=int, default=4, help="procedural videos per noise level")
    ap.add_argument("--seeds", type=int, default=8, help="sampled videos for the video-level bound (0: skip it)")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps of the sampled videos")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    from tabulate import tabulate

    model = load_tiny_video_dit(args.weights, device=args.device, dtype=torch.float32)
    ts = [float(x) for x in args.ts.split(",") if x.strip()]
    rows = bounds(model, args.frames, args.size, ts, args.videos)
    names = [k for k in rows[0] if k not in ("layer", "head")]
    table = tabulate([[r["layer"], r["head"]] + [f"{100 * r[n]:.1f}" for n in names] for r in rows],
                     headers=["layer", "head"] + [f"{n} (err %)" for n in names], tablefmt="github")
    grid = f"{args.frames}×{args.size // model.patch}×{args.size // model.patch}"
    devname = torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else str(args.device)
    section = (f"## Attention oracle bounds: tiny video DiT ({now()})\n\n"
               f"Device: {devname}, torch {torch.__version__}. Command: `{command_line()}`. Fixture's own "
               f"q/k/v (grid {grid}) on {args.videos} procedural videos noised to t = {', '.join(map(str, ts))}; "
               f"relative attention error in % over the videos, worst over the noise levels. Token oracle top ρ: each query keeps its ρ·N "
               f"keys of largest true weight (the best any top-k sparse selection can do at that density); "
               f"block oracle: VMoBA's 4×4×4 layout with the truly heaviest blocks; last column: VMoBA as "
               f"shipped.\n\n{table}\n")
    videos = video_bounds(model, args.frames, args.size, list(range(args.seeds)), args.steps) if args.seeds else []
    if videos:
        vtable = tabulate([[r["name"], f"{100 * r['flop_cut']:.1f}%", f"{r['psnr']:.1f}"] for r in videos],
                          headers=["attention in every layer", "attn-FLOP cut", "PSNR dB vs dense"],
                          tablefmt="github")
        section += (f"\nSampled videos ({args.seeds} seeds × {args.steps} Euler steps, fp32, as `fidelity.py`) with "
                    f"every layer's attention replaced; the oracles choose from the true attention, so these "
                    f"bound what any selector of that kind reaches at that cut:\n\n{vtable}\n")
    publish("attention_bounds", section, dict(rows=rows, ts=ts, grid=grid, videos=videos),
            append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
