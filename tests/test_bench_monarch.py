"""``benchmarks/bench_monarch.py --smoke``: the GPU benchmark's CPU path (Triton interpreter, tiny shapes)."""
from __future__ import annotations

import json
import sys


def test_bench_monarch_smoke(monkeypatch, tmp_path):
    """Checks, a Monarch row, a MonarchRT row beside frame-block Monarch, the block-causal row and the
    KV-cache row and the targets land in $OUT."""
    monkeypatch.setenv("VMONARCH_INTERPRET_KERNELS", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench_monarch.py", "--smoke"])
    from benchmarks import bench_monarch

    assert bench_monarch.main(["--smoke", "--no-append"]) is True
    res = json.loads((tmp_path / "bench_monarch.json").read_text())
    assert res["checks"] and all(c["finite"] and c["err_fp32"] < 1e-4 for c in res["checks"])
    assert [r["shape"] for r in res["results"]] == ["smoke_text"] and res["results"][0]["ours_ms"] > 0
    rows = res["monarch_rt"]["rows"]
    full = [r for r in rows if r["row"] == "full"]
    assert len(full) == 1 and full[0]["text"] == 3
    assert full[0]["finite"] and 0 < full[0]["err_video"] < 0.5 and 0 < full[0]["monarch_err_video"] < 0.5
    assert full[0]["flop_cut"] > 1 and full[0]["rt_ms"] > 0
    causal = next(r for r in rows if r["row"].startswith("block-causal"))
    assert causal["finite"] and 0 < causal["err_video"] < 0.5 and causal["rt_ms"] > 0
    assert "(cached mode)" in causal["row"]  # each chunk against its visible keys, no recomputed prefix
    cached = next(r for r in rows if r["row"].startswith("KV cache"))
    assert cached["N"] == "24x48" and "skipped" not in cached
    assert cached["finite"] and 0 < cached["err_video"] < 0.5 and cached["rt_ms"] > 0
    assert res["monarch_rt"]["targets"]
    section = (tmp_path / "bench_monarch_section.md").read_text()
    assert section.index("Targets") > section.index("MonarchRT") > section.index("Per-phase split")
