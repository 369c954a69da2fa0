"""Train the tiny video DiT shipped in ``vmonarch_fixtures/`` (GPU, a few minutes).

    OUT=out python examples/train_tiny_video_dit.py            # the shipped fixture's settings

Data: procedural videos generated on the fly on the GPU (``vmonarch_fixtures.tiny_dit.procedural_videos``:
bouncing shapes, camera pans over textures, shapes over a panning texture, with fine moving
patterns of amplitude ``--detail``), 3×16×32×32 pixels,
cut by the model into 1×2×2 patches = a 16×16×16 token grid (4096 tokens). Objective: rectified
flow (``x_t = (1-t)·x0 + t·noise``, the model predicts ``noise - x0``), logit-normal t, 10% class
dropout. AdamW, bf16 autocast, EMA of the weights; training stops after ``--seconds`` of wall
time. The q/k RMSNorm gains (the attention temperature under qk-norm) train at ``--qk-gain-lr``
times the base rate: at 1× they barely move in a few thousand steps and the attention stays
diffuse, unlike a long-trained video DiT. Writes under ``--out`` (default ``$OUT`` or ``out/``):

* ``tiny_video_dit.safetensors`` — EMA weights in fp16 (the fixture);
* ``train_log.json`` — losses, per-layer attention entropy of the trained model, settings;
* ``train_samples.png`` — videos sampled from seeds 0..5 (20 Euler steps), one row per video.

Copy the safetensors into ``vmonarch_fixtures/`` to ship it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
from vmonarch_fixtures.tiny_dit import (CLASS_NAMES, TinyVideoDiT, attention_stats, procedural_videos,  # noqa: E402
                                        sample, save_tiny_video_dit)


def entropy_table(stats) -> str:
    from tabulate import tabulate

    rows = [[s["layer"], f"{s['entropy']:.2f}", f"{s['uniform_entropy']:.2f}",
             f"{s['entropy'] / s['uniform_entropy']:.2f}", " ".join(f"{h:.2f}" for h in s["head_entropy"]),
             f"{s['same_frame_mass']:.2f} (uniform {s['uniform_same_frame']:.3f})",
             f"{s['same_position_other_frames_mass']:.3f}"]
            for s in stats]
    return tabulate(rows, headers=["layer", "entropy (nats)", "uniform log N", "ratio", "per head",
                                   "mass on own frame", "mass on same (h,w) other frames"],
                    tablefmt="github", disable_numparse=True)


def save_strip(videos: torch.Tensor, path, title: str = "", frames_shown: int = 8) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, T = videos.shape[:3]
    idx = torch.linspace(0, T - 1, min(frames_shown, T)).round().long().tolist()
    fig, axes = plt.subplots(n, len(idx), figsize=(1.1 * len(idx), 1.1 * n + 0.4), squeeze=False)
    for i in range(n):
        for j, f in enumerate(idx):
            img = ((videos[i, :, f].permute(1, 2, 0).float().cpu() + 1) / 2).clamp(0, 1).numpy()
            axes[i, j].imshow(img, interpolation="nearest")
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(f"t={f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=200.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--ema", type=float, default=0.997)
    ap.add_argument("--detail", type=float, default=1.0, help="fine-pattern amplitude of the procedural videos")
    ap.add_argument("--qk-gain-lr", type=float, default=20.0,
                    help="learning-rate multiplier for the q/k RMSNorm gains (they set the attention temperature)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = TinyVideoDiT(dim=args.dim, depth=args.depth, heads=args.heads).to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"TinyVideoDiT: {nparams / 1e6:.2f} M parameters, grid {args.frames}×{args.size // 2}×{args.size // 2} "
          f"tokens, device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}", flush=True)
    gains = [p for n, p in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))]
    rest = [p for n, p in model.named_parameters() if not n.endswith(("q_norm.weight", "k_norm.weight"))]
    groups = [dict(params=rest, lr_mult=1.0), dict(params=gains, lr_mult=args.qk_gain_lr)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    warmup = 100
    log, t_start, step, loss_avg = [], time.perf_counter(), 0, None
    while step < args.max_steps:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.seconds:
            break
        frac = elapsed / args.seconds
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        with torch.no_grad():
            x0, y = procedural_videos(args.batch, args.frames, args.size, generator=gen, device=dev, detail=args.detail)
            noise = torch.randn(x0.shape, generator=gen, device=dev)
            t = torch.sigmoid(torch.randn(args.batch, generator=gen, device=dev))
            xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
            drop = torch.rand(args.batch, generator=gen, device=dev) < 0.1
            y = torch.where(drop, torch.full_like(y, len(CLASS_NAMES)), y)
        with torch.autocast(**amp):
            pred = model(xt, t, y)
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        if step % 50 == 0:
            lv = loss.item()
            loss_avg = lv if loss_avg is None else 0.9 * loss_avg + 0.1 * lv
            log.append(dict(step=step, loss=lv, lr=lr, seconds=round(time.perf_counter() - t_start, 1)))
            if step % 250 == 0:
                print(f"step {step:5d}  loss {loss_avg:.4f}  lr {lr:.2e}  {time.perf_counter() - t_start:6.1f}s",
                      flush=True)
    train_s = time.perf_counter() - t_start
    print(f"trained {step} steps in {train_s:.0f} s ({step * args.batch / train_s:.0f} videos/s)", flush=True)

    qk_gain = [round(float((b.attn.q_norm.weight * b.attn.k_norm.weight).abs().mean()), 3) for b in ema.blocks]
    print("mean |q-gain · k-gain| per layer (1.0 at init; scales the attention logits):", qk_gain, flush=True)
    meta = dict(steps=step, qk_gain_lr=args.qk_gain_lr, detail=args.detail, qk_gain=qk_gain, batch=args.batch,
                seconds=round(train_s, 1), frames=args.frames, size=args.size,
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                script="examples/train_tiny_video_dit.py")
    path = out / "tiny_video_dit.safetensors"
    save_tiny_video_dit(ema, path, metadata=meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)

    # Evaluate the EMA model: held-out loss, attention structure, samples.
    evgen = torch.Generator(device=dev).manual_seed(12345)
    x0, y = procedural_videos(16, args.frames, args.size, generator=evgen, device=dev, detail=args.detail)
    noise = torch.randn(x0.shape, generator=evgen, device=dev)
    val = {}
    with torch.no_grad():
        for tv in (0.25, 0.5, 0.75):
            xt = (1 - tv) * x0 + tv * noise
            pred = ema(xt, torch.full((16,), tv, device=dev), y)
            val[str(tv)] = F.mse_loss(pred, noise - x0).item()
    print("held-out loss (EMA, fp32) at t=0.25/0.5/0.75:", {k: round(v, 4) for k, v in val.items()}, flush=True)
    stats = {}
    for tv in (0.5, 0.9):
        xt = (1 - tv) * x0[:4] + tv * noise[:4]
        stats[str(tv)] = attention_stats(ema, xt, torch.full((4,), tv, device=dev), y[:4])
        print(f"\nattention of the trained model at t={tv} (4 held-out videos, mean over heads and queries):")
        print(entropy_table(stats[str(tv)]), flush=True)
    vids = sample(ema, list(range(6)), steps=20, frames=args.frames, height=args.size, width=args.size)
    save_strip(vids, out / "train_samples.png", title=f"tiny video DiT samples, seeds 0-5 ({step} steps trained)")
    (out / "train_log.json").write_text(json.dumps(dict(meta=meta, params=nparams, log=log, val_loss=val,
                                                        attention=stats, args=vars(args)), indent=1))
    loss_avg = loss.item() if loss_avg is None else loss_avg
    print(f"\nfinal: {step} steps, train loss {loss_avg:.4f}, val loss t=0.5 {val['0.5']:.4f}; "
          f"layer entropies at t=0.5: " + ", ".join(f"{s['entropy']:.2f}" for s in stats["0.5"])
          + f" (uniform {stats['0.5'][0]['uniform_entropy']:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
