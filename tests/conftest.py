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


_ROUTING_ENV = ("VMONARCH_INTERPRET_KERNELS", "VMONARCH_FORCE_REFERENCE", "VMONARCH_DENSE_KERNEL", "TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _routing_env_unchanged():
    """A test that leaves a kernel-routing variable changed (set outside monkeypatch) would make every
    later test run other code paths (all ops in Triton's interpreter: a suite many times slower)."""
    before = {k: os.environ.get(k) for k in _ROUTING_ENV}
    yield
    after = {k: os.environ.get(k) for k in _ROUTING_ENV}
    if after != before:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        pytest.fail(f"the test left kernel-routing environment variables changed: {before} -> {after}")


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
