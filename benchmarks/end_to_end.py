"""End-to-end speed of real video transformers: "how much faster is my model?"

    OUT=out python benchmarks/end_to_end.py              # GPU: Wan2.1-1.3B 480p + CogVideoX-5B
    python benchmarks/end_to_end.py --models hunyuan15   # GPU: HunyuanVideo 1.5 (8.3 B) 480p
    python benchmarks/end_to_end.py --models framepack   # GPU: FramePack (HunyuanVideo 13 B)
    python benchmarks/end_to_end.py --tiny --no-append   # CPU smoke run (small random configs)

On the lent GPU (diffusers travels as a wheel: carry=[".whl"]), one model per call keeps each call
well inside the 10-minute limit (a fresh machine compiles Dynamo graphs and Triton kernels cold):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 \
        benchmarks/end_to_end.py --models wan --no-append

diffusers transformers at full size with random weights (bf16, batch 1; no downloads):

* ``wan``: ``WanTransformer3DModel`` with the Wan2.1-T2V-1.3B config (``vmonarch_fixtures.models.wan_1_3b``),
  480p / 81 frames: latent 16×21×60×104, 1×2×2 patches → 21×30×52 = 32760 tokens, 512 text tokens
  (cross-attention).
* ``cogvideox``: ``CogVideoXTransformer3DModel`` with the CogVideoX-5B config (42 layers, 48 heads × 64,
  RoPE variant), 720×480 / 49 frames: latent 13×16×60×90 → 13×30×45 = 17550 video + 226 text tokens in
  joint attention.
* ``hunyuan15``: ``HunyuanVideo15Transformer3DModel`` with its default (8.3 B, i2v) config: 54 layers,
  16 heads × 128, 480p / 61 frames: latent 65×16×30×53 (patch 1) → 16×30×53 = 25440 video + 256 + 64 +
  729 text/image tokens in joint attention, with the model's valid × valid [B, 1, N, N] bool mask on every
  call (prompts unpadded here). That mask keeps diffusers' SDPA off the FlashAttention and cuDNN kernels,
  so a further baseline drops all-visible masks and runs cuDNN ("mask dropped": exact for unpadded prompts).
* ``framepack``: ``HunyuanVideoFramepackTransformer3DModel`` with FramePack-I2V's config (HunyuanVideo's
  20 + 40 blocks, 24 heads × 128, history embedders, SigLIP image projection), one 9-latent-frame section
  at 544×704: 9×34×44 = 13464 video tokens behind 2992 + 374 + 396 clean / 2× / 4× history tokens, then
  729 image + 96 prompt tokens (of 512, the rest masked; batch 1 crops them). History, image and text
  tokens are attended densely (like text), so at most ~47 % of the attention can be structured.

For each model: one forward, timed as the median of ``--runs`` CUDA-event measurements after warm-up,
for dense attention (diffusers' default SDPA, and SDPA forced to the FlashAttention and cuDNN
backends) and for ``vmonarch_opt.optimize(model, batch, methods=(method,), budget=None)`` per method
(``--methods calibrated`` adds optimize()'s calibrated default); the time
``optimize`` itself takes; the attention-FLOP cut and the output's relative error vs dense (from the
report's validation run). Prints a short table last, writes ``$OUT/end_to_end.json`` and
``$OUT/end_to_end_section.md``, and appends the table to BENCHMARKS.md (unless ``--no-append``).
"""
from __future__ import annotations

import argparse
import contextlib
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
from vmonarch_opt import VMoBAConfig  # noqa: E402
from vmonarch_fixtures import models  # noqa: E402
from benchmarks.publish import command_line, now, publish  # noqa: E402


def cogvideox_5b(frames: int = 13, height: int = 30, width: int = 45, dtype=torch.bfloat16, device="cuda",
                 seed: int = 0):
    """CogVideoXTransformer3DModel with the CogVideoX-5B config, random weights; grid in latent tokens."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                                    time_embed_dim=512, text_embed_dim=4096, num_layers=42,
                                    sample_width=2 * width, sample_height=2 * height, sample_frames=4 * (frames - 1) + 1,
                                    patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
                                    use_rotary_positional_embeddings=True)
    m = m.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(1, frames, 16, 2 * height, 2 * width, generator=g),
             encoder_hidden_states=torch.randn(1, 226, 4096, generator=g), timestep=torch.tensor([500]),
             return_dict=False)
    return m, models._to(b, device, dtype)


def hunyuan15_480p(frames: int = 16, height: int = 30, width: int = 53, dtype=torch.bfloat16, device="cuda",
                   seed: int = 0, text: int = 256, text_2: int = 64, image: int = 729):
    """HunyuanVideo15Transformer3DModel with its default config (random weights, made on ``device``)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        m = HunyuanVideo15Transformer3DModel()
    m = m.to(dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(1, m.config.in_channels, frames, height, width, generator=g),
             timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, text, 3584, generator=g),
             encoder_attention_mask=torch.ones(1, text), encoder_hidden_states_2=torch.randn(1, text_2, 1472, generator=g),
             encoder_attention_mask_2=torch.ones(1, text_2), image_embeds=torch.randn(1, image, 1152, generator=g),
             return_dict=False)
    return m, models._to(b, device, dtype)


def framepack_i2v(frames: int = 9, height: int = 34, width: int = 44, dtype=torch.bfloat16, device="cuda",
                  seed: int = 0, text: int = 512, real_text: int = 96, image: int = 729):
    """HunyuanVideoFramepackTransformer3DModel with FramePack-I2V's config (random weights, made on
    ``device``): one section of ``frames`` latent frames with FramePack's history layout (start + last
    clean frame, 2 frames at 2×, 16 at 4× compression; frame indices as FramePack numbers them)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        m = HunyuanVideoFramepackTransformer3DModel(has_image_proj=True, image_proj_dim=1152,
                                                    has_clean_x_embedder=True, guidance_embeds=True)
    m = m.to(dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    c, lat = m.config.in_channels, (2 * height, 2 * width)
    mask = torch.zeros(1, text)
    mask[:, :real_text] = 1
    b = dict(hidden_states=torch.randn(1, c, frames, *lat, generator=g), timestep=torch.tensor([500.0]),
             encoder_hidden_states=torch.randn(1, text, 4096, generator=g), encoder_attention_mask=mask,
             pooled_projections=torch.randn(1, 768, generator=g), image_embeds=torch.randn(1, image, 1152, generator=g),
             guidance=torch.tensor([10000.0]), indices_latents=torch.arange(20, 20 + frames),
             latents_clean=torch.randn(1, c, 2, *lat, generator=g), indices_latents_clean=torch.tensor([0, 19]),
             latents_history_2x=torch.randn(1, c, 2, *lat, generator=g), indices_latents_history_2x=torch.tensor([17, 18]),
             latents_history_4x=torch.randn(1, c, 16, *lat, generator=g),
             indices_latents_history_4x=torch.arange(1, 17), return_dict=False)
    return m, models._to(b, device, dtype)


class _DropVisibleMasks(torch.overrides.TorchFunctionMode):
    """SDPA calls whose mask lets everything through run without it (and so may use FlashAttention
    or cuDNN): the "mask dropped" baseline."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if mask is not None and mask.dtype == torch.bool and bool(mask.all()):
                args = args[:3] + ((None,) + tuple(args[4:]) if len(args) > 3 else ())
                kwargs.pop("attn_mask", None)
        return func(*args, **kwargs)


MASKED = {"hunyuan15"}  # models whose attention always carries a mask (the "mask dropped" baseline)
DESCRIBED = {"wan": "Wan2.1-1.3B 480p/81f (21×30×52 = 32760 tokens)",
             "cogvideox": "CogVideoX-5B 49f 720×480 (13×30×45 + 226 text)",
             "hunyuan15": "HunyuanVideo 1.5 (8.3 B) 480p/61f (16×30×53 = 25440 + 1049 text/image tokens, "
                          "valid × valid mask)",
             "framepack": "FramePack-I2V (HunyuanVideo 13 B) 544×704, 9 latent frames (9×34×44 = 13464 video + 3762 "
                          "history + 825 image/text tokens)"}


def build(name: str, tiny: bool, device):
    if tiny:  # small random configs for a CPU smoke run; grids large enough to be rewritten
        if name == "wan":
            return models.wan(frames=3, height=6, width=8, device=device)
        if name == "cogvideox":
            return models.cogvideox(frames=3, height=6, width=8, device=device)
        if name == "hunyuan15":
            return models.hunyuan15(frames=3, height=6, width=8, device=device)
        if name == "framepack":
            return models.framepack(frames=3, height=6, width=8, device=device)
    if name == "wan":
        return models.wan_1_3b(device=device)
    if name == "cogvideox":
        return cogvideox_5b(device=device)
    if name == "hunyuan15":
        return hunyuan15_480p(device=device)
    if name == "framepack":
        return framepack_i2v(device=device)
    raise ValueError(f"unknown model {name!r}: use wan, cogvideox, hunyuan15 or framepack")


def median_ms(fn, runs: int, warmup: int, cuda: bool) -> float:
    """Median wall time of ``fn()`` in ms: CUDA events on the GPU, perf_counter elsewhere."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compiled(model, on: bool):
    """``model`` itself, or a fresh ``torch.compile`` of it (Dynamo caches reset first)."""
    if not on:
        return model
    torch._dynamo.reset()
    return torch.compile(model)


def call(model, batch):
    return model(**batch)


def method_kwargs(method: str) -> dict:
    """``optimize`` keyword arguments of one --methods entry."""
    if method == "calibrated":
        return {}
    if method == "vmoba+pooled":  # VMoBA with the unselected blocks as pooled keys
        return dict(budget=None, methods=("vmoba",), overrides={"*": VMoBAConfig(pooled_rest=True)})
    return dict(budget=None, methods=(method,))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="wan,cogvideox")
    ap.add_argument("--methods", default="monarch,vmoba",
                    help="comma-separated: monarch, vmoba, vmoba+pooled, dense (method pinned on every eligible "
                         "site, no calibration; vmoba+pooled = VMoBAConfig(pooled_rest=True)) and/or calibrated "
                         "(optimize()'s default: calibration under Budget())")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="small random configs (CPU smoke run)")
    ap.add_argument("--compile", action="store_true",
                    help="time every configuration under torch.compile (inductor; compilation happens in the "
                         "warm-up): dense with diffusers' default SDPA vs the optimized model, both compiled")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    devname = torch.cuda.get_device_name(dev) if cuda else "cpu"
    kernels = "Triton" if cuda and os.environ.get("VMONARCH_FORCE_REFERENCE", "0") != "1" else "PyTorch reference"
    print(f"[e2e] device {devname}, torch {torch.__version__}, optimized attention via {kernels}", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    results, rows = [], []
    for mname in names:
        try:
            model, batch = build(mname, args.tiny, dev)
        except Exception as e:
            traceback.print_exc()
            rows.append([mname, f"FAILED to build: {type(e).__name__}: {str(e)[:80]}"] + [""] * 6)
            continue
        nparams = sum(p.numel() for p in model.parameters())
        print(f"[e2e] {mname}: {type(model).__name__}, {nparams / 1e9:.2f} B parameters", flush=True)
        base = {}
        dense_rows = [("dense SDPA (diffusers default)", None, False), ("dense SDPA FLASH", SDPBackend.FLASH_ATTENTION, False),
                      ("dense SDPA CUDNN", SDPBackend.CUDNN_ATTENTION, False)]
        if mname in MASKED:
            dense_rows.append(("dense SDPA CUDNN, all-visible mask dropped", SDPBackend.CUDNN_ATTENTION, True))
        for label, backend, drop in dense_rows:
            if backend is not None and (not cuda or args.compile):
                continue
            try:
                if backend is None:
                    fwd = compiled(model, args.compile)
                    ms = median_ms(lambda: call(fwd, batch), args.runs, args.warmup, cuda)
                else:
                    with sdpa_kernel(backend), (_DropVisibleMasks() if drop else contextlib.nullcontext()):
                        ms = median_ms(lambda: call(model, batch), args.runs, args.warmup, cuda)
                base[label] = ms
                print(f"[e2e] {mname} {label}: {ms:.1f} ms", flush=True)
                results.append(dict(model=mname, config=label, forward_ms=ms))
            except Exception as e:
                print(f"[e2e] {mname} {label}: unavailable ({type(e).__name__}: {str(e)[:120]})", flush=True)
        ref = base.get("dense SDPA (diffusers default)")
        best_dense = min(base.values()) if base else None
        for label, ms in base.items():
            rows.append([mname, label, f"{ms:.1f}", "1.00×" if label.endswith("default)") else f"{ref / ms:.2f}×",
                         "—", "—", "—", "—"])
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            try:
                t0 = time.perf_counter()
                kw = method_kwargs(method)
                vmonarch_opt.optimize(model, batch, inplace=True, **kw,
                                      **({"min_seq_len": 0} if args.tiny else {}))
                if cuda:
                    torch.cuda.synchronize()
                opt_s = time.perf_counter() - t0
                rep = model.report
                tot = rep.totals
                cut = 1 - tot["flops_after"] / tot["flops_before"]
                fwd = compiled(model, args.compile)
                ms = median_ms(lambda: call(fwd, batch), args.runs, args.warmup, cuda)
                res = dict(model=mname, config=method, forward_ms=ms, optimize_s=opt_s, flop_cut=cut,
                           by_method=tot["by_method"], output_error=tot.get("output_error"),
                           speedup_vs_default=ref / ms if ref else None,
                           speedup_vs_best_dense=best_dense / ms if best_dense else None,
                           report=rep.data)
                results.append(res)
                by = ", ".join(f"{k}: {v}" for k, v in sorted(tot["by_method"].items()))
                err = tot.get("output_error")
                rows.append([mname, f"vmonarch_opt {method} ({by})", f"{ms:.1f}", f"{ref / ms:.2f}×",
                             f"{best_dense / ms:.2f}×", f"{100 * cut:.1f}%", "?" if err is None else f"{err:.3f}",
                             f"{opt_s:.1f}"])
                print(f"[e2e] {mname} {method}: {ms:.1f} ms ({ref / ms:.2f}× vs default SDPA, "
                      f"{best_dense / ms:.2f}× vs best dense), optimize {opt_s:.1f} s", flush=True)
                print(rep, flush=True)
            except Exception as e:
                traceback.print_exc()
                rows.append([mname, f"vmonarch_opt {method}: FAILED {type(e).__name__}: {str(e)[:80]}"] + [""] * 6)
                results.append(dict(model=mname, config=method, error=f"{type(e).__name__}: {e}"))
            finally:
                vmonarch_opt.restore(model)
        del model, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    from tabulate import tabulate

    headers = ["model", "attention", "forward ms (median)", "speed-up vs default SDPA", "vs best dense",
               "attn-FLOP cut", "output rel. err", "optimize s"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    cmd, when = command_line(), now()
    what = ("small random configs (--tiny)" if args.tiny else ", ".join(DESCRIBED.get(n, n) for n in names))
    mode = " under torch.compile (inductor, both sides compiled)" if args.compile else ""
    section = (f"## End-to-end: one transformer forward, dense vs optimized{mode} ({when})\n\n"
               f"Device: {devname}, torch {torch.__version__}, optimized attention via {kernels}. Command: `{cmd}`. "
               f"Models: {what}; diffusers, random weights, {'fp32' if args.tiny else 'bf16'}, batch 1; median of "
               f"{args.runs} runs after {args.warmup} warm-up. Output error = relative L2 error of the model output vs "
               f"dense on the calibration batch (the report's validation).\n\n{table}\n")
    publish("end_to_end", section, dict(device=devname, command=cmd, date=when, kernels=kernels, results=results),
            append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
