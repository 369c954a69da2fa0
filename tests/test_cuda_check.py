"""benchmarks/cuda_check.py's CPU path (the GPU run is the point; this keeps the script working)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_check_smoke(capsys):
    sys.path.insert(0, ROOT)
    from benchmarks.cuda_check import main

    before = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "VMONARCH_INTERPRET_KERNELS")}
    assert main(["--smoke"]) == 0
    # the environment is left as it was: later tests must not run every op in the interpreter
    assert {k: os.environ.get(k) for k in before} == before
    out = capsys.readouterr().out
    assert "vmoba token KV cache" in out and "monarch_rt block-causal 2" in out and "error" not in out.lower()
