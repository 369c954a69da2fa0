"""Inputs that are wrong: every user mistake is named, never silently ignored or worked around.

grid= that does not fit, globs that match nothing, pins that cannot run, calibration batches of
several shapes, hand-edited profiles, option values, CLI mistakes and the profile plot's scale.
"""
import json
import warnings

import pytest
import torch

import vmonarch_opt
from handwritten_models import SelfAttention
from vmonarch_fixtures import models

FAST = dict(budget=None, min_seq_len=0, validate=False)  # no calibration: the checks are what is tested


def _quiet_optimize(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vmonarch_opt.optimize(*args, **kw)


# ------------------------------------------------------------------------------ 9: grid=
def test_grid_that_does_not_fit_the_video_tokens_raises():
    """wan(): a 3×4×5 grid of 60 video tokens (no text in its self-attention). A grid of another
    product used to be ignored while the report claimed the inferred grid."""
    model, batch = models.wan()
    with pytest.raises(ValueError) as e:
        _quiet_optimize(model, batch, grid=(2, 2, 2), **FAST)
    msg = str(e.value)
    assert "blocks.0.attn1" in msg and "60" in msg and "(2, 2, 2)" in msg
    assert "3×4×5" in msg or "(3, 4, 5)" in msg  # what the model says the grid is
    with pytest.raises(ValueError, match=r"blocks\.1\.attn1.*60"):  # one glob
        _quiet_optimize(model, batch, grid={"blocks.1.attn1": (3, 4, 4)}, **FAST)
    with pytest.raises(ValueError, match=r"61 tokens.*blocks\.0\.attn1.*60"):  # text placed that does not add up
        _quiet_optimize(model, batch, grid={"blocks.0.attn1": {"grid": (3, 4, 5), "text_before": 1}}, **FAST)
    with pytest.raises(ValueError, match="grid="):  # calibrate() checks the same way
        vmonarch_opt.calibrate(model, batch, grid=(2, 2, 2), min_seq_len=0, progress=False)


def test_grid_that_fits_is_used_and_said_so():
    model, batch = models.wan()
    opt = _quiet_optimize(model, batch, grid=(5, 4, 3), methods="monarch", **FAST)  # 60 tokens: taken as given
    s = opt.report.site("blocks.0.attn1")["site"]
    assert s["grid"] == [5, 4, 3] and s["grid_source"] == "grid= given by the user"


def test_grid_the_model_agrees_with_is_placed_where_only_the_model_can_place_it():
    """Motif-Video's decoder joins two copies of the video: only the patch embedding says which one is
    the video. A grid= with the video's token count takes that placement (it used to be dropped for
    the inferred grid, which happened to be the same)."""
    model, batch = models.motif_video()  # a 3×6×8 grid
    opt = _quiet_optimize(model, batch, grid=(6, 3, 8), **FAST)
    s = opt.report.site("single_transformer_blocks.1.attn")["site"]
    assert s["grid"] == [6, 3, 8] and (s["text_before"], s["text_after"]) == (0, 144)
    assert s["grid_source"].startswith("grid= given by the user (the other tokens placed as for the grid from Conv3d")


def test_grid_entry_that_fits_no_site_it_names_raises():
    """A site whose video tokens are not known (no patch embedding, no latents in the batch): a
    grid that fits none of the sites it matches is wrong, not ignored."""
    model = torch.nn.Sequential(SelfAttention(), SelfAttention()).eval()
    x = torch.randn(1, 36, 32)
    with pytest.raises(ValueError, match=r"(?s)grid=.*\(2, 3, 5\).*36"):
        _quiet_optimize(model, x, grid=(2, 3, 5), **FAST)
    opt = _quiet_optimize(model, x, grid=(1, 6, 6), methods="monarch", **FAST)
    assert opt.report.site("0")["site"]["grid"] == [1, 6, 6]


@pytest.mark.parametrize("bad", [(0, 4, 5), (-3, 4, 5), (3.0, 4, 5), (3, 4, 5.5), (True, 4, 5)])
def test_non_positive_or_float_grids_say_what_is_wanted(bad):
    model, batch = models.wan()
    with pytest.raises(ValueError, match="positive integers whose product is"):
        vmonarch_opt.optimize(model, batch, grid=bad, **FAST)
    with pytest.raises(ValueError, match="positive integers whose product is"):
        vmonarch_opt.optimize(model, batch, grid={"blocks.*": {"grid": bad}}, **FAST)


# ------------------------------------------------------------------------------ 10: globs and pins
def test_override_glob_that_matches_no_site_warns_with_the_sites():
    model, batch = models.wan()
    with pytest.warns(RuntimeWarning, match=r"(?s)overrides=.*'block\.0\.\*'.*blocks\.0\.attn1.*blocks\.1\.attn2"):
        vmonarch_opt.optimize(model, batch, overrides={"block.0.*": "dense", "blocks.1.*": "dense"}, **FAST)


def test_grid_glob_that_matches_no_site_warns_with_the_sites():
    model, batch = models.wan()
    with pytest.warns(RuntimeWarning, match=r"(?s)grid=.*'transformer\.\*'.*blocks\.0\.attn1"):
        vmonarch_opt.optimize(model, batch, grid={"transformer.*": (3, 4, 5)}, **FAST)


def test_globs_that_match_warn_nothing():
    model, batch = models.wan()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        vmonarch_opt.optimize(model, batch, overrides={"blocks.0.*": "dense"}, grid={"blocks.*": (3, 4, 5)}, **FAST)


def test_pin_the_site_cannot_take_is_in_its_why():
    model, batch = models.wan()
    opt = vmonarch_opt.optimize(model, batch, overrides={"blocks.0.attn2": "monarch"}, **FAST)
    row = opt.report.site("blocks.0.attn2")
    assert row["plan"]["method"] == "original"
    why = row["plan"]["reason"]
    assert "pinned to monarch by overrides=" in why and "cross-attention" in why
    assert "pinned" in str(opt.report)


def test_unknown_method_in_overrides_fails_before_the_model_runs(monkeypatch):
    model, batch = models.wan()
    ran = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"(?s)overrides=.*'magic'.*monarch"):
        vmonarch_opt.optimize(model, batch, overrides={"blocks.*": "magic"}, **FAST)
    assert not ran


# ------------------------------------------------------------------------------ 11: several batches
def test_calibration_batches_of_different_shapes_raise():
    """Each site's plan matches one shape: the other batches used to be dropped at every site while
    the profile said it was calibrated on all of them."""
    model, b3 = models.wan(frames=3)
    _, b2 = models.wan(frames=2)
    with pytest.raises(ValueError) as e:
        vmonarch_opt.calibrate(model, [b3, b2], budget=vmonarch_opt.Budget(max_rel_error=0.5), min_seq_len=0,
                               progress=False)
    msg = str(e.value)
    assert "batch 0" in msg and "batch 1" in msg and "(1, 4, 3, 8, 10)" in msg and "(1, 4, 2, 8, 10)" in msg
    assert "per shape" in msg
    with pytest.raises(ValueError, match="per shape"):
        vmonarch_opt.optimize(model, [b3, b2], budget=vmonarch_opt.Budget(max_rel_error=0.5), min_seq_len=0)


def test_calibration_batches_of_one_shape_are_all_used():
    model, b = models.wan()
    b2 = {**b, "hidden_states": torch.randn_like(b["hidden_states"]), "timestep": b["timestep"] * 0 + 500}
    prof = vmonarch_opt.calibrate(model, [b, b2], budget=vmonarch_opt.Budget(max_rel_error=0.5), min_seq_len=0,
                                  progress=False)
    assert prof.data["batches"] == 2
    assert all(r["batches"] == 2 for r in prof.sites.values() if r["status"] == "calibrated")


class _Skippable(torch.nn.Module):
    """Two attention blocks; ``skip=True`` leaves the second out (same tensors, another path)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([SelfAttention(), SelfAttention()])

    def forward(self, x, skip=False):
        x = self.blocks[0](x)
        return x if skip else self.blocks[1](x)


def test_a_site_some_batches_do_not_reach_is_not_dropped_silently():
    torch.manual_seed(0)
    model, x = _Skippable().eval(), torch.randn(1, 36, 32)
    with pytest.warns(RuntimeWarning, match=r"blocks\.1 on 1 of 2 batches"):
        batches = [{"x": x, "skip": False}, {"x": x + 1, "skip": True}]
        prof = vmonarch_opt.calibrate(model, batches, methods="monarch", grid=(1, 6, 6), min_seq_len=0,
                                      budget=vmonarch_opt.Budget(max_rel_error=1.0), progress=False)
    assert prof.sites["blocks.0"]["batches"] == 2 and prof.sites["blocks.1"]["batches"] == 1


# ------------------------------------------------------------------------------ 13: options
def test_methods_as_one_string_is_one_method():
    model, batch = models.wan()
    opt = vmonarch_opt.optimize(model, batch, methods="monarch", **FAST)
    assert opt.report.data["meta"]["methods"] == ["monarch"]
    with pytest.raises(ValueError, match="methods"):
        vmonarch_opt.optimize(model, batch, methods="monarch,dense", **FAST)


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_min_seq_len_must_be_a_non_negative_integer(bad):
    model, batch = models.wan()
    with pytest.raises(ValueError, match="min_seq_len"):
        vmonarch_opt.optimize(model, batch, min_seq_len=bad, budget=None)
    with pytest.raises(ValueError, match="min_seq_len"):
        vmonarch_opt.calibrate(model, batch, min_seq_len=bad)


# ------------------------------------------------------------------------------ 12: profiles edited by hand
def test_pooled_vmoba_flops_count_the_pooled_keys():
    """The FLOPs a VMoBA plan states from its measured density are what the kernel executes (the
    pooled rest's keys included), so a profile's FLOPs can be recomputed from its plan."""
    from vmonarch_opt import methods as registry
    from vmonarch_opt.methods import Shape
    from vmonarch_opt.site import AttentionSite

    site = AttentionSite("s", "s", 0, "sdpa", 1, 2, 2, 151, 151, 16, 16, "float32", "[B,H,N,D]", grid=(4, 6, 6),
                         text_before=7)
    q, k, v = (torch.randn(1, 2, 151, 16) for _ in range(3))
    vmoba = registry.get("vmoba")
    for pooled in (False, True):
        args = vmoba.resolve_args(vmonarch_opt.VMoBAConfig(pooled_rest=pooled), site, 2)
        _, flops, density = vmoba.calibration_run(q, k, v, args, 0.25)
        assert vmoba.flops(Shape.of(site), args, density) == flops


@pytest.fixture(scope="module")
def wan_profile(tmp_path_factory):
    """wan() at 4×6×6 calibrated loosely: both self-attention sites choose Monarch 1×3×3 tiles."""
    model, batch = models.wan(frames=4, height=6, width=6)
    prof = vmonarch_opt.calibrate(model, batch, budget=vmonarch_opt.Budget(max_rel_error=0.5), min_seq_len=0,
                                  progress=False)
    return model, batch, prof.save(tmp_path_factory.mktemp("profiles") / "wan.json")


def _edit(path, tmp_path, edit, site="blocks.0.attn1"):
    """A copy of the profile at ``path`` with ``edit(row)`` applied to one site's row."""
    data = json.loads(path.read_text())
    edit(data["sites"][site])
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(data))
    return out


def _as(row, label, **fields):
    """Make the row's choice another config, labelled as such (errors, FLOPs and why untouched)."""
    cfg = {**row["choice"]["config"], **fields}
    row["choice"]["config"] = cfg
    row["choice"]["label"] = label


def test_the_calibrated_profile_loads_as_written(wan_profile, tmp_path):
    model, batch, path = wan_profile
    prof = vmonarch_opt.load_profile(path)
    assert prof.sites["blocks.0.attn1"]["choice"]["label"] == "monarch 1×3×3 s1"
    opt = vmonarch_opt.optimize(model, batch, profile=prof)
    assert opt.report.site("blocks.0.attn1")["plan"]["method"] == "monarch"
    out = vmonarch_opt.calibrate(model, batch, min_seq_len=0, progress=False,  # an output budget's "why"s too
                                 budget=vmonarch_opt.Budget(max_rel_error=0.5, output_rel_error=0.1))
    vmonarch_opt.load_profile(out.save(tmp_path / "out.json"))


def test_a_vmoba_profile_calibrated_on_three_batches_loads(tmp_path):
    """Its FLOPs are a mean over the batches: the check recomputes them from the mean density and
    must not refuse the profile over a rounding of that mean."""
    model, batch = models.wan()
    batches = [{**batch, "timestep": torch.tensor([t])} for t in (900, 500, 100)]
    prof = vmonarch_opt.calibrate(model, batches, methods=("vmoba", "dense"), min_seq_len=0, progress=False,
                                  budget=vmonarch_opt.Budget(max_rel_error=10.0))
    assert any(r["choice"]["config"]["method"] == "vmoba" for r in prof.sites.values() if r.get("choice"))
    loaded = vmonarch_opt.load_profile(prof.save(tmp_path / "three.json"))
    assert loaded.choices() == prof.choices()


def test_a_monarch_block_that_does_not_fit_the_grid_is_refused(wan_profile, tmp_path):
    _, _, path = wan_profile
    bad = _edit(path, tmp_path, lambda r: _as(r, "monarch 1×7×6 s1", block=[1, 7, 6]))
    with pytest.raises(vmonarch_opt.ProfileError,
                       match=r"blocks\.0\.attn1.*block 1×7×6 does not fit the site's grid 4×6×6"):
        vmonarch_opt.load_profile(bad)
    bad = _edit(path, tmp_path, lambda r: _as(r, "monarch 1×0×6 s1", block=[1, 0, 6]))
    with pytest.raises(vmonarch_opt.ProfileError, match="positive integers"):
        vmonarch_opt.load_profile(bad)


def test_a_choice_that_costs_more_than_dense_is_refused(wan_profile, tmp_path):
    _, _, path = wan_profile
    bad = _edit(path, tmp_path, lambda r: _as(r, "monarch 4×6×6 s1", block=[4, 6, 6]))  # one block: dense and more
    with pytest.raises(vmonarch_opt.ProfileError,
                       match=r"monarch 4×6×6 s1 costs \d+ attention FLOPs, not fewer than dense"):
        vmonarch_opt.load_profile(bad)


def test_a_config_without_its_parameters_or_with_unknown_ones_is_refused(wan_profile, tmp_path):
    _, _, path = wan_profile

    def bare(r):
        r["choice"]["config"] = {"method": "monarch"}  # would silently mean frame blocks
        r["choice"]["label"] = "monarch auto s1"
    with pytest.raises(vmonarch_opt.ProfileError, match=r"lacks its parameters \['block', 'steps', 'recompute'\]"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, bare))
    with pytest.raises(vmonarch_opt.ProfileError, match=r"unknown fields \['speed'\]"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, lambda r: r["choice"]["config"].update(speed=2)))
    with pytest.raises(vmonarch_opt.ProfileError, match=r"candidate.*unknown fields \['speed'\]"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, lambda r: r["candidates"][0]["config"].update(speed=2)))
    with pytest.raises(vmonarch_opt.ProfileError, match=r"threshold=-1"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, lambda r: r["choice"].update(
            config={**r["candidates"][5]["config"], "threshold": -1}, label="vmoba 1d 1×2×2 thr-1")))


def test_a_why_that_no_longer_matches_is_refused(wan_profile, tmp_path):
    _, _, path = wan_profile

    def other_candidate(r):  # the frame-block candidate, with its error and FLOPs, but the tile's why
        frame = next(c for c in r["candidates"] if c["label"] == "monarch 1×6×6 s1")
        r["choice"].update(config=frame["config"], label=frame["label"], error=frame["error"], flops=frame["flops"])
    with pytest.raises(vmonarch_opt.ProfileError, match=r"(?s)why 'cheapest within the budget: error 4.*does not match "
                                                        r"its choice monarch 1×6×6 s1.*calibration writes"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, other_candidate))
    with pytest.raises(vmonarch_opt.ProfileError, match="does not match its choice"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, lambda r: r["choice"].update(
            why=r["choice"]["why"].replace("fewer attention FLOPs", "fewer attention FLOPs, and faster"))))
    with pytest.raises(vmonarch_opt.ProfileError, match="not one of the measured candidates"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, lambda r: _as(r, "monarch 2×3×3 s1", block=[2, 3, 3])))


def test_flops_are_those_of_the_plan_not_of_the_file(wan_profile, tmp_path):
    _, _, path = wan_profile
    with pytest.raises(vmonarch_opt.ProfileError, match=r"choice monarch 1×3×3 s1: 1000 attention FLOPs in the file, "
                                                        r"but its plan at this site does \d+"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, lambda r: r["choice"].update(flops=1000)))
    with pytest.raises(vmonarch_opt.ProfileError, match="dense attention FLOPs in the file"):
        vmonarch_opt.load_profile(_edit(path, tmp_path, lambda r: r["dense"].update(flops=10 ** 9)))


def test_optimize_checks_a_profile_changed_after_loading(wan_profile):
    model, batch, path = wan_profile
    prof = vmonarch_opt.load_profile(path)
    _as(prof.sites["blocks.1.attn1"], "monarch 1×7×6 s1", block=[1, 7, 6])
    with pytest.raises(vmonarch_opt.ProfileError, match=r"blocks\.1\.attn1.*does not fit"):
        vmonarch_opt.optimize(model, batch, profile=prof)


# ------------------------------------------------------------------------------ 14: the command line
WAN = "vmonarch_fixtures.models:wan"


def _cli_error(capsys, *argv) -> str:
    """Run the CLI on a mistake: exit status 2, one line on stderr, no traceback; that line."""
    from vmonarch_opt.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmonarch-opt: error: "), err
    return lines[0]


def test_cli_mistakes_are_one_line(tmp_path, capsys):
    assert "magic" in _cli_error(capsys, "calibrate", WAN, "--methods", "monarch,magic")
    assert "T,H,W" in _cli_error(capsys, "calibrate", WAN, "--grid", "3,4")
    assert "T,H,W" in _cli_error(capsys, "calibrate", WAN, "--grid", "a,b,c")
    assert "max_rel_error=-1.0" in _cli_error(capsys, "calibrate", WAN, "--max-rel-error", "-1")
    assert "--min-seq-len" in _cli_error(capsys, "calibrate", WAN, "--min-seq-len", "-5")
    assert "--overrides must be a JSON object" in _cli_error(capsys, "calibrate", WAN, "--overrides", "{blocks")
    assert "'magic'" in _cli_error(capsys, "calibrate", WAN, "--overrides", '{"blocks.*": "magic"}')
    assert "--kwargs must be a JSON object" in _cli_error(capsys, "calibrate", WAN, "--kwargs", "[3]")
    assert "--kwargs must be a JSON object" in _cli_error(capsys, "export-onnx", WAN, "--kwargs", "{", "-o",
                                                           str(tmp_path / "m.onnx"))
    assert "is a directory" in _cli_error(capsys, "calibrate", WAN, "-o", str(tmp_path))
    assert "grid=(2, 2, 2)" in _cli_error(capsys, "calibrate", WAN, "--grid", "2,2,2", "--min-seq-len", "0", "-q",
                                          "-o", str(tmp_path / "p.json"))  # a library error, after the model ran


def test_cli_file_mistakes_are_one_line(tmp_path, capsys):
    for name, text in {"list.json": "[1, 2]", "other.json": '{"format": "something/1"}', "bare.json": "{}",
                       "damaged.json": '{"format": "vmonarch_opt.report/1", "model": "M"}'}.items():
        (tmp_path / name).write_text(text)
        line = _cli_error(capsys, "report", str(tmp_path / name))
        assert name in line and ("not a vmonarch_opt report" in line or "damaged" in line), line
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    assert "not a text file" in _cli_error(capsys, "report", str(tmp_path / "binary.json"))
    assert "is a directory" in _cli_error(capsys, "report", str(tmp_path))
    assert "is a directory" in _cli_error(capsys, "show", str(tmp_path))
    assert "no such" in _cli_error(capsys, "show", str(tmp_path / "missing.json"))
    assert ".xyz" in _cli_error(capsys, "plot", str(tmp_path / "missing.json"), "-o", str(tmp_path / "p.xyz"))


def test_cli_debug_shows_the_traceback(capsys):
    from vmonarch_opt.cli import main

    with pytest.raises(ValueError, match="max_rel_error"):
        main(["--debug", "calibrate", WAN, "--max-rel-error", "-1"])
    with pytest.raises(ValueError, match="max_rel_error"):  # anywhere on the line
        main(["calibrate", WAN, "--max-rel-error", "-1", "--debug"])


def test_cli_version(capsys):
    from vmonarch_opt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vmonarch-opt {vmonarch_opt.__version__}"


def test_cli_as_a_program_exits_2_and_ends_quietly_in_a_pipe(tmp_path):
    """The console script: status 2 and one line for a mistake; ``report --markdown | head`` stops
    without a BrokenPipeError traceback."""
    import subprocess
    import sys

    model, batch = models.wan()
    report = _quiet_optimize(model, batch, **FAST).report
    report.data["rows"] = report.data["rows"] * 2000  # far more than a pipe buffer
    report.to_json(tmp_path / "big.json")
    cli = [sys.executable, "-m", "vmonarch_opt.cli"]
    for argv in (["report", str(tmp_path)], ["show", str(tmp_path / "missing.json")]):
        res = subprocess.run(cli + argv, capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith("vmonarch-opt: error: "), res.stderr
    proc = subprocess.Popen(cli + ["report", "--markdown", str(tmp_path / "big.json")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert first.startswith(b"### vmonarch_opt report") and err == ""


# ------------------------------------------------------------------------------ 15: the profile plot
def test_profile_plot_cut_axis_starts_at_1x_and_colours_have_a_legend(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    model, batch = models.wan(frames=4, height=6, width=6)
    prof = vmonarch_opt.calibrate(model, batch, budget=vmonarch_opt.Budget(max_rel_error=0.5), min_seq_len=0,
                                  overrides={"blocks.1.attn1": "dense"}, progress=False)
    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
    prof.plot(tmp_path / "p.png")
    ax = figures[0].axes[3]  # the FLOP-cut panel
    assert ax.get_ylim()[0] == pytest.approx(1.0)  # no cut is the floor, not 0
    bars = ax.patches
    assert len(bars) == 2 and all(b.get_y() == pytest.approx(1.0) for b in bars)
    cut = prof.sites["blocks.0.attn1"]["dense"]["flops"] / prof.sites["blocks.0.attn1"]["choice"]["flops"]
    assert bars[0].get_y() + bars[0].get_height() == pytest.approx(cut) and bars[1].get_height() == 0
    legend = ax.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["monarch", "dense"]
    colours = {t.get_text(): h.get_facecolor() for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert bars[0].get_facecolor() == colours["monarch"] and bars[1].get_facecolor() == colours["dense"]
    assert "1×" in ax.get_ylabel()
