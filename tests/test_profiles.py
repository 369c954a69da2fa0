"""Calibration profiles on diffusers video transformers: budget respected after rewrite, save/load
round trip, mismatched/corrupt/old files, table, plot and CLI (CPU, small random configs)."""
import json
import os

import pytest
import torch

import vmonarch_opt
from vmonarch_fixtures import models
from vmonarch_opt import Budget, ProfileError, load_profile
from conftest import rel_err


BUDGET = Budget(max_rel_error=0.5)  # random tiny models: attention errors of 0.1-0.5 (see the profiles)
WAN = dict(frames=4, height=6, width=6)


def _out(model, batch):
    with torch.no_grad():
        return model(**batch)[0]


@pytest.fixture(scope="module")
def wan():
    model, batch = models.wan(**WAN)
    prof = vmonarch_opt.calibrate(model, batch, budget=BUDGET, min_seq_len=0, progress=False)
    return model, batch, prof


def _check_budget_after_rewrite(opt, prof, budget):
    """Re-measured errors of the rewritten sites (the optimized model's own validation run)."""
    chosen, first = 0, True
    for sid, row in prof.sites.items():
        rep = opt.report.site(sid)
        if row["status"] != "calibrated":
            continue
        method = row["choice"]["config"]["method"]
        assert rep["plan"]["method"] == method
        assert rep["plan"]["source"] == "profile"
        assert rep["error"] <= budget.limit_for(sid) + 1e-6, (sid, rep["error"])
        assert rep["plan"]["calibrated_error"] == pytest.approx(row["choice"]["error"], rel=1e-4, abs=1e-7)
        if first:  # later sites see inputs changed by the rewritten sites before them
            assert rep["error"] == pytest.approx(row["choice"]["error"], rel=1e-3, abs=1e-6)
        first = False
        assert rep["plan"]["reason"].startswith("calibrated:")
        if method == "vmoba":
            assert rep["plan"]["density"] == pytest.approx(row["choice"]["density"])
            assert rep["plan"]["flops_after"] < rep["plan"]["flops_before"]
        chosen += method != "dense"
    return chosen


def test_wan_profile_respects_budget_and_round_trips(wan, tmp_path):
    model, batch, prof = wan
    rows = [r for r in prof.sites.values() if r["status"] == "calibrated"]
    assert [r["site"]["site_id"] for r in rows] == ["blocks.0.attn1", "blocks.1.attn1"]
    assert prof.sites["blocks.0.attn2"]["status"] == "original"  # cross-attention, with its reason
    for r in rows:
        st = r["stats"]
        assert len(st["entropy"]) == 2 and 0 < min(st["entropy_norm"]) <= max(st["entropy_norm"]) <= 1 + 1e-5
        assert len(st["entropy_spread"]) == 2 and len(st["own_frame_mass"]) == 2
        assert 0 < min(st["concentration"]) <= 1 and r["candidates"]
        assert r["choice"]["error"] <= BUDGET.max_rel_error

    opt = vmonarch_opt.optimize(model, batch, profile=prof, min_seq_len=0)
    assert _check_budget_after_rewrite(opt, prof, BUDGET) >= 1
    path = prof.save(tmp_path / "wan.json")
    loaded = load_profile(path)
    assert loaded.data == json.loads(prof.to_json())
    assert loaded.choices() == prof.choices()
    again = vmonarch_opt.optimize(model, batch, profile=loaded, min_seq_len=0)
    assert torch.equal(_out(again, batch), _out(opt, batch))
    # without min_seq_len, the profile's own threshold (0 here, not the default 1024) applies
    assert loaded.data["min_seq_len"] == 0
    implicit = vmonarch_opt.optimize(model, batch, profile=loaded)
    assert torch.equal(_out(implicit, batch), _out(opt, batch))
    assert vmonarch_opt.optimize(model, batch, profile=loaded, min_seq_len=10 ** 6).report.totals["by_method"] \
        == {"original": len(prof.sites)}  # an explicit threshold still wins
    # calibrating inside optimize() gives the same choices and outputs
    direct = vmonarch_opt.optimize(model, batch, budget=BUDGET, min_seq_len=0)
    assert direct.vmonarch.profile.choices() == prof.choices()
    assert torch.equal(_out(direct, batch), _out(opt, batch))
    assert rel_err(_out(opt, batch), _out(model, batch)) > 0


def test_cogvideox_joint_attention_profile():
    model, batch = models.cogvideox(frames=4, height=4, width=6)
    budget = Budget(max_rel_error=0.3, per_site={"transformer_blocks.0.*": 0.0})
    prof = vmonarch_opt.calibrate(model, batch, budget=budget, min_seq_len=0, progress=False)
    b0, b1 = prof.sites["transformer_blocks.0.attn1"], prof.sites["transformer_blocks.1.attn1"]
    assert b0["site"]["text_before"] == 7 and b0["limit"] == 0.0 and b1["limit"] == 0.3
    assert b0["choice"]["config"] == {"method": "dense"}
    opt = vmonarch_opt.optimize(model, batch, profile=prof, min_seq_len=0)
    assert _check_budget_after_rewrite(opt, prof, budget) == 1  # block 1 gets a structured method
    assert torch.isfinite(_out(opt, batch)).all()


def test_hunyuan_text_padding_is_calibrated_as_it_runs():
    """Joint attention with a text key-padding mask: calibration measures every candidate through
    the op's padding path against the model's masked attention, so the calibrated error of the
    first rewritten site is what the optimized model re-measures there."""
    model, batch = models.hunyuan(frames=3, height=4, width=6, batch=2)
    batch["encoder_attention_mask"][0, 3:] = 0  # prompt 0 has 3 real tokens of 7
    prof = vmonarch_opt.calibrate(model, batch, budget=BUDGET, methods=("monarch", "vmoba"), min_seq_len=0,
                                  progress=False)
    rows = {sid: r for sid, r in prof.sites.items() if r["status"] == "calibrated"}
    assert rows and all(r["site"]["has_mask"] for r in rows.values())
    opt = vmonarch_opt.optimize(model, batch, profile=prof)
    assert _check_budget_after_rewrite(opt, prof, BUDGET) >= 1
    # the same candidate measured without the mask gives another error: the mask was honoured
    first = next(iter(rows))
    unpadded = dict(batch, encoder_attention_mask=torch.ones_like(batch["encoder_attention_mask"]))
    prof2 = vmonarch_opt.calibrate(model, unpadded, budget=BUDGET, methods=("monarch", "vmoba"), min_seq_len=0,
                                   progress=False)
    e1 = {c["label"]: c["error"] for c in rows[first]["candidates"]}
    e2 = {c["label"]: c["error"] for c in prof2.sites[first]["candidates"]}
    assert e1.keys() == e2.keys() and all(abs(e1[k] - e2[k]) > 1e-6 for k in e1)


def test_mismatched_profiles_fail_clearly(wan, tmp_path):
    model, batch, prof = wan
    path = prof.save(tmp_path / "wan.json")
    other_model, other_batch = models.wan(frames=2, height=6, width=6)
    with pytest.raises(ProfileError, match=r"(?s)other shapes.*seq_q 144→72.*allow_shape_change=True"):
        vmonarch_opt.optimize(other_model, other_batch, profile=load_profile(path), min_seq_len=0)
    ok = vmonarch_opt.optimize(other_model, other_batch, profile=load_profile(path, allow_shape_change=True),
                               min_seq_len=0)
    assert torch.isfinite(_out(ok, other_batch)).all()
    assert all(r["plan"]["source"] == "profile" for r in ok.report.rows if r["plan"]["method"] != "original")
    cog, cog_batch = models.cogvideox()
    with pytest.raises(ProfileError, match=r"(?s)model class.*WanTransformer3DModel.*recalibrate"):
        vmonarch_opt.optimize(cog, cog_batch, profile=str(path), min_seq_len=0)
    deeper, deeper_batch = models.wan(layers=3, **WAN)
    with pytest.raises(ProfileError, match="parameter names/shapes differ"):
        vmonarch_opt.optimize(deeper, deeper_batch, profile=path, min_seq_len=0)


def test_corrupt_old_and_missing_files(wan, tmp_path):
    _, _, prof = wan
    good = prof.save(tmp_path / "p.json").read_text()
    cases = {
        "truncated": (good[: len(good) // 2], "not valid JSON"),
        "old": (good.replace("vmonarch_opt.profile/1", "vmonarch_opt.profile/0"), "another vmonarch_opt version"),
        "alien": (json.dumps({"format": "something/1"}), "not a vmonarch_opt profile"),
        "edited": (json.dumps({**json.loads(good), "sites": {"x": {"site": {}}}}), "corrupt"),
        "badchoice": (good.replace('"method": "monarch"', '"method": "magic"'), "corrupt"),
    }
    for name, (text, msg) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(text)
        with pytest.raises(ProfileError, match=msg):
            load_profile(p)
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "missing.json")


def test_save_is_atomic(wan, tmp_path, monkeypatch):
    _, _, prof = wan
    path = prof.save(tmp_path / "p.json")
    before = path.read_text()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        prof.save(path)
    assert path.read_text() == before and sorted(os.listdir(tmp_path)) == ["p.json"]


def test_table_and_plot(wan, tmp_path):
    _, _, prof = wan
    text = str(prof)
    assert "blocks.0.attn1" in text and "entropy/logN" in text and "top 10%" in text
    assert "cross-attention" in text  # sites left to the model's own attention say why
    cands = prof.candidates_table()
    assert "monarch 1×6×6 s1" in cands and "vmoba" in cands and "◀" in cands
    png = prof.plot(tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_calibrate_show_plot_diff(tmp_path, capsys):
    from vmonarch_opt.cli import main

    kw = json.dumps(WAN)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["calibrate", "vmonarch_fixtures.models:wan", "--kwargs", kw, "--min-seq-len", "0",
                 "--max-rel-error", "0.5", "-q", "-o", str(a)]) == 0
    assert main(["calibrate", "vmonarch_fixtures.models:wan", "--kwargs", kw, "--min-seq-len", "0",
                 "--max-rel-error", "0.001", "-q", "-o", str(b)]) == 0
    c = tmp_path / "c.json"  # a budget on the model's output
    assert main(["calibrate", "vmonarch_fixtures.models:wan", "--kwargs", kw, "--min-seq-len", "0",
                 "--max-rel-error", "0.5", "--output-rel-error", "0.05", "-q", "-o", str(c)]) == 0
    assert "profile written to" in capsys.readouterr().out
    assert main(["show", str(c)]) == 0 and "output_rel_error=0.05" in capsys.readouterr().out
    assert main(["show", str(c), "--candidates"]) == 0 and "model output" in capsys.readouterr().out
    assert main(["show", str(a), "--candidates", "--site", "blocks.1.attn1"]) == 0
    out = capsys.readouterr().out
    assert "calibration profile" in out and "blocks.1.attn1" in out and "in budget" in out
    assert main(["report", str(a)]) == 0 and "calibration profile" in capsys.readouterr().out
    assert main(["plot", str(a), "-o", str(tmp_path / "a.png")]) == 0 and (tmp_path / "a.png").exists()
    capsys.readouterr()
    assert main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "choice A" in out and "dense" in out  # the tight budget leaves the sites dense
    with pytest.raises(SystemExit, match="module:factory"):
        main(["calibrate", "vmonarch_fixtures.models"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="not valid JSON"):
        main(["show", str(tmp_path / "bad.json")])
