"""benchmarks/end_to_end.py on the CPU: the script runs on every model it knows (tiny configs), and its
"mask dropped" baseline drops a mask only when the mask hides nothing."""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_drop_visible_masks_only_drops_masks_that_hide_nothing():
    from end_to_end import _DropVisibleMasks
    from conftest import rel_err

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):  # records the mask SDPA really gets (outer mode)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                seen.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
            return func(*args, **kwargs)

    visible = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    hiding = visible.clone()
    hiding[..., 12:] = False
    with Spy(), _DropVisibleMasks():  # the last mode entered sees the call first
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        b = F.scaled_dot_product_attention(q, k, v, visible)  # positional form
        c = F.scaled_dot_product_attention(q, k, v, attn_mask=hiding)
    assert seen[0] is None and seen[1] is None and seen[2] is hiding
    assert rel_err(a, F.scaled_dot_product_attention(q, k, v)) < 1e-6 and rel_err(b, a) < 1e-6
    assert rel_err(c, F.scaled_dot_product_attention(q, k, v, attn_mask=hiding)) < 1e-6


def test_end_to_end_runs_on_every_model(tmp_path, monkeypatch):
    from end_to_end import main

    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["--tiny", "--models", "wan,cogvideox,hunyuan15,framepack", "--methods", "monarch", "--runs", "1",
                 "--warmup", "0", "--no-append", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "end_to_end.json").read_text())["results"]
    opt = {r["model"]: r for r in res if r["config"] == "monarch"}
    assert set(opt) == {"wan", "cogvideox", "hunyuan15", "framepack"}
    for r in opt.values():
        assert "error" not in r and 0 < r["flop_cut"] < 1 and r["output_error"] < 0.2
