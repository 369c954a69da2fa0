"""A whole diffusers generation, dense vs optimized: "how much faster is my denoising loop?"

    OUT=out python benchmarks/pipeline.py                      # GPU: WanPipeline, Wan2.1-1.3B 480p/81f, 10 steps
    python benchmarks/pipeline.py --dense-steps 2              # also: the first 2 steps exact, the rest optimized
    python benchmarks/pipeline.py --smoke --no-append          # CPU smoke run (tiny pipeline)

On the lent GPU diffusers travels as a wheel (carry=[".whl"]; transformers is on the machine):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 \\
        benchmarks/pipeline.py --no-append

The pipeline: diffusers' ``WanPipeline`` with the Wan2.1-T2V-1.3B transformer at full size and the
Wan VAE at full size, random weights (``vmonarch_fixtures.pipelines.wan_2_1_1_3b``), bf16
transformer, UniPC flow scheduler (shift 3), 480×832, 81 frames (21×30×52 = 32760 latent tokens),
random 512-token prompt and negative-prompt embeddings, guidance 5.0: the transformer runs twice per
step (prompt, negative prompt), as diffusers' Wan pipeline does.

Measured, in this order:

1. the dense denoising loop (``output_type="latent"``: the VAE decode is not timed), median of
   ``--runs`` after a short warm-up loop;
2. ``vmonarch_opt.record`` around one generation (steps 0, ½ and the last: 6 transformer calls
   recorded), i.e. what recording adds to a generation;
3. per ``--methods`` entry (as in ``benchmarks/end_to_end.py``: ``monarch`` / ``vmoba`` pinned on every
   eligible site with ``budget=None``, ``calibrated`` = optimize's default): the time
   ``vmonarch_opt.optimize_pipeline`` takes, then the optimized loop from the same seed (warm-up,
   then the median of ``--runs``), the attention-FLOP cut of the report, and the relative error of the
   final latents against the dense loop's; with ``--dense-steps K`` again with the first K steps
   exact (``set_original_attention(fast, dense_steps=K)``);
4. with ``--decode``: both final latents VAE-decoded, PSNR / SSIM between the videos.

Prints a short table last, writes ``$OUT/pipeline.json`` and ``$OUT/pipeline_section.md``, and appends
the table to BENCHMARKS.md (unless ``--no-append``).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
import vmonarch_opt  # noqa: E402
from vmonarch_opt.metrics import rel_error  # noqa: E402
from vmonarch_fixtures import pipelines  # noqa: E402
from benchmarks.end_to_end import method_kwargs  # noqa: E402
from benchmarks.publish import command_line, now, publish  # noqa: E402


def build(args, device):
    if args.smoke:
        return pipelines.wan(steps=args.steps or 2, device=device)
    return pipelines.wan_2_1_1_3b(steps=args.steps or 10, frames=args.frames, height=args.height, width=args.width,
                                  device=device)


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def loop(pipe, call: dict, seed: int, cuda: bool, steps=None) -> tuple[torch.Tensor, float]:
    """One denoising loop (prompt embeddings given, ``output_type="latent"``): latents, seconds."""
    kw = dict(call) if steps is None else {**call, "num_inference_steps": steps}
    sync(cuda)
    t0 = time.perf_counter()
    with torch.no_grad():
        lat = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames
    sync(cuda)
    return lat, time.perf_counter() - t0


def timed_loops(pipe, call: dict, args, cuda: bool) -> tuple[torch.Tensor, float]:
    """Warm-up loop(s) of ``--warmup-steps`` steps, then the median of ``--runs`` full loops."""
    if args.warmup_steps:
        loop(pipe, call, args.seed, cuda, steps=args.warmup_steps)
    times, lat = [], None
    for _ in range(args.runs):
        lat, s = loop(pipe, call, args.seed, cuda)
        times.append(s)
    return lat, statistics.median(times)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """WanPipeline's decode: ``[1, C, T, H, W]`` in [0, 1]."""
    vae = pipe.vae
    z = latents.to(vae.device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
    video = vae.decode(z * std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="pt").permute(0, 2, 1, 3, 4).float().cpu()


def flop_cut(report) -> str:
    """Attention-FLOP cut per optimized transformer, from the pipeline report."""
    parts = []
    for name, r in report.items():
        t = r.totals
        cut = "?" if t["flops_after"] is None else f"{100 * (1 - t['flops_after'] / t['flops_before']):.1f}%"
        parts.append(cut if len(report) == 1 else f"{name} {cut}")
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="monarch,vmoba",
                    help="comma-separated: monarch, vmoba, vmoba+pooled, dense (pinned, budget=None) and/or calibrated")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; --smoke: 2)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--runs", type=int, default=1, help="timed loops per configuration (median)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up loop before timing (0: none)")
    ap.add_argument("--record-steps", default="0,0.5,1.0",
                    help="record(steps=...): comma-separated ints (indices) and floats (fractions), or 'all'")
    ap.add_argument("--dense-steps", type=int, default=0, help="also time each method with the first K steps exact")
    ap.add_argument("--decode", action="store_true", help="VAE-decode the videos and report PSNR / SSIM")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny pipeline (CPU smoke run)")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    devname = torch.cuda.get_device_name(dev) if cuda else "cpu"
    kernels = "Triton" if cuda and os.environ.get("VMONARCH_FORCE_REFERENCE", "0") != "1" else "PyTorch reference"
    print(f"[pipeline] device {devname}, torch {torch.__version__}, optimized attention via {kernels}", flush=True)
    record_steps = "all" if args.record_steps == "all" else \
        tuple(float(s) if "." in s else int(s) for s in args.record_steps.split(","))

    pipe, call = build(args, dev)
    n_steps = call["num_inference_steps"]
    mods = vmonarch_opt.pipelines.denoisers(pipe)
    print(f"[pipeline] {type(pipe).__name__}: " + ", ".join(
        f"{n} {sum(p.numel() for p in m.parameters()) / 1e9:.3f} B parameters" for n, m in mods.items()), flush=True)
    results, rows = [], []

    dense_lat, dense_s = timed_loops(pipe, call, args, cuda)
    print(f"[pipeline] dense loop: {dense_s:.2f} s ({n_steps} steps)", flush=True)
    results.append(dict(config="dense", loop_s=dense_s, steps=n_steps))
    rows.append(["dense (diffusers' attention)", f"{dense_s:.2f}", f"{1e3 * dense_s / n_steps:.0f}", "1.00×", "—", "—",
                 "—"])
    dense_video = decode(pipe, dense_lat) if args.decode else None

    sync(cuda)
    t0 = time.perf_counter()
    with vmonarch_opt.record(pipe, steps=record_steps) as rec:
        with torch.no_grad():
            pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(args.seed + 1))
    sync(cuda)
    record_s = time.perf_counter() - t0
    print(rec, flush=True)
    print(f"[pipeline] record (one generation): {record_s:.2f} s, {rec.nbytes / 2**20:.1f} MiB recorded", flush=True)

    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        fast = None
        try:
            kw = method_kwargs(method)
            if args.smoke:
                kw["min_seq_len"] = 0
            sync(cuda)
            t0 = time.perf_counter()
            fast = vmonarch_opt.optimize_pipeline(pipe, rec, **kw)
            sync(cuda)
            opt_s = time.perf_counter() - t0
            cut = flop_cut(fast.report)
            print(fast.report, flush=True)
            variants = [(method, None)] + ([(f"{method}, first {args.dense_steps} steps exact", args.dense_steps)]
                                           if args.dense_steps else [])
            for label, k in variants:
                vmonarch_opt.set_original_attention(fast, False) if k is None else \
                    vmonarch_opt.set_original_attention(fast, dense_steps=k)
                lat, s = timed_loops(fast, call, args, cuda)
                err = rel_error(lat, dense_lat)
                res = dict(config=label, loop_s=s, steps=n_steps, speedup=dense_s / s, optimize_pipeline_s=opt_s,
                           flop_cut=cut, latents_rel_error=err, dense_steps=k,
                           reports={n: r.data for n, r in fast.report.items()})
                if dense_video is not None:
                    from benchmarks.fidelity import psnr, ssim

                    video = decode(pipe, lat)
                    res.update(psnr=psnr(video, dense_video)[0], ssim=ssim(video, dense_video)[0])
                results.append(res)
                rows.append([f"vmonarch_opt {label}", f"{s:.2f}", f"{1e3 * s / n_steps:.0f}", f"{dense_s / s:.2f}×",
                             cut, f"{err:.3g}" + (f" ({res['psnr']:.1f} dB)" if "psnr" in res else ""),
                             f"{opt_s:.1f}"])
                print(f"[pipeline] {label}: loop {s:.2f} s ({dense_s / s:.2f}× vs dense), optimize_pipeline "
                      f"{opt_s:.1f} s, latents rel. error {err:.3g}", flush=True)
        except Exception as e:
            traceback.print_exc()
            rows.append([f"vmonarch_opt {method}: FAILED {type(e).__name__}: {str(e)[:80]}"] + [""] * 6)
            results.append(dict(config=method, error=f"{type(e).__name__}: {e}"))
        finally:
            del fast
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    from tabulate import tabulate

    headers = ["pipeline", f"loop s ({n_steps} steps)", "ms/step", "speed-up", "attn-FLOP cut",
               "final latents rel. err" + (" (video PSNR)" if args.decode else ""), "optimize_pipeline s"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    cmd, when = command_line(), now()
    what = ("tiny WanPipeline (--smoke), fp32" if args.smoke else
            f"WanPipeline, Wan2.1-T2V-1.3B transformer and Wan VAE at full size (random weights), bf16 transformer, "
            f"{args.height}×{args.width}, {args.frames} frames, {n_steps} UniPC steps, guidance 5.0 (2 transformer calls "
            f"per step), random 512-token prompt embeddings")
    section = (f"## Pipeline: whole denoising loop, dense vs optimized ({when})\n\n"
               f"Device: {devname}, torch {torch.__version__}, optimized attention via {kernels}. Command: `{cmd}`. "
               f"{what}. Loop = `pipe(..., output_type=\"latent\")` (VAE decode not timed), median of {args.runs} after "
               f"{f'a {args.warmup_steps}-step warm-up loop' if args.warmup_steps else 'no warm-up'}, same seed for every row; latents error = relative L2 error of the "
               f"final latents vs the dense loop's. `record` around one generation (steps {args.record_steps}): "
               f"{record_s:.2f} s; methods pinned with budget=None unless 'calibrated'.\n\n{table}\n")
    publish("pipeline", section, dict(device=devname, command=cmd, date=when, kernels=kernels, record_s=record_s,
                                      recorded_mib=rec.nbytes / 2**20, results=results),
            append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
