"""optimize() on diffusers video transformers with small random configs (no downloads)."""
import copy
import math

import pytest
import torch

import vmonarch_opt
from vmonarch_fixtures import models
from vmonarch_opt import MonarchConfig, VMoBAConfig
from conftest import assert_kernels_ran, rel_err


# (factory, expected self-attention sites, expected kind of those sites, text before, text after)
CASES = {
    "wan": (models.wan, 2, "self", 0, 0),
    "cogvideox": (models.cogvideox, 2, "joint", 7, 0),
    "hunyuan": (models.hunyuan, 2, "joint", 0, 7),
    "ltx": (models.ltx, 2, "self", 0, 0),
    "hunyuan15": (models.hunyuan15, 2, "joint", 0, 16),  # [B, 1, N, N] valid x valid mask on every call
    "kandinsky5": (models.kandinsky5, 2, "self", 0, 0),  # channels-last latents [B, T, H, W, C]
}


def _out(model, batch):
    with torch.no_grad():
        return model(**batch)[0]


def _video_self_sites(report):
    return [r for r in report.rows if r["site"]["kind"] in ("self", "joint") and r["site"]["grid"]]


@pytest.mark.parametrize("name", list(CASES))
def test_detects_every_block_self_attention(name):
    factory, n_self, kind, tb, ta = CASES[name]
    model, batch = factory()
    opt = vmonarch_opt.optimize(model, batch, methods=("dense",), min_seq_len=0)
    video = _video_self_sites(opt.report)
    assert len(video) == n_self
    for r in video:
        s = r["site"]
        assert s["kind"] == kind
        assert tuple(s["grid"]) == (3, 4, 5)
        assert (s["text_before"], s["text_after"]) == (tb, ta)
        assert s["seq_q"] == 60 + tb + ta


@pytest.mark.parametrize("name", list(CASES))
def test_dense_method_reproduces_model_and_leaves_original_alone(name):
    factory = CASES[name][0]
    model, batch = factory()
    state = copy.deepcopy(model.state_dict())
    forward_before = model.forward
    ref = _out(model, batch)
    opt = vmonarch_opt.optimize(model, batch, methods=("dense",), min_seq_len=0)
    assert type(opt) is type(model) and opt is not model
    assert rel_err(_out(opt, batch), ref) < 1e-5
    assert_kernels_ran(opt)
    # the original model: same parameters, same forward, same output
    assert model.forward == forward_before and "forward" not in model.__dict__
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(_out(model, batch), ref)
    assert list(opt.state_dict()) == list(state)


@pytest.mark.parametrize("name", list(CASES))
def test_monarch_with_one_block_is_exact(name):
    factory = CASES[name][0]
    model, batch = factory()
    ref = _out(model, batch)
    one_block = MonarchConfig(block=(3, 4, 5))  # the whole grid is a single block: dense softmax
    opt = vmonarch_opt.optimize(model, batch, overrides={"*": one_block}, min_seq_len=0, budget=None)
    rewritten = [r for r in opt.report.rows if r["plan"]["method"] == "monarch" and r["site"]["grid"]]
    assert len(rewritten) == len(_video_self_sites(opt.report))
    assert rel_err(_out(opt, batch), ref) < 1e-4
    assert_kernels_ran(opt)


@pytest.mark.parametrize("batch", [1, 2])
def test_latte_factorised_space_time_attention(batch):
    """Spatial attention per frame (frames in the batch) and temporal attention per position
    (positions in the batch) get the per-frame / per-position grids of the patch embedding."""
    model, b = models.latte(batch=batch)
    ref = _out(model, b)
    opt = vmonarch_opt.optimize(model, b, methods=("dense",), min_seq_len=0)
    assert rel_err(_out(opt, b), ref) < 1e-5
    grids = {r["site"]["site_id"]: tuple(r["site"]["grid"]) for r in _video_self_sites(opt.report)}
    assert grids == {"transformer_blocks.0.attn1": (1, 4, 5), "transformer_blocks.1.attn1": (1, 4, 5),
                     "temporal_transformer_blocks.0.attn1": (3, 1, 1),
                     "temporal_transformer_blocks.1.attn1": (3, 1, 1)}
    assert "spatial attention per frame" in opt.report.site("transformer_blocks.0.attn1")["site"]["grid_source"]
    one_block = vmonarch_opt.optimize(model, b, overrides={"*": MonarchConfig(block=(3, 4, 5))}, min_seq_len=0,
                                      budget=None)
    assert [r["plan"]["args"]["block"] for r in _video_self_sites(one_block.report)] == \
        [[1, 4, 5], [3, 1, 1], [1, 4, 5], [3, 1, 1]]
    assert rel_err(_out(one_block, b), ref) < 1e-4
    assert_kernels_ran(one_block)
    structured = vmonarch_opt.optimize(model, b, methods=("monarch",), min_seq_len=0, budget=None)
    blocks = {r["site"]["site_id"]: r["plan"]["args"]["block"] for r in _video_self_sites(structured.report)}
    assert blocks["temporal_transformer_blocks.0.attn1"] == [2, 1, 1]  # ~√T frames, not 1×1×1 blocks
    out = _out(structured, b)
    assert torch.isfinite(out).all() and 0 < rel_err(out, ref) < 0.5


def test_cross_attention_as_long_as_the_video_stays_cross():
    """A prompt exactly as long as the video (60 text tokens, 3×4×5 grid): the length no longer
    makes attn2 look like self-attention — q and k come from different projections' inputs."""
    model, b = models.wan(text=60)
    opt = vmonarch_opt.optimize(model, b, methods=("monarch",), min_seq_len=0, budget=None)
    kinds = {r["site"]["site_id"]: (r["site"]["kind"], r["plan"]["method"]) for r in opt.report.rows}
    assert kinds["blocks.0.attn1"] == ("self", "monarch") and kinds["blocks.1.attn1"] == ("self", "monarch")
    assert kinds["blocks.0.attn2"] == ("cross", "original") and kinds["blocks.1.attn2"] == ("cross", "original")
    assert "another sequence" in opt.report.site("blocks.0.attn2")["plan"]["reason"]


def test_mochi_attention_in_a_per_prompt_loop_is_found():
    """Mochi computes its joint attention in a Python loop over prompts (``torch.nonzero`` on the
    text mask): capture keeps that data-dependent code in the graph instead of skipping the frame."""
    model, b = models.mochi()
    ref = _out(model, b)
    opt = vmonarch_opt.optimize(model, b, methods=("dense",), min_seq_len=0)
    video = _video_self_sites(opt.report)
    assert [r["site"]["site_id"] for r in video] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(r["site"]["kind"] == "joint" and tuple(r["site"]["grid"]) == (3, 4, 5)
               and r["site"]["text_after"] == 7 for r in video)
    assert "uncaptured" not in opt.report.data["meta"]
    assert rel_err(_out(opt, b), ref) < 1e-5
    one_block = vmonarch_opt.optimize(model, b, overrides={"*": MonarchConfig(block=(3, 4, 5))}, min_seq_len=0,
                                      budget=None)
    assert one_block.report.totals["by_method"]["monarch"] == 2
    assert rel_err(_out(one_block, b), ref) < 1e-4
    assert_kernels_ran(one_block)


def test_attention_outside_the_captured_graphs_is_reported(monkeypatch):
    """If capture misses an attention (here: capture forced to skip Mochi's attention processor),
    the census of the reference run says so in a warning and in the report."""
    model, b = models.mochi()
    import diffusers.models.transformers.transformer_mochi as tm

    monkeypatch.setattr(tm.MochiAttnProcessor2_0, "__call__",
                        torch._dynamo.disable(tm.MochiAttnProcessor2_0.__call__))
    with pytest.warns(RuntimeWarning, match="attention ran outside the captured graphs in transformer_blocks.0.attn1"):
        opt = vmonarch_opt.optimize(model, b, methods=("dense",), min_seq_len=0)
    assert opt.report.data["meta"]["uncaptured"]["calls"] == {"transformer_blocks.0.attn1": 1,
                                                              "transformer_blocks.1.attn1": 1}
    assert "not optimized: attention ran outside the captured graphs" in str(opt.report)


def test_framepack_blocks_captured_below_a_graph_break_keep_their_modules():
    """Framepack's forward breaks the graph (``.item()``): its blocks are traced in frames of their
    own, where Dynamo names the attention module relative to the block ("attn"); sites must still
    be routed to the right modules, and the report's errors are the real ones. The history latents
    are packed in front of the video in nested cats of the graph before the break: the video grid
    is found behind them (40 clean + 6 2x + 2 4x history tokens, then 60 video, then 7 text + 3 image)."""
    model, b = models.framepack()
    ref = _out(model, b)
    opt = vmonarch_opt.optimize(model, b, methods=("monarch",), min_seq_len=0, budget=None)
    ids = {r["site"]["site_id"]: r["plan"]["method"] for r in opt.report.rows}
    assert ids["transformer_blocks.0.attn"] == ids["single_transformer_blocks.0.attn"] == "monarch"
    assert ids["context_embedder.token_refiner.refiner_blocks.0.attn"] == "original"
    for site in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"):
        s = opt.report.site(site)["site"]
        assert (tuple(s["grid"]), s["text_before"], s["text_after"]) == ((3, 4, 5), 48, 10)
        assert s["kind"] == "joint"
    assert rel_err(_out(opt, b), ref) == pytest.approx(opt.report.totals["output_error"], rel=1e-4)
    assert opt.report.totals["output_error"] > 0
    exact = vmonarch_opt.optimize(model, b, overrides={"*attn": MonarchConfig(block=(3, 4, 5))}, min_seq_len=0,
                                  budget=None)
    assert exact.report.totals["by_method"].get("monarch") == 2
    assert rel_err(_out(exact, b), ref) < 1e-4
    # another prompt length (the model crops the text padding at batch 1), another video size (and
    # so other history lengths), both: the plans follow, as optimize() would make them at that shape
    _, other = models.framepack(frames=2, height=5)
    prompt = dict(b, encoder_attention_mask=b["encoder_attention_mask"].clone())
    prompt["encoder_attention_mask"][:, 5:] = 0
    both = dict(other, encoder_attention_mask=prompt["encoder_attention_mask"])
    for batch, warning in ((prompt, r"now 48 before / 8 after, not 48 / 10"), (other, r"token grid is now \(2, 5, 5\)"),
                           (both, r"token grid is now \(2, 5, 5\)")):
        with pytest.warns(RuntimeWarning, match=warning):
            out = _out(opt, batch)
        direct = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
        assert rel_err(out, _out(direct, batch)) < 1e-5
        assert rel_err(out, _out(model, batch)) > 1e-4  # Monarch ran, not the model's own attention
    s = opt.vmonarch.sites[1]
    assert s.grid_module == "x_embedder.proj"
    assert sorted(s.text_before_from) == ["clean_x_embedder.proj", "clean_x_embedder.proj_2x", "clean_x_embedder.proj_4x"]


def test_prompt_of_another_length_follows_the_text_segment():
    """HunyuanVideo's joint attention has one text segment (after the video): a prompt of another
    length keeps the plan, the text taking the difference."""
    model, batch = models.hunyuan()
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    _, other = models.hunyuan(text=4)
    with pytest.warns(RuntimeWarning, match=r"now 0 before / 4 after, not 0 / 7"):
        out = _out(opt, other)
    direct = vmonarch_opt.optimize(model, other, methods=("monarch",), min_seq_len=0, budget=None)
    assert rel_err(out, _out(direct, other)) < 1e-5 and rel_err(out, _out(model, other)) > 1e-4


def test_framepack_blocks_sharing_one_captured_graph_all_get_sites():
    """Below the graph break Dynamo compiles a block's forward once and runs that graph for every
    block of the class: the blocks whose graph was not seen again get the template's sites (each
    calibrated and validated on its own q/k/v), none is left uncaptured."""
    model, b = models.framepack(layers=3, single_layers=4)
    ref = _out(model, b)
    opt = vmonarch_opt.optimize(model, b, methods=("monarch",), min_seq_len=0, budget=None)
    blocks = [f"transformer_blocks.{i}.attn" for i in range(3)] + [f"single_transformer_blocks.{i}.attn" for i in range(4)]
    rows = {r["site"]["site_id"]: r for r in opt.report.rows}
    assert [sid for sid in rows if sid in blocks] == blocks  # execution order
    assert all(rows[sid]["plan"]["method"] == "monarch" and tuple(rows[sid]["site"]["grid"]) == (3, 4, 5)
               for sid in blocks)
    assert any("graph shared with transformer_blocks.0" in n for n in rows["transformer_blocks.2.attn"]["site"]["notes"])
    assert not opt.report.data["meta"].get("uncaptured")
    errs = [rows[sid]["error"] for sid in blocks]
    assert all(e is not None and 0 < e < 1 for e in errs) and len(set(errs)) == len(errs)  # each its own
    assert rel_err(_out(opt, b), ref) == pytest.approx(opt.report.totals["output_error"], rel=1e-4)
    exact = vmonarch_opt.optimize(model, b, overrides={"*attn": MonarchConfig(block=(3, 4, 5))}, min_seq_len=0,
                                  budget=None)
    assert exact.report.totals["by_method"].get("monarch") == 7
    assert rel_err(_out(exact, b), ref) < 1e-4
    assert_kernels_ran(exact)


def test_two_copies_of_the_video_in_one_sequence():
    """Motif-Video's decoder block attends over its copy of the video joined with the encoder's
    output video tokens: both parts come from the grid's patch embedding, so the first is the
    video and the second is attended densely like text (exact with one Monarch block)."""
    model, b = models.motif_video()
    ref = _out(model, b)
    opt = vmonarch_opt.optimize(model, b, methods=("monarch",), min_seq_len=0, budget=None)
    s = opt.report.site("single_transformer_blocks.1.attn")["site"]
    assert (tuple(s["grid"]), s["text_before"], s["text_after"], s["seq_q"]) == ((3, 6, 8), 0, 144, 288)
    exact = vmonarch_opt.optimize(model, b, overrides={"*attn": MonarchConfig(block=(3, 6, 8))}, min_seq_len=0,
                                  budget=None)
    assert exact.report.totals["by_method"].get("monarch") == 3
    assert rel_err(_out(exact, b), ref) < 1e-4


def test_hunyuan_text_padding_mask_is_handled_exactly():
    model, batch = models.hunyuan(batch=2)
    batch["encoder_attention_mask"][0, 4:] = 0  # prompt 0 has 4 real tokens, prompt 1 has 7
    ref = _out(model, batch)
    opt = vmonarch_opt.optimize(model, batch, overrides={"*": MonarchConfig(block=(3, 4, 5))}, min_seq_len=0, budget=None)
    rows = _video_self_sites(opt.report)
    assert [r["plan"]["method"] for r in rows] == ["monarch", "monarch"]
    assert all("text padding mask" in r["plan"]["reason"] for r in rows)
    refiner = opt.report.site("context_embedder.token_refiner.refiner_blocks.0.attn")
    assert refiner["plan"]["method"] == "original"  # text-only attention with a 7×7 mask
    assert rel_err(_out(opt, batch), ref) < 1e-4
    calls = vmonarch_opt.stats(opt)  # exact because the one-block Monarch kernel ran, not a fallback
    assert [calls[r["site"]["site_id"]]["ran"] for r in rows] == [1, 1]
    assert not any(calls[r["site"]["site_id"]]["fell_back"] for r in rows)
    # real Monarch frame blocks under the same mask: finite, and different from dense
    opt2 = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    out2 = _out(opt2, batch)
    assert torch.isfinite(out2).all() and rel_err(out2, ref) > 1e-3  # the method ran, and the report says so:
    assert rel_err(out2, ref) == pytest.approx(opt2.report.totals["output_error"], rel=1e-3)


@pytest.mark.parametrize("batch", [1, 2])
def test_hunyuan15_query_key_padding_mask_is_handled_exactly(batch):
    """HunyuanVideo 1.5 masks every joint attention with valid-query × valid-key ([B, 1, N, N]): with
    padded prompts the padded text queries see no key at all; the rewrite must reproduce that."""
    model, b = models.hunyuan15(batch=batch, pad=2)
    if batch == 2:
        b["encoder_attention_mask"][1] = 1  # the second prompt is not padded
    ref = _out(model, b)
    opt = vmonarch_opt.optimize(model, b, overrides={"*": MonarchConfig(block=(3, 4, 5))}, min_seq_len=0, budget=None)
    rows = _video_self_sites(opt.report)
    assert [r["plan"]["method"] for r in rows] == ["monarch", "monarch"]
    assert all("text padding mask" in r["plan"]["reason"] for r in rows)
    assert rel_err(_out(opt, b), ref) < 1e-4
    calls = vmonarch_opt.stats(opt)  # exact because the one-block Monarch kernel ran, not a fallback
    assert all(calls[r["site"]["site_id"]] == {"ran": 1, "fell_back": {}, "why": {}} for r in rows)
    vm = vmonarch_opt.optimize(model, b, methods=("vmoba",), min_seq_len=0, budget=None)
    for r in _video_self_sites(vm.report):  # FLOPs measured from the selection under the mask
        assert r["plan"]["method"] == "vmoba" and 0 < r["plan"]["flops_after"] < r["plan"]["flops_before"]
    cal = vmonarch_opt.optimize(model, b, min_seq_len=0)  # calibrated under the same mask
    assert torch.isfinite(_out(cal, b)).all()
    assert all(r["plan"]["reason"].startswith("calibrated") for r in _video_self_sites(cal.report))


def test_channels_last_latents_whose_channels_equal_the_height_are_flagged():
    """[B, T, H, W, C] latents with C == H: read as [B, T, C, H, W] they give another grid with the
    same token count; the grid source says so and names the other reading."""
    model, batch = models.kandinsky5(height=4, width=5, channels=8)  # latents [1, 3, 8, 10, 8]
    opt = vmonarch_opt.optimize(model, batch, methods=("dense",), min_seq_len=0)
    for r in _video_self_sites(opt.report):
        assert "ambiguous" in r["site"]["grid_source"] and "(3, 4, 5)" in r["site"]["grid_source"]


def test_kandinsky_visual_conditioning_channels_still_give_the_grid():
    """visual_cond concatenates latents, condition latents and a mask: 2 * in_visual_dim + 1 channels."""
    model, batch = models.kandinsky5(visual_cond=True)  # latents [1, 3, 8, 10, 9]
    ref = _out(model, batch)
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    rows = _video_self_sites(opt.report)
    assert len(rows) == 2 and all(tuple(r["site"]["grid"]) == (3, 4, 5) for r in rows)
    assert all("[B,T,H,W,C]" in r["site"]["grid_source"] for r in rows)
    err = rel_err(_out(opt, batch), ref)
    assert err > 1e-3 and err == pytest.approx(opt.report.totals["output_error"], rel=1e-3)


def test_monarch_frame_blocks_change_output_but_stay_close():
    model, batch = models.wan(frames=4, height=4, width=4, layers=2)
    ref = _out(model, batch)
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    rows = [r for r in opt.report.rows if r["plan"]["method"] == "monarch"]
    assert len(rows) == 2
    assert all(r["plan"]["args"]["block"] == [1, 4, 4] for r in rows)
    assert all(r["plan"]["flops_after"] < r["plan"]["flops_before"] for r in rows)
    out = _out(opt, batch)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) > 1e-3 and rel_err(out, ref) == pytest.approx(opt.report.totals["output_error"], rel=1e-3)
    assert all(c == {"ran": 1, "fell_back": {}, "why": {}} for c in vmonarch_opt.stats(opt).values())


def test_inplace_modifies_and_restore_undoes():
    model, batch = models.wan()
    ref = _out(model, batch)
    same = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None, inplace=True)
    assert same is model and hasattr(model, "report")
    assert not torch.equal(_out(model, batch), ref)
    vmonarch_opt.restore(model)
    assert torch.equal(_out(model, batch), ref)
    assert not hasattr(model, "report")
    hooks = [h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks) if h]
    assert not hooks, "restore() must remove the token-grid hooks too"


def test_short_sequences_stay_dense_by_default():
    model, batch = models.wan()
    opt = vmonarch_opt.optimize(model, batch)
    for r in opt.report.rows:
        assert r["plan"]["method"] == "original"
        assert r["plan"]["reason"].startswith(("sequence too short", "cross-attention"))


def test_grid_override_and_batch_of_two():
    model, batch = models.wan(batch=2)
    opt = vmonarch_opt.optimize(model, batch, grid=(3, 4, 5), methods=("monarch",), min_seq_len=0, budget=None)
    r = opt.report.site("blocks.0.attn1")
    assert r["site"]["grid_source"] == "grid= given by the user"
    assert r["site"]["batch"] == 2
    assert torch.isfinite(_out(opt, batch)).all()


@pytest.mark.parametrize("name", list(CASES))
def test_other_video_size_follows_the_token_grid(name):
    """Called at another frame count and resolution, the sites run their method re-derived for
    the new token grid (from the patch embedding, or the batch for LTX): the very plans optimize()
    makes at that shape, with a warning that the error was measured at the other one."""
    factory = CASES[name][0]
    model, batch = factory()
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    _, other = factory(frames=2, height=5)
    with pytest.warns(RuntimeWarning, match=r"token grid is now \(2, 5, 5\).*block \(1, 5, 5\)"):
        out = _out(opt, other)
    direct = vmonarch_opt.optimize(model, other, methods=("monarch",), min_seq_len=0, budget=None)
    assert rel_err(out, _out(direct, other)) < 1e-6
    assert rel_err(out, _out(model, other)) > 1e-4  # Monarch ran, not the model's own attention


def test_other_video_size_keeps_exact_configurations_exact():
    model, batch = models.wan()
    _, other = models.wan(frames=2, height=5)
    ref = _out(model, other)
    for cfg in (MonarchConfig(block=(3, 4, 5)), VMoBAConfig(threshold=1.0)):  # one block / every block
        opt = vmonarch_opt.optimize(model, batch, overrides={"*": cfg}, min_seq_len=0, budget=None)
        with pytest.warns(RuntimeWarning, match="token grid is now"):
            out = _out(opt, other)
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("tb,ta,prefix,call,expect", [
    (0, 7, (), (60 + 4, {}), ((3, 4, 5), 0, 4)),                     # prompt after the video, shorter
    (7, 0, (), (60 + 9, {}), ((3, 4, 5), 9, 0)),                     # prompt before the video, longer
    (5, 7, (), (60 + 10, {}), None),                                 # two segments, origin unknown
    (5, 7, ("hist",), (60 + 10, {"hist": (1, 1, 5)}), ((3, 4, 5), 5, 5)),   # history as before: prompt 5
    (5, 7, ("hist",), (50 + 9 + 7, {"video": (2, 5, 5), "hist": (1, 3, 3)}), ((2, 5, 5), 9, 7)),
    (5, 7, ("hist",), (60 + 10, {}), None),                          # history module did not run
    (5, 7, ("hist",), (60 + 3, {"hist": (1, 1, 5)}), None),          # no room for the prompt
])
def test_text_of_another_length_is_placed_only_when_unambiguous(tb, ta, prefix, call, expect):
    from vmonarch_opt.passes.regrid import adapt_plan
    from vmonarch_opt.plan import SitePlan

    plan = SitePlan("s", "monarch", args=dict(grid=[3, 4, 5], block=[1, 4, 5], text_before=tb, text_after=ta,
                                              steps=1, recompute=False), seq_q=60 + tb + ta,
                    seq_k=60 + tb + ta, head_dim=16)
    n, by_module = call
    by_module = {"video": (3, 4, 5), **by_module}
    grids = list(by_module.values())
    got = adapt_plan(plan, n, n, 16, grids, by_module, grid_module="video", prefix_modules=prefix)
    if expect is None:
        assert got is None
    else:
        g, tb2, ta2 = expect
        assert (tuple(got.args["grid"]), got.args["text_before"], got.args["text_after"]) == (g, tb2, ta2)
        assert got.seq_q == n == math.prod(g) + tb2 + ta2


def test_other_shape_without_a_grid_source_falls_back_to_dense():
    from handwritten_models import SdpaForms, Stack

    torch.manual_seed(0)
    model = Stack(SdpaForms).eval()
    x, y = torch.randn(1, 60, 32), torch.randn(1, 40, 32)
    opt = vmonarch_opt.optimize(model, x, methods=("monarch",), grid=(3, 4, 5), min_seq_len=0, budget=None)
    with pytest.warns(RuntimeWarning, match="differs from the calibrated"):
        out = opt(y)
    with torch.no_grad():
        assert rel_err(out, model(y)) < 1e-5

def test_set_original_attention_switches_and_restores():
    """set_original_attention: the model's own attention at every rewritten site (bit-identical to
    the unoptimized model), as a context manager and as a call; also under torch.compile."""
    model, batch = models.wan()
    opt = vmonarch_opt.optimize(model, batch, methods=("monarch",), min_seq_len=0, budget=None)
    own, fast = _out(model, batch), _out(opt, batch)
    assert rel_err(fast, own) > 1e-4
    with vmonarch_opt.set_original_attention(opt):
        assert torch.equal(_out(opt, batch), own)
        with vmonarch_opt.set_original_attention(opt, False):  # nested: back to the kernels
            assert torch.equal(_out(opt, batch), fast)
        assert torch.equal(_out(opt, batch), own)
    assert torch.equal(_out(opt, batch), fast)
    vmonarch_opt.set_original_attention(opt)  # as a call: stays on
    assert torch.equal(_out(opt, batch), own)
    vmonarch_opt.set_original_attention(opt, False)
    torch._dynamo.reset()
    comp = torch.compile(opt, backend="aot_eager", fullgraph=True)
    assert rel_err(_out(comp, batch), fast) < 1e-6
    with vmonarch_opt.set_original_attention(opt):
        assert rel_err(_out(comp, batch), own) < 1e-6  # the flag is guarded: recompiled, not stale
    assert rel_err(_out(comp, batch), fast) < 1e-6
    with pytest.raises(vmonarch_opt.VMonarchError, match="not optimized by vmonarch_opt.optimize"):
        vmonarch_opt.set_original_attention(model)


def test_same_token_count_other_grid_follows_it():
    """Portrait vs landscape: a 4x5 and a 5x4 latent have as many tokens, but VMoBA's spatial
    chunks (and Monarch's tiles) must follow the grid the input really has; a grid the user gave
    is kept."""
    model, batch = models.wan(height=8, width=12)
    _, other = models.wan(height=12, width=8)
    opt = vmonarch_opt.optimize(model, batch, methods=("vmoba",), min_seq_len=0, budget=None)
    with pytest.warns(RuntimeWarning, match=r"token grid is now \(3, 12, 8\)"):
        out = _out(opt, other)
    direct = vmonarch_opt.optimize(model, other, methods=("vmoba",), min_seq_len=0, budget=None)
    assert rel_err(out, _out(direct, other)) < 1e-6
    assert rel_err(_out(opt, batch), _out(vmonarch_opt.optimize(model, batch, methods=("vmoba",), min_seq_len=0,
                                                                 budget=None), batch)) < 1e-6
    pinned = vmonarch_opt.optimize(model, batch, methods=("vmoba",), min_seq_len=0, budget=None, grid=(3, 8, 12))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-derivation warning: the user's grid stands
        _out(pinned, other)
