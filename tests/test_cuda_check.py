"""benchmarks/cuda_check.py's CPU path (the GPU run is the point; this keeps the script working)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_check_smoke(capsys):
    sys.path.insert(0, ROOT)
    from benchmarks.cuda_check import main

    assert main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "vmoba token KV cache" in out and "monarch_rt block-causal 2" in out and "error" not in out.lower()
