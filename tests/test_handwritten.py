"""Hand-written attention in every form, SDPA call forms, an image ViT, and sites left dense."""
import pytest
import torch

import vmonarch_opt
from vmonarch_opt import MonarchConfig
from vmonarch_opt.report import WHY_WIDTH
from conftest import assert_kernels_ran, rel_err
from handwritten_models import (HANDWRITTEN, AdditiveMask, Causal, ReturnsProbs, SdpaForms, Stack,
                                TinyViT)

X = torch.randn(2, 24, 32)


@pytest.mark.parametrize("cls", HANDWRITTEN, ids=lambda c: c.__name__)
def test_handwritten_forms_are_detected_and_rewritten(cls):
    model = Stack(cls).eval()
    with torch.no_grad():
        ref = model(X)
    opt = vmonarch_opt.optimize(model, (X,), methods=("dense",), min_seq_len=0)
    rows = opt.report.rows
    assert [r["site"]["site_id"] for r in rows] == ["blocks.0.attn", "blocks.1.attn"]
    for r in rows:
        assert r["site"]["form"] == "handwritten"
        assert r["site"]["scale"] == pytest.approx(16 ** -0.5)
        assert r["site"]["head_dim"] == 16 and r["site"]["seq_q"] == 24
        assert r["plan"]["method"] == "dense", r["plan"]["reason"]
    with torch.no_grad():
        assert rel_err(opt(X), ref) < 1e-5
    assert_kernels_ran(opt)
    # one Monarch block over the whole sequence is dense softmax attention
    opt1 = vmonarch_opt.optimize(model, (X,), overrides={"*": MonarchConfig(block=(1, 1, 24))}, min_seq_len=0, budget=None)
    assert all(r["plan"]["method"] == "monarch" for r in opt1.report.rows)
    with torch.no_grad():
        assert rel_err(opt1(X), ref) < 1e-4
    assert_kernels_ran(opt1)
    # without a grid a 3-D block means a 1D block of as many tokens: (2, 3, 4) -> 24, one block
    opt3 = vmonarch_opt.optimize(model, (X,), overrides={"*": MonarchConfig(block=(2, 3, 4))}, min_seq_len=0,
                                 budget=None)
    assert [r["plan"]["args"]["block"] for r in opt3.report.rows] == [[1, 1, 24]] * 2
    with torch.no_grad():
        assert rel_err(opt3(X), ref) < 1e-4
    assert_kernels_ran(opt3)
    # real Monarch blocks (1D, no grid) change the output but keep it finite
    opt2 = vmonarch_opt.optimize(model, (X,), methods=("monarch",), min_seq_len=0, budget=None)
    with torch.no_grad():
        out = opt2(X)
    assert torch.isfinite(out).all() and rel_err(out, ref) > 0


def test_sdpa_call_forms_get_one_site_each():
    model = Stack(SdpaForms).eval()
    opt = vmonarch_opt.optimize(model, (X,), methods=("dense",), min_seq_len=0)
    ids = [r["site"]["site_id"] for r in opt.report.rows]
    assert ids == ["blocks.0.attn#0", "blocks.0.attn#1", "blocks.1.attn#0", "blocks.1.attn#1"]
    assert opt.report.site("blocks.0.attn#1")["site"]["scale"] == 0.3
    with torch.no_grad():
        assert rel_err(opt(X), model(X)) < 1e-6


@pytest.mark.parametrize("cls,args,reason", [
    (AdditiveMask, (X, torch.randn(24, 24)), "attention mask"),
    (Causal, (X,), "causal"),
    (ReturnsProbs, (X,), "probabilities"),
], ids=["mask", "causal", "probs"])
def test_unsupported_sites_stay_dense_with_reason(cls, args, reason):
    model = Stack(cls).eval()
    with torch.no_grad():
        ref = model(*args)
    opt = vmonarch_opt.optimize(model, args, methods=("monarch",), min_seq_len=0, budget=None)
    assert len(opt.report.rows) == 2
    for r in opt.report.rows:
        assert r["plan"]["method"] == "original"
        assert reason in r["plan"]["reason"]
    assert all(reason in opt.report.why(r["site"]["site_id"]) for r in opt.report.rows)
    # the printed "why" column wraps at WHY_WIDTH: tabulate's rule under the header gives its width
    rule = next(line for line in str(opt.report).splitlines() if set(line) <= {"-", " "} and line)
    assert len(rule.split()[-1]) <= WHY_WIDTH < max(len(opt.report.why(r["site"]["site_id"])) for r in opt.report.rows)
    with torch.no_grad():
        assert torch.equal(opt(*args), ref)


def test_vit_grid_and_class_token():
    model = TinyViT().eval()
    img = torch.randn(2, 3, 32, 32)
    opt = vmonarch_opt.optimize(model, img, methods=("monarch",), min_seq_len=0, budget=None)
    for r in opt.report.rows:
        s = r["site"]
        assert tuple(s["grid"]) == (1, 8, 8) and s["text_before"] == 1 and s["kind"] == "joint"
        assert r["plan"]["method"] == "monarch"
    with torch.no_grad():
        out = opt(img)
    assert torch.isfinite(out).all()


def test_dropout_in_training_mode_is_left_dense():
    class Drop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = SdpaForms()

        def forward(self, x):
            q, k, v = self.inner.split(x)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    opt = vmonarch_opt.optimize(Drop().train(), (X,), min_seq_len=0)
    assert "dropout" in opt.report.rows[0]["plan"]["reason"]


def test_site_that_validation_never_reaches_is_not_claimed():
    """A site seen during capture but not taken when the optimized model runs (here: attention
    only on the model's 2nd call, which is the capture run) must not be reported as rewritten."""
    import torch.nn.functional as F

    class SecondCallOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.attn = torch.nn.Identity()

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                q = x.view(2, 24, 2, 16).transpose(1, 2)
                return self.attn(F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 24, 32))
            return x

    opt = vmonarch_opt.optimize(SecondCallOnly(), (X,), methods=("monarch",), min_seq_len=0, budget=None)
    (row,) = opt.report.rows
    assert row["plan"]["method"] == "original"
    assert "never reached this site" in row["plan"]["reason"]
    assert opt.report.totals["flops_after"] == opt.report.totals["flops_before"]


def test_padding_masks_are_recognised_and_anything_else_is_not():
    """passes/keypad.py: key-padding and valid × valid masks give the valid keys; a window, causal or
    half-symmetric mask of the same [B, 1, N, N] shape is not a padding mask; run_key_padded matches
    SDPA under the mask, padded queries included."""
    import torch.nn.functional as F
    from vmonarch_opt.passes.keypad import is_padding_mask_shape, run_key_padded, valid_keys
    from conftest import rel_err

    n = 12
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, 9:] = False  # text after 8 video tokens: 1 valid, 3 padded for element 0
    outer = (valid[:, None, :, None] & valid[:, None, None, :])
    assert is_padding_mask_shape(tuple(outer.shape), n, n) and is_padding_mask_shape((2, 1, 1, n), n, n)
    assert not is_padding_mask_shape((2, 2, n, n), n, n) and not is_padding_mask_shape((2, 1, n, n), n, n + 1)
    assert torch.equal(valid_keys(outer, 2), valid)
    assert torch.equal(valid_keys(valid[:, None, None, :], 2), valid)
    additive = torch.zeros(outer.shape).masked_fill(~outer, float("-inf"))
    assert torch.equal(valid_keys(additive, 2), valid)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(2, 1, n, n)
    window = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().le(2)[None, None].expand(2, 1, n, n)
    half = outer.clone()
    half[0, 0, 10, :] = True  # a padded query that sees keys: not valid × valid
    moved = outer.clone()
    moved[0, 0, 3, 4], moved[0, 0, 3, 10] = False, True  # as many entries, one in a padded key's column
    holed = outer.clone()
    holed[1, 0, 2, 5] = False  # element 1 has nothing padded but a hole: valid tokens first, not full
    scattered = valid.clone()
    scattered[1, 2] = False  # a padded token in the middle: the counting path
    scat = scattered[:, None, :, None] & scattered[:, None, None, :]
    assert torch.equal(valid_keys(scat, 2), scattered)
    scat_holed = scat.clone()
    scat_holed[1, 0, 0, 1] = False
    for bad in (causal, window, half, moved, holed, scat_holed):
        assert valid_keys(bad, 2) is None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for _ in range(3))
    calls = []

    def call(qq, kk, vv, tb, ta):
        calls.append((qq.shape[-2], tb, ta))
        return F.scaled_dot_product_attention(qq, kk, vv)
    for mask in (outer, additive, valid[:, None, None, :]):
        out = run_key_padded(q, k, v, mask, 0, 4, 16 ** -0.5, call)
        assert rel_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) < 1e-5
    assert calls[:2] == [(9, 0, 1), (12, 0, 4)]
    calls.clear()  # nothing padded: one call for the whole batch
    everything = torch.ones(2, 1, n, n, dtype=torch.bool)
    assert rel_err(run_key_padded(q, k, v, everything, 0, 4, 16 ** -0.5, call),
                   F.scaled_dot_product_attention(q, k, v)) < 1e-5 and calls == [(12, 0, 4)]
    assert run_key_padded(q, k, v, window, 0, 4, 16 ** -0.5, call) is None
    from vmonarch_opt.passes.keypad import _count_true
    r = torch.rand(3, 13, 13, generator=g) > 0.5  # 169 entries: words + a tail; m[1] is not word-aligned
    for t in (r, r[1], r[2], r[:, 1:], r[0, :1, :5]):
        assert _count_true(t) == int(t.sum())


class _Processor:
    """Not a module (a diffusers-style attention processor): a graph break inside it makes Dynamo
    resume in this frame, whose graph carries no module stack."""

    def __call__(self, attn, x):
        q, k, v = attn.split(x)
        n = int(x.shape[1] + x.sum().item() * 0)  # .item(): a graph break inside the processor
        return attn.merge(torch.nn.functional.scaled_dot_product_attention(q[..., :n, :], k, v))


class _ProcessorAttn(SdpaForms):
    def forward(self, x):
        return _PROC(self, x)


_PROC = _Processor()


def test_attention_in_a_graph_without_module_info_is_not_routed_at_the_root():
    """A site captured in a resumed graph without module stack looks like the root's own attention;
    routed at the root it would take the first same-shaped call of the whole forward. It must stay
    dense with its reason, and the census must name the attention that was not optimized."""
    model = Stack(_ProcessorAttn, depth=2)
    ref = model(X)
    with pytest.warns(RuntimeWarning, match="attention in blocks.0.attn .* graphs resumed after a graph break"):
        opt = vmonarch_opt.optimize(model, (X,), methods=("monarch",), min_seq_len=0, budget=None)
    assert all(r["plan"]["method"] == "original" for r in opt.report.rows)
    assert [r["site"]["site_id"] for r in opt.report.rows] == ["<root>#0", "<root>#1"]
    assert all("does not say which module" in r["plan"]["reason"] for r in opt.report.rows)
    assert torch.allclose(opt(X), ref)


def test_flex_attention_is_named_in_the_report():
    """flex_attention (score/mask functions, BlockMask) is not rewritten; the report says so."""
    import warnings
    from torch.nn.attention.flex_attention import flex_attention

    class Flex(SdpaForms):
        def forward(self, x):
            q, k, v = self.split(x)
            return self.merge(flex_attention(q, k, v))

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flex, self.sdpa = Flex(), SdpaForms()

        def forward(self, x):
            return self.sdpa(self.flex(x))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        with pytest.warns(RuntimeWarning, match=r"flex_attention ran in flex \(1 call\)"):
            opt = vmonarch_opt.optimize(Mixed(), (X,), methods=("monarch",), min_seq_len=0, budget=None)
    assert "not optimized: flex_attention ran in flex (1 call)" in str(opt.report)
    assert [r["site"]["site_id"] for r in opt.report.rows] == ["sdpa#0", "sdpa#1"]


class _SdpaAttn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 32))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _SdpaAttn()

    def forward(self, x):
        return x + self.attn(x)


class _EagerLoop(torch.nn.Module):
    """Blocks called from code Dynamo does not trace: each block's forward is a frame of its own,
    compiled once and rerun for the other blocks of the class (FramePack's situation); the last
    two blocks see shorter sequences (recompiled: graphs of their own)."""

    def __init__(self, n=5):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(n))

    def forward(self, x):
        return self._loop(x)

    @torch._dynamo.disable(recursive=False)
    def _loop(self, x):
        for i, blk in enumerate(self.blocks):
            cut = {3: 30, 4: 40}.get(i, x.shape[1])
            x = torch.cat([blk(x[:, :cut]), x[:, cut:]], 1)
        return x


def test_blocks_rerunning_a_captured_graph_get_its_sites():
    import warnings

    from vmonarch_opt.passes.capture import capture_dynamo
    from vmonarch_opt.passes.census import attention_census
    from vmonarch_opt.passes.detect import detect
    from vmonarch_opt.passes.siblings import add_sibling_sites

    torch.manual_seed(0)
    model, x = _EagerLoop().eval(), torch.randn(1, 60, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no uncaptured-attention warning
        opt = vmonarch_opt.optimize(model, x, methods=("monarch",), grid=(3, 4, 5), min_seq_len=0, budget=None)
    rows = {r["site"]["site_id"]: r for r in opt.report.rows}
    assert list(rows) == [f"blocks.{i}.attn" for i in range(5)]
    assert [rows[f"blocks.{i}.attn"]["site"]["seq_q"] for i in range(5)] == [60, 60, 60, 30, 40]
    assert all(r["plan"]["method"] == "monarch" for r in rows.values())
    assert [bool(rows[f"blocks.{i}.attn"]["site"]["notes"]) for i in range(5)] == [False, True, True, False, False]
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) == pytest.approx(opt.report.totals["output_error"], rel=1e-4)
    # a block of the class whose calls had other shapes is not given the template's sites
    with torch.no_grad(), attention_census(model) as calls:
        model(x)
    detected = detect(capture_dynamo(model, x), model)
    assert [d.site.module_path for d in add_sibling_sites(detected, calls, model)] == [
        f"blocks.{i}.attn" for i in range(5)]
    calls.shapes["blocks.2.attn"] = [(50, 50, 16)]
    assert "blocks.2.attn" not in [d.site.module_path for d in add_sibling_sites(detected, calls, model)]


def test_sibling_template_is_a_captured_block_of_the_same_shapes():
    """Blocks 0 (60 tokens) and 3 (30) are captured; if block 4's calls had block 3's shapes, its
    copies come from block 3, not from the first block of the class."""
    from vmonarch_opt.passes.capture import capture_dynamo
    from vmonarch_opt.passes.census import attention_census
    from vmonarch_opt.passes.detect import detect
    from vmonarch_opt.passes.siblings import add_sibling_sites

    torch.manual_seed(0)
    model, x = _EagerLoop().eval(), torch.randn(1, 60, 32)
    with torch.no_grad(), attention_census(model) as calls:
        model(x)
    detected = [d for d in detect(capture_dynamo(model, x), model) if d.site.module_path != "blocks.4.attn"]
    calls.shapes["blocks.4.attn"] = [(30, 30, 16)]
    added = {d.site.module_path: d for d in add_sibling_sites(detected, calls, model)}
    assert added["blocks.4.attn"].site.seq_q == 30 and "blocks.3" in added["blocks.4.attn"].site.notes[-1]
