"""Sites of module instances that ran a graph Dynamo captured for another instance of their class.

When Dynamo enters a block's ``forward`` as a frame of its own (the model's forward graph-broke
before the block loop and runs it eagerly: Framepack's data-dependent text crop), it compiles that
code once and guards on the block's class, not on which block it is (modules are inlined, their
parameters are graph inputs). The graph captured for ``transformer_blocks.0`` then runs for blocks
1 … 19 without our capture backend seeing it again, so only the first instance (or two, after one
recompile) has sites, and the eager census counts the others' attention as uncaptured: a 60-block
FramePack got 4 sites.

For such a module the template is a captured site whose graph was traced in a frame below the root
(its module path was given relative to the frame's block, e.g. ``attn``): a module at the same
relative path in a block of the same class, of the same class itself, that made as many attention
calls per invocation as the template module has sites, of the same shapes (the census records
them), and has no site of its own, gets copies of the template's sites (same graph nodes, its own
id). Calibration, validation and the rewrite then treat them like any site: each is measured on
its own block's q/k/v, and a call that does not match its plan runs the model's own attention.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Optional

import torch

from .capture import node_module_path
from .census import Census
from .detect import DetectedSite


def frame_root(ds: DetectedSite, modules: dict) -> Optional[tuple[str, str]]:
    """``(block path, path relative to it)`` when ``ds`` was captured in a frame entered at a block
    below the root (its graph names modules relative to that block), else None."""
    if not ds.site.module_resolved:
        return None
    rel = node_module_path(ds.node)  # as the graph names it (unresolved)
    path = ds.site.module_path
    if not rel or rel in modules or not path.endswith("." + rel):
        return None
    return path[: -len(rel) - 1], rel


def add_sibling_sites(detected: list[DetectedSite], calls: Census, model: torch.nn.Module) -> list[DetectedSite]:
    """``detected`` with copies of template sites for the modules described in the module
    docstring, each placed after the sites of the modules that precede it in ``model``."""
    modules = dict(model.named_modules())
    order = {p: i for i, p in enumerate(modules)}
    have = Counter(ds.site.module_path for ds in detected)
    groups: dict[tuple, list[DetectedSite]] = {}  # (block class, relative path, module) -> its sites
    for ds in detected:
        fr = frame_root(ds, modules)
        if fr is not None and fr[0] in modules:
            groups.setdefault((type(modules[fr[0]]), fr[1], ds.site.module_path), []).append(ds)
    out = list(detected)
    for path, n in sorted(calls.items(), key=lambda kv: order.get(kv[0], -1)):
        if have[path] or path not in modules:
            continue
        for (block_cls, rel, _), group in groups.items():  # the first captured block that fits
            block = path[: -len(rel) - 1] if path.endswith("." + rel) else None
            template = group[0].site
            if (block is None or type(modules.get(block)) is not block_cls or n != len(group)
                    or type(modules[path]) is not type(modules[template.module_path])):
                continue
            shapes = calls.shapes.get(path)
            if shapes is not None and shapes != [(d.site.seq_q, d.site.seq_k, d.site.head_dim) for d in group]:
                continue  # same code, other shapes (e.g. a stage of another resolution): not this graph
            root = template.module_path[: -len(rel) - 1]
            clones = []
            for ds in group:
                s = ds.site
                sid = path if len(group) == 1 else f"{path}#{s.ordinal}"
                note = (f"graph shared with {root}: Dynamo captured it once and runs it for every "
                        f"{block_cls.__name__}")
                clones.append(replace(ds, site=replace(s, site_id=sid, module_path=path, notes=[*s.notes, note]),
                                      extra=dict(ds.extra)))
            at = max((i + 1 for i, d in enumerate(out) if order.get(d.site.module_path, -1) < order[path]),
                     default=len(out))
            out[at:at] = clones
            break
    return out
