"""Hand-written attention in every form, SDPA call forms, an image ViT, and sites left dense."""
import pytest
import torch

import vmonarch_opt
from vmonarch_opt import MonarchConfig
from conftest import rel_err
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
    # one Monarch block over the whole sequence is dense softmax attention
    opt1 = vmonarch_opt.optimize(model, (X,), overrides={"*": MonarchConfig(block=(1, 1, 24))}, min_seq_len=0, budget=None)
    assert all(r["plan"]["method"] == "monarch" for r in opt1.report.rows)
    with torch.no_grad():
        assert rel_err(opt1(X), ref) < 1e-4
    # without a grid a 3-D block means a 1D block of as many tokens: (2, 3, 4) -> 24, one block
    opt3 = vmonarch_opt.optimize(model, (X,), overrides={"*": MonarchConfig(block=(2, 3, 4))}, min_seq_len=0,
                                 budget=None)
    assert [r["plan"]["args"]["block"] for r in opt3.report.rows] == [[1, 1, 24]] * 2
    with torch.no_grad():
        assert rel_err(opt3(X), ref) < 1e-4
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
    assert reason in str(opt.report)
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
