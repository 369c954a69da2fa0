"""Bad input, the report's exports, and the CLI."""
import json
import subprocess
import sys

import pytest
import torch

import vmonarch_opt
from vmonarch_fixtures import models
from vmonarch_opt.cli import main
from vmonarch_opt.errors import CalibrationBatchError


def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        vmonarch_opt.optimize(lambda x: x, torch.randn(2))


def test_wrong_batch_names_the_signature():
    model, batch = models.wan()
    bad = dict(batch)
    bad.pop("encoder_hidden_states")
    with pytest.raises(CalibrationBatchError) as e:
        vmonarch_opt.optimize(model, bad)
    msg = str(e.value)
    assert "WanTransformer3DModel.forward(" in msg and "encoder_hidden_states" in msg
    assert "hidden_states=Tensor(1, 4, 3, 8, 10)" in msg


def test_wrong_batch_type():
    model, _ = models.wan()
    with pytest.raises(CalibrationBatchError, match="dict"):
        vmonarch_opt.optimize(model, 3)


def test_bad_options():
    model, batch = models.wan()
    with pytest.raises(ValueError, match="methods"):
        vmonarch_opt.optimize(model, batch, methods=("flash",))
    with pytest.raises(ValueError, match="grid"):
        vmonarch_opt.optimize(model, batch, grid=(3, 4))


def test_report_exports_and_cli(tmp_path, capsys):
    model, batch = models.wan()
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    text = str(opt.report)
    assert "blocks.0.attn1" in text and "monarch" in text and "cross-attention" in text
    assert "attention sites" in text.splitlines()[-1]
    md = opt.report.to_markdown()
    assert md.count("|") > 20
    path = tmp_path / "r.json"
    opt.report.to_json(path)
    data = json.loads(path.read_text())
    assert data["totals"]["sites"] == 4 and data["totals"]["by_method"] == {"monarch": 2, "original": 2}
    assert data["totals"]["flops_after"] < data["totals"]["flops_before"]
    assert vmonarch_opt.Report.load(path).totals == opt.report.totals
    assert main(["report", str(path)]) == 0
    assert "blocks.1.attn1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        main(["report", str(tmp_path / "bad.json")])


_FACTORY_MODULE = """
import torch

from handwritten_models import SelfAttention


def make(tokens=36):
    torch.manual_seed(0)
    return torch.nn.Sequential(SelfAttention(), SelfAttention()).eval(), torch.randn(1, tokens, 32)
"""


def test_cli_finds_a_factory_in_the_current_directory(tmp_path, monkeypatch, capsys):
    """vmonarch-opt resolves module:factory from a module file in the current directory, which the
    console script does not have on sys.path, and leaves sys.path as it found it."""
    import importlib.util
    import os

    name = "vmonarch_cli_cwd_models"
    (tmp_path / f"{name}.py").write_text(_FACTORY_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and os.path.abspath(p) != os.getcwd()])
    path_before = list(sys.path)
    assert importlib.util.find_spec(name) is None  # not importable without the CLI's help
    try:
        out = tmp_path / "p.json"
        assert main(["calibrate", f"{name}:make", "--kwargs", '{"tokens": 36}', "--min-seq-len", "0",
                     "--max-rel-error", "1.0", "--methods", "monarch,dense", "-q", "-o", str(out)]) == 0
        text = capsys.readouterr().out
        assert out.exists() and "profile written to" in text and "2 sites" in text  # the factory's model
        assert sys.path == path_before
        with pytest.raises(SystemExit, match="no attribute"):  # export-onnx shares the resolver
            main(["export-onnx", f"{name}:nope", "-o", str(tmp_path / "m.onnx")])
        assert sys.path == path_before
    finally:
        sys.modules.pop(name, None)


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vmonarch_opt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "report" in out.stdout


def test_readme_example_runs_and_writes_its_report(tmp_path):
    """examples/optimize_wan.py, as the README tells a newcomer to run it."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "optimize_wan.py"
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("vmonarch_opt report — WanTransformer3DModel") == 2
    assert "calibrated: no candidate meets the error budget" in res.stdout  # run 1: calibrated, left dense
    assert "4 attention sites (monarch: 2, original: 2)" in res.stdout  # run 2: Monarch pinned
    data = json.loads((tmp_path / "wan_report.json").read_text())
    assert [r["plan"]["method"] for r in data["rows"]] == ["monarch", "original", "monarch", "original"]


def test_report_states_the_measured_forward_time(monkeypatch):
    """On CUDA optimize() times one eager forward with and without the rewrite and the report says it;
    when the optimized model is slower it says why and what to do (and optimize warns)."""
    import copy
    import warnings

    pipeline = sys.modules["vmonarch_opt.pipeline"]  # optimize()'s stages

    model, batch = models.wan()
    plain = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    assert "forward_ms" not in plain.report.totals  # CPU: nothing timed
    monkeypatch.setattr(pipeline, "on_cuda", lambda b: True)  # the timing path, with CPU clocks
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    fm = timed.report.totals["forward_ms"]
    assert set(fm) == {"original", "optimized"} and all(v > 0 for v in fm.values())
    # no CUDA kernels ran, so the profiler measured no GPU activity: not claimed either way
    assert timed.report.totals["forward_gpu_busy"] == {"original": None, "optimized": None}
    assert timed.vmonarch.switch.original is False  # the timing left the optimized path on
    r = vmonarch_opt.Report(copy.deepcopy(timed.report.data))
    r.totals["forward_ms"] = {"original": 10.0, "optimized": 4.0}
    assert "one eager forward on the calibration batch: 10 ms → 4 ms (speed-up 2.50×)" in str(r)
    assert "slower" not in str(r)
    r.totals["forward_ms"] = {"original": 4.0, "optimized": 10.0}
    # not measured: neither diagnosis is claimed, both remedies are given
    note = r.slower_note()
    assert "slower than the original at this size" in note and "was not measured" in note
    assert 'mode="reduce-overhead"' in note and "Budget(cost=" in note
    r.totals["forward_gpu_busy"] = {"original": 0.9, "optimized": 0.2}  # measured: launch-bound
    note = r.slower_note()
    assert "busy only 20% of the optimized forward (measured)" in note and "reduce-overhead" in note
    assert "Budget(cost=" not in note and "GPU busy 90% → 20% of the forward" in str(r)
    r.totals["forward_ms"] = {"original": 1000.0, "optimized": 1100.0}
    r.totals["forward_gpu_busy"] = {"original": 0.95, "optimized": 0.97}  # measured: the kernels are slower
    note = r.slower_note()
    assert "not launch" in note and "reduce-overhead" not in note and "Budget(cost=" in note


def test_gpu_busy_counts_overlapping_kernels_once():
    from vmonarch_opt.pipeline import union_length

    assert union_length([(0, 10)]) == 10
    assert union_length([(0, 10), (5, 12), (20, 25)]) == 17  # two streams overlapping, then a gap
    assert union_length([(0, 10), (2, 3), (10, 11)]) == 11
