"""The method registry: a method is one module; a toy method registered here (and only here) goes
through optimize, calibration, the profile round trip and the report without any other change."""
from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import vmonarch_opt
from conftest import rel_err
from handwritten_models import SdpaForms, Stack
from vmonarch_opt import Budget, load_profile, methods
from vmonarch_opt.methods import Method, Shape


@dataclass(frozen=True)
class StridedConfig:
    """Attend to every ``stride``-th key only (a crude approximation, but a real one)."""

    stride: int = 2
    method = "strided"


def _strided(q, k, v, stride: int, scale: float):
    return F.scaled_dot_product_attention(q, k[..., ::stride, :], v[..., ::stride, :], scale=scale)


class Strided(Method):
    name = "strided"
    config_cls = StridedConfig
    uses_grid = False
    lowered_as = "MatMul/Softmax/MatMul over every stride-th key"

    def describe(self, cfg) -> str:
        return f"strided s{cfg.stride}"

    def config_from_args(self, args):
        return StridedConfig(stride=args["stride"])

    def resolve_args(self, cfg, site, layer):
        return {"stride": int(cfg.stride)}

    def flops(self, shape: Shape, args, density=None):
        return 4 * shape.batch * shape.heads * shape.seq_q * math.ceil(shape.seq_k / args["stride"]) * shape.head_dim

    def params(self, args) -> str:
        return f"stride={args['stride']}"

    def candidates(self, site, budget, layer):
        return [("strided", StridedConfig(stride=s)) for s in (2, 4)]

    def run(self, q, k, v, args, scale):
        return _strided(q, k, v, args["stride"], scale)

    def lower(self, q, k, v, args, scale, key_valid=None):
        return _strided(q, k, v, args["stride"], scale)


@pytest.fixture
def strided():
    m = methods.register(Strided())
    try:
        yield m
    finally:
        methods.unregister("strided")


def _model_and_input():
    torch.manual_seed(0)
    return Stack(SdpaForms).eval(), torch.randn(1, 64, 32)


def _with_strided_sdpa(monkeypatch, stride: int):
    """The model's own SDPA replaced by the strided one: what the optimized model must compute."""
    real = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        s = scale if scale is not None else query.shape[-1] ** -0.5
        return real(query, key[..., ::stride, :], value[..., ::stride, :], scale=s)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)


def test_toy_method_runs_through_optimize_and_the_report(strided, monkeypatch):
    model, x = _model_and_input()
    opt = vmonarch_opt.optimize(model, x, methods=("strided",), budget=None, min_seq_len=0)
    rows = opt.report.rows
    assert len(rows) == 4 and {r["plan"]["method"] for r in rows} == {"strided"}
    assert all(r["plan"]["args"] == {"stride": 2} for r in rows)
    assert all(r["plan"]["flops_after"] * 2 == r["plan"]["flops_before"] for r in rows)
    text = str(opt.report)
    assert "strided" in text and "stride=2" in text and "2.0×" in text
    with torch.no_grad():
        out = opt(x)
        dense = model(x)
        _with_strided_sdpa(monkeypatch, 2)
        expected = model(x)
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, dense) > 1e-3  # the method really ran


def test_toy_method_is_calibrated_and_its_profile_round_trips(strided, tmp_path, monkeypatch):
    model, x = _model_and_input()
    prof = vmonarch_opt.calibrate(model, x, methods=("strided", "dense"), budget=Budget(max_rel_error=10.0),
                                  min_seq_len=0)
    assert getattr(model, "vmonarch", None) is None  # calibrate leaves the model as it was
    rows = prof.sites
    assert {tuple(c["label"] for c in r["candidates"]) for r in rows.values()} == {("strided s2", "strided s4")}
    assert set(prof.choices().values()) == {StridedConfig(stride=4)}  # loose budget: the cheapest
    path = prof.save(tmp_path / "profile.json")
    loaded = load_profile(path)
    assert loaded.choices() == prof.choices()
    opt = vmonarch_opt.optimize(model, x, profile=loaded)
    for r in opt.report.rows:
        assert r["plan"]["method"] == "strided" and r["plan"]["args"] == {"stride": 4}
        assert r["plan"]["reason"].startswith("calibrated")
        assert r["plan"]["calibrated_error"] == rows[r["site"]["site_id"]]["choice"]["error"]
    assert "stride=4" in str(opt.report)
    tight = vmonarch_opt.calibrate(model, x, methods=("strided", "dense"), budget=Budget(max_rel_error=0.0),
                                   min_seq_len=0)
    assert {r["choice"]["config"]["method"] for r in tight.sites.values()} == {"dense"}
    with torch.no_grad():
        out = opt(x)
        _with_strided_sdpa(monkeypatch, 4)
        assert rel_err(out, model(x)) < 1e-5


def test_unregistered_method_is_gone_and_unknown_names_are_refused(strided):
    assert "strided" in methods.names()
    methods.unregister("strided")
    assert "strided" not in methods.names()
    model, x = _model_and_input()
    with pytest.raises(ValueError, match="choose a non-empty subset of .*monarch"):
        vmonarch_opt.optimize(model, x, methods=("strided",))
    with pytest.raises(ValueError, match="unknown method 'strided'"):
        methods.config_from_dict({"method": "strided", "stride": 2})


def test_registry_refuses_clashes():
    with pytest.raises(ValueError, match="already registered"):
        class Other(Method):
            name = "monarch"
            config_cls = StridedConfig
        methods.register(Other())
    with pytest.raises(ValueError, match="name other than"):
        class Nameless(Method):
            config_cls = StridedConfig
        methods.register(Nameless())


def test_nothing_outside_the_registry_branches_on_a_method_name():
    """Method knowledge lives in its module: no comparison of a method against a name literal."""
    pkg = pathlib.Path(vmonarch_opt.__file__).parent
    pattern = re.compile(r"""\bmethod\s*(==|!=)\s*['"]|['"]\s*(==|!=)\s*[\w.]*method\b|\.method\s+(not\s+)?in\s+[(\[{]""")
    hits = [f"{p.relative_to(pkg)}:{i}: {line.strip()}"
            for p in sorted(pkg.rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []
