"""record / optimize_pipeline / set_original_attention on whole diffusers pipelines: tiny pipelines
from random-weight components (vmonarch_fixtures.pipelines), prompt embeddings instead of text
encoders, CPU, no downloads."""
import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import vmonarch_opt
from vmonarch_fixtures import pipelines as P
from vmonarch_opt import VMonarchError

ROOT = Path(__file__).resolve().parents[1]


def _gen():
    return torch.Generator().manual_seed(0)


def _latents(pipe, kw, **extra):
    return pipe(**{**kw, **extra}, output_type="latent", generator=_gen()).frames


def _high_noise_steps(pipe) -> set:
    """The steps Wan's pipeline gives its first expert (t ≥ boundary_ratio · num_train_timesteps)."""
    b = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    return {i for i, t in enumerate(pipe.scheduler.timesteps) if t >= b}


# ----------------------------------------------------------------------------- recording
# (factory, kwargs, transformer calls per step with CFG on, batch of one call with CFG on)
RECORDED = {
    "wan": (P.wan, {}, 2, 1),                                   # cond, then uncond: two calls per step
    "wan2.2": (P.wan, dict(two_experts=True), 2, 1),            # the same, per expert
    "wan2.2_i2v": (P.wan_i2v, dict(two_experts=True), 2, 1),    # image latents concatenated to the noise
    "cogvideox": (P.cogvideox, {}, 1, 2),                       # one call on a doubled batch
    "hunyuan": (P.hunyuan, {}, 2, 1),                           # true CFG: two calls per step
}


@pytest.mark.parametrize("name,cfg", [(n, True) for n in RECORDED] + [(n, False) for n in ("wan", "cogvideox", "hunyuan")],
                         ids=[f"{n}-cfg" for n in RECORDED] + [f"{n}-no_cfg" for n in ("wan", "cogvideox", "hunyuan")])
def test_record_gets_every_call_of_the_requested_steps(name, cfg):
    factory, fkw, calls_cfg, batch_cfg = RECORDED[name]
    pipe, kw = factory(cfg=cfg, steps=4, **fkw)
    ref = _latents(pipe, kw)
    with vmonarch_opt.record(pipe, steps=(0, 0.5, 1.0)) as rec:
        out = _latents(pipe, kw)
    assert torch.equal(out, ref)  # recording changes nothing
    # the scheduler is given back untouched
    assert not {"step", "set_timesteps", "set_begin_index"} & set(pipe.scheduler.__dict__)
    assert all(not m._forward_pre_hooks for m in vmonarch_opt.pipelines.denoisers(pipe).values())

    wanted = {0, 2, 3}  # 4 steps: 0.0 -> 0, 0.5 -> 1.5 rounded up -> 2, 1.0 -> 3
    calls, batch = (calls_cfg, batch_cfg) if cfg else (1, 1)
    experts = {"transformer": _high_noise_steps(pipe), "transformer_2": set(range(4)) - _high_noise_steps(pipe)} \
        if "2.2" in name else {"transformer": set(range(4))}
    assert rec.components == list(experts)
    for comp, ran in experts.items():
        assert ran and set(rec.ran_steps(comp)) == ran  # each expert ran some steps (boundary inside the run)
        assert rec.recorded_steps(comp) == sorted(wanted & ran)
        got = rec.batches(comp)
        assert len(got) == calls * len(wanted & ran)
        for c in (c for c in rec.calls if c.component == comp):
            assert c.steps == 4 and c.run == 0 and 0 <= c.call < calls
            assert c.batch["hidden_states"].shape[0] == batch and c.batch["hidden_states"].device.type == "cpu"
            assert c.timestep == pytest.approx(float(pipe.scheduler.timesteps[c.step]))
    first = rec.calls[0]
    if name.startswith("wan") or name == "hunyuan":  # the pipeline's own inputs, prompt first
        assert torch.equal(first.batch["encoder_hidden_states"], kw["prompt_embeds"])
        if cfg:
            assert torch.equal(rec.calls[1].batch["encoder_hidden_states"], kw["negative_prompt_embeds"])
    if name == "cogvideox" and cfg:  # [negative; prompt] in one batch
        assert torch.equal(first.batch["encoder_hidden_states"],
                           torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]]))
    assert "0 of 4" in str(rec) and rec.nbytes > 0


def test_record_all_steps_several_runs_and_device_none():
    pipe, kw = P.wan(cfg=False, steps=3)
    with vmonarch_opt.record(pipe, steps="all", device=None) as rec:
        _latents(pipe, kw)
        _latents(pipe, kw, num_inference_steps=2)
    assert [(c.run, c.step, c.steps) for c in rec.calls] == [(0, 0, 3), (0, 1, 3), (0, 2, 3), (1, 0, 2), (1, 1, 2)]
    with vmonarch_opt.record(pipe, steps=-1) as last:
        _latents(pipe, kw)
    assert [c.step for c in last.calls] == [2]


def test_positional_calls_are_recorded_by_name():
    pipe, kw = P.wan(cfg=False, steps=3)
    x = torch.randn(1, 4, 3, 8, 10)
    with vmonarch_opt.record(pipe, steps=(0,)) as rec:
        pipe.scheduler.set_timesteps(3)  # a hand-written loop: step 0 of 3
        with torch.no_grad():
            pipe.transformer(x, torch.tensor([999.0]), kw["prompt_embeds"], return_dict=False)
    (b,) = rec.batches()
    assert set(b) == {"hidden_states", "timestep", "encoder_hidden_states", "return_dict"}
    assert torch.equal(b["hidden_states"], x) and b["hidden_states"] is not x and rec.calls[0].steps == 3


def test_record_wan_2_1_image_to_video_with_a_clip_image_encoder():
    pipe, kw = P.wan_i2v(two_experts=False, steps=2)  # Wan 2.1 I2V: CLIP image features enter the transformer
    with vmonarch_opt.record(pipe, steps="all") as rec:
        _latents(pipe, kw)
    b = rec.batches()
    assert len(b) == 4 and b[0]["encoder_hidden_states_image"].shape[-1] == 16
    assert b[0]["hidden_states"].shape[1] == 12  # noise + mask + image latents


def test_record_checks_its_arguments_and_warns_about_what_it_missed():
    pipe, kw = P.wan(cfg=False, steps=3)
    for bad in ("some", 1.5, (True,), (), ("0",)):
        with pytest.raises(ValueError, match="steps"):
            vmonarch_opt.record(pipe, steps=bad)
    with pytest.raises(ValueError, match="denoisers"):
        vmonarch_opt.record(pipe, components=["unet"])
    with pytest.warns(RuntimeWarning, match="not called inside"):
        with vmonarch_opt.record(pipe):
            pass
    with pytest.warns(RuntimeWarning, match=r"step\(s\) \[7\]"):
        with vmonarch_opt.record(pipe, steps=(0, 7)) as rec:
            _latents(pipe, kw)
    assert rec.recorded_steps() == [0]
    with vmonarch_opt.record(pipe) as active:
        with pytest.raises(VMonarchError, match="still active"):
            vmonarch_opt.optimize_pipeline(pipe, active)
        _latents(pipe, kw)


def test_scheduler_wrappers_keep_signatures_pipelines_inspect():
    pipe, _ = P.cogvideox(steps=2)  # CogVideoX passes eta/generator only if scheduler.step's signature has them
    before = inspect.signature(pipe.scheduler.step)
    with pytest.warns(RuntimeWarning, match="nothing was recorded"), vmonarch_opt.record(pipe):
        assert inspect.signature(pipe.scheduler.step) == before
        assert "eta" in inspect.signature(pipe.scheduler.step).parameters


# ----------------------------------------------------------------------------- optimizing
EXACT = {
    "wan2.2": (P.wan, dict(two_experts=True)),
    "cogvideox": (P.cogvideox, {}),
    "hunyuan_cfg": (P.hunyuan, dict(cfg=True)),
    "wan2.1_i2v": (P.wan_i2v, dict(two_experts=False)),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_dense_method_reproduces_the_original_generation_exactly(name):
    factory, fkw = EXACT[name]
    pipe, kw = factory(steps=3, **fkw)
    mods = vmonarch_opt.pipelines.denoisers(pipe)
    ref = _latents(pipe, kw)
    with vmonarch_opt.record(pipe) as rec:
        _latents(pipe, kw)
    fast = vmonarch_opt.optimize_pipeline(pipe, rec, methods=("dense",), budget=None, min_seq_len=0)
    assert type(fast) is type(pipe) and fast is not pipe
    assert torch.equal(_latents(fast, kw), ref)
    # every transformer rewritten (our dense op ran), the user's pipeline untouched and still dense
    assert set(fast.report) == set(mods)
    for n, m in mods.items():
        opt = getattr(fast, n)
        assert opt is not m and "vmonarch" not in m.__dict__ and getattr(pipe, n) is m
        assert opt.report.totals["by_method"].get("dense", 0) >= 1
        assert sum(s["ran"] for s in vmonarch_opt.stats(opt).values()) > 0
    assert fast.vae is pipe.vae and fast.scheduler is pipe.scheduler
    assert torch.equal(_latents(pipe, kw), ref)


def test_monarch_report_covers_every_transformer_and_the_whole_pipeline_switch(tmp_path):
    pipe, kw = P.wan(two_experts=True, steps=3)
    video_ref = pipe(**kw, output_type="pt", generator=_gen()).frames
    ref = _latents(pipe, kw)
    with vmonarch_opt.record(pipe, steps="all") as rec:
        _latents(pipe, kw)
    fast = vmonarch_opt.optimize_pipeline(pipe, rec, methods=("monarch",), budget=None, min_seq_len=0,
                                          per_component={"transformer_2": {"overrides": {"blocks.0.*": "original"}}})
    rep = fast.report
    assert list(rep) == ["transformer", "transformer_2"]
    assert rep["transformer"].totals["by_method"]["monarch"] == 2
    assert rep["transformer_2"].totals["by_method"]["monarch"] == 1  # its per-component override
    text = str(rep)
    assert "── transformer ──" in text and "── transformer_2 ──" in text
    rep.to_json(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["format"] == "vmonarch_opt.pipeline_report/1" and set(saved["reports"]) == {"transformer", "transformer_2"}
    assert "## transformer_2" in rep.to_markdown()

    out = _latents(fast, kw)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    for n in ("transformer", "transformer_2"):
        assert all(s["ran"] > 0 for s in vmonarch_opt.stats(getattr(fast, n)).values())
    # the whole pipeline back on exact attention: bit-identical video, then optimized again
    with vmonarch_opt.set_original_attention(fast):
        assert torch.equal(fast(**kw, output_type="pt", generator=_gen()).frames, video_ref)
    assert torch.equal(_latents(fast, kw), out)

    # dense_steps=k: steps 0..k-1 exact. All steps exact = the original; none = fully optimized
    vmonarch_opt.set_original_attention(fast, dense_steps=3)
    assert torch.equal(_latents(fast, kw), ref)
    vmonarch_opt.set_original_attention(fast, dense_steps=0)
    assert torch.equal(_latents(fast, kw), out)
    # one exact step = switching by hand in a step callback
    vmonarch_opt.set_original_attention(fast, False)
    assert vmonarch_opt.pipelines.dense_steps_of(fast) is None

    def by_hand(p, i, t, cb):
        for n in ("transformer", "transformer_2"):
            vmonarch_opt.set_original_attention(getattr(p, n), i + 1 < 1)
        return cb

    for n in ("transformer", "transformer_2"):
        vmonarch_opt.set_original_attention(getattr(fast, n))  # step 0
    expected = _latents(fast, kw, callback_on_step_end=by_hand)
    before = {n: sum(s["fell_back"].get("switched", 0) for s in vmonarch_opt.stats(getattr(fast, n)).values())
              for n in ("transformer", "transformer_2")}
    with vmonarch_opt.set_original_attention(fast, dense_steps=1):
        got = _latents(fast, kw)
        assert vmonarch_opt.pipelines.dense_steps_of(fast) == 1
    assert torch.equal(got, expected) and not torch.equal(got, out)
    after = {n: sum(s["fell_back"].get("switched", 0) for s in vmonarch_opt.stats(getattr(fast, n)).values())
             for n in ("transformer", "transformer_2")}
    # step 0 is the first expert's: its 2 self-attention sites × 2 CFG calls ran the model's own attention
    assert after["transformer"] - before["transformer"] == 4 and after["transformer_2"] == before["transformer_2"]
    assert vmonarch_opt.pipelines.dense_steps_of(fast) is None  # the with-block put back "no schedule"
    assert torch.equal(_latents(fast, kw), out)


def test_inplace_and_errors_of_optimize_pipeline_and_the_switch():
    pipe, kw = P.wan(two_experts=True, cfg=False, steps=3)
    with vmonarch_opt.record(pipe, steps=(0,)) as rec:
        _latents(pipe, kw)
    with pytest.raises(VMonarchError, match=r"transformer_2 ran steps 2 but none of them was recorded"):
        vmonarch_opt.optimize_pipeline(pipe, rec)
    with pytest.raises(ValueError, match="per_component"):
        vmonarch_opt.optimize_pipeline(pipe, rec, components=["transformer"], per_component={"transformer_2": {}})
    with pytest.raises(TypeError, match="recording must be"):
        vmonarch_opt.optimize_pipeline(pipe, [rec])
    with pytest.raises(VMonarchError, match="no denoiser of this WanPipeline was optimized"):
        vmonarch_opt.set_original_attention(pipe)
    # a dict of batches works too; inplace rewrites the pipeline's own transformer
    t1 = pipe.transformer
    same = vmonarch_opt.optimize_pipeline(pipe, {"transformer": rec.batches("transformer")}, inplace=True,
                                          components=["transformer"], methods=("dense",), budget=None, min_seq_len=0)
    assert same is pipe and pipe.transformer is t1 and "vmonarch" in t1.__dict__ and list(pipe.report) == ["transformer"]
    with pytest.raises(VMonarchError, match="needs the pipeline"):
        vmonarch_opt.set_original_attention(pipe.transformer, dense_steps=1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="dense_steps"):
            vmonarch_opt.set_original_attention(pipe, dense_steps=bad)
    with pytest.raises(ValueError, match="contradicts"):
        vmonarch_opt.set_original_attention(pipe, False, dense_steps=1)
    vmonarch_opt.set_original_attention(pipe, dense_steps=1)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    with pytest.raises(VMonarchError, match="replaced"):
        _latents(pipe, kw)
    vmonarch_opt.set_original_attention(pipe, False)
    _latents(pipe, kw)
    vmonarch_opt.restore(pipe.transformer)


def test_readme_quick_start_runs_as_written():
    """The README's Quick start block, verbatim: on a tiny WanPipeline with a tiny text encoder whose
    call defaults are small (the README calls pipe(prompt)), and on a tiny Wan transformer."""
    from diffusers import WanPipeline
    from vmonarch_fixtures import models

    class SmallWanPipeline(WanPipeline):
        def __call__(self, *args, height=64, width=80, num_frames=9, num_inference_steps=3, **kw):
            return super().__call__(*args, height=height, width=width, num_frames=num_frames,
                                    num_inference_steps=num_inference_steps, **kw)

    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", quick, re.S).group(1)
    assert "vmonarch_opt.record(pipe" in code and "vmonarch_opt.optimize_pipeline(pipe, rec" in code
    pipe, _ = P.wan(text_encoder=True, cls=SmallWanPipeline)
    model, calib_batch = models.wan()
    prompt = "a small boat on the river at sunset"
    scope = {"pipe": pipe, "prompt": prompt, "model": model, "calib_batch": calib_batch}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), scope)
    fast = scope["fast"]
    assert isinstance(fast, WanPipeline) and fast is not pipe and list(fast.report) == ["transformer"]
    assert fast(prompt).frames[0].shape == (9, 64, 80, 3)
    assert "transformer" in str(fast.report) and scope["optimized"].report.totals["sites"] == 4


def test_pipeline_benchmark_smoke(tmp_path, monkeypatch):
    from benchmarks.pipeline import main

    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--smoke", "--no-append", "--methods", "monarch", "--dense-steps", "1", "--warmup-steps", "0",
                 "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "pipeline.json").read_text())
    rows = {r["config"]: r for r in res["results"]}
    assert set(rows) == {"dense", "monarch", "monarch, first 1 steps exact"}
    for r in (rows["monarch"], rows["monarch, first 1 steps exact"]):
        assert "error" not in r and set(r["reports"]) == {"transformer"}
        assert 0 < r["latents_rel_error"] < 0.2 and r["optimize_pipeline_s"] > 0
    assert rows["monarch, first 1 steps exact"]["latents_rel_error"] < rows["monarch"]["latents_rel_error"]
    assert res["record_s"] > 0 and "## Pipeline: whole denoising loop" in (tmp_path / "pipeline_section.md").read_text()
