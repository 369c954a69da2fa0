"""Decide, per attention site, whether it can be rewritten and with which method."""
from __future__ import annotations

import fnmatch
from typing import Optional

from .config import METHODS, Config, DenseConfig, SitePlan, parse_config, resolve_args
from .site import AttentionSite

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


def unsupported_reason(site: AttentionSite, min_seq_len: int, forced: bool) -> Optional[str]:
    """Why ``site`` must stay exactly as the model wrote it, or None if it can be rewritten."""
    if not site.module_resolved:
        if not site.module_path:
            return ("captured in a graph resumed after a graph break, which does not say which module runs "
                    "it (the model's own forward calls no attention): cannot route it")
        return (f"the captured graph names its module '{site.module_path}', which matches no single module of "
                f"the model (graph break inside a submodule): cannot route it")
    if site.kind == "cross":
        if site.seq_k < site.seq_q:
            return f"cross-attention ({site.seq_q} queries × {site.seq_k} keys): few keys, not worth restructuring"
        return (f"cross-attention ({site.seq_q} queries × {site.seq_k} keys of another sequence): our structured "
                f"kernels are for a token sequence attending to itself")
    if site.is_causal:
        return "causal mask (is_causal=True): our structured kernels are bidirectional"
    if site.has_mask and not key_padding_ok(site):
        shp = "×".join(map(str, site.mask_shape)) if site.mask_shape else "?"
        return (f"attention mask ({site.mask_kind or 'mask'} {shp}): only text padding masks of joint attention "
                f"([B, 1, 1, N] keys, or [B, 1, N, N] = valid queries × valid keys) are supported")
    if site.dropout_training:
        return f"attention dropout p={site.dropout_p:g} in training mode"
    if site.scale_is_tensor:
        return "softmax scale is a tensor (learned or computed at run time)"
    if site.probs_escape:
        return "attention probabilities are used beyond the product with V"
    if site.head_dim != site.head_dim_v:
        return f"value head_dim {site.head_dim_v} differs from query head_dim {site.head_dim}"
    if site.dtype not in SUPPORTED_DTYPES:
        return f"dtype {site.dtype} (supported: {', '.join(SUPPORTED_DTYPES)})"
    if site.layout not in ("[B,H,N,D]", "[B*H,N,D]"):
        return f"q/k/v layout {site.layout} (need [B,H,N,D] or [B*H,N,D])"
    if not forced and site.seq_q < min_seq_len:
        return f"sequence too short (N={site.seq_q} < min_seq_len={min_seq_len}): dense is as fast"
    return None


def key_padding_ok(site: AttentionSite) -> bool:
    """A mask shaped like a padding mask over the text tokens of joint attention (what it holds is
    checked on every call: ``passes/keypad.py``)."""
    from .passes.keypad import is_padding_mask_shape

    return (site.kind == "joint" and site.mask_kind in ("bool", "additive")
            and is_padding_mask_shape(site.mask_shape, site.seq_q, site.seq_k))


def _override_for(site_id: str, overrides: Optional[dict]):
    if not overrides:
        return None
    for pat, spec in overrides.items():
        if fnmatch.fnmatchcase(site_id, pat):
            return spec
    return None


def default_config(site: AttentionSite, methods: tuple) -> Config:
    """The choice without calibration data: Monarch, then VMoBA, then dense, as allowed."""
    for m in ("monarch", "vmoba", "dense"):
        if m in methods:
            return parse_config(m)
    return DenseConfig()


def attention_flops(site: AttentionSite) -> int:
    return 4 * site.batch * site.heads * site.seq_q * site.seq_k * site.head_dim


def method_flops(site: AttentionSite, plan: SitePlan) -> Optional[int]:
    """Attention FLOPs of the chosen method (None when it depends on data not yet measured)."""
    if plan.method in ("dense", "original"):
        return attention_flops(site)
    if plan.method == "monarch":
        from .kernels.monarch.reference import monarch_flops
        a = plan.args
        return int(monarch_flops(site.batch, site.heads, site.seq_q, site.head_dim, grid=tuple(a["grid"]),
                                 block=tuple(a["block"]), text_before=a["text_before"],
                                 text_after=a["text_after"], steps=a["steps"]))
    if plan.method == "vmoba" and plan.density is not None:
        n_text = site.text_before + site.text_after
        nv = site.seq_q - n_text
        # text rows and columns stay dense; video×video pairs at the measured density
        dense_pairs = site.seq_q * site.seq_k
        video_pairs = nv * nv
        pairs = dense_pairs - video_pairs + plan.density * video_pairs
        return int(4 * site.batch * site.heads * pairs * site.head_dim)
    return None


def plan_sites(sites: list[AttentionSite], *, methods=METHODS, overrides: Optional[dict] = None,
               min_seq_len: int = 1024, chosen: Optional[dict] = None) -> dict[str, SitePlan]:
    """One ``SitePlan`` per site. ``chosen`` maps site ids to configs picked by calibration."""
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods={methods!r}: choose a non-empty subset of {METHODS}")
    plans: dict[str, SitePlan] = {}
    layer = 0
    for s in sites:
        spec = _override_for(s.site_id, overrides)
        plan = SitePlan(site_id=s.site_id, method="original", seq_q=s.seq_q, seq_k=s.seq_k,
                        head_dim=s.head_dim)
        plan.flops_before = attention_flops(s)
        why = unsupported_reason(s, min_seq_len, forced=spec is not None and spec != "original")
        if spec == "original":
            why = "pinned by overrides= to the model's own attention"
        if why is not None:
            plan.reason = why
            plan.flops_after = plan.flops_before
            plans[s.site_id] = plan
            continue
        if spec is not None:
            cfg, plan.source = parse_config(spec), "override"
            plan.reason = "pinned by overrides="
        elif chosen and s.site_id in chosen:
            cfg, plan.source = chosen[s.site_id], "profile"
            plan.reason = "chosen by calibration"
        else:
            cfg = default_config(s, methods)
            plan.reason = "default (no calibration profile)" if cfg.method != "dense" else "only dense allowed"
        plan.method = cfg.method
        plan.args = resolve_args(cfg, s, layer)
        layer += 1
        if s.has_mask:
            # dense too: with the padded tokens dropped our dense kernel runs unmasked, where the
            # model's masked SDPA cannot use FlashAttention and runs cuDNN at a third of its speed
            plan.args["key_padding"] = True
            plan.args.setdefault("text_before", s.text_before)  # where the padded text may be
            plan.args.setdefault("text_after", s.text_after)
            plan.reason += "; text padding mask: padded text tokens dropped at run time"
        if plan.method == "monarch" and s.grid is None:
            plan.reason += "; 1D blocks: " + s.grid_source
        f = method_flops(s, plan)
        plan.flops_after = f if f is not None else 0
        plans[s.site_id] = plan
    return plans
