"""Small diffusers video pipelines assembled from random-weight components (no downloads).

Each factory returns ``(pipe, call_kwargs)``: ``pipe(**call_kwargs)`` generates a video from random
prompt embeddings (``prompt_embeds``, no tokenizer or text encoder: those components are ``None``).
Used by ``tests/test_pipelines.py``, ``examples/pipeline_wan.py`` and ``benchmarks/pipeline.py``.

Sizes: ``frames`` pixel frames (latent frames ``(frames - 1) // 4 + 1``), ``height``/``width`` in
pixels (the VAEs compress 8× in space; the transformers patch 2×2, so 64×80 px is a 4×5 token grid
per latent frame). Diffusers' pipelines need ``transformers`` importable (they import their text
encoders' classes), even when no text encoder is built.
"""
from __future__ import annotations

import torch

from .models import _need_diffusers


def _place(pipe, device, dtype) -> None:
    pipe.to(device)
    if dtype != torch.float32:  # (diffusers warns about modules it keeps in float32 when loading)
        pipe.to(dtype=dtype)


def _embeds(g: torch.Generator, batch: int, text: int, dim: int, dtype, device) -> torch.Tensor:
    return torch.randn(batch, text, dim, generator=g).to(device, dtype)


def _tiny_wan_vae(z_dim: int, seed: int):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=0,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                            latents_std=[1.0] * z_dim).eval()


def _tiny_wan_transformer(seed: int, in_channels: int, out_channels: int, layers: int, heads: int, head_dim: int,
                          text_dim: int, image_dim=None):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=32,
                                 ffn_dim=64, num_layers=layers, rope_max_seq_len=64, image_dim=image_dim,
                                 added_kv_proj_dim=None if image_dim is None else heads * head_dim).eval()


WORDS = ("a the of on in at and with red blue green small large cat dog bird car boat city beach forest river "
         "street night day sunset snow rain walks runs flies drives swims slowly quickly camera pans").split()


def tiny_text_encoder(dim: int = 32, seed: int = 0):
    """A word-level tokenizer over ``WORDS`` (others map to ``<unk>``) and a one-layer UMT5 text
    encoder of width ``dim`` with random weights: enough for ``pipe(prompt)`` to run offline."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=dim, d_kv=8, d_ff=2 * dim, num_layers=1,
                                          num_heads=4, relative_attention_num_buckets=8)).eval()
    return tokenizer, encoder


def wan(two_experts: bool = False, boundary_ratio: float = 0.7, cfg: bool = True, steps: int = 3,
        frames: int = 9, height: int = 64, width: int = 80, layers: int = 2, heads: int = 2, head_dim: int = 16,
        text: int = 7, text_encoder: bool = False, seed: int = 0, dtype=torch.float32, device="cpu", cls=None):
    """``WanPipeline`` (Wan 2.1 layout; ``two_experts=True``: Wan 2.2's ``transformer`` for high
    noise and ``transformer_2`` for low noise, switched at ``boundary_ratio``). ``text_encoder=True``
    builds a tiny tokenizer and text encoder (``tiny_text_encoder``) and the call takes a
    ``prompt`` (and ``negative_prompt``) instead of embeddings. ``cls``: a ``WanPipeline``
    subclass to build instead."""
    _need_diffusers()
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    z = 4
    t1 = _tiny_wan_transformer(seed, z, z, layers, heads, head_dim, 32)
    t2 = _tiny_wan_transformer(seed + 10, z, z, layers, heads, head_dim, 32) if two_experts else None
    tokenizer, encoder = tiny_text_encoder(32, seed + 40) if text_encoder else (None, None)
    pipe = (cls or WanPipeline)(tokenizer=tokenizer, text_encoder=encoder, vae=_tiny_wan_vae(z, seed + 20),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=t1, transformer_2=t2,
                                boundary_ratio=boundary_ratio if two_experts else None)
    _place(pipe, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 1)
    kw = dict(height=height, width=width, num_frames=frames, num_inference_steps=steps,
              guidance_scale=5.0 if cfg else 1.0)
    if text_encoder:
        kw["prompt"] = "a red car drives slowly on the beach at sunset"
        if cfg:
            kw["negative_prompt"] = "snow and rain"
        return pipe, kw
    kw["prompt_embeds"] = _embeds(g, 1, text, 32, dtype, device)
    if cfg:
        kw["negative_prompt_embeds"] = _embeds(g, 1, text, 32, dtype, device)
    return pipe, kw


def wan_i2v(two_experts: bool = True, boundary_ratio: float = 0.7, cfg: bool = True, steps: int = 3,
            frames: int = 9, height: int = 64, width: int = 80, layers: int = 2, heads: int = 2, head_dim: int = 16,
            text: int = 7, seed: int = 0, dtype=torch.float32, device="cpu"):
    """``WanImageToVideoPipeline``. ``two_experts=True``: Wan 2.2 I2V (two experts, no image
    encoder: the image enters only as VAE latents concatenated to the noise). ``False``: Wan 2.1
    I2V, whose transformer also cross-attends to CLIP image features: a tiny random
    ``transformers.CLIPVisionModel`` and ``CLIPImageProcessor`` built here (diffusers 0.42 refuses
    ``image_embeds`` together with the ``image`` it still needs for the latents, so the encoder
    cannot be left out)."""
    _need_diffusers()
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    z, vae_t = 4, 4
    image_encoder = image_processor = None
    image_dim = None
    if not two_experts:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(seed + 30)
        image_dim = 16
        image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=image_dim, intermediate_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=32, patch_size=8,
                                                         projection_dim=16)).eval()
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    mk = lambda s: _tiny_wan_transformer(s, 2 * z + vae_t, z, layers, heads, head_dim, 32, image_dim)  # noqa: E731
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_tiny_wan_vae(z, seed + 20),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_encoder=image_encoder,
                                   image_processor=image_processor, transformer=mk(seed),
                                   transformer_2=mk(seed + 10) if two_experts else None,
                                   boundary_ratio=boundary_ratio if two_experts else None)
    _place(pipe, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 1)
    image = torch.rand(1, 3, height, width, generator=g).to(device)  # [0, 1] pixels
    kw = dict(image=image, prompt_embeds=_embeds(g, 1, text, 32, dtype, device), height=height, width=width,
              num_frames=frames, num_inference_steps=steps, guidance_scale=5.0 if cfg else 1.0)
    if cfg:
        kw["negative_prompt_embeds"] = _embeds(g, 1, text, 32, dtype, device)
    return pipe, kw


def cogvideox(cfg: bool = True, steps: int = 3, frames: int = 9, height: int = 64, width: int = 80, layers: int = 2,
              heads: int = 2, head_dim: int = 16, text: int = 7, seed: int = 0, dtype=torch.float32, device="cpu"):
    """``CogVideoXPipeline`` (classifier-free guidance as one call on a doubled batch)."""
    _need_diffusers()
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    t = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                    out_channels=4, time_embed_dim=32, text_embed_dim=32, num_layers=layers,
                                    sample_width=width // 8, sample_height=height // 8, sample_frames=frames,
                                    patch_size=2, max_text_seq_length=text, temporal_compression_ratio=4,
                                    use_rotary_positional_embeddings=True).eval()
    torch.manual_seed(seed + 20)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=t,
                             scheduler=CogVideoXDDIMScheduler())
    _place(pipe, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 1)
    kw = dict(prompt_embeds=_embeds(g, 1, text, 32, dtype, device), height=height, width=width, num_frames=frames,
              num_inference_steps=steps, guidance_scale=6.0 if cfg else 1.0)
    if cfg:
        kw["negative_prompt_embeds"] = _embeds(g, 1, text, 32, dtype, device)
    return pipe, kw


def hunyuan(cfg: bool = False, steps: int = 3, frames: int = 9, height: int = 64, width: int = 80, heads: int = 2,
            head_dim: int = 16, text: int = 7, seed: int = 0, dtype=torch.float32, device="cpu"):
    """``HunyuanVideoPipeline`` (guidance-distilled: ``guidance`` is an input of the transformer;
    ``cfg=True`` adds "true" classifier-free guidance, a second call with negative embeddings)."""
    _need_diffusers()
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)

    torch.manual_seed(seed)
    t = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                       attention_head_dim=head_dim, num_layers=1, num_single_layers=1,
                                       num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
                                       pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)).eval()
    torch.manual_seed(seed + 20)
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
                                    temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=t, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    _place(pipe, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 1)
    kw = dict(prompt_embeds=_embeds(g, 1, text, 32, dtype, device), prompt_attention_mask=torch.ones(1, text).to(device),
              pooled_prompt_embeds=torch.randn(1, 16, generator=g).to(device, dtype), height=height, width=width,
              num_frames=frames, num_inference_steps=steps)
    if cfg:
        kw.update(true_cfg_scale=4.0, negative_prompt_embeds=_embeds(g, 1, text, 32, dtype, device),
                  negative_prompt_attention_mask=torch.ones(1, text).to(device),
                  negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g).to(device, dtype))
    return pipe, kw


def wan_2_1_1_3b(steps: int = 10, frames: int = 81, height: int = 480, width: int = 832, text: int = 512, seed: int = 0,
                 dtype=torch.bfloat16, device="cuda", vae: str = "full"):
    """``WanPipeline`` with the Wan2.1-T2V-1.3B transformer at full size (random weights) and the
    Wan 2.1 VAE at full size (``vae="full"``, random weights) or a tiny one (``"tiny"``: for runs
    that only time the denoising loop); 480p/81f by default = 21×30×52 latent tokens; random
    512-token prompt embeddings (UMT5 width 4096), classifier-free guidance on (5.0)."""
    _need_diffusers()
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from .models import wan_1_3b

    t, _ = wan_1_3b(dtype=dtype, device=device, seed=seed)
    torch.manual_seed(seed + 20)
    v = AutoencoderKLWan() if vae == "full" else _tiny_wan_vae(16, seed + 20)
    v = v.to(device=device, dtype=torch.float32).eval()  # diffusers' Wan examples keep the VAE in fp32
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                    flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=v, scheduler=sched, transformer=t)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 1)
    kw = dict(prompt_embeds=_embeds(g, 1, text, 4096, dtype, device),
              negative_prompt_embeds=_embeds(g, 1, text, 4096, dtype, device), height=height, width=width,
              num_frames=frames, num_inference_steps=steps, guidance_scale=5.0)
    return pipe, kw
