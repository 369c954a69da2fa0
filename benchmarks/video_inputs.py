"""Structured synthetic q/k/v for video attention benchmarks and tests.

Random Gaussian q/k give near-uniform attention, which flatters every approximation method and
says nothing about video DiTs. ``make_video_qkv`` instead builds q/k/v the way a video DiT layer
sees them: projections of a smooth spatio-temporal content field with moving objects, rotated by
a 3D rotary position embedding over (t, h, w), so that attention is local in space and time,
follows objects across frames, and (in some heads) is global.

    from benchmarks.video_inputs import make_video_qkv
    q, k, v = make_video_qkv(grid=(21, 30, 52), heads=12, head_dim=128, dtype=torch.bfloat16,
                             device="cuda", text_tokens=0)

Everything is generated on ``device`` with vectorised torch ops (a Wan-14B 720p shape takes well
under a second on a GPU) from one ``torch.Generator`` seeded with ``seed``: same arguments, same
tensors.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["make_video_qkv", "HEAD_KINDS", "rope_3d_freqs"]

HEAD_KINDS = ("spatial", "temporal", "global")

_DEFAULT_KNOBS = dict(
    channels=32,
    spatial_corr=2.5,
    temporal_corr=3.0,
    num_objects=4,
    object_radius=0.12,
    object_speed=0.8,
    object_strength=2.0,
    head_kinds=HEAD_KINDS,
    local_logit=9.0,
    temporal_logit=6.0,
    content_logit=4.0,
    global_content_logit=5.0,
    rope_theta=10000.0,
    noise=0.1,
    text_logit=6.0,
)


def rope_3d_freqs(head_dim: int, theta: float = 10000.0):
    """Split the ``head_dim/2`` rotary pairs over the (t, h, w) axes like Wan2.1 does.

    Returns ``(axis, freq)``: for each pair, the axis it rotates with (0=t, 1=h, 2=w) and its
    angular frequency (radians per token).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    pairs = head_dim // 2
    p_h = p_w = pairs // 3
    p_t = pairs - p_h - p_w
    axis, freq = [], []
    for ax, p in ((0, p_t), (1, p_h), (2, p_w)):
        k = torch.arange(p, dtype=torch.float64)
        axis.append(torch.full((p,), ax, dtype=torch.long))
        freq.append(theta ** (-k / max(p, 1)))
    return torch.cat(axis), torch.cat(freq)


def _smooth_noise(shape, corr_t, corr_h, corr_w, gen, device):
    """Gaussian noise low-pass filtered in Fourier space over the first three axes, unit variance."""
    T, H, W, C = shape
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    X = torch.fft.fftn(x, dim=(0, 1, 2))
    ft = torch.fft.fftfreq(T, device=device)[:, None, None]
    fh = torch.fft.fftfreq(H, device=device)[None, :, None]
    fw = torch.fft.fftfreq(W, device=device)[None, None, :]
    g = torch.exp(-2 * math.pi ** 2 * ((ft * corr_t) ** 2 + (fh * corr_h) ** 2 + (fw * corr_w) ** 2))
    y = torch.fft.ifftn(X * g[..., None], dim=(0, 1, 2)).real
    return y / y.std().clamp_min(1e-6)


def make_video_qkv(grid: Sequence[int] = (4, 8, 8), heads: int = 4, head_dim: int = 64, batch: int = 1,
                   text_tokens: int = 0, text_position: str = "before", dtype=torch.float32,
                   device="cpu", seed: int = 0, **knobs):
    """q, k, v of shape ``[batch, heads, N, head_dim]`` with video structure, ``N = text_tokens + T*H*W``.

    Video tokens are ordered (t, h, w) row-major; text tokens (if any) sit before or after them.

    Construction, per batch element:

    * a content field ``X[t, h, w, :]`` (``channels`` dims): Gaussian noise low-pass filtered with
      correlation lengths ``temporal_corr`` (frames) and ``spatial_corr`` (tokens), plus
      ``num_objects`` moving blobs: each has a random feature vector (strength ``object_strength``),
      a radius ``object_radius`` (fraction of min(H, W)) and a constant velocity of up to
      ``object_speed`` tokens per frame, so the same features reappear at shifted positions in
      every frame (cross-frame correspondences);
    * per head, q = X Wq + p, k = X Wk + p with Wk = Wq + small noise (similar content attracts)
      and a constant positional vector p, then the 3D rotary embedding (pairs split over t/h/w as
      in Wan2.1, base ``rope_theta``) rotates q and k by their (t, h, w) position. The positional
      part then contributes ``sum_pairs |p|^2 cos(freq * delta)`` to the logit: a kernel peaked
      at zero displacement whose width per axis is set by how much of |p|^2 sits on that axis;
    * v = X Wv + noise.

    The rotary pairs carry positional weight in proportion to their frequency (slow pairs
    would only add a constant to every logit).

    Head kinds cycle through ``head_kinds`` (default ``("spatial", "temporal", "global")``):

    * ``"spatial"``: positional weight on all axes, peak positional logit ``local_logit``:
      attention local in space and time (a 3D neighbourhood), content adds ``content_logit``;
    * ``"temporal"``: positional weight on the h/w pairs only (``temporal_logit``): attention
      follows the same spatial position (and similar content) across all frames;
    * ``"global"``: no positional part; content-only logits scaled to ``global_content_logit``:
      broad, semantic attention over the whole clip.

    Logit values are after the 1/sqrt(head_dim) softmax scale, i.e. the values the softmax sees.

    Other knobs: ``noise`` (iid noise added to q, k, v, relative to their scale), ``text_logit``
    (text tokens are Gaussian embeddings without rotary embedding, projected with the same
    weights; their self logit is ``text_logit`` and the logits of video queries against text keys
    have a standard deviation of about ``text_logit / 2``).

    Unknown knob names raise a ValueError listing the valid ones.
    """
    bad = set(knobs) - set(_DEFAULT_KNOBS)
    if bad:
        raise ValueError(f"unknown knob(s) {sorted(bad)}; valid knobs: {sorted(_DEFAULT_KNOBS)}")
    kn = dict(_DEFAULT_KNOBS, **knobs)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be (T, H, W) with positive sizes, got {grid}")
    if text_position not in ("before", "after"):
        raise ValueError(f"text_position must be 'before' or 'after', got {text_position!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even (rotary pairs)")
    T, H, W = (int(g) for g in grid)
    D, C = int(head_dim), int(kn["channels"])
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    scale = 1.0 / math.sqrt(D)
    kinds = [kn["head_kinds"][h % len(kn["head_kinds"])] for h in range(heads)]
    for kd in kinds:
        if kd not in HEAD_KINDS:
            raise ValueError(f"head kind {kd!r} unknown; use one of {HEAD_KINDS}")

    # rotary tables over (t, h, w)
    axis, freq = rope_3d_freqs(D, kn["rope_theta"])
    axis, freq = axis.to(dev), freq.to(dev).float()
    tt, hh, ww = torch.meshgrid(torch.arange(T, device=dev), torch.arange(H, device=dev),
                                torch.arange(W, device=dev), indexing="ij")
    pos = torch.stack([tt, hh, ww], -1).reshape(-1, 3).float()            # [Nv, 3]
    ang = pos[:, axis] * freq                                             # [Nv, D/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):                                                          # x [..., Nv, D]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out

    # per-head weights and positional vectors
    Wq = torch.randn(heads, C, D, generator=gen, device=dev) / math.sqrt(C)
    Wk = Wq + 0.3 * torch.randn(heads, C, D, generator=gen, device=dev) / math.sqrt(C)
    Wv = torch.randn(heads, C, D, generator=gen, device=dev) / math.sqrt(C)
    p = torch.zeros(heads, D, device=dev)
    content_gain = torch.ones(heads, device=dev)
    for h, kd in enumerate(kinds):
        if kd == "global":
            content_gain[h] = kn["global_content_logit"]
            continue
        content_gain[h] = kn["content_logit"]
        # weight the rotary pairs by their frequency: the slow pairs barely change over the
        # grid and would only add a constant to every logit instead of localising attention
        w_pair = freq.clone()
        if kd == "temporal":
            w_pair[axis == 0] = 0.0
            target = kn["temporal_logit"]
        else:
            target = kn["local_logit"]
        # scale*|p|^2 = target; random phase per pair so p is not axis aligned
        amp = torch.sqrt(w_pair / w_pair.sum() * target / scale)
        phi = torch.rand(D // 2, generator=gen, device=dev) * 2 * math.pi
        p[h, 0::2] = amp * phi.cos()
        p[h, 1::2] = amp * phi.sin()

    n_text = int(text_tokens)
    N = n_text + T * H * W
    qs, ks, vs = [], [], []
    yy = torch.arange(H, device=dev).float()[:, None]
    xx = torch.arange(W, device=dev).float()[None, :]
    for b in range(batch):
        X = _smooth_noise((T, H, W, C), kn["temporal_corr"], kn["spatial_corr"], kn["spatial_corr"], gen, dev)
        rad = max(kn["object_radius"] * min(H, W), 0.5)
        for _ in range(int(kn["num_objects"])):
            feat = torch.randn(C, generator=gen, device=dev)
            feat = feat / feat.norm() * math.sqrt(C) * kn["object_strength"] / 2
            c0 = torch.rand(2, generator=gen, device=dev) * torch.tensor([H, W], device=dev).float()
            vel = (torch.rand(2, generator=gen, device=dev) * 2 - 1) * kn["object_speed"]
            for t in range(T):
                cy, cx = c0 + vel * t
                cy, cx = cy % H, cx % W
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                X[t] += torch.exp(-d2 / (2 * rad ** 2))[..., None] * feat
        X = X.reshape(T * H * W, C)
        X = X / X.std().clamp_min(1e-6)
        # content part: rescale so that scale * |x Wq|^2 ~ the head's content gain (self logit)
        cq = torch.einsum("nc,hcd->hnd", X, Wq)
        ck = torch.einsum("nc,hcd->hnd", X, Wk)
        norm = (cq.pow(2).sum(-1).mean(-1) * scale).sqrt().clamp_min(1e-6)  # [heads]
        g = (content_gain.sqrt() / norm)[:, None, None]
        q = rope(cq * g + p[:, None, :])
        k = rope(ck * g + p[:, None, :])
        v = torch.einsum("nc,hcd->hnd", X, Wv)
        if kn["noise"]:
            for t_ in (q, k, v):
                t_ += kn["noise"] * t_.std() * torch.randn(t_.shape, generator=gen, device=dev)
        if n_text:
            E = torch.randn(n_text, C, generator=gen, device=dev)
            tq = torch.einsum("nc,hcd->hnd", E, Wq)
            tk = torch.einsum("nc,hcd->hnd", E, Wk)
            tv = torch.einsum("nc,hcd->hnd", E, Wv)
            tg = (kn["text_logit"] / (tq.pow(2).sum(-1).mean(-1) * scale).clamp_min(1e-6)).sqrt()[:, None, None]
            tq, tk = tq * tg, tk * tg
            # text keys as video queries see them: logits of std text_logit / 2
            q_rms = q.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-6)[:, None, None]  # [heads,1,1]
            tk = tk / tk.norm(dim=-1, keepdim=True).clamp_min(1e-6) * (kn["text_logit"] / 2) / (scale * q_rms) * math.sqrt(D)
            if text_position == "before":
                q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
            else:
                q, k, v = torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    q, k, v = (torch.stack(x).to(dtype).contiguous() for x in (qs, ks, vs))
    assert q.shape == (batch, heads, N, D)
    return q, k, v
