"""A Self-Forcing-style causal Wan built from diffusers' Wan modules (random weights).

Autoregressive video diffusion (CausVid, Self-Forcing) makes a bidirectional video DiT causal: the
video is generated in chunks of ``chunk_frames`` latent frames; each chunk is denoised in a few
steps while its self-attention also attends to the keys/values of the chunks already generated (a
per-layer KV cache); once a chunk is clean, one more forward at timestep 0 computes its keys/values
and they are appended to the cache. The same network trains on a whole clip at once with a
block-causal mask (chunk ``c`` sees chunks ``≤ c``), which computes exactly what streaming computes.

``CausalWanTransformer3DModel`` subclasses diffusers' ``WanTransformer3DModel`` (0.42): its patch
embedding, condition embedder, RoPE tables, blocks and output head are used as they are; only the
self-attention processor (``CausalWanAttnProcessor``: ``torch.cat`` of the cache and the new
keys/values, then ``F.scaled_dot_product_attention``) and the block loop (which hands each layer its
cache and collects the new keys/values) are its own. The cache is an argument of ``forward`` — a
list with one ``{"key", "value"}`` dict per layer — never module state, so a copy of the model
(``vmonarch_opt.optimize`` makes one) streams with the same caches.

Two modes of ``forward``:

* streaming: ``kv_cache`` given (a list, or None for the first chunk with ``chunk_frames`` frames
  or fewer), ``hidden_states`` = the new chunk; RoPE positions start after the cached frames;
  ``return_kv=True`` also returns the new chunk's keys/values (``append_kv`` adds them);
* training: ``kv_cache=None`` and more frames than a chunk: the whole clip at once under the
  block-causal bool mask ``[1, 1, N, N]`` (``block_causal_mask``); ``timestep`` may be per frame
  (``[B, T]``, e.g. 0 on the context chunks and t on the last one).

Factories: ``tiny_causal_wan`` (CPU, tests and the example) and ``causal_wan_1_3b`` (Wan2.1-T2V-1.3B
sizes, bf16, CUDA: the streaming benchmark). ``stream_generate`` runs the chunk-by-chunk sampler
(flow-matching Euler steps, then the timestep-0 cache forward) and times each chunk.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .models import _need_diffusers

_need_diffusers()
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402

__all__ = ["CausalWanTransformer3DModel", "CausalWanAttnProcessor", "CausalWanOutput", "block_causal_mask",
           "append_kv", "cached_frames", "tiny_causal_wan", "causal_wan_1_3b", "stream_generate", "streaming_batch",
           "training_batch", "euler_sigmas"]


def block_causal_mask(frames: int, tokens_per_frame: int, chunk_frames: int, device=None) -> torch.Tensor:
    """``[1, 1, N, N]`` bool (True = attend): query frame ``t`` sees the key frames of its own chunk
    and of the earlier ones (chunks of ``chunk_frames`` frames; the last may be shorter)."""
    f = torch.arange(frames * tokens_per_frame, device=device) // tokens_per_frame
    visible_end = torch.clamp((f // chunk_frames + 1) * chunk_frames, max=frames)
    return (f[None, :] < visible_end[:, None])[None, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``[B, N, heads, D]``: channel pairs (2i, 2i+1) rotated by the angle of their
    position; ``cos``/``sin`` ``[1, N, 1, D/2]`` float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class CausalWanAttnProcessor:
    """Self-attention of a causal Wan block over ``kv_cache`` ‖ the new tokens.

    Returns ``(output, key, value)``: the new tokens' keys/values ``[B, N, heads, D]`` (after RoPE),
    what a cache stores. ``kv_cache``: ``{"key", "value"}`` of the earlier frames, or None;
    ``attention_mask``: the training mode's block-causal mask, or None."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, kv_cache: Optional[dict] = None):
        if getattr(attn, "fused_projections", False):
            raise ValueError("CausalWanAttnProcessor: fused QKV projections are not supported; call "
                             "unfuse_projections() on the model first")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        keys, values = k, v
        if kv_cache is not None:
            keys = torch.cat([kv_cache["key"], k], dim=1)
            values = torch.cat([kv_cache["value"], v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, k, v


@dataclass
class CausalWanOutput(BaseOutput):
    """``sample``: the flow prediction of the new frames; ``kv``: per layer, the new frames'
    ``{"key", "value"}`` (``return_kv=True``), else None."""

    sample: torch.Tensor
    kv: Optional[list] = None


def cached_frames(kv_cache: Optional[list], tokens_per_frame: int) -> int:
    """Frames held by ``kv_cache`` (0 for None)."""
    if not kv_cache:
        return 0
    n = int(kv_cache[0]["key"].shape[1])
    if n % tokens_per_frame:
        raise ValueError(f"kv_cache holds {n} tokens per layer, not whole frames of {tokens_per_frame} tokens: "
                         f"pass the caches this model returned for frames of the same size")
    return n // tokens_per_frame


def append_kv(kv_cache: Optional[list], new: list, max_frames: Optional[int] = None,
              tokens_per_frame: Optional[int] = None) -> list:
    """The cache after a chunk: per layer, the old keys/values followed by ``new`` (a forward's
    ``kv``). With ``max_frames`` (and ``tokens_per_frame``) only the last ``max_frames`` frames are
    kept (a rolling window; RoPE positions then keep counting from the absolute frame index, which
    the caller passes as ``start_frame``)."""
    if kv_cache is None:
        out = [dict(key=n["key"], value=n["value"]) for n in new]
    else:
        if len(kv_cache) != len(new):
            raise ValueError(f"kv_cache has {len(kv_cache)} layers, the new keys/values {len(new)}")
        out = [dict(key=torch.cat([c["key"], n["key"]], 1), value=torch.cat([c["value"], n["value"]], 1))
               for c, n in zip(kv_cache, new)]
    if max_frames is not None:
        if not tokens_per_frame:
            raise ValueError("append_kv(max_frames=...) needs tokens_per_frame")
        keep = max_frames * tokens_per_frame
        out = [dict(key=c["key"][:, -keep:], value=c["value"][:, -keep:]) for c in out]
    return out


class CausalWanTransformer3DModel(WanTransformer3DModel):
    """diffusers' Wan made chunk-causal (module docstring). Config: Wan's, plus ``chunk_frames``
    (latent frames per chunk, 3 as in Self-Forcing)."""

    @register_to_config
    def __init__(self, patch_size: tuple = (1, 2, 2), num_attention_heads: int = 40, attention_head_dim: int = 128,
                 in_channels: int = 16, out_channels: int = 16, text_dim: int = 4096, freq_dim: int = 256,
                 ffn_dim: int = 13824, num_layers: int = 40, cross_attn_norm: bool = True,
                 qk_norm: Optional[str] = "rms_norm_across_heads", eps: float = 1e-6, rope_max_seq_len: int = 1024,
                 chunk_frames: int = 3):
        super().__init__(patch_size=patch_size, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
                         text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers,
                         cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, rope_max_seq_len=rope_max_seq_len)
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames}: at least 1 latent frame per chunk")
        for block in self.blocks:
            block.attn1.set_processor(CausalWanAttnProcessor())

    # ------------------------------------------------------------------ pieces of the forward
    def _rope(self, frames: int, height: int, width: int, start: int, device) -> tuple:
        """``(cos, sin)`` ``[1, N, 1, D/2]`` of Wan's 3D RoPE for frames ``start .. start + frames``."""
        rope = self.rope
        if start + frames > rope.max_seq_len:
            raise ValueError(f"frames {start}..{start + frames - 1}: beyond rope_max_seq_len={rope.max_seq_len}")
        sizes = [rope.t_dim // 2, rope.h_dim // 2, rope.w_dim // 2]
        out = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            half = table[:, 0::2].to(device=device, dtype=torch.float32)  # one angle per channel pair
            t, h, w = half.split(sizes, dim=1)
            t = t[start:start + frames].view(frames, 1, 1, -1).expand(frames, height, width, -1)
            h = h[:height].view(1, height, 1, -1).expand(frames, height, width, -1)
            w = w[:width].view(1, 1, width, -1).expand(frames, height, width, -1)
            out.append(torch.cat([t, h, w], dim=-1).reshape(1, frames * height * width, 1, -1))
        return tuple(out)

    def _block(self, block, x, text, tproj, rotary, mask, cache):
        """One ``WanTransformerBlock`` with its self-attention over the cache: ``(x, key, value)``."""
        if tproj.ndim == 4:  # per token: [B, N, 6, D]
            mods = (block.scale_shift_table.unsqueeze(0) + tproj.float()).chunk(6, dim=2)
            mods = [m.squeeze(2) for m in mods]
        else:  # [B, 6, D]
            mods = (block.scale_shift_table + tproj.float()).chunk(6, dim=1)
        shift, scale, gate, c_shift, c_scale, c_gate = mods
        h = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        attn, key, value = block.attn1(h, None, mask, rotary, kv_cache=cache)
        x = (x.float() + attn * gate).type_as(x)
        x = x + block.attn2(block.norm2(x.float()).type_as(x), text, None, None)
        h = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        x = (x.float() + block.ffn(h).float() * c_gate).type_as(x)
        return x, key, value

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                kv_cache: Optional[list] = None, start_frame: Optional[int] = None, return_kv: bool = False,
                return_dict: bool = True):
        """Denoise ``hidden_states`` ``[B, C, T, H, W]`` (module docstring for the two modes).
        ``timestep``: ``[B]``, or ``[B, T]`` per latent frame; ``kv_cache``: one ``{"key", "value"}``
        per layer (``[B, cached tokens, heads, head_dim]``) or None; ``start_frame``: the RoPE
        position of the first new frame (default: the frames in the cache)."""
        B, _, T, Hl, Wl = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        frames, height, width = T // p_t, Hl // p_h, Wl // p_w
        hw = height * width
        if kv_cache is not None and len(kv_cache) != len(self.blocks):
            raise ValueError(f"kv_cache has {len(kv_cache)} entries; the model has {len(self.blocks)} layers "
                             f"(one {{'key', 'value'}} dict per layer)")
        if kv_cache is not None and frames > self.config.chunk_frames:
            raise ValueError(f"with a kv_cache, hidden_states is one chunk of at most {self.config.chunk_frames} "
                             f"latent frames; got {frames}")
        start = cached_frames(kv_cache, hw) if start_frame is None else int(start_frame)
        rotary = self._rope(frames, height, width, start, hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        if timestep.ndim == 2:  # per frame -> per token
            if timestep.shape[1] != frames:
                raise ValueError(f"timestep of shape {tuple(timestep.shape)}: per-frame timesteps need "
                                 f"[B, {frames}]")
            temb, tproj, text, _ = self.condition_embedder(timestep.flatten(), encoder_hidden_states, None,
                                                           timestep_seq_len=frames)
            temb = temb.repeat_interleave(hw, dim=1)
            tproj = tproj.unflatten(2, (6, -1)).repeat_interleave(hw, dim=1)
        else:
            temb, tproj, text, _ = self.condition_embedder(timestep, encoder_hidden_states, None)
            tproj = tproj.unflatten(1, (6, -1))

        mask = None
        if kv_cache is None and frames > self.config.chunk_frames:  # training: the whole clip, block-causal
            mask = block_causal_mask(frames, hw, self.config.chunk_frames, device=x.device)

        new_kv = []
        for i, block in enumerate(self.blocks):
            x, key, value = self._block(block, x, text, tproj, rotary, mask,
                                        kv_cache[i] if kv_cache is not None else None)
            new_kv.append(dict(key=key, value=value))

        if temb.ndim == 3:  # per token
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(B, frames, height, width, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        sample = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        kv = new_kv if return_kv else None
        if not return_dict:
            return (sample, kv) if return_kv else (sample,)
        return CausalWanOutput(sample=sample, kv=kv)


# ---------------------------------------------------------------------------------------- factories
def tiny_causal_wan(layers: int = 2, heads: int = 2, head_dim: int = 16, chunk_frames: int = 3, seed: int = 0,
                    dtype=torch.float32, device="cpu") -> CausalWanTransformer3DModel:
    """A tiny random causal Wan (4 latent channels, patch 1×2×2, text width 32) for CPU tests."""
    torch.manual_seed(seed)
    m = CausalWanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                    in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                    num_layers=layers, rope_max_seq_len=64, chunk_frames=chunk_frames)
    return m.to(device, dtype).eval()


def causal_wan_1_3b(chunk_frames: int = 3, seed: int = 0, dtype=torch.bfloat16,
                    device="cuda") -> CausalWanTransformer3DModel:
    """Wan2.1-T2V-1.3B sizes (30 layers, 12 heads × 128, FFN 8960, text 4096), random weights,
    made chunk-causal: the streaming benchmark's generator (480p: latents 16×21×60×104)."""
    torch.manual_seed(seed)
    with torch.device(device):
        m = CausalWanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                        num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        eps=1e-6, chunk_frames=chunk_frames)
    return m.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------- sampling
def euler_sigmas(steps: int) -> list:
    """Noise levels of a ``steps``-step flow-matching sampler from 1 down to 0 (evenly spaced, as
    Self-Forcing's 4 steps 1000/750/500/250); the model's timestep is ``1000·σ``."""
    if steps < 1:
        raise ValueError(f"steps={steps}: at least one denoising step")
    return [1.0 - i / steps for i in range(steps + 1)]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def stream_generate(model, noise: torch.Tensor, encoder_hidden_states: torch.Tensor, steps: int = 4,
                    chunks: Optional[int] = None, kv_cache: Optional[list] = None,
                    on_chunk: Optional[Callable] = None) -> tuple[torch.Tensor, list, list]:
    """Generate a video chunk by chunk: ``noise`` ``[B, C, T, H, W]`` (``T`` latent frames, in chunks of
    the model's ``chunk_frames``); per chunk, ``steps`` flow-matching Euler steps (each one forward
    over the new chunk with the KV cache), then one forward at timestep 0 on the clean chunk whose
    keys/values are appended to the cache (Self-Forcing's cache update). ``model`` may be an
    optimized copy. Stops after ``chunks`` chunks when given; ``kv_cache``: a cache to continue
    from. Returns ``(latents of the generated frames, per-chunk records, the KV cache)``; a record
    holds the chunk's frames, cached frames, wall seconds (CUDA synchronised) and forwards;
    ``on_chunk(record, latents of the chunk)`` is called after each chunk."""
    cfg = model.config
    C = int(cfg.chunk_frames)
    B, _, T = noise.shape[:3]
    hw = (noise.shape[3] // cfg.patch_size[1]) * (noise.shape[4] // cfg.patch_size[2])
    sigmas = euler_sigmas(steps)
    n_chunks = -(-T // C) if chunks is None else min(int(chunks), -(-T // C))
    cache, out, records = kv_cache, [], []
    for c in range(n_chunks):
        s, e = c * C, min(T, (c + 1) * C)
        _sync(noise.device)
        t0 = time.perf_counter()
        x = noise[:, :, s:e]
        for sig, nxt in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((B,), 1000.0 * sig, device=noise.device)  # float32: 750 is not a bfloat16
            v = model(x, t, encoder_hidden_states, kv_cache=cache, return_dict=False)[0]
            x = x + (nxt - sig) * v
        t = torch.zeros((B,), device=noise.device)
        kv = model(x, t, encoder_hidden_states, kv_cache=cache, return_kv=True, return_dict=False)[1]
        cache = append_kv(cache, kv)
        _sync(noise.device)
        rec = dict(chunk=c, frames=(s, e), cached_frames=cached_frames(cache, hw) - (e - s),
                   seconds=time.perf_counter() - t0, forwards=steps + 1)
        records.append(rec)
        out.append(x)
        if on_chunk is not None:
            on_chunk(rec, x)
    return torch.cat(out, dim=2), records, cache


def streaming_batch(model, noise: torch.Tensor, encoder_hidden_states: torch.Tensor, chunk: int = 2,
                    steps: int = 2, sigma: float = 1.0) -> dict:
    """The calibration batch of a streaming call: the first denoising step (noise level ``sigma``)
    of chunk ``chunk``, with the KV cache of chunks ``0 .. chunk-1`` generated by ``model`` in
    ``steps`` steps each. ``model(**batch)`` runs."""
    if chunk < 1:
        raise ValueError("streaming_batch(chunk=...): a chunk after the first (the first has no cache)")
    C = int(model.config.chunk_frames)
    if noise.shape[2] < (chunk + 1) * C:
        raise ValueError(f"noise has {noise.shape[2]} latent frames; chunk {chunk} needs {(chunk + 1) * C}")
    _, _, cache = stream_generate(model, noise, encoder_hidden_states, steps=steps, chunks=chunk)
    B = noise.shape[0]
    t = torch.full((B,), 1000.0 * sigma, device=noise.device)
    return dict(hidden_states=noise[:, :, chunk * C:(chunk + 1) * C], timestep=t,
                encoder_hidden_states=encoder_hidden_states, kv_cache=cache, return_dict=False)


def training_batch(noise: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep=500.0) -> dict:
    """The training-mode call over a whole clip (block-causal mask built by the model): ``timestep``
    a number (every frame) or a ``[B, T]`` tensor of per-frame timesteps."""
    B = noise.shape[0]
    t = timestep if isinstance(timestep, torch.Tensor) else torch.full((B,), float(timestep))
    return dict(hidden_states=noise, timestep=t.to(noise.device), encoder_hidden_states=encoder_hidden_states,
                return_dict=False)
