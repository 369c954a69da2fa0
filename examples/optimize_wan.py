"""Optimize a small Wan video transformer (diffusers, random weights) and print the report.

    python examples/optimize_wan.py

The model is WanTransformer3DModel with a tiny config so it runs on a CPU in seconds; the
latent video is 4 frames × 16×20 pixels (4×8×10 tokens after the 1×2×2 patch embedding).
On a GPU, use vmonarch_opt.models.wan_1_3b() for the full-size Wan2.1-1.3B architecture.

1. ``optimize(model, batch)`` as a user calls it: every self-attention is calibrated under the
   default quality budget (attention error ≤ 5 %). With random weights attention is close to
   uniform, which no structured method approximates that well, so the report shows each site
   left dense with the best candidate's error — calibration follows the data.
2. ``methods=("monarch",), budget=None`` pins Monarch attention on every eligible site without
   calibration: the report shows the rewrite, its FLOP cut and the measured error.
"""
import torch

import vmonarch_opt
from vmonarch_opt import models

model, batch = models.wan(frames=4, height=8, width=10, layers=2, heads=2, head_dim=32)


def output_error(optimized) -> float:
    with torch.no_grad():
        dense, ours = model(**batch)[0], optimized(**batch)[0]
    return ((ours - dense).norm() / dense.norm()).item()


calibrated = vmonarch_opt.optimize(model, batch, min_seq_len=256)
print(calibrated.report)
print(f"output relative error vs the original model: {output_error(calibrated):.3e}\n")

monarch = vmonarch_opt.optimize(model, batch, methods=("monarch",), budget=None, min_seq_len=256)
print(monarch.report)
print(f"output relative error vs the original model: {output_error(monarch):.3e}")
monarch.report.to_json("wan_report.json")
print("report written to wan_report.json  (view it again: vmonarch-opt report wan_report.json)")
