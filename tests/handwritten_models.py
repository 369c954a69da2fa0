"""Attention modules written by hand in the forms users write them (test fixtures)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Base(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, o):
        b, h, n, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * d))


class MulScale(_Base):
    """scores = (q @ kᵀ) * scale"""

    def forward(self, x):
        q, k, v = self.split(x)
        a = (q @ k.transpose(-2, -1)) * (self.d ** -0.5)
        return self.merge(a.softmax(dim=-1) @ v)


class PreScaledQ(_Base):
    """timm style: q = q * scale before the product"""

    def forward(self, x):
        q, k, v = self.split(x)
        q = q * self.d ** -0.5
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        return self.merge(attn @ v)


class DivScaleMatmul(_Base):
    """torch.matmul with division by sqrt(d); F.softmax; scale on both q and k"""

    def forward(self, x):
        q, k, v = self.split(x)
        q, k = q * self.d ** -0.25, k * self.d ** -0.25
        s = torch.matmul(q, k.transpose(-1, -2)) / 1.0
        return self.merge(torch.matmul(F.softmax(s, dim=-1), v))


class BmmHeads(_Base):
    """[B*H, N, D] layout with torch.bmm and division"""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * self.h, n, self.d) for t in self.split(x))
        s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.d)
        o = torch.bmm(torch.softmax(s, dim=-1), v)
        return self.merge(o.reshape(b, self.h, n, self.d))


class Baddbmm(_Base):
    """old CogVideo style: baddbmm(empty, q, kᵀ, beta=0, alpha=scale)"""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b * self.h, n, self.d) for t in self.split(x))
        empty = torch.empty(b * self.h, n, n, dtype=q.dtype, device=q.device)
        s = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0, alpha=self.d ** -0.5)
        o = torch.bmm(s.softmax(-1), v)
        return self.merge(o.reshape(b, self.h, n, self.d))


class Einsum(_Base):
    """einsum for both products, softmax in float32 and cast back"""

    def forward(self, x):
        q, k, v = self.split(x)
        s = torch.einsum("bhid,bhjd->bhij", q, k) * self.d ** -0.5
        p = s.float().softmax(dim=-1).type_as(q)
        return self.merge(torch.einsum("bhij,bhjd->bhid", p, v))


class AdditiveMask(_Base):
    """an additive mask before the softmax (must stay dense)"""

    def forward(self, x, mask):
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1) * self.d ** -0.5 + mask
        return self.merge(s.softmax(-1) @ v)


class ReturnsProbs(_Base):
    """returns the attention probabilities too (must stay dense)"""

    def forward(self, x):
        q, k, v = self.split(x)
        p = (q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1)
        return self.merge(p @ v), p


class SdpaForms(_Base):
    """F.scaled_dot_product_attention in positional, keyword and scale= forms"""

    def forward(self, x):
        q, k, v = self.split(x)
        o1 = F.scaled_dot_product_attention(q, k, v)
        o2 = F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.3)
        return self.merge(o1 + o2)


class Causal(_Base):
    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class SelfAttention(nn.Module):
    """Plain SDPA self-attention with a residual (x + proj(attention))."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Stack(nn.Module):
    """Several blocks of one attention form with MLPs in between."""

    def __init__(self, cls, depth=2, dim=32, heads=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": cls(dim, heads), "mlp": nn.Linear(dim, dim)})
                                    for _ in range(depth))

    def forward(self, x, *extra):
        for blk in self.blocks:
            out = blk["attn"](x, *extra)
            out = out[0] if isinstance(out, tuple) else out
            x = x + out
            x = x + blk["mlp"](x)
        return x


class TinyViT(nn.Module):
    """An image ViT: conv patch embedding, a class token, pre-norm blocks with timm-style attention."""

    def __init__(self, img=32, patch=4, dim=32, heads=2, depth=2, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(dim), "attn": PreScaledQ(dim, heads),
                                                   "mlp": nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim),
                                                                        nn.GELU(), nn.Linear(2 * dim, dim))})
                                    for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = x + blk["attn"](blk["norm"](x))
            x = x + blk["mlp"](x)
        return self.head(x[:, 0])


HANDWRITTEN = [MulScale, PreScaledQ, DivScaleMatmul, BmmHeads, Baddbmm, Einsum]


def _all_to_all(x: torch.Tensor, scatter: int, gather: int) -> torch.Tensor:
    """Split ``x`` along ``scatter`` into one part per rank, send part r to rank r, and concatenate
    what every rank sent along ``gather`` (rank order)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    p = dist.get_world_size()
    parts = torch.stack(x.chunk(p, dim=scatter)).contiguous()  # [p, ...]: part r goes to rank r
    got = funcol.all_to_all_single(parts.flatten(), None, None, dist.group.WORLD)
    got = funcol.wait_tensor(got).reshape(parts.shape)
    return torch.cat(got.unbind(0), dim=gather)


class HandAttentionCore(nn.Module):
    """softmax(q·kᵀ·scale)·v written by hand on [B, heads, N, D]."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v


class UlyssesAttention(nn.Module):
    """Hand-written Ulysses sequence parallelism (DeepSpeed-style): this rank's run of the sequence
    in; q/k/v exchanged all-to-all so that the attention core sees every token of heads/P heads;
    the output exchanged back. ``ulysses=False``: plain self-attention on the whole sequence."""

    def __init__(self, dim=32, heads=2, ulysses=True):
        super().__init__()
        self.h, self.d, self.ulysses = heads, dim // heads, ulysses
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.core = HandAttentionCore(self.d ** -0.5)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)  # [B, H, n, D]
        if self.ulysses:
            q, k, v = (_all_to_all(t, scatter=1, gather=2) for t in (q, k, v))  # [B, H/P, N, D]
        o = self.core(q, k, v)
        if self.ulysses:
            o = _all_to_all(o, scatter=2, gather=1)  # [B, H, n, D]
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class UlyssesStack(nn.Module):
    """Blocks of :class:`UlyssesAttention` and MLPs; the full sequence in and out, each rank of the
    default process group working on its run of tokens in between (split at the input, all-gathered
    at the output). ``ulysses=False``: the same model in one process."""

    def __init__(self, depth=2, dim=32, heads=2, ulysses=True):
        super().__init__()
        self.ulysses = ulysses
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": UlyssesAttention(dim, heads, ulysses),
                                                   "mlp": nn.Linear(dim, dim)}) for _ in range(depth))

    def forward(self, x):
        import torch.distributed as dist

        parallel = self.ulysses
        if parallel:
            x = x.chunk(dist.get_world_size(), dim=1)[dist.get_rank()]
        for blk in self.blocks:
            x = x + blk["attn"](x)
            x = x + blk["mlp"](x)
        if parallel:
            import torch.distributed._functional_collectives as funcol

            x = funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), gather_dim=1, group=dist.group.WORLD))
        return x
