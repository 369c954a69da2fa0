"""Infer, per attention site, how its token sequence maps to the latent video grid.

A site's sequence is ``text_before + T·H·W + text_after`` tokens, video tokens in (t, h, w)
row-major order. Candidate grids come from (in order of trust):

1. ``grid=`` given by the user;
2. Conv3d patch-embedding outputs ``[B, C, T, H, W]`` in the captured graph;
3. Conv2d patch embeddings applied per frame (output ``[B·T, C, H, W]``; an image ViT is T=1);
4. integer ``num_frames/height/width`` arguments of the batch divided by the config's patch sizes;
5. 5-D video tensors of the batch divided by the config's patch sizes.

Factorised space/time attention (Latte-style: spatial attention over each frame with the frames
folded into the batch, temporal attention over each position with the positions folded in) gets
the per-frame grid ``(1, H, W)`` or the per-position grid ``(T, 1, 1)`` of a candidate when the
site's sequence length and batch say so.

Text tokens (joint attention) are located by finding the ``cat`` that builds the sequence in the
graph. Packing may be nested (Framepack puts clean/2×/4× history latents in front of the video,
one ``cat`` each, before a graph break; the text joins in the attention block's graph): a part
longer than the video is searched the same way, and a sequence that enters a graph as an input is
looked up in the cats of the other captured graphs, which must agree. The non-video tokens found
are treated as text (attended densely); where they came from patch embeddings (history latents),
the site records those modules so that a later call can count them (``regrid.py``). A part of the
video's size made by another patch embedding is not the video. If the grid is known but the text
position is not, the site gets no grid (1D blocks) and the report says so. Nothing is guessed
silently: every site records where its grid came from.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.fx

from ..batch import iter_tensors
from .capture import CapturedGraph, node_module_path
from .detect import _CAT, DetectedSite, _shape

GridSpec = Union[tuple, dict, None]
_CONV3D = {torch.conv3d, torch.nn.functional.conv3d}
_CONV2D = {torch.conv2d, torch.nn.functional.conv2d}


@dataclass(frozen=True)
class GridCandidate:
    grid: tuple
    source: str
    text: Optional[tuple] = None  # (text_before, text_after) when given with the grid
    node: Optional[torch.fx.Node] = None  # the patch-embedding call whose output gave the grid


def _conv_nodes(graphs: list[CapturedGraph]):
    """(node, "3d" | "2d") for every Conv3d / Conv2d call in the captured graphs."""
    for g in graphs:
        mods = dict(g.gm.named_modules())
        for n in g.gm.graph.nodes:
            m = mods.get(n.target) if n.op == "call_module" else None
            if (n.op == "call_function" and n.target in _CONV3D) or isinstance(m, torch.nn.Conv3d):
                yield n, "3d"
            elif (n.op == "call_function" and n.target in _CONV2D) or isinstance(m, torch.nn.Conv2d):
                yield n, "2d"


def conv_grid(shape, kind: str, batch_size: Optional[int]) -> Optional[tuple]:
    """The token grid a patch-embedding convolution's output shape gives: ``[B, C, T, H, W]``
    (Conv3d), or ``[B·T, C, H, W]`` (Conv2d applied per frame; needs the batch size)."""
    if kind == "3d" and len(shape) == 5:
        return tuple(int(x) for x in shape[2:])
    if kind == "2d" and len(shape) == 4 and batch_size and shape[0] % batch_size == 0:
        return (int(shape[0]) // batch_size, int(shape[2]), int(shape[3]))
    return None


def _conv_candidates(graphs: list[CapturedGraph], batch_size: Optional[int]) -> list[GridCandidate]:
    out = []
    for n, kind in _conv_nodes(graphs):
        shp = _shape(n)
        grid = conv_grid(shp, kind, batch_size) if shp else None
        if grid is None:
            continue
        where = node_module_path(n) or n.name
        if kind == "3d":
            what = "Conv3d patch embedding"
        else:
            what = "Conv2d patch embedding per frame" if grid[0] > 1 else "Conv2d patch embedding"
        out.append(GridCandidate(grid, f"{what} '{where}'", node=n))
    return out


def grid_modules(graphs: list[CapturedGraph], model: torch.nn.Module) -> list[tuple[str, str]]:
    """(module path, "3d" | "2d") of the model's Conv3d / Conv2d modules that ran in the captured
    graphs: the patch embeddings whose output shapes give token grids (watched again at run time)."""
    real = dict(model.named_modules())
    out = []
    for n, _ in _conv_nodes(graphs):
        path = node_module_path(n, real)
        m = real.get(path)
        if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
            out.append((path, "3d" if isinstance(m, torch.nn.Conv3d) else "2d"))
    return list(dict.fromkeys(out))


def _config_get(model) -> Optional[Callable]:
    """``get(key, default)`` over the model's config (a dict or an attribute object), or None."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    return cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))


def _patch_sizes(model) -> Optional[tuple]:
    get = _config_get(model)
    if get is None:
        return None
    p = get("patch_size", None)
    if p is None:
        return None
    if isinstance(p, (tuple, list)):
        return tuple(int(x) for x in p) if len(p) == 3 else (1, int(p[-2]), int(p[-1]))
    pt = get("patch_size_t", None) or 1
    return (int(pt), int(p), int(p))


def _batch_candidates(model, batch, describe: bool = True) -> list[GridCandidate]:
    """Grids from ``num_frames/height/width`` arguments and 5-D latents ÷ patch sizes; ``describe``
    also flags layouts that another reading of the same latents would match (not when re-deriving
    grids inside a compiled forward)."""
    out = []
    ps = _patch_sizes(model)
    items = dict(iter_tensors(batch))
    ints = {k: v for k, v in items.items() if isinstance(v, int) and not isinstance(v, bool)}
    keys = {"num_frames": None, "height": None, "width": None}
    for k in keys:
        keys[k] = ints.get(k)
    if all(v is not None for v in keys.values()):
        pt, ph, pw = ps or (1, 1, 1)
        g = (keys["num_frames"] // pt, keys["height"] // ph, keys["width"] // pw)
        out.append(GridCandidate(g, f"batch num_frames/height/width ÷ patch {pt}×{ph}×{pw}"))
    if ps:
        pt, ph, pw = ps
        chans = _in_channel_counts(model)
        for name, v in items.items():
            if isinstance(v, torch.Tensor) and v.dim() == 5:
                _, a1, a2, a3, a4 = v.shape
                # (layout, channel axis size, (T, H, W)): [B, C, T, H, W] (Wan, Hunyuan), [B, T, C, H, W]
                # (CogVideoX), [B, T, H, W, C] (Kandinsky 5)
                layouts = [("[B,C,T,H,W]", a1, (a2, a3, a4)), ("[B,T,C,H,W]", a2, (a1, a3, a4))]
                if a4 in chans:  # channels-last only where the config says so (else a stray candidate)
                    layouts.append(("[B,T,H,W,C]", a4, (a1, a2, a3)))
                if chans:  # the layout whose channel axis is the model's input channels first (another
                    # may have the same token count); no sort: under torch.compile these are SymInts
                    layouts = ([lay for lay in layouts if lay[1] in chans]
                               + [lay for lay in layouts if lay[1] not in chans])
                grids = [(lay, c, (-(-t // pt), h // ph, w // pw)) for lay, c, (t, h, w) in layouts]
                for lay, c, g in grids:
                    src = f"batch '{name}' {lay} ÷ patch {pt}×{ph}×{pw}"
                    alike = [(lay2, g2) for lay2, c2, g2 in grids if c2 == c and g2 != g
                             and math.prod(g2) == math.prod(g)] if describe else []
                    if alike:  # e.g. channels == latent height: two readings, same token count
                        lay2, g2 = alike[0]
                        src += (f" (ambiguous: read as {lay2} it is {g2}; pass grid={g2} if that is the "
                                f"latent layout)")
                    out.append(GridCandidate(g, src))
    return out


def _in_channel_counts(model) -> set:
    """The latent input channel counts the model's config allows: ``in_channels`` / ``in_visual_dim``
    / ``in_dim``, and ``2 * in_visual_dim + 1`` with ``visual_cond`` (Kandinsky: latents, condition
    latents and a mask concatenated); empty without a config."""
    get = _config_get(model)
    if get is None:
        return set()
    out = set()
    for key in ("in_channels", "in_visual_dim", "in_dim"):
        c = get(key, None)
        if isinstance(c, int) and not isinstance(c, bool):
            out.add(c)
    vis = get("in_visual_dim", None)
    if get("visual_cond", False) is True and isinstance(vis, int):
        out.add(2 * vis + 1)
    return out


def _batch_size(batch) -> Optional[int]:
    for _, v in iter_tensors(batch):
        if isinstance(v, torch.Tensor) and v.dim() >= 3:
            return int(v.shape[0])
    return None


def _cat_parts(n) -> Optional[list]:
    """``[(part node, size along the cat dim)]`` of a ``cat`` node with known shapes, else None."""
    if not (n.op == "call_function" and n.target in _CAT):
        return None
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    shapes = [_shape(p) for p in parts] if isinstance(parts, (list, tuple)) else []
    if not shapes or not all(shapes) or not all(-len(s) <= dim < len(s) for s in shapes):
        return None
    return [(p, s[dim]) for p, s in zip(parts, shapes)]


def _video_offsets(parts: list, n_video: int, graphs, graph, depth: int, is_video=None) -> list:
    """``[(offset, prefix parts, confirmed)]``: where the video tokens are in the sequence a ``cat``
    of ``parts`` builds — a part of exactly ``n_video`` tokens, or (nested packing, e.g. history
    latents put in front of the video) a longer part whose own sequence holds the video — with the
    ``(node, size)`` parts that make up the tokens before it. ``is_video(part)``: False for a part
    of the video's size known to come from another patch embedding (FramePack's clean latents can
    have as many frames as the video), True for one known to come from the grid's own, None when
    unknown; ``confirmed`` says the video part was known to come from it."""
    out, before = [], 0
    for i, (p, size) in enumerate(parts):
        mine = is_video(p) if is_video is not None and size == n_video else None
        if size == n_video and mine is not False:
            out.append((before, parts[:i], mine is True))
        elif size > n_video and depth < 4:
            for o, inner, ok in _locate_video(p, size, n_video, graphs, graph, depth + 1, is_video=is_video):
                out.append((before + o, parts[:i] + inner, ok))
        before += size
    return out


def _locate_video(start, length: int, n_video: int, graphs, graph, depth: int = 0,
                  max_nodes: int = 400, is_video=None) -> list:
    """Where the ``n_video`` video tokens sit in the ``length``-token sequence ``start`` carries, as
    ``_video_offsets`` readings that all give the same offset (empty when not found or ambiguous):
    search its ancestry for the ``cat`` that builds a sequence of that length; of several parts
    that all come from the grid's patch embedding (Motif-Video's decoder joins two copies of the
    video) the first is the video, the rest dense like text. When the ancestry starts at a graph
    input (a graph break between the packing and the attention), the cats of the other captured
    graphs that build a sequence of that length are asked instead, and must agree."""
    if not isinstance(start, torch.fx.Node):
        return []
    seen, todo, from_input = set(), deque([start]), False
    while todo and len(seen) < max_nodes:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        from_input |= n.op == "placeholder"
        parts = _cat_parts(n)
        if parts and sum(s for _, s in parts) == length:
            found = _video_offsets(parts, n_video, graphs, graph, depth, is_video)
            if len({f[0] for f in found}) == 1 or (found and all(f[2] for f in found)):
                return [f for f in found if f[0] == found[0][0]]
            if found:
                return []
        todo.extend(n.all_input_nodes)
    if not from_input or depth >= 4:
        return []
    found = []
    for g in graphs:
        if g.gm.graph is graph:
            continue
        for n in g.gm.graph.nodes:
            parts = _cat_parts(n)
            if parts and sum(s for _, s in parts) == length:
                found += _video_offsets(parts, n_video, graphs, g.gm.graph, depth + 1, is_video)
    return found if len({f[0] for f in found}) == 1 else []


def _conv_source(part, size: int, convs: dict, batch_size, modules: dict, max_nodes: int = 200) -> Optional[str]:
    """The patch-embedding module whose output (``size`` tokens) ``part`` was made from, or None."""
    seen, todo = set(), deque([part])
    while todo and len(seen) < max_nodes:
        n = todo.popleft()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in convs:
            shp = _shape(n)
            g = conv_grid(shp, convs[n], batch_size) if shp else None
            return node_module_path(n, modules) if g and math.prod(g) == size else None
        todo.extend(n.all_input_nodes)
    return None


def _find_text_split(ds: DetectedSite, n_video: int, graphs: list[CapturedGraph] = (),
                     source_of: Optional[Callable] = None, video_module: str = "") -> Optional[tuple]:
    """(tokens before, tokens after, modules of the tokens before) the video in the site's
    sequence, from the cat(s) in q's ancestry that join video and text (or history) tokens; None
    if not found or ambiguous. The modules are the patch embeddings every part before the video
    came from (``source_of(node, size)``), or () when some part has none (text). With
    ``video_module`` (the patch embedding that gave the grid), a part of the video's size made by
    another patch embedding is not the video."""
    start = ds.q
    if not isinstance(start, torch.fx.Node):
        return None

    def is_video(part):
        src = source_of(part, n_video) if source_of is not None and video_module else None
        return None if src is None else src == video_module
    found = _locate_video(start, ds.site.seq_q, n_video, graphs, start.graph, is_video=is_video)
    if not found:
        return None
    at = found[0][0]
    mods: tuple = ()
    for _, prefix, _ in found if source_of is not None and at else ():
        src = [source_of(p, size) for p, size in prefix]
        if src and all(src):
            mods = tuple(src)
            break
    return at, ds.site.seq_q - n_video - at, mods


def _spec_entries(grid: GridSpec) -> list:
    """``grid=`` as [(site glob, spec)]; a spec is (T, H, W) or {"grid": (T, H, W), "text_before": n, "text_after": m}."""
    if grid is None:
        return []
    if isinstance(grid, dict) and "grid" not in grid:
        return list(grid.items())
    return [("*", grid)]


def _user_entry(grid: GridSpec, site_id: str) -> tuple:
    """``(glob, GridCandidate)`` of the first ``grid=`` entry matching this site, or ``(None, None)``."""
    for pat, spec in _spec_entries(grid):
        if fnmatch.fnmatchcase(site_id, pat):
            if isinstance(spec, dict):
                text = (int(spec.get("text_before", 0)), int(spec.get("text_after", 0)))
                return pat, GridCandidate(tuple(int(x) for x in spec["grid"]),
                                          "grid= given by the user, with its text placement", text)
            return pat, GridCandidate(tuple(int(x) for x in spec), "grid= given by the user")
    return None, None


def lookup_user_grid(grid: GridSpec, site_id: str) -> Optional[GridCandidate]:
    """The grid ``grid=`` gives this site (first matching pattern), or None."""
    return _user_entry(grid, site_id)[1]


def _count(x) -> bool:
    """A positive integer (``True`` is not a size)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0


def check_grid_spec(user_grid: GridSpec) -> None:
    """Raise a ValueError naming the fix if ``grid=`` is malformed (before any model run: how many
    video tokens each site has is checked once the sites are known, in ``assign_grids``)."""
    fix = (f"grid={user_grid!r}: give (frames, height, width) in latent tokens, e.g. grid=(21, 30, 52), "
           f"{{'blocks.*': (21, 30, 52)}}, or with the text placement of joint attention "
           f"{{'blocks.*': {{'grid': (21, 30, 52), 'text_before': 0, 'text_after': 226}}}}")
    if user_grid is not None and not isinstance(user_grid, (tuple, list, dict)):
        raise ValueError(fix)
    for _, spec in _spec_entries(user_grid):
        if isinstance(spec, dict):
            if set(spec) - {"grid", "text_before", "text_after"} or "grid" not in spec:
                raise ValueError(fix)
            for k in ("text_before", "text_after"):
                n = spec.get(k, 0)
                if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                    raise ValueError(f"grid={user_grid!r}: {k}={n!r} must be an integer ≥ 0 (tokens of the "
                                     f"sequence before / after the video)")
            spec = spec["grid"]
        g = tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)
        if len(g) != 3:
            raise ValueError(fix)
        if not all(_count(x) for x in g):
            raise ValueError(f"grid={user_grid!r}: the grid {tuple(g)!r} must be three positive integers whose "
                             f"product is the number of video tokens of the sites it applies to (latent "
                             f"frames × height × width, after patching), e.g. grid=(21, 30, 52)")


def _factorised(options: list[GridCandidate], site, batch_size: Optional[int]) -> list[GridCandidate]:
    """Per-frame ``(1, H, W)`` / per-position ``(T, 1, 1)`` grids of the candidates that fit a
    self-attention site whose batch holds the frames / the spatial positions."""
    if site.seq_q != site.seq_k or not batch_size:
        return []
    out = []
    for c in options:
        T, H, W = c.grid
        if T > 1 and site.seq_q == H * W and site.batch == batch_size * T:
            out.append(GridCandidate((1, H, W), f"spatial attention per frame of the {c.grid} grid from {c.source}"))
        if H * W > 1 and site.seq_q == T and site.batch == batch_size * H * W:
            out.append(GridCandidate((T, 1, 1), f"temporal attention per position of the {c.grid} grid from {c.source}"))
    return out


def _place(ds: DetectedSite, options: list, graphs, source_of, module_of) -> tuple:
    """``((candidate, text_before, text_after, text_before_from), "")`` for the first candidate that
    fits the site's sequence, or ``(None, why the first near miss did not fit)``."""
    s = ds.site
    n, why_not = s.seq_q, ""
    for c in options:
        nv = math.prod(c.grid)
        if c.text is not None:  # the user placed the text: it must add up exactly
            if sum(c.text) + nv == s.seq_q == s.seq_k:
                return (c, *c.text, []), ""
            why_not = why_not or (f"grid= {c.grid} with {c.text[0]} text tokens before and {c.text[1]} after "
                                  f"is {nv + sum(c.text)} tokens, but this self-attention has {n}")
            continue
        if nv == n:
            return (c, 0, 0, []), ""
        if 0 < nv < n:
            split = _find_text_split(ds, nv, graphs, source_of, module_of(c))
            if split is not None:
                return (c, split[0], split[1], list(split[2])), ""
            why_not = why_not or (f"grid {c.grid} from {c.source} covers {nv} of {n} tokens but the text "
                                  f"tokens' position could not be found (pass grid={{'<site>': {{'grid': "
                                  f"{c.grid}, 'text_before': ..., 'text_after': ...}}}})")
    return None, why_not


def _with_factorised(options: list, site, batch_size) -> list:
    """``options``, plus per-frame / per-position grids when none fits inside the sequence."""
    if not any(math.prod(c.grid) <= site.seq_q for c in options):  # factorised space/time attention?
        return options + _factorised(options, site, batch_size)
    return options


def _misfit(user: GridCandidate, s, why_not: str) -> str:
    """What is wrong with the user's grid at site ``s``."""
    nv = math.prod(user.grid)
    what = f"grid={user.grid}"
    if user.text is not None:
        what += f" with {user.text[0]} text tokens before and {user.text[1]} after"
        nv += sum(user.text)
    shape = f"{s.seq_q} tokens" if s.seq_q == s.seq_k else f"{s.seq_q} query tokens × {s.seq_k} key tokens"
    return f"{what} ({nv} tokens) does not fit site '{s.site_id}' ({shape})" + (f": {why_not}" if why_not else "")


def assign_grids(sites: list[DetectedSite], graphs: list[CapturedGraph], model, batch,
                 user_grid: GridSpec = None) -> None:
    """Fill ``grid``, ``text_before``, ``text_after``, ``grid_source`` and ``kind`` of each site.

    A ``grid=`` entry is never ignored silently: one that does not fit a site whose video grid the
    model shows (patch embedding, batch) raises ``ValueError`` naming the site, its token count and
    the grid; one that fits none of the sites it matches raises too; one that matches no site warns.
    """
    check_grid_spec(user_grid)
    bsz = _batch_size(batch)
    cands = _conv_candidates(graphs, bsz) + _batch_candidates(model, batch)
    real = dict(model.named_modules())
    convs = dict(_conv_nodes(graphs))

    def source_of(part, size):  # the patch embedding a sequence part came from
        return _conv_source(part, size, convs, bsz, real)

    def module_of(c: GridCandidate) -> str:  # the patch embedding that gave a candidate grid
        path = node_module_path(c.node, real) if c.node is not None else ""
        return path if path in real else ""

    matched: dict = {pat: [] for pat, _ in _spec_entries(user_grid)}  # glob -> [(site, fits)]
    for ds in sites:
        s = ds.site
        pat, user = _user_entry(user_grid, s.site_id)
        if user is not None:
            if user.text is not None and s.seq_q != s.seq_k:  # text placement is for joint attention
                user = GridCandidate(user.grid, "grid= given by the user")
            chosen, why_not = _place(ds, _with_factorised([user], s, bsz), graphs, source_of, module_of)
            if chosen is None:
                inferred, _ = _place(ds, _with_factorised(cands, s, bsz), graphs, source_of, module_of)
                if inferred is not None and user.text is None and math.prod(inferred[0].grid) == math.prod(user.grid):
                    # as many video tokens as the model shows: where the others sit was only findable from
                    # the patch embedding (e.g. two parts of the video's size, one of them the video)
                    c, tb, ta, before_from = inferred
                    chosen = (GridCandidate(user.grid, f"{user.source} (the other tokens placed as for the grid "
                                                       f"from {c.source})", None,
                                            c.node if tuple(c.grid) == tuple(user.grid) else None),
                              tb, ta, before_from)
            matched[pat].append((s, chosen is not None))
            if chosen is None:
                if inferred is not None:
                    c, tb, ta, _ = inferred
                    raise ValueError(
                        f"{_misfit(user, s, '')}, where the model shows {math.prod(c.grid)} video tokens "
                        f"(grid {'×'.join(map(str, c.grid))} from {c.source}"
                        + (f", with {tb} text tokens before and {ta} after" if tb or ta else "")
                        + f"). Give a grid whose product is {math.prod(c.grid)}, a grid= entry of its own for "
                        f"this site ({{'{s.site_id}': (T, H, W)}}), or leave it to inference.")
                why_not = _misfit(user, s, why_not)
        else:
            chosen, why_not = _place(ds, _with_factorised(cands, s, bsz), graphs, source_of, module_of)
        if chosen is None:
            s.grid = None
            s.grid_source = why_not or ("no video grid found for this sequence length: 1D blocks"
                                        if cands else "no video grid found (pass grid=(T, H, W)): 1D blocks")
        else:
            c, tb, ta, before_from = chosen
            s.grid, s.text_before, s.text_after, s.grid_source = c.grid, tb, ta, c.source
            s.grid_module = module_of(c)
            if before_from:
                s.text_before_from = before_from
        if s.seq_q == s.seq_k and (s.text_before or s.text_after):
            s.kind = "joint"
    _check_entries(user_grid, matched, [ds.site.site_id for ds in sites])


def _check_entries(user_grid: GridSpec, matched: dict, site_ids: list) -> None:
    """Raise for a ``grid=`` entry that fits none of the sites it matches; warn for one that matches none."""
    for pat, hits in matched.items():
        if hits and not any(ok for _, ok in hits):
            raise ValueError(
                f"grid= entry {pat!r}: {dict(_spec_entries(user_grid))[pat]!r} fits none of the {len(hits)} "
                f"site(s) it matches, e.g. {hits[0][0].grid_source}. Give (T, H, W) whose product is the number "
                f"of video tokens of those sites (with text_before / text_after for the other tokens of joint "
                f"attention).")
    unused = [pat for pat, hits in matched.items() if not hits]
    if unused:
        warnings.warn(f"vmonarch_opt: grid= {'entries' if len(unused) > 1 else 'entry'} "
                      f"{', '.join(map(repr, unused))} match{'' if len(unused) > 1 else 'es'} no attention site, so "
                      f"{'they are' if len(unused) > 1 else 'it is'} not used; the sites are: {', '.join(site_ids)}",
                      RuntimeWarning, stacklevel=2)
