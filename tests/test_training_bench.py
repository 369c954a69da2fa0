"""benchmarks/bench_training.py on the CPU (--smoke): every section runs, at tiny shapes."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_bench_training_smoke_runs_every_section(tmp_path, monkeypatch):
    from bench_training import main

    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--no-append", "--runs", "1", "--warmup", "0"]) == 0
    res = json.loads((tmp_path / "bench_training.json").read_text())
    assert (tmp_path / "bench_training_section.md").read_text().startswith("## Training")
    att = {r["attention"]: r for r in res["attention"]}
    ours = [r for label, r in att.items() if label.startswith("vmonarch ")]
    assert len(ours) == 3
    for r in ours:  # on CPU the ops' backward differentiates the references
        assert "error" not in r and r["fwd_bwd_ms"] > 0 and r["backward"] == "reference autograd", r
    flex = [r for label, r in att.items() if label.startswith("FlexAttention")]
    assert len(flex) == 1 and flex[0]["fwd_ms"] > 0 and 0 < flex[0]["density"] < 0.5
    assert {r["method"] for r in res["grads"]} == {"monarch", "vmoba", "dense"}
    for r in res["grads"]:  # float32 op vs float64 reference autograd
        assert r["finite_low"] and max(r[f"{g}_err_low"] for g in ("dq", "dk", "dv")) < 1e-5, r
    wan = res["wan"]
    assert [r["config"] for r in wan] == ["dense SDPA (diffusers)", "vmonarch monarch", "vmonarch vmoba",
                                          "vmonarch dense op"]
    for r in wan:
        assert "error" not in r and r["step_ms"] > 0, r
    for r in wan[1:]:
        assert r["ran"] > 0 and r["fell_back"] == 0 and r["speed_vs_dense"] > 0
