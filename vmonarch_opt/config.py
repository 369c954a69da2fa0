"""Per-site method configurations and their resolution to op arguments."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

METHODS = ("monarch", "vmoba", "dense")


@dataclass(frozen=True)
class MonarchConfig:
    """Monarch attention. ``block=None`` picks frame blocks (1, H, W) when the grid is known
    (VMonarch), row groups for single-frame grids, and ~√N 1D blocks without a grid."""

    block: Optional[tuple] = None
    steps: int = 1
    recompute: bool = False
    method = "monarch"


@dataclass(frozen=True)
class VMoBAConfig:
    """Block-sparse VMoBA. ``chunk=None`` picks ~4 blocks per grid dimension; ``partition=None``
    follows the layer-wise 1D→2D→3D cycle. ``pooled_rest=True`` keeps the blocks a query did
    not select as one pooled key each (mean key + log block size, mean value) instead of
    dropping them: it restores the attention mass that broad heads spread over the rest, for
    ~1/block-size of dense attention's cost."""

    chunk: Optional[tuple] = None
    partition: Optional[str] = None
    threshold: float = 0.25
    topk: int = 0
    pooled_rest: bool = False
    method = "vmoba"


@dataclass(frozen=True)
class DenseConfig:
    """Our dense flash kernel (exact)."""

    method = "dense"


Config = Union[MonarchConfig, VMoBAConfig, DenseConfig]


def parse_config(spec) -> Config:
    """``"monarch" | "vmoba" | "dense"`` or a config object -> config object."""
    if isinstance(spec, (MonarchConfig, VMoBAConfig, DenseConfig)):
        return spec
    if spec == "monarch":
        return MonarchConfig()
    if spec == "vmoba":
        return VMoBAConfig()
    if spec == "dense":
        return DenseConfig()
    raise ValueError(f"unknown method {spec!r}: use 'monarch', 'vmoba', 'dense' or a MonarchConfig/VMoBAConfig/DenseConfig")


def default_monarch_block(grid: tuple) -> tuple:
    """Frame blocks for videos; for a single frame, groups of rows of about √N tokens; for a
    single position over time (factorised temporal attention), runs of about √T frames."""
    t, h, w = grid
    if t > 1 and h * w == 1:  # temporal attention over one position: ~√T frames per block
        return (max(1, math.isqrt(max(t - 1, 0)) + 1), 1, 1)
    if t > 1:
        return (1, h, w)
    n = h * w
    if h == 1:
        return (1, 1, max(1, math.isqrt(max(w - 1, 0)) + 1))
    rows = max(1, round(math.sqrt(n) / w)) if w < math.sqrt(n) else 1
    if rows == 1 and w > math.sqrt(n):
        return (1, 1, max(1, round(math.sqrt(n))))
    return (1, min(rows, h), w)


def default_vmoba_chunk(grid: tuple) -> tuple:
    return tuple(max(1, -(-g // 4)) for g in grid)


@dataclass
class SitePlan:
    """What happens to one site: the method, its resolved arguments, and why."""

    site_id: str
    method: str  # "monarch" | "vmoba" | "dense" | "original" (left untouched)
    args: dict = field(default_factory=dict)  # resolved op arguments (grid, block, ...)
    reason: str = ""  # for "original": why it was left dense; otherwise how the method was chosen
    source: str = "default"  # default | override | profile
    calibrated_error: Optional[float] = None
    flops_before: int = 0
    flops_after: int = 0
    density: Optional[float] = None  # VMoBA: fraction of video×video token pairs computed (measured)
    seq_q: int = 0
    seq_k: int = 0
    head_dim: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_args(cfg: Config, site, layer_index: int) -> dict:
    """Op arguments for ``cfg`` at ``site`` (grid and text placement from the site)."""
    nv = site.seq_q - site.text_before - site.text_after
    grid = tuple(site.grid) if site.grid else (1, 1, nv)
    if isinstance(cfg, MonarchConfig):
        if cfg.block is not None:
            block = tuple(cfg.block)
            if len(block) == 1:
                block = (1, 1, block[0])
            elif site.grid is None and len(block) == 3:  # no grid: 1D blocks of as many tokens
                block = (1, 1, math.prod(block))
        elif site.grid:
            block = default_monarch_block(grid)
        else:
            block = (1, 1, max(1, math.isqrt(max(nv - 1, 0)) + 1))
        if len(block) != 3 or any(b < 1 for b in block):
            raise ValueError(f"MonarchConfig.block={cfg.block!r}: give (bt, bh, bw) ≥ 1")
        return dict(grid=list(grid), block=[min(b, g) for b, g in zip(block, grid)],
                    text_before=site.text_before, text_after=site.text_after,
                    steps=int(cfg.steps), recompute=bool(cfg.recompute))
    if isinstance(cfg, VMoBAConfig):
        chunk = tuple(cfg.chunk) if cfg.chunk is not None else default_vmoba_chunk(grid)
        part = cfg.partition
        if part is None:
            try:
                from .kernels.vmoba.layout import vmoba_partition_for_layer
                part = vmoba_partition_for_layer(layer_index)
            except ImportError:
                part = ("1d", "2d", "3d")[layer_index % 3]
        return dict(grid=list(grid), chunk=list(chunk), text_before=site.text_before,
                    text_after=site.text_after, partition=part,
                    threshold=float(cfg.threshold), topk=int(cfg.topk),
                    pooled_rest=bool(cfg.pooled_rest))
    return {}
