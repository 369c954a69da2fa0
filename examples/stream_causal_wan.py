"""Stream a video chunk by chunk from a causal Wan with a KV cache, optimized by vmonarch_opt.

    python examples/stream_causal_wan.py [--frames 12] [--steps 4] [--methods monarch_rt] [--out stream_out]

The model is the Self-Forcing-style causal Wan of ``vmonarch_fixtures/causal_wan.py`` (diffusers'
Wan modules, random weights, tiny config: runs on a CPU in seconds): the video is generated in
chunks of 3 latent frames; each chunk is denoised in ``--steps`` flow-matching steps, every
forward attending to the KV cache of the chunks before it, then one forward at timestep 0 appends
the chunk's keys/values to the cache.

1. The calibration batch is a streaming call: the last chunk's first denoising step with the
   cache of all earlier chunks (``streaming_batch``). ``optimize`` finds each self-attention as a
   KV-cache site ("cached" in the report's kind column: fewer queries than keys, the keys being
   the cached frames followed by the new ones) and plans it at that cache length; while streaming,
   the plan is re-derived for each cache length (the first chunk has none).
2. ``methods=("dense",)`` is the exact check: our dense op at every KV-cache site must reproduce
   the model's chunks to float rounding.
3. ``--methods`` (default ``monarch_rt``: MonarchRT, query tiles over the new frames, key rows over
   all frames) is the fast path. A method without a KV-cache form leaves the site dense and the
   report says why.

Prints both reports and a per-chunk table (seconds per chunk, max |error| against the original
model's chunk), and writes under ``--out`` (atomically): ``report.json`` and ``report_dense.json``
(``vmonarch-opt report`` prints them), ``chunks.json`` (the table) and ``latents.safetensors``
(the original and optimized videos' latents).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures
import vmonarch_opt  # noqa: E402
from vmonarch_fixtures.causal_wan import stream_generate, streaming_batch, tiny_causal_wan  # noqa: E402
from vmonarch_opt.io import atomic_write_text  # noqa: E402


def save_latents_atomic(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=12, help="latent frames to generate (chunks of 3)")
    ap.add_argument("--height", type=int, default=4, help="latent tokens per frame, vertically (after the patch)")
    ap.add_argument("--width", type=int, default=5, help="latent tokens per frame, horizontally (after the patch)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per chunk")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--methods", default="monarch_rt", help="comma-separated methods for the fast copy")
    ap.add_argument("--budget", default="none",
                    help="'none': the methods' default choice, no calibration; or a relative attention error, "
                         "e.g. 0.05, to calibrate")
    ap.add_argument("--out", default="stream_out", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = tiny_causal_wan(layers=args.layers, seed=args.seed)
    C = model.config.chunk_frames
    if args.frames < 2 * C:
        raise SystemExit(f"--frames {args.frames}: at least two chunks ({2 * C} latent frames), so that one "
                         f"call has a KV cache to calibrate on")
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(1, 4, args.frames, 2 * args.height, 2 * args.width, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    last = -(-args.frames // C) - 1
    # the calibration batch: the last chunk's first step, with the cache of every chunk before it
    calib = streaming_batch(model, noise[:, :, :(last + 1) * C], text, chunk=last, steps=args.steps)
    budget = None if args.budget == "none" else vmonarch_opt.Budget(max_rel_error=float(args.budget))
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    with warnings.catch_warnings():
        # each site's plan follows the cache length (warned once per site; said once below)
        warnings.filterwarnings("ignore", message=".*keys are a KV cache.*")
        exact = vmonarch_opt.optimize(model, calib, methods=("dense",), budget=None, min_seq_len=0)
        fast = vmonarch_opt.optimize(model, calib, methods=methods, budget=budget, min_seq_len=0)

        ref, ref_rec, _ = stream_generate(model, noise, text, steps=args.steps)
        chk, chk_rec, _ = stream_generate(exact, noise, text, steps=args.steps)
        out, out_rec, _ = stream_generate(fast, noise, text, steps=args.steps)

    print(exact.report)
    print()
    print(fast.report)
    print("\n(each KV-cache plan is re-derived for every cache length while streaming: 0 cached frames for the "
          "first chunk, then 3, 6, ...)\n")
    rows = []
    for a, b, c in zip(ref_rec, chk_rec, out_rec):
        s, e = a["frames"]
        rows.append(dict(chunk=a["chunk"], frames=f"{s}..{e - 1}", cached_frames=a["cached_frames"],
                         s_model=a["seconds"], s_dense_op=b["seconds"], s_optimized=c["seconds"],
                         err_dense_op=(chk[:, :, s:e] - ref[:, :, s:e]).abs().max().item(),
                         err_optimized=(out[:, :, s:e] - ref[:, :, s:e]).abs().max().item(),
                         ref_max=ref[:, :, s:e].abs().max().item()))
    print(tabulate(rows, headers={"chunk": "chunk", "frames": "frames", "cached_frames": "cached frames",
                                  "s_model": "s model", "s_dense_op": "s dense op", "s_optimized": "s optimized",
                                  "err_dense_op": "max|err| dense op", "err_optimized": f"max|err| {args.methods}",
                                  "ref_max": "max|chunk|"}, floatfmt=".3g"))
    print(f"({args.steps} denoising steps + 1 cache forward per chunk; errors against the original model's chunk)")

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    fast.report.to_json(outdir / "report.json")
    exact.report.to_json(outdir / "report_dense.json")
    atomic_write_text(outdir / "chunks.json", json.dumps(dict(args=vars(args), chunks=rows,
                                                              stats=vmonarch_opt.stats(fast),
                                                              stats_dense=vmonarch_opt.stats(exact)), indent=1))
    save_latents_atomic(outdir / "latents.safetensors", dict(original=ref, dense_op=chk, optimized=out))
    print(f"written under {outdir}/: report.json, report_dense.json, chunks.json, latents.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
