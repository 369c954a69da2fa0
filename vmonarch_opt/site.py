"""``AttentionSite``: one attention computation found in a model's graph."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class AttentionSite:
    """Everything the optimizer knows about one attention site.

    ``site_id`` is the owning module's path (``blocks.3.attn1``), suffixed ``#k`` when that module
    computes more than one attention (``k`` = call order inside the module's forward).
    """

    site_id: str
    module_path: str
    ordinal: int
    form: str  # "sdpa" or "handwritten"
    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    dtype: str
    layout: str  # e.g. "[B,H,N,D]" or "[B*H,N,D]"
    scale: Optional[float] = None  # None = 1/sqrt(head_dim)
    scale_is_tensor: bool = False
    has_mask: bool = False
    mask_shape: Optional[tuple] = None
    mask_kind: str = ""  # "", "additive", "bool", "masked_fill"
    is_causal: bool = False
    dropout_p: float = 0.0
    dropout_training: bool = False
    probs_escape: bool = False  # softmax output used beyond the product with V (hand-written only)
    kind: str = "self"  # self | cross | joint | cached (queries = the newest tokens of the keys: a KV cache)
    grid: Optional[tuple] = None  # (T, H, W) latent video tokens, or None
    text_before: int = 0
    text_after: int = 0
    grid_source: str = ""
    grid_module: str = ""  # the patch-embedding module whose output gave the grid, if one did
    text_before_from: list = field(default_factory=list)  # patch embeddings of the tokens before the video
    graph_index: int = 0
    node_name: str = ""
    notes: list = field(default_factory=list)
    module_resolved: bool = True  # False: the captured graph did not say which module runs it
    causal_chunk: int = 0  # frames per chunk of a block-causal mask over the grid (0: none; passes/causal.py)
    cached_frames: int = 0  # kind "cached": key frames before the queries' first (the KV cache)
    structure_note: str = ""  # why a mask or a KV cache was not recognised as block-causal / whole frames

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5

    @property
    def shape(self) -> tuple:
        return (self.batch, self.heads, self.seq_q, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid) if self.grid else None
        d["mask_shape"] = list(self.mask_shape) if self.mask_shape else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AttentionSite":
        d = dict(d)
        d["grid"] = tuple(d["grid"]) if d.get("grid") else None
        d["mask_shape"] = tuple(d["mask_shape"]) if d.get("mask_shape") else None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
