"""Decide, per attention site, whether it can be rewritten and with which method."""
from __future__ import annotations

import fnmatch
import numbers
import warnings
from typing import Optional

from . import methods as registry
from .methods import Shape, causal
from .plan import ORIGINAL, SitePlan
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
    if site.kind == "cached" and not site.cached_frames:
        return f"KV-cache attention ({site.seq_q} queries × {site.seq_k} keys): {site.structure_note or 'not recognised'}"
    if site.is_causal:
        return ("token-causal mask (is_causal=True): our kernels run block-causal masks over whole frame chunks, "
                "not a causal order of single tokens")
    if site.has_mask and not site.causal_chunk and not key_padding_ok(site):
        shp = "×".join(map(str, site.mask_shape)) if site.mask_shape else "?"
        extra = f" (it is not block-causal: {site.structure_note})" if site.structure_note else ""
        return (f"attention mask ({site.mask_kind or 'mask'} {shp}){extra}: supported are text padding masks of joint "
                f"attention ([B, 1, 1, N] keys, or [B, 1, N, N] = valid queries × valid keys) and block-causal masks "
                f"over frame chunks")
    if site.dropout_training:
        return (f"attention dropout p={site.dropout_p:g} in training mode: optimize() the model in eval mode "
                f"(model.eval()) to rewrite it; training-mode calls then run the model's own attention, dropout included")
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


def structure_note(args: dict) -> str:
    """What the plan's reason says of a block-causal or KV-cache structure ("" without one)."""
    if args.get("causal_chunk"):
        return (f"; block-causal mask: chunks of {args['causal_chunk']} frames, each attending to itself and the "
                f"earlier ones")
    if args.get("cached_frames"):
        return (f"; KV cache: {args['cached_frames']} cached frames before the "
                f"{args['grid'][0] - args['cached_frames']} new ones")
    return ""


def key_padding_ok(site: AttentionSite) -> bool:
    """A mask shaped like a padding mask over the text tokens of joint attention (what it holds is
    checked on every call: ``passes/keypad.py``)."""
    from .passes.keypad import is_padding_mask_shape

    return (site.kind == "joint" and site.mask_kind in ("bool", "additive")
            and is_padding_mask_shape(site.mask_shape, site.seq_q, site.seq_k))


def check_min_seq_len(min_seq_len, source: str = "min_seq_len") -> int:
    """``min_seq_len`` as an int ≥ 0, or a ValueError naming the fix."""
    if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, numbers.Integral) or min_seq_len < 0:
        raise ValueError(f"{source}={min_seq_len!r}: give a number of tokens ≥ 0 (sites with fewer tokens keep "
                         f"the model's own attention; 0 rewrites every site)")
    return int(min_seq_len)


def check_overrides(overrides) -> None:
    """Raise a ValueError naming the fix if ``overrides=`` is not ``{site_glob: method name |
    "original" | config}`` of registered methods (before any model run)."""
    if overrides is None:
        return
    form = "{site_glob: method name | 'original' | config object}, e.g. {'blocks.0.*': 'dense'}"
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides={overrides!r}: give {form}")
    for pat, spec in overrides.items():
        if not isinstance(pat, str):
            raise ValueError(f"overrides= key {pat!r}: give {form} (keys are globs on site paths)")
        if isinstance(spec, str) and spec == ORIGINAL:
            continue
        try:
            registry.parse(spec)
        except ValueError as e:
            raise ValueError(f"overrides={{{pat!r}: {spec!r}}}: {e}, or {ORIGINAL!r} for the model's own "
                             f"attention") from None


def warn_unmatched_overrides(overrides: Optional[dict], sites: list[AttentionSite]) -> None:
    """A RuntimeWarning for ``overrides=`` globs that match no site (they pin nothing)."""
    ids = [s.site_id for s in sites]
    unused = [pat for pat in (overrides or {}) if not any(fnmatch.fnmatchcase(sid, pat) for sid in ids)]
    if unused:
        warnings.warn(f"vmonarch_opt: overrides= {'globs' if len(unused) > 1 else 'glob'} "
                      f"{', '.join(map(repr, unused))} match{'' if len(unused) > 1 else 'es'} no attention site, so "
                      f"{'they pin' if len(unused) > 1 else 'it pins'} nothing; the sites are: {', '.join(ids)}",
                      RuntimeWarning, stacklevel=3)


def _override_for(site_id: str, overrides: Optional[dict]):
    if not overrides:
        return None
    for pat, spec in overrides.items():
        if fnmatch.fnmatchcase(site_id, pat):
            return spec
    return None


def default_config(site: AttentionSite, methods: tuple):
    """The choice without calibration data: the allowed method of best default rank (Monarch,
    then VMoBA, then dense) that can take the site."""
    for m in registry.ranked(methods):
        if m.site_unsupported(site) is None:
            return m.config()
    return registry.get(methods[0]).config()


def structured_refusals(site: AttentionSite, methods: tuple) -> str:
    """Why each allowed structured method cannot take ``site`` ("" when none is allowed or none
    refuses): what the report says when only dense is left."""
    out = []
    for m in registry.ranked(methods):
        if m.structured:
            why = m.site_unsupported(site)
            if why is not None:
                out.append(f"{m.name}: {why}")
    return "; ".join(out)


def attention_flops(site: AttentionSite) -> int:
    return Shape.of(site).dense_flops


def method_flops(site: AttentionSite, plan: SitePlan) -> Optional[int]:
    """Attention FLOPs of the chosen method (None when it depends on data not yet measured)."""
    if not plan.rewritten:
        return attention_flops(site)
    return registry.get(plan.method).cost(Shape.of(site), plan.args, plan.density)


def plan_sites(sites: list[AttentionSite], *, methods=None, overrides: Optional[dict] = None,
               min_seq_len: int = 1024, chosen: Optional[dict] = None) -> dict[str, SitePlan]:
    """One ``SitePlan`` per site. ``chosen`` maps site ids to configs picked by calibration."""
    methods = registry.check_methods(methods)
    plans: dict[str, SitePlan] = {}
    layer = 0
    for s in sites:
        spec = _override_for(s.site_id, overrides)
        base = SitePlan(site_id=s.site_id, method=ORIGINAL, seq_q=s.seq_q, seq_k=s.seq_k, head_dim=s.head_dim,
                        flops_before=attention_flops(s))
        pinned = spec is not None and spec != ORIGINAL
        why = unsupported_reason(s, min_seq_len, forced=pinned)
        if pinned and why is not None:
            why = f"pinned to {registry.of(registry.parse(spec)).name} by overrides=, which cannot run here: {why}"
        if spec == ORIGINAL:
            why = "pinned by overrides= to the model's own attention"
        if why is None:
            if spec is not None:
                cfg, source, reason = registry.parse(spec), "override", "pinned by overrides="
            elif chosen and s.site_id in chosen:
                cfg, source, reason = chosen[s.site_id], "profile", "chosen by calibration"
            else:
                cfg, source = default_config(s, methods), "default"
                refused = structured_refusals(s, methods)
                reason = ("default (no calibration profile)" if registry.of(cfg).structured
                          else "only dense allowed" if not refused else "dense: " + refused)
            method = registry.of(cfg)
            why = method.unsupported(s)
            if why is None:
                try:
                    args = method.site_args(cfg, s, layer)
                    why = causal.unsupported(method, args)
                except ValueError as e:
                    why = str(e)
            if why is not None and spec is not None:
                why = f"pinned to {method.name} by overrides=, which cannot run here: {why}"
        if why is not None:
            plans[s.site_id] = base.replace(reason=why, flops_after=base.flops_before)
            continue
        layer += 1
        if s.has_mask and not s.causal_chunk:
            # dense too: with the padded tokens dropped our dense kernel runs unmasked, where the
            # model's masked SDPA cannot use FlashAttention and runs cuDNN at a third of its speed
            args = {"text_before": s.text_before, "text_after": s.text_after, **args, "key_padding": True}
            reason += "; text padding mask: padded text tokens dropped at run time"
        reason += structure_note(args) + method.plan_note(s, args)
        plan = base.replace(method=method.name, args=args, source=source, reason=reason)
        f = method_flops(s, plan)
        plans[s.site_id] = plan.replace(flops_after=f)
    return plans
