"""Small, randomly initialised video transformers from diffusers (no downloads), with batches.

Used by the tests, the examples and the CLI (``vmonarch_fixtures.models:wan`` from a checkout of the
repository). Each factory returns ``(model, batch)`` where ``model(**batch)`` runs. Sizes are in latent
tokens after patching.
"""
from __future__ import annotations

import torch


def _need_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover
        raise ImportError("these model factories need diffusers: pip install diffusers") from e


def wan(frames: int = 3, height: int = 4, width: int = 5, layers: int = 2, heads: int = 2, head_dim: int = 16,
        text: int = 7, batch: int = 1, seed: int = 0, dtype=torch.float32, device="cpu"):
    """WanTransformer3DModel; latent grid frames×height×width tokens (patch 1×2×2)."""
    _need_diffusers()
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                              in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                              num_layers=layers, rope_max_seq_len=64).to(device, dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=g),
             timestep=torch.tensor([500] * batch), encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
             return_dict=False)
    return m, _to(b, device, dtype)


def cogvideox(frames: int = 3, height: int = 4, width: int = 5, layers: int = 2, heads: int = 2,
              head_dim: int = 16, text: int = 7, batch: int = 1, seed: int = 0, dtype=torch.float32, device="cpu"):
    """CogVideoXTransformer3DModel (text tokens before video tokens in joint attention)."""
    _need_diffusers()
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                    out_channels=4, time_embed_dim=32, text_embed_dim=32, num_layers=layers,
                                    sample_width=2 * width, sample_height=2 * height, sample_frames=4 * frames - 3,
                                    patch_size=2, max_text_seq_length=text, temporal_compression_ratio=4,
                                    use_rotary_positional_embeddings=True).to(device, dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(batch, frames, 4, 2 * height, 2 * width, generator=g),
             encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.tensor([500] * batch),
             return_dict=False)
    return m, _to(b, device, dtype)


def hunyuan(frames: int = 3, height: int = 4, width: int = 5, layers: int = 1, single_layers: int = 1,
            heads: int = 2, head_dim: int = 16, text: int = 7, batch: int = 1, seed: int = 0,
            dtype=torch.float32, device="cpu"):
    """HunyuanVideoTransformer3DModel (double- and single-stream blocks; text after video)."""
    _need_diffusers()
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                       attention_head_dim=head_dim, num_layers=layers,
                                       num_single_layers=single_layers, num_refiner_layers=1, patch_size=2,
                                       patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
                                       rope_axes_dim=(4, 6, 6)).to(device, dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=g),
             timestep=torch.tensor([500] * batch), encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
             encoder_attention_mask=torch.ones(batch, text), pooled_projections=torch.randn(batch, 16, generator=g),
             guidance=torch.tensor([3000.0] * batch), return_dict=False)
    return m, _to(b, device, dtype)


def hunyuan15(frames: int = 3, height: int = 4, width: int = 5, layers: int = 2, heads: int = 2,
              head_dim: int = 16, text: int = 7, text_2: int = 5, image: int = 4, pad: int = 0, batch: int = 1,
              seed: int = 0, dtype=torch.float32, device="cpu"):
    """HunyuanVideo15Transformer3DModel (joint attention, text/image tokens after the video, a
    [B, 1, N, N] valid × valid bool mask on every call); ``pad`` > 0 pads both prompts by that many
    tokens (the model puts the padding after the valid text)."""
    _need_diffusers()
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                         attention_head_dim=head_dim, num_layers=layers, num_refiner_layers=1,
                                         mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=32,
                                         text_embed_2_dim=32, image_embed_dim=16,
                                         rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
                                         ).to(device, dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    m1, m2 = torch.ones(batch, text), torch.ones(batch, text_2)
    if pad:
        m1[:, text - pad:] = 0
        m2[:, text_2 - pad:] = 0
    b = dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=g),
             timestep=torch.tensor([500.0] * batch), encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
             encoder_attention_mask=m1, encoder_hidden_states_2=torch.randn(batch, text_2, 32, generator=g),
             encoder_attention_mask_2=m2, image_embeds=torch.randn(batch, image, 16, generator=g), return_dict=False)
    return m, _to(b, device, dtype)


def kandinsky5(frames: int = 3, height: int = 4, width: int = 5, layers: int = 2, heads: int = 2,
               head_dim: int = 16, text: int = 7, channels: int = 4, visual_cond: bool = False, batch: int = 1,
               seed: int = 0, dtype=torch.float32, device="cpu"):
    """Kandinsky5Transformer3DModel: channels-last latents ``[B, T, H, W, C]``, linear patch
    embedding, video self-attention and text cross-attention in separate calls; ``visual_cond``
    feeds ``2 * channels + 1`` input channels (latents, condition latents, mask)."""
    _need_diffusers()
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    dim = heads * head_dim
    m = Kandinsky5Transformer3DModel(in_visual_dim=channels, in_text_dim=32, in_text_dim2=24, time_dim=32,
                                     out_visual_dim=channels, patch_size=(1, 2, 2), model_dim=dim, ff_dim=2 * dim,
                                     num_text_blocks=1, num_visual_blocks=layers, visual_cond=visual_cond,
                                     axes_dims=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)).eval()
    with torch.no_grad():  # its modulation is zero-initialised (attention would not reach the output)
        for n, p in m.named_parameters():
            if "modulation" in n:
                p.normal_(0, 0.05)
    m = m.to(device, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    c_in = 2 * channels + 1 if visual_cond else channels
    b = dict(hidden_states=torch.randn(batch, frames, 2 * height, 2 * width, c_in, generator=g),
             encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.tensor([500.0] * batch),
             pooled_projections=torch.randn(batch, 24, generator=g),
             visual_rope_pos=(torch.arange(frames), torch.arange(height), torch.arange(width)),
             text_rope_pos=torch.arange(text), return_dict=False)
    return m, _to(b, device, dtype)


def ltx(frames: int = 3, height: int = 4, width: int = 5, layers: int = 2, heads: int = 2, head_dim: int = 16,
        text: int = 7, batch: int = 1, seed: int = 0, dtype=torch.float32, device="cpu"):
    """LTXVideoTransformer3DModel (pre-patchified tokens; grid from num_frames/height/width)."""
    _need_diffusers()
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=heads,
                                   attention_head_dim=head_dim, cross_attention_dim=32, num_layers=layers,
                                   caption_channels=32).to(device, dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(batch, frames * height * width, 8, generator=g),
             encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.tensor([500] * batch),
             encoder_attention_mask=torch.ones(batch, text), num_frames=frames, height=height, width=width,
             return_dict=False)
    return m, _to(b, device, dtype)


def latte(frames: int = 3, height: int = 4, width: int = 5, layers: int = 2, heads: int = 2, head_dim: int = 16,
          text: int = 7, batch: int = 1, seed: int = 0, dtype=torch.float32, device="cpu"):
    """LatteTransformer3DModel: factorised attention — spatial blocks attend within each frame
    (frames folded into the batch), temporal blocks across frames at each position."""
    _need_diffusers()
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(seed)
    m = LatteTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
                                num_layers=layers, cross_attention_dim=32, sample_size=2 * height, patch_size=2,
                                norm_type="ada_norm_single", num_embeds_ada_norm=1000, caption_channels=32,
                                video_length=frames).to(device, dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=g),
             timestep=torch.tensor([500] * batch), encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
             return_dict=False)
    return m, _to(b, device, dtype)


def mochi(frames: int = 3, height: int = 4, width: int = 5, layers: int = 2, heads: int = 2, head_dim: int = 16,
          text: int = 7, batch: int = 1, seed: int = 0, dtype=torch.float32, device="cpu"):
    """MochiTransformer3DModel: joint attention computed in a per-prompt Python loop over the text
    mask (``torch.nonzero``), text after video."""
    _need_diffusers()
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=heads, attention_head_dim=head_dim,
                                num_layers=layers, pooled_projection_dim=16, in_channels=4, out_channels=4,
                                text_embed_dim=32, time_embed_dim=32, max_sequence_length=text).eval()
    with torch.no_grad():  # zero-initialised RoPE frequencies would make RoPE the identity
        m.pos_frequencies.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 7))
    m = m.to(device, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=g),
             encoder_hidden_states=torch.randn(batch, text, 32, generator=g), timestep=torch.tensor([500] * batch),
             encoder_attention_mask=torch.ones(batch, text), return_dict=False)
    return m, _to(b, device, dtype)


def framepack(frames: int = 3, height: int = 4, width: int = 5, heads: int = 2, head_dim: int = 16, text: int = 7,
              batch: int = 1, seed: int = 0, dtype=torch.float32, device="cpu", layers: int = 1,
              single_layers: int = 1):
    """HunyuanVideoFramepackTransformer3DModel with clean/2×/4× history latents and image tokens; its
    forward breaks the Dynamo graph (``.item()``), so the blocks are captured in frames of their own."""
    _need_diffusers()
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True).to(device, dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    lat = (4, 2 * height, 2 * width)
    b = dict(hidden_states=torch.randn(batch, 4, frames, *lat[1:], generator=g), timestep=torch.tensor([500] * batch),
             encoder_hidden_states=torch.randn(batch, text, 32, generator=g), encoder_attention_mask=torch.ones(batch, text),
             pooled_projections=torch.randn(batch, 16, generator=g), image_embeds=torch.randn(batch, 3, 16, generator=g),
             indices_latents=torch.arange(frames), guidance=torch.tensor([3000.0] * batch),
             latents_clean=torch.randn(batch, 4, 2, *lat[1:], generator=g), indices_latents_clean=torch.tensor([0, 4]),
             latents_history_2x=torch.randn(batch, 4, 2, *lat[1:], generator=g),
             indices_latents_history_2x=torch.tensor([5, 6]),
             latents_history_4x=torch.randn(batch, 4, 4, *lat[1:], generator=g),
             indices_latents_history_4x=torch.tensor([7, 8, 9, 10]), return_dict=False)
    return m, _to(b, device, dtype)


def motif_video(frames: int = 3, height: int = 6, width: int = 8, text: int = 7, image: int = 4, seed: int = 0,
                dtype=torch.float32, device="cpu"):
    """MotifVideoTransformer3DModel with a decoder block: its joint attention joins the decoder's copy
    of the video with the encoder's output video tokens (two sequences on one grid)."""
    _need_diffusers()
    from diffusers.models.transformers.transformer_motif_video import MotifVideoTransformer3DModel

    torch.manual_seed(seed)
    m = MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64,
                                     num_layers=1, num_single_layers=2, num_decoder_layers=1, mlp_ratio=2.0,
                                     patch_size=2, patch_size_t=1, text_embed_dim=32, image_embed_dim=16,
                                     rope_axes_dim=(16, 24, 24)).to(device, dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(1, 4, frames, 2 * height, 2 * width, generator=g), timestep=torch.tensor([500.0]),
             encoder_hidden_states=torch.randn(1, text, 32, generator=g), encoder_attention_mask=torch.ones(1, text),
             image_embeds=torch.randn(1, image, 16, generator=g), return_dict=False)
    return m, _to(b, device, dtype)


def skyreels_v2(frames: int = 6, height: int = 4, width: int = 5, layers: int = 2, heads: int = 2,
                head_dim: int = 16, text: int = 7, causal_block_size: int = 2, batch: int = 1, seed: int = 0,
                dtype=torch.float32, device="cpu"):
    """SkyReelsV2Transformer3DModel with its autoregressive (block-causal) attention switched on:
    ``_set_ar_attention(causal_block_size)`` makes every self-attention take a bool mask under which
    chunks of ``causal_block_size`` latent frames see themselves and the earlier chunks (0: off)."""
    _need_diffusers()
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    m = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                     in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                     num_layers=layers, rope_max_seq_len=64).to(device, dtype).eval()
    if causal_block_size:
        m._set_ar_attention(causal_block_size)
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width, generator=g),
             timestep=torch.tensor([500] * batch), encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
             return_dict=False)
    return m, _to(b, device, dtype)


def anyflow_far(chunk_partition=(1, 2, 2), height: int = 4, width: int = 4, layers: int = 1, heads: int = 2,
                head_dim: int = 16, text: int = 7, seed: int = 0, dtype=torch.float32, device="cpu"):
    """AnyFlowFARTransformer3DModel (frame-autoregressive, causal training rollout): its self-attention
    runs flex_attention with a BlockMask over full and FAR-compressed tokens. Latent frames =
    ``sum(chunk_partition)``."""
    _need_diffusers()
    from diffusers import AnyFlowFARTransformer3DModel

    torch.manual_seed(seed)
    m = AnyFlowFARTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                     out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers,
                                     rope_max_seq_len=64, chunk_partition=tuple(chunk_partition)).to(device, dtype).eval()
    f = sum(chunk_partition)
    g = torch.Generator().manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(1, f, 4, 2 * height, 2 * width, generator=g),
             timestep=torch.full((1, f), 500.0), r_timestep=torch.full((1, f), 200.0),
             encoder_hidden_states=torch.randn(1, text, 32, generator=g), chunk_partition=list(chunk_partition),
             return_dict=False)
    return m, _to(b, device, dtype)


def wan_1_3b(frames: int = 21, height: int = 30, width: int = 52, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """Wan2.1-T2V-1.3B architecture at full size with random weights; 480p/81f = 21×30×52 tokens."""
    _need_diffusers()
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                              out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    m = m.to(device=device, dtype=dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    b = dict(hidden_states=torch.randn(1, 16, frames, 2 * height, 2 * width, generator=g),
             timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 512, 4096, generator=g),
             return_dict=False)
    return m, _to(b, device, dtype)


def _to(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out
