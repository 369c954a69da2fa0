"""A small video diffusion transformer trained by us, shipped with its weights as a fixture.

We cannot download pretrained video models here, so fidelity ("how different is my video?") is
measured on this stand-in: a DiT over pixel videos (3×16×32×32 by default) cut into 1×2×2
patches, i.e. a 16×16×16 = 4096-token latent grid (t, h, w) — the same attention layout as Wan
or HunyuanVideo, at a size a CPU can run.

* :class:`TinyVideoDiT` — Conv3d patch embedding, ``depth`` pre-norm transformer blocks with
  adaLN-single timestep/class conditioning (PixArt-α style: one shared MLP produces the six
  modulation vectors, each block adds its own learned table), per-head RMS qk-norm, 3D rotary
  embeddings over (t, h, w) and ``F.scaled_dot_product_attention`` in the ``[B, heads, N, D]``
  layout. It predicts the flow-matching velocity ``v = noise - x0``.
* :func:`load_tiny_video_dit` — the shipped weights (``tiny_video_dit.safetensors`` next to this file,
  trained by ``examples/train_tiny_video_dit.py``), offline.
* :func:`sample` — a deterministic Euler sampler of the rectified-flow ODE
  ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0``; one noise tensor per seed, so a video
  depends only on its seed and class, not on what else is in the batch.
* :func:`procedural_videos` — the training distribution (bouncing shapes, camera pans over
  textures, both at once; ``detail=`` adds fine moving patterns — the shipped fixture was trained
  with ``detail=1.0``, recorded as ``model.data_detail``), also handy as a realistic calibration batch.
* :func:`attention_stats` — per-layer attention entropy and where the attention mass goes.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vmonarch_opt.switch import set_original_attention

__all__ = ["TinyVideoDiT", "load_tiny_video_dit", "sample", "procedural_videos", "attention_stats",
           "calib_batch", "FIXTURE", "CLASS_NAMES"]

FIXTURE = Path(__file__).resolve().parent / "tiny_video_dit.safetensors"
CLASS_NAMES = ("bouncing shapes", "camera pan over texture", "shapes over panning texture")


# ----------------------------------------------------------------------------- building blocks
def _timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``1000·t`` (t in [0, 1]), as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to the t, h and w rotary embeddings (each even)."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    t = 2 * (head_dim // 8)  # a quarter to time, the rest split between h and w
    h = 2 * ((head_dim - t) // 4)
    return t, h, head_dim - t - h


def rope_3d(grid: tuple[int, int, int], head_dim: int, device, theta: float = 10000.0):
    """cos/sin tables ``[N, head_dim/2]`` for tokens in (t, h, w) row-major order."""
    T, H, W = grid
    pos = [torch.arange(n, device=device, dtype=torch.float32) for n in (T, H, W)]
    angles = []
    for p, d, axis in zip(pos, rope_split(head_dim), range(3)):
        freqs = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        a = p[:, None] * freqs[None]  # [n, d/2]
        shape = [1, 1, 1, d // 2]
        shape[axis] = a.shape[0]
        angles.append(a.view(shape).expand(T, H, W, d // 2))
    ang = torch.cat(angles, dim=-1).reshape(T * H * W, head_dim // 2)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x [B, N, heads, D]`` by the angles of each token."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Self-attention with qk-norm and 3D RoPE through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.record: Optional[list] = None  # set by record_qkv()
        self.attend: Optional[Callable] = None  # set by attention_replaced(): fn(q, k, v) instead of SDPA

    def forward(self, x, cos, sin):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).unbind(2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.record is not None:
            self.record.append((q.detach(), k.detach(), v.detach()))
        o = F.scaled_dot_product_attention(q, k, v) if self.attend is None else self.attend(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, mod, cos, sin):
        # mod: [B, 6, dim] from the shared adaLN MLP
        sh1, sc1, g1, sh2, sc2, g2 = (self.scale_shift_table[None] + mod).unbind(1)
        h = self.norm1(x) * (1 + sc1[:, None]) + sh1[:, None]
        x = x + g1[:, None] * self.attn(h, cos, sin)
        h = self.norm2(x) * (1 + sc2[:, None]) + sh2[:, None]
        return x + g2[:, None] * self.mlp(h)


class TinyVideoDiT(nn.Module):
    """Video DiT predicting the flow-matching velocity.

    ``forward(x, t, y=None)``: ``x [B, C, T, H, W]`` noisy video, ``t [B]`` in [0, 1] (1 = pure
    noise), ``y [B]`` class labels in ``[0, num_classes)`` (None or ``num_classes`` = unconditional).
    Any T, and H, W divisible by ``patch``, are accepted (the rotary tables follow the grid).
    """

    def __init__(self, in_channels: int = 3, patch: int = 2, dim: int = 192, depth: int = 6, heads: int = 3,
                 mlp_ratio: float = 3.0, num_classes: int = len(CLASS_NAMES), freq_dim: int = 256):
        super().__init__()
        self.config = dict(in_channels=in_channels, patch=patch, dim=dim, depth=depth, heads=heads,
                           mlp_ratio=mlp_ratio, num_classes=num_classes, freq_dim=freq_dim)
        self.in_channels, self.patch, self.dim, self.heads = in_channels, patch, dim, heads
        self.num_classes, self.freq_dim = num_classes, freq_dim
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=(1, patch, patch), stride=(1, patch, patch))
        self.t_embed = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)  # last row = unconditional
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.proj_out = nn.Linear(dim, patch * patch * in_channels)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        nn.init.zeros_(self.t_block[1].weight)  # adaLN-zero style start: gates begin at the table values
        nn.init.zeros_(self.proj_out.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [batch, {self.in_channels}, frames, height, width], got {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        p = self.patch
        if H % p or W % p:
            raise ValueError(f"height {H} and width {W} must be multiples of the patch size {p}")
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)
        if y is None:
            y = torch.full((B,), self.num_classes, device=x.device, dtype=torch.long)
        h = self.patch_embed(x)  # [B, dim, T, H/p, W/p]
        grid = (T, H // p, W // p)
        h = h.flatten(2).transpose(1, 2)  # [B, N, dim], tokens in (t, h, w) order
        c = self.t_embed(_timestep_features(t, self.freq_dim).to(h.dtype)) + self.y_embed(y.reshape(B))
        mod = self.t_block(c).view(B, 6, self.dim)
        cos, sin = rope_3d(grid, self.dim // self.heads, x.device)
        for blk in self.blocks:
            h = blk(h, mod, cos, sin)
        sh, sc = (self.final_table[None] + c[:, None]).unbind(1)
        h = self.norm_out(h) * (1 + sc[:, None]) + sh[:, None]
        h = self.proj_out(h)  # [B, N, p*p*C]
        h = h.view(B, T, H // p, W // p, p, p, C).permute(0, 6, 1, 2, 4, 3, 5)
        return h.reshape(B, C, T, H, W)


# ----------------------------------------------------------------------------- weights
def save_tiny_video_dit(model: TinyVideoDiT, path, dtype=torch.float16, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.config), "format": "vmonarch_opt.tiny_video_dit/1"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file(state, str(path), metadata=meta)


def load_tiny_video_dit(path=None, device="cpu", dtype=torch.float32) -> TinyVideoDiT:
    """The shipped, trained model (eval mode, on ``device`` in ``dtype``); no network needed."""
    from safetensors import safe_open

    path = Path(path) if path is not None else FIXTURE
    if not path.exists():
        raise FileNotFoundError(f"{path}: tiny video DiT weights not found; train them with "
                                f"`python examples/train_tiny_video_dit.py` or check out "
                                f"vmonarch_fixtures/tiny_video_dit.safetensors from the repository")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path}: not a tiny video DiT checkpoint (no 'config' metadata)")
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = TinyVideoDiT(**json.loads(meta["config"]))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.metadata = meta
    model.data_detail = float(meta.get("detail", 0.0))  # procedural_videos(detail=) it was trained on
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- sampling
def timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0; ``shift > 1`` spends more steps at high noise (SD3)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def initial_noise(seeds: Sequence[int], shape: tuple, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One standard-normal video per seed, drawn on the CPU (identical on every device)."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(model: nn.Module, seeds: Sequence[int], classes: Optional[Sequence[int]] = None, *, steps: int = 20,
           frames: int = 16, height: int = 32, width: int = 32, shift: float = 1.0, device=None,
           dtype=None, in_channels: int = 3, dense_model: Optional[nn.Module] = None,
           dense_steps: int = 0) -> torch.Tensor:
    """Videos ``[len(seeds), C, frames, height, width]`` in about [-1, 1] by Euler steps of the
    rectified-flow ODE. Deterministic: the same seeds, classes and model give the same videos.
    ``classes=None`` takes ``seed % 3``; ``model`` may be any module with TinyVideoDiT's call
    signature (an optimized copy, a compiled one). The first ``dense_steps`` steps — the
    high-noise ones, which fix the video's layout — run exact attention (dense warm-up steps, as
    sparse-attention video samplers commonly do): ``dense_model`` (the original model) if given,
    else ``model`` itself with ``vmonarch_opt.set_original_attention``."""
    optimized = "vmonarch" in getattr(model, "__dict__", {})
    if dense_steps and dense_model is None and not optimized:
        raise ValueError("dense_steps > 0 needs dense_model= (the model with its own attention) or a model "
                         "returned by vmonarch_opt.optimize")
    p = next(iter(model.parameters()), None)
    device = device if device is not None else (p.device if p is not None else "cpu")
    dtype = dtype if dtype is not None else (p.dtype if p is not None else torch.float32)
    ncls = getattr(model, "num_classes", len(CLASS_NAMES))
    classes = [int(s) % ncls for s in seeds] if classes is None else list(classes)
    if len(classes) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(classes)} classes")
    x = initial_noise(seeds, (in_channels, frames, height, width), device, torch.float32)
    y = torch.tensor(classes, device=device, dtype=torch.long)
    ts = timesteps(steps, shift)
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        tt = torch.full((len(seeds),), t, device=device, dtype=dtype)
        dense = i < dense_steps
        net = dense_model if dense and dense_model is not None else model
        with set_original_attention(model) if dense and net is model else contextlib.nullcontext():
            v = net(x.to(dtype), tt, y).float()
        x = x + (t_next - t) * v
    return x


# ----------------------------------------------------------------------------- data
def _bounce(p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect positions into [lo, hi] (triangle wave): a point moving at constant speed bouncing
    off the walls."""
    span = hi - lo
    q = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(q < span, q, 2 * span - q)


def _texture(n, size_y, size_x, gen, device, oy, ox, k: int = 4, detail: float = 0.0):
    """Smooth random colour textures: sums of ``k`` random plane waves per channel, sampled at
    pixel coordinates shifted by ``(oy, ox)`` ([n, T]) — a camera pan when the offset moves."""
    ys = torch.arange(size_y, device=device, dtype=torch.float32)
    xs = torch.arange(size_x, device=device, dtype=torch.float32)
    freq = (torch.rand(n, 3, k, 2, generator=gen, device=device) * 2 - 1) * (2 * math.pi / 14)
    phase = torch.rand(n, 3, k, generator=gen, device=device) * 2 * math.pi
    amp = torch.rand(n, 3, k, generator=gen, device=device) / k ** 0.5
    Y = ys[None, None, :, None] + oy[:, :, None, None]  # [n, T, H, 1]
    X = xs[None, None, None, :] + ox[:, :, None, None]  # [n, T, 1, W]
    arg = (freq[:, :, :, 0, None, None, None] * Y[:, None, None] + freq[:, :, :, 1, None, None, None] * X[:, None, None]
           + phase[..., None, None, None])  # [n, 3, k, T, H, W]
    base = torch.rand(n, 3, 1, 1, 1, generator=gen, device=device) * 1.2 - 0.6
    tex = base + (amp[..., None, None, None] * torch.sin(arg)).sum(2)
    if detail > 0:
        tex = tex + detail * _waves(n, Y[:, None], X[:, None], gen, device)
    return tex.clamp(-1, 1)


def _waves(n, Y, X, gen, device, k: int = 12, periods: tuple = (2.5, 8.0)):
    """Fine detail: ``k`` plane waves per channel with periods in ``periods`` pixels and random
    directions, evaluated at coordinates ``Y``, ``X`` (broadcast to ``[n, 1, ...]``); unit-ish
    amplitude. Moves with whatever moves the coordinates (a pan, a shape)."""
    per = periods[0] + (periods[1] - periods[0]) * torch.rand(n, 3, k, generator=gen, device=device)
    ang = torch.rand(n, 3, k, generator=gen, device=device) * 2 * math.pi
    fy, fx = 2 * math.pi / per * torch.sin(ang), 2 * math.pi / per * torch.cos(ang)
    phase = torch.rand(n, 3, k, generator=gen, device=device) * 2 * math.pi
    extra = (None,) * (Y.dim() - 2)
    idx = (slice(None), slice(None), slice(None)) + extra
    arg = fy[idx] * Y[:, :, None] + fx[idx] * X[:, :, None] + phase[idx]
    return torch.sin(arg).sum(2) * (0.6 / k ** 0.5)


def procedural_videos(n: int, frames: int = 16, size: int = 32, *, classes: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None, device="cpu",
                      detail: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` procedural videos ``[n, 3, frames, size, size]`` in [-1, 1] and their classes.

    Class 0: 1–3 discs/squares of random colours bouncing off the walls over a flat background
    with a gentle gradient. Class 1: a camera pan (random direction, 0.3–1.5 px/frame) over a smooth
    random texture. Class 2: bouncing shapes over a panning texture. Shapes are anti-aliased.
    ``detail > 0`` adds fine patterns (periods 2.5–8 px) of that amplitude to the textures and
    inside the shapes, moving with them: every token then carries content of its own that the
    next frames carry at the moved position (closer to the latents of a real video VAE than
    smooth colour fields). ``detail=0`` draws exactly the videos it always drew.
    """
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
    dev = torch.device(device)
    if classes is None:
        classes = torch.randint(0, len(CLASS_NAMES), (n,), generator=gen, device=dev)
    classes = classes.to(dev)
    tt = torch.arange(frames, device=dev, dtype=torch.float32)

    # background: flat + gradient (class 0) or panning texture (classes 1, 2)
    ang = torch.rand(n, generator=gen, device=dev) * 2 * math.pi
    speed = 0.3 + 1.2 * torch.rand(n, generator=gen, device=dev)
    oy = (torch.sin(ang) * speed)[:, None] * tt[None] + 100 * torch.rand(n, 1, generator=gen, device=dev)
    ox = (torch.cos(ang) * speed)[:, None] * tt[None] + 100 * torch.rand(n, 1, generator=gen, device=dev)
    tex = _texture(n, size, size, gen, dev, oy, ox, detail=detail)
    flat = torch.rand(n, 3, 1, 1, 1, generator=gen, device=dev) * 1.6 - 0.8
    gdir = torch.randn(n, 2, generator=gen, device=dev) * 0.3
    coords = torch.arange(size, device=dev, dtype=torch.float32) / size - 0.5
    grad = gdir[:, 0, None, None] * coords[:, None] + gdir[:, 1, None, None] * coords[None, :]
    flat = (flat + grad[:, None, None]).clamp(-1, 1).expand(n, 3, frames, size, size)
    use_tex = (classes > 0).view(n, 1, 1, 1, 1)
    video = torch.where(use_tex, tex, flat).clone()

    # shapes (classes 0 and 2)
    max_shapes = 3
    count = torch.randint(1, max_shapes + 1, (n,), generator=gen, device=dev)
    ys = torch.arange(size, device=dev, dtype=torch.float32)
    for s in range(max_shapes):
        r = 3 + 4 * torch.rand(n, generator=gen, device=dev)
        p0 = torch.rand(n, 2, generator=gen, device=dev) * size
        vel = (torch.rand(n, 2, generator=gen, device=dev) * 2 - 1) * 2.5
        col = torch.rand(n, 3, generator=gen, device=dev) * 2 - 1
        square = torch.rand(n, generator=gen, device=dev) < 0.5
        cy = _bounce(p0[:, 0, None] + vel[:, 0, None] * tt, r[:, None], size - 1 - r[:, None])  # [n, T]
        cx = _bounce(p0[:, 1, None] + vel[:, 1, None] * tt, r[:, None], size - 1 - r[:, None])
        dy = ys[None, None, :, None] - cy[:, :, None, None]
        dx = ys[None, None, None, :] - cx[:, :, None, None]
        dist = torch.where(square.view(n, 1, 1, 1), torch.maximum(dy.abs(), dx.abs()), (dy ** 2 + dx ** 2).sqrt())
        alpha = (r.view(n, 1, 1, 1) + 0.5 - dist).clamp(0, 1)  # 1-pixel anti-aliased edge
        on = ((s < count) & (classes != 1)).view(n, 1, 1, 1).float()
        a = (alpha * on)[:, None]  # [n, 1, T, H, W]
        fill = col.view(n, 3, 1, 1, 1)
        if detail > 0:
            fill = fill + detail * _waves(n, dy[:, None], dx[:, None], gen, dev)
        video = video * (1 - a) + fill * a
    return video.clamp(-1, 1), classes


def calib_batch(n: int = 1, frames: int = 16, size: int = 32, t: float = 0.5, seed: int = 0, device="cpu",
                dtype=torch.float32, detail: float = 0.0) -> dict:
    """A realistic ``optimize`` calibration batch: procedural videos noised to time ``t``."""
    gen = torch.Generator().manual_seed(seed)
    x0, y = procedural_videos(n, frames, size, generator=gen, detail=detail)
    noise = torch.randn(x0.shape, generator=gen)
    xt = (1 - t) * x0 + t * noise
    return dict(x=xt.to(device, dtype), t=torch.full((n,), t, device=device, dtype=dtype), y=y.to(device))


# ----------------------------------------------------------------------------- analysis
@torch.no_grad()
def record_qkv(model: TinyVideoDiT, x, t, y=None) -> list[tuple]:
    """The ``(q, k, v)`` ``[B, heads, N, D]`` every layer's attention sees in one forward (after
    qk-norm and rotary embeddings: exactly what SDPA gets)."""
    attns = [b.attn for b in model.blocks]
    for a in attns:
        a.record = []
    try:
        model(x, t, y)
        return [a.record[0] for a in attns]
    finally:
        for a in attns:
            a.record = None


@contextlib.contextmanager
def attention_replaced(model: TinyVideoDiT, fn: Callable):
    """Within the block, every layer's attention is ``fn(q, k, v)`` (``[B, heads, N, D]`` after
    qk-norm and rotary embeddings) instead of SDPA: for analysis, e.g. the oracle bounds."""
    attns = [b.attn for b in model.blocks]
    for a in attns:
        a.attend = fn
    try:
        yield model
    finally:
        for a in attns:
            a.attend = None


@torch.no_grad()
def attention_stats(model: TinyVideoDiT, x, t, y=None, query_chunk: int = 512) -> list[dict]:
    """Per layer (mean over batch, heads and queries): attention entropy in nats, the entropy of
    uniform attention (log N), the mass each query puts on its own frame, and on the same spatial
    position in the other frames. Also the per-head entropies. Uses the model's own q/k."""
    recs = record_qkv(model, x, t, y)
    T = x.shape[2]
    Hh, Ww = x.shape[3] // model.patch, x.shape[4] // model.patch
    N = T * Hh * Ww
    frame = torch.arange(N, device=x.device) // (Hh * Ww)
    spatial = torch.arange(N, device=x.device) % (Hh * Ww)
    out = []
    for layer, (q, k, _) in enumerate(recs):
        q, k = q.float(), k.float()
        scale = q.shape[-1] ** -0.5
        ent = torch.zeros(q.shape[1], device=x.device)
        same_frame = torch.zeros((), device=x.device)
        same_pos = torch.zeros((), device=x.device)
        for s in range(0, N, query_chunk):
            e = slice(s, min(N, s + query_chunk))
            logits = torch.einsum("bhqd,bhkd->bhqk", q[:, :, e], k) * scale
            pr = logits.softmax(-1)
            ent += -(pr * logits.log_softmax(-1)).sum(-1).sum((0, 2))
            sf = (frame[e, None] == frame[None]).float()
            sp = ((spatial[e, None] == spatial[None]) & (frame[e, None] != frame[None])).float()
            same_frame += (pr * sf).sum()
            same_pos += (pr * sp).sum()
        denom = q.shape[0] * q.shape[1] * N
        per_head = (ent / (q.shape[0] * N)).tolist()
        out.append(dict(layer=layer, entropy=sum(per_head) / len(per_head), uniform_entropy=math.log(N),
                        same_frame_mass=(same_frame / denom).item(), uniform_same_frame=1.0 / T,
                        same_position_other_frames_mass=(same_pos / denom).item(),
                        head_entropy=per_head))
    return out
