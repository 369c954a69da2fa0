import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    e = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    assert e == e, "NaN in output"
    return e


def assert_kernels_ran(opt) -> None:
    """Every rewritten site of ``opt`` ran our op at least once since optimize() and none fell back
    to the model's own attention (an exactness test must test our op, not the original)."""
    import vmonarch_opt

    stats = vmonarch_opt.stats(opt)
    assert stats, "no site was rewritten"
    for sid, c in stats.items():
        assert c["ran"] >= 1 and not c["fell_back"], (sid, c)
