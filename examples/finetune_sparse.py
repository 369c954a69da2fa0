"""Buy back quality with a short fine-tune: the fixture video DiT with ≥ 85 % of its attention FLOPs cut.

    OUT=out python examples/finetune_sparse.py                  # GPU: monarch and vmoba, 240 s of tuning each
    python examples/finetune_sparse.py --smoke                  # CPU, reduced scale: a minute or less

For each method the shipped tiny video DiT (``vmonarch_fixtures.tiny_dit``: 6 layers × 3 heads × 64,
a 16×16×16 token grid at full scale) is optimized with that method pinned on every layer at a
configuration cutting at least ``--min-cut`` of the attention FLOPs (Monarch: the block layout
closest to frame blocks that reaches it; VMoBA: 3D blocks, global top-k, with the pooled rest
where it stays cheap), then distilled toward the original (dense) model with
``vmonarch_opt.finetune`` on procedural training videos noised at random times: the original
model's velocity prediction is the target. Before and after tuning it reports, against the dense
model:

* PSNR / SSIM of sampled videos (same seeds and initial noise, Euler steps; the metrics of
  ``benchmarks/fidelity.py``);
* the held-out denoising loss (MSE of the predicted velocity against the true one, on procedural
  videos the tuning never saw, at t = 0.25 / 0.5 / 0.75: ``--eval-ts``) next to the dense model's.

The tuned weights are written with safetensors, one file per method (``--weights-out``:
``tuned.safetensors`` gives ``tuned.monarch.safetensors``, ...; atomic writes; outside the
package). ``vmonarch_fixtures.tiny_dit.load_tiny_video_dit(path)`` loads them; optimize the loaded
model with the same method to use them. Results: a table printed last, ``--json`` (default
``$OUT/finetune_sparse.json`` when ``$OUT`` is set). Nothing is appended to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
import vmonarch_opt  # noqa: E402
from vmonarch_opt import MonarchConfig, VMoBAConfig  # noqa: E402
from vmonarch_opt.finetune import TRAIN_CHOICES  # noqa: E402
from vmonarch_opt.io import atomic_write_text  # noqa: E402
from vmonarch_opt.kernels.monarch.reference import dense_attention_flops, monarch_flops  # noqa: E402
from vmonarch_fixtures.tiny_dit import (calib_batch, load_tiny_video_dit, procedural_videos, sample,  # noqa: E402
                                        save_tiny_video_dit)
from benchmarks.fidelity import psnr, ssim, to_unit  # noqa: E402


# ----------------------------------------------------------------------------- configurations
def monarch_config(grid: tuple, head_dim: int, min_cut: float):
    """The first block layout, from frame blocks down to smaller tiles, whose FLOP cut reaches
    ``min_cut`` (one step): (config, cut)."""
    T, H, W = grid
    n = T * H * W
    dense = dense_attention_flops(1, 1, n, n, head_dim)
    half = lambda x: max(1, -(-x // 2))  # noqa: E731
    quarter = lambda x: max(1, -(-x // 4))  # noqa: E731
    tried = []
    for block in [(1, H, W), (1, half(H), W), (1, H, half(W)), (1, half(H), half(W)), (2, half(H), half(W)),
                  (1, quarter(H), half(W)), (1, quarter(H), quarter(W)), (2, quarter(H), quarter(W))]:
        cut = 1 - monarch_flops(1, 1, n, head_dim, grid=grid, block=block) / dense
        tried.append((block, cut))
        if cut >= min_cut:
            return MonarchConfig(block=block, steps=1), cut
    raise ValueError(f"no Monarch block layout reaches a {min_cut:.0%} cut at grid {grid}: "
                     + ", ".join(f"{b}: {c:.1%}" for b, c in tried))


def vmoba_config(grid: tuple, min_cut: float):
    """3D blocks (about a quarter of each grid dimension: 64 blocks), global top-k, the pooled rest
    when it costs < 2 % of dense: (config, expected cut)."""
    chunk = tuple(max(1, -(-g // 4)) for g in grid)
    blocks = math.prod(-(-g // c) for g, c in zip(grid, chunk))
    n = math.prod(grid)
    pooled = blocks / n < 0.02  # every query also scores one pooled key per block
    extra = blocks / n if pooled else 0.0
    topk = math.floor((1 - min_cut - extra) * blocks)
    if topk < 1:
        raise ValueError(f"VMoBA cannot reach a {min_cut:.0%} cut at grid {grid} with {blocks} blocks")
    return VMoBAConfig(chunk=chunk, partition="3d", topk=topk, pooled_rest=pooled), 1 - topk / blocks - extra


# ----------------------------------------------------------------------------- data and metrics
def noised(n, frames, size, gen, device, detail, t=None):
    """Procedural videos noised to ``t`` (logit-normal when None): ``((x_t, t, y), velocity)``."""
    x0, y = procedural_videos(n, frames, size, generator=gen, device=device, detail=detail)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    if t is None:
        t = torch.sigmoid(torch.randn(n, generator=gen, device=device))
    else:
        t = torch.full((n,), float(t), device=device)
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    return (xt, t, y), noise - x0


def heldout_loss(model, heldout) -> float:
    """Mean denoising MSE (velocity) over the held-out batches."""
    with torch.no_grad():
        return statistics.mean(F.mse_loss(model(*b).float(), target).item() for b, target in heldout)


def sample_metrics(model, dense_videos, seeds, **kw) -> tuple[float, float]:
    vids = sample(model, seeds, **kw)
    u, d = to_unit(vids), to_unit(dense_videos)
    return statistics.mean(psnr(u, d)), statistics.mean(ssim(u, d))


def save_atomic(model, path: Path, metadata: dict) -> None:
    """The model's weights (float32) as a tiny-video-DiT checkpoint, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_tiny_video_dit(model, tmp, dtype=torch.float32, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would have made it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="monarch,vmoba", help="comma-separated: monarch, vmoba")
    ap.add_argument("--min-cut", type=float, default=0.85, help="attention-FLOP cut every configuration must reach")
    ap.add_argument("--train", default="attention", choices=TRAIN_CHOICES,
                    help="what finetune() trains")
    ap.add_argument("--seconds", type=float, default=240.0, help="fine-tuning wall time per method")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=8, help="sampled videos scored by PSNR/SSIM")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=8, help="held-out videos per noise level")
    ap.add_argument("--calib-ts", default="0.9,0.5,0.1", help="noise levels of the calibration batches")
    ap.add_argument("--eval-ts", default="0.25,0.5,0.75", help="noise levels of the held-out denoising loss")
    ap.add_argument("--weights", default=None, help="starting weights (default: the shipped fixture)")
    ap.add_argument("--weights-out", default=None,
                    help="where the tuned weights go: NAME.safetensors gives NAME.<method>.safetensors "
                         "(default: $OUT/finetuned.safetensors when $OUT is set, else not saved)")
    ap.add_argument("--json", default=None, help="results as JSON (default: $OUT/finetune_sparse.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU-sized run (CI): 8×16×16 videos (8×8×8 tokens), batch 1, 2 tuning steps, 1 seed × 2 "
                         "sample steps, 1 held-out video at t = 0.5, one calibration batch; options given "
                         "explicitly override it "
                         "(e.g. --smoke --max-steps 40)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes, then whatever the command line sets explicitly
        smoke = dict(frames=8, size=16, batch=1, max_steps=2, seeds=1, sample_steps=2, heldout=1, calib_ts="0.5",
                     eval_ts="0.5", device="cpu")
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for k, v in smoke.items():
            if k not in given:
                setattr(args, k, v)
    out_env = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    weights_out = (Path(args.weights_out) if args.weights_out
                   else out_env / "finetuned.safetensors" if out_env else None)
    json_out = Path(args.json) if args.json else (out_env / "finetune_sparse.json" if out_env else None)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    devname = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"[finetune] device {devname}, torch {torch.__version__}, grid {args.frames}×{args.size // 2}×"
          f"{args.size // 2}, train={args.train}, {args.seconds:g} s / {args.max_steps} steps per method", flush=True)

    teacher = load_tiny_video_dit(args.weights, device=dev).requires_grad_(False)
    detail = teacher.data_detail
    grid = (args.frames, args.size // teacher.patch, args.size // teacher.patch)
    head_dim = teacher.dim // teacher.heads
    seeds = list(range(100, 100 + args.seeds))  # not the seeds anything was tuned on
    skw = dict(steps=args.sample_steps, frames=args.frames, height=args.size, width=args.size)
    dense_videos = sample(teacher, seeds, **skw)
    hgen = torch.Generator(device=dev).manual_seed(4321)  # held-out videos: their own generator
    heldout = [noised(args.heldout, args.frames, args.size, hgen, dev, detail, float(t))
               for t in args.eval_ts.split(",")]
    loss_dense = heldout_loss(teacher, heldout)
    calib = [calib_batch(1, args.frames, args.size, t=float(t), seed=1234, device=dev, detail=detail)
             for t in args.calib_ts.split(",")]
    print(f"[finetune] dense model: held-out loss {loss_dense:.5f}", flush=True)

    results, rows = [], []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method == "monarch":
            cfg, _ = monarch_config(grid, head_dim, args.min_cut)
        elif method == "vmoba":
            cfg, _ = vmoba_config(grid, args.min_cut)
        else:
            raise SystemExit(f"--methods: unknown method {method!r}: use monarch and/or vmoba")
        model = load_tiny_video_dit(args.weights, device=dev)
        opt = vmonarch_opt.optimize(model, calib, methods=(method,), overrides={"*": cfg}, budget=None, min_seq_len=0)
        tot = opt.report.totals
        cut = 1 - tot["flops_after"] / tot["flops_before"]
        if cut < args.min_cut:
            raise SystemExit(f"{method}: {cfg} cuts {cut:.1%} of the attention FLOPs, below --min-cut {args.min_cut}")
        p0, s0 = sample_metrics(opt, dense_videos, seeds, **skw)
        l0 = heldout_loss(opt, heldout)
        print(f"[finetune] {method} {cfg}: cut {cut:.1%}; before tuning PSNR {p0:.2f} dB, SSIM {s0:.4f}, "
              f"held-out loss {l0:.5f} ({l0 / loss_dense:.3f}× dense)", flush=True)

        tgen = torch.Generator(device=dev).manual_seed(2024)

        def batches(step):
            return noised(args.batch, args.frames, args.size, tgen, dev, detail)[0]

        def log(step, loss):
            if (step + 1) % 50 == 0:
                print(f"[finetune] {method} step {step + 1}: distillation loss {loss:.5f}", flush=True)

        with amp:
            res = vmonarch_opt.finetune(opt, teacher, batches, train=args.train, steps=args.max_steps, lr=args.lr,
                                        max_seconds=args.seconds, callback=log)
        p1, s1 = sample_metrics(opt, dense_videos, seeds, **skw)
        l1 = heldout_loss(opt, heldout)
        print(f"[finetune] {method}: {res}; after tuning PSNR {p1:.2f} dB, SSIM {s1:.4f}, held-out loss {l1:.5f} "
              f"({l1 / loss_dense:.3f}× dense)", flush=True)
        path = None
        if weights_out is not None:
            path = weights_out.with_name(f"{weights_out.name.removesuffix('.safetensors')}.{method}.safetensors")
            save_atomic(opt, path, dict(teacher.metadata, finetuned=f"{method} {cfg}", finetune_steps=res.steps,
                                        finetune_seconds=round(res.seconds, 1), finetune_train=args.train,
                                        script="examples/finetune_sparse.py"))
            print(f"[finetune] wrote {path}", flush=True)
        results.append(dict(method=method, config=str(cfg), flop_cut=cut, train=args.train, steps=res.steps,
                            seconds=res.seconds, trained_numel=res.trained_numel, losses=res.losses[::10],
                            psnr_before=p0, psnr_after=p1, ssim_before=s0, ssim_after=s1, loss_before=l0,
                            loss_after=l1, loss_dense=loss_dense, weights=str(path) if path else None))
        rows.append([method, str(cfg), f"{100 * cut:.1f}%", f"{res.steps} ({res.seconds:.0f} s)",
                     f"{p0:.2f} → {p1:.2f}", f"{s0:.4f} → {s1:.4f}",
                     f"{l0 / loss_dense:.3f} → {l1 / loss_dense:.3f}"])
        del opt, model
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(dict(device=devname, torch=torch.__version__, grid=grid, args=vars(args),
                                            loss_dense=loss_dense, results=results), indent=1))
    from tabulate import tabulate

    print("\n" + tabulate(rows, headers=["method", "configuration", "attn-FLOP cut", "tuning steps",
                                         "PSNR dB vs dense", "SSIM vs dense", "held-out loss / dense"],
                          tablefmt="github", disable_numparse=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
