"""Optimize a small Wan video transformer (diffusers, random weights) and print the report.

    python examples/optimize_wan.py

The model is WanTransformer3DModel with a tiny config so it runs on a CPU in seconds; the
latent video is 4 frames × 16×20 pixels (4×8×10 tokens after the 1×2×2 patch embedding).
On a GPU, use vmonarch_opt.models.wan_1_3b() for the full-size Wan2.1-1.3B architecture.
"""
import torch

import vmonarch_opt
from vmonarch_opt import models

model, batch = models.wan(frames=4, height=8, width=10, layers=2, heads=2, head_dim=32)
optimized = vmonarch_opt.optimize(model, batch, min_seq_len=256)
print(optimized.report)

with torch.no_grad():
    dense, ours = model(**batch)[0], optimized(**batch)[0]
print(f"\noutput relative error vs the original model: {((ours - dense).norm() / dense.norm()).item():.3e}")
optimized.report.to_json("wan_report.json")
print("report written to wan_report.json  (view it again: vmonarch-opt report wan_report.json)")
