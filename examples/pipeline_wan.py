"""A whole diffusers WanPipeline, dense vs optimized, same seed: watch the two videos side by side.

    python examples/pipeline_wan.py                 # CPU, tiny random pipeline (about a minute)
    python examples/pipeline_wan.py --two-experts   # the same with Wan 2.2's two experts
    python examples/pipeline_wan.py --full          # GPU: Wan2.1-1.3B transformer at full size, 480p/81f

What it does, in the order a user would:

1. builds a WanPipeline from random-weight components (prompt embeddings stand in for the text
   encoder): tiny by default, the Wan2.1-T2V-1.3B transformer and the Wan VAE at full size with
   ``--full`` (random weights: the video is noise either way, but every shape and time is real);
2. records the transformers' inputs during one generation (``vmonarch_opt.record``, another seed
   than the compared one), then times the dense denoising loop (the faster of two runs);
3. optimizes every transformer on the recorded inputs (``vmonarch_opt.optimize_pipeline``, a new
   pipeline): Monarch attention pinned on every self-attention by default (``--calibrate``:
   optimize's calibrated default instead, which with random weights keeps most sites dense:
   near-uniform attention fits no structured method);
4. generates from the same seed with the optimized pipeline (``--dense-steps k``: the first k
   steps with exact attention), timing the loop the same way;
5. prints the report, the time of both loops, of recording and of optimizing, the relative error
   of the final latents and PSNR / SSIM between the two decoded videos (the functions of
   ``benchmarks/fidelity.py``: [0, 1] pixels, SSIM with an 11×11 Gaussian window), and writes to
   ``--out`` (default ``pipeline_wan_out/``): ``side_by_side.mp4`` (dense | optimized | |diff|
   amplified so that its largest value is white; needs ``pip install imageio imageio-ffmpeg``,
   otherwise ``side_by_side.gif`` is written with Pillow), ``strip.png`` (a few frames of each)
   and ``report.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
import vmonarch_opt  # noqa: E402
from vmonarch_opt.metrics import rel_error  # noqa: E402
from benchmarks.fidelity import psnr, ssim  # noqa: E402
from vmonarch_fixtures import pipelines  # noqa: E402


def build(args):
    if args.full:
        if not torch.cuda.is_available():
            sys.exit("--full needs a CUDA GPU (the 1.3B transformer at 480p/81f); leave it out for the CPU version")
        return pipelines.wan_2_1_1_3b(steps=args.steps or 10, seed=args.seed)
    return pipelines.wan(two_experts=args.two_experts, steps=args.steps or 4, frames=17, height=96, width=128,
                         layers=2, heads=2, head_dim=32, seed=args.seed)


def timed_loop(pipe, call: dict, seed: int, repeats: int = 2) -> tuple[torch.Tensor, float, list]:
    """The denoising loop alone (``output_type="latent"``), the faster of ``repeats`` runs: final
    latents, seconds, seconds per step."""
    best = None
    for _ in range(repeats):
        run = _loop_once(pipe, call, seed)
        if best is None or run[1] < best[1]:
            best = run
    return best


def _loop_once(pipe, call: dict, seed: int) -> tuple[torch.Tensor, float, list]:
    cuda = pipe.transformer.device.type == "cuda"
    marks = []

    def mark(p, i, t, kw):
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return {}

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(seed),
                   callback_on_step_end=mark).frames
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    steps = np.diff([t0] + marks).tolist()
    return latents, total, steps


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """What WanPipeline does after its loop: un-normalise the latents, VAE-decode, map to [0, 1].
    Returns ``[C, T, H, W]`` floats in [0, 1]."""
    vae = pipe.vae
    z = latents.to(vae.device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
    video = vae.decode(z * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="pt")[0].permute(1, 0, 2, 3).float().cpu()


def amplified_diff(dense: torch.Tensor, opt: torch.Tensor) -> tuple[torch.Tensor, float]:
    """|dense − optimized| scaled so that its largest value is white (the factor is returned)."""
    d = (dense - opt).abs()
    gain = float(1.0 / d.max().clamp_min(1e-6))
    return (d * gain).clamp(0, 1), gain


def write_video(dense: torch.Tensor, opt: torch.Tensor, out: Path, fps: int) -> Path:
    """dense | optimized | amplified |diff|, frame by frame: mp4 through diffusers' export_to_video
    when imageio and imageio-ffmpeg are installed, else an animated GIF through Pillow."""
    diff, _ = amplified_diff(dense, opt)
    frames = torch.cat([dense, opt, diff], dim=3).permute(1, 2, 3, 0).numpy()  # [T, H, 3W, C]
    if importlib.util.find_spec("imageio") and importlib.util.find_spec("imageio_ffmpeg"):
        from diffusers.utils import export_to_video

        path = out / "side_by_side.mp4"
        export_to_video(list(frames), str(path), fps=fps)
        return path
    from PIL import Image

    path = out / "side_by_side.gif"
    images = [Image.fromarray((f * 255).round().astype(np.uint8)) for f in frames]
    shrink = -(-images[0].width // 1536)  # a full-size 3 × 832-wide GIF would be huge: keep it under 1536 px
    if shrink > 1:
        images = [im.resize((im.width // shrink, im.height // shrink), Image.BILINEAR) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    print("(imageio / imageio-ffmpeg not installed: wrote a GIF" + (f" at 1/{shrink} size" if shrink > 1 else "")
          + "; `pip install imageio imageio-ffmpeg` for mp4)")
    return path


def write_strip(dense: torch.Tensor, opt: torch.Tensor, path: Path, title: str, frames: int = 8) -> None:
    """Rows dense / optimized / amplified |diff|, a few frames as columns (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff, gain = amplified_diff(dense, opt)
    idx = torch.linspace(0, dense.shape[1] - 1, min(frames, dense.shape[1])).round().long().tolist()
    rows = [("dense", dense), ("optimized", opt), (f"|diff| × {gain:.3g}", diff)]
    fig, axes = plt.subplots(3, len(idx), figsize=(1.3 * len(idx) + 1, 3.6), squeeze=False)
    for r, (label, vid) in enumerate(rows):
        for j, f in enumerate(idx):
            ax = axes[r, j]
            ax.imshow(vid[:, f].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="GPU: Wan2.1-1.3B transformer + Wan VAE at full size, 480p/81f")
    ap.add_argument("--two-experts", action="store_true", help="tiny Wan 2.2 layout: transformer + transformer_2")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: 4 tiny, 10 full)")
    ap.add_argument("--dense-steps", type=int, default=0, help="run the first k steps with exact attention")
    ap.add_argument("--calibrate", action="store_true", help="optimize()'s calibrated default instead of Monarch pinned")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="pipeline_wan_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe, call = build(args)
    print(f"{type(pipe).__name__}: " + ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M parameters"
                                                 for n, m in vmonarch_opt.pipelines.denoisers(pipe).items()))
    # 1. record the transformers' inputs during one generation (another seed than the one compared)
    t0 = time.perf_counter()
    with vmonarch_opt.record(pipe, steps=(0, 0.5, 1.0)) as rec:
        pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(args.seed + 1))
    t1 = time.perf_counter()
    print(rec)
    # 2. the dense loop (warm: the recorded generation ran the same shapes)
    dense_lat, dense_s, dense_steps = timed_loop(pipe, call, args.seed)
    # 3. optimize every transformer: a new pipeline; `pipe` stays dense
    t2 = time.perf_counter()
    kw = {} if args.calibrate else dict(methods=("monarch",), budget=None)
    if not args.full:
        kw["min_seq_len"] = 0  # the tiny video has 240 tokens: below the default 1024, sites would stay dense
    fast = vmonarch_opt.optimize_pipeline(pipe, rec, **kw)
    t3 = time.perf_counter()
    if args.dense_steps:
        vmonarch_opt.set_original_attention(fast, dense_steps=args.dense_steps)
    if torch.cuda.is_available() and args.full:  # kernels compiled and autotuned before the timed loop
        fast(**{**call, "num_inference_steps": 2}, output_type="latent")
    opt_lat, opt_s, opt_steps = timed_loop(fast, call, args.seed)

    dense, opt = decode(pipe, dense_lat), decode(pipe, opt_lat)
    p = psnr(dense[None], opt[None])[0]
    s = ssim(dense[None], opt[None])[0]
    video = write_video(dense, opt, out, fps=16 if args.full else 8)
    write_strip(dense, opt, out / "strip.png",
                f"{type(pipe).__name__}, same seed: dense vs optimized (PSNR {p:.1f} dB, SSIM {s:.4f})")
    lat_err = rel_error(opt_lat, dense_lat)
    fast.report.to_json(out / "report.json")

    print(fast.report)
    print(f"\nrecord (one generation): {t1 - t0:.2f} s; optimize_pipeline: {t3 - t2:.2f} s")
    print(f"denoising loop, {len(dense_steps)} steps: dense {dense_s:.2f} s ({1e3 * np.median(dense_steps):.0f} ms/step), "
          f"optimized {opt_s:.2f} s ({1e3 * np.median(opt_steps):.0f} ms/step): {dense_s / opt_s:.2f}×"
          + (f" (first {args.dense_steps} step(s) exact)" if args.dense_steps else ""))
    if not torch.cuda.is_available():
        print("  (CPU: the optimized attention runs the PyTorch reference of each kernel, not Triton, so these times "
              "say nothing about GPU speed; run --full on a GPU for that)")
    print(f"optimized vs dense: final latents rel. error {lat_err:.3e}; video PSNR {p:.2f} dB, SSIM {s:.4f} "
          f"({dense.shape[1]} frames {dense.shape[2]}×{dense.shape[3]}; random weights: the videos are noise, and a "
          f"random VAE flattens them: the difference is what counts)")
    print(f"wrote {video}, {out / 'strip.png'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
