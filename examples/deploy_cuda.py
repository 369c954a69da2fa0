"""Deploy an optimized Wan transformer on a GPU: torch.compile, CUDA graphs, torch.export.

    python examples/deploy_cuda.py [--frames 5 --height 16 --width 16 --dtype bf16]

Builds a small diffusers Wan transformer (random weights) on CUDA, optimizes it with Monarch
attention (``--method vmoba`` / ``vmoba-pooled``: VMoBA, plain or with the pooled rest), and checks that

1. ``torch.compile(optimized, fullgraph=True)`` (inductor) runs without graph breaks and keeps the
   ``vmonarch::*`` ops in its graph;
2. with CUDA graphs (inductor's ``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets) the
   model is captured (no cudagraph skips) and matches eager;
3. ``torch.export.export`` gives an ExportedProgram with the ops that runs and matches;
4. the compiled model called at another video size (one more frame, a wider latent) runs the plans
   re-derived for that token grid, like the eager optimized model;
5. the report's call counters count the compiled calls (CUDA graphs replay their increments).

It prints a small table (median latencies via triton.testing.do_bench, for information; the
benchmarks live in benchmarks/) and writes JSON to $OUT when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: vmonarch_fixtures, benchmarks
import vmonarch_opt  # noqa: E402
from vmonarch_fixtures import models  # noqa: E402


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--height", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--method", default="monarch", choices=["monarch", "vmoba", "vmoba-pooled"])
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the checks without CUDA graphs")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("deploy_cuda.py needs a CUDA GPU for CUDA graphs; --device cpu runs the other checks", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if cuda:
        from triton.testing import do_bench

    model, batch = models.wan(frames=args.frames, height=args.height, width=args.width, layers=args.layers,
                              heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=args.device)
    method = args.method.split("-")[0]
    overrides = {"*": vmonarch_opt.VMoBAConfig(pooled_rest=True)} if args.method == "vmoba-pooled" else None
    opt = vmonarch_opt.optimize(model, batch, methods=(method,), overrides=overrides, min_seq_len=0, budget=None)
    op = f"vmonarch.{method}_attention"
    print(opt.report)
    with torch.no_grad():
        ref = opt(**batch)[0].clone()

    results, rows = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                     "torch": torch.__version__, "shape": list(batch["hidden_states"].shape)}, []

    # 1 + 2. inductor, fullgraph, counting our ops in the graph it receives; on CUDA with CUDA
    # graphs (what mode="reduce-overhead" sets), so one compilation checks both
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    seen = Counter()

    def counting(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("vmonarch."))
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": cuda})

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(opt, backend=counting, fullgraph=True)

    def run_compiled(inputs=batch):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            return compiled(**inputs)[0]

    for _ in range(3):
        out = run_compiled().clone()
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    if cuda:
        try:
            from torch._inductor import cudagraph_trees

            mgr = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
            skips["cudagraph_tree_nodes"] = 0 if mgr is None else len(list(mgr.get_roots()))
        except Exception as e:  # internal API: informational only
            skips["cudagraph_tree_nodes"] = f"unknown ({type(e).__name__})"
    results["compile"] = dict(ops=dict(seen), rel_err=rel(out, ref), cudagraphs=cuda, counters=skips)
    # the sites' call counters count the compiled (CUDA-graph replayed) calls too: 1 eager + 3 compiled
    calls = vmonarch_opt.stats(opt)
    results["calls"] = {sid: dict(ran=c["ran"], fell_back=c["fell_back"]) for sid, c in calls.items()}
    calls_ok = bool(calls) and all(c["ran"] == 4 and not c["fell_back"] for c in calls.values())

    # 4. another video size through the compiled model: plans follow the token grid
    _, other = models.wan(frames=args.frames + 1, height=args.height, width=args.width + 2, layers=args.layers,
                          heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=args.device)
    for _ in range(2):
        out_other = run_compiled(other).clone()
    with torch.no_grad():
        want_other = opt(**other)[0]
        dense_other = model(**other)[0]  # the model itself (optimize copied it)
    results["other_size"] = dict(shape=list(other["hidden_states"].shape), rel_err=rel(out_other, want_other),
                                 differs_from_dense=rel(out_other, dense_other))

    # 3. torch.export
    ep = torch.export.export(opt, (), batch)
    ep_ops = Counter(str(n.target) for n in ep.graph.nodes if str(n.target).startswith("vmonarch."))
    with torch.no_grad():
        out_ep = ep.module()(**batch)[0]
    results["export"] = dict(ops=dict(ep_ops), rel_err=rel(out_ep, ref))

    def eager():
        with torch.no_grad():
            return opt(**batch)[0]

    if cuda:
        for name, fn in (("eager", eager), ("compile + CUDA graphs", run_compiled)):
            ms = do_bench(fn, return_mode="median")
            rows.append((name, f"{ms:.3f}"))
            results.setdefault("median_ms", {})[name] = ms

    results["method"] = args.method
    ok = (results["compile"]["ops"].get(op, 0) == args.layers and results["compile"]["rel_err"] < 2e-2 and calls_ok
          and not skips.get("cudagraph_skips", 0)
          and ep_ops.get(f"{op}.default", 0) == args.layers
          and results["export"]["rel_err"] < 2e-2 and results["other_size"]["rel_err"] < 2e-2
          # the re-derived plans really ran: closer to the eager optimized model than to dense attention
          and results["other_size"]["rel_err"] < 0.5 * results["other_size"]["differs_from_dense"])
    results["ok"] = bool(ok)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "deploy_cuda.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps({k: v for k, v in results.items() if k != "median_ms"}, indent=1))
    from tabulate import tabulate

    print(tabulate(rows, headers=["path", "median ms"]))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
