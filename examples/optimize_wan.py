"""Optimize a small Wan video transformer (diffusers, random weights) and print the report.

    python examples/optimize_wan.py

The model is diffusers' WanTransformer3DModel with a tiny config so it runs on a CPU in seconds;
the latent video is 4 frames × 16×20 pixels (4×8×10 tokens after the 1×2×2 patch embedding).
On a GPU, give ``optimize`` your own model the same way — e.g. Wan2.1-T2V-1.3B from
``WanTransformer3DModel.from_pretrained(...)`` — with a batch of the size you generate at.

1. ``optimize(model, batch)`` as a user calls it: every self-attention is calibrated under the
   default quality budget (attention error ≤ 5 %). With random weights attention is close to
   uniform, which no structured method approximates that well, so the report shows each site
   left dense with the best candidate's error — calibration follows the data.
2. ``methods=("monarch",), budget=None`` pins Monarch attention on every eligible site without
   calibration: the report shows the rewrite, its FLOP cut, the measured error, and how many calls
   ran our kernel or fell back to the model's own attention (here: the one forward that measures
   the output error).
"""
import torch
from diffusers import WanTransformer3DModel

import vmonarch_opt

# A tiny Wan transformer with random weights: 2 layers, 2 heads of 32 channels, 4 latent channels.
torch.manual_seed(0)
model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                              in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                              num_layers=2, rope_max_seq_len=64).eval()
# What the model is called with: one noisy latent video [batch, channels, frames, height, width],
# the diffusion timestep and 7 text-encoder embeddings (random stand-ins for a prompt).
g = torch.Generator().manual_seed(1)
batch = dict(hidden_states=torch.randn(1, 4, 4, 16, 20, generator=g), timestep=torch.tensor([500]),
             encoder_hidden_states=torch.randn(1, 7, 32, generator=g), return_dict=False)


def output_error(optimized) -> float:
    with torch.no_grad():
        dense, ours = model(**batch)[0], optimized(**batch)[0]
    return ((ours - dense).norm() / dense.norm()).item()


calibrated = vmonarch_opt.optimize(model, batch, min_seq_len=256)
error = output_error(calibrated)  # one forward of the optimized model
print(calibrated.report)          # its "ran/fell back" column counts the calls of that forward
print(f"output relative error vs the original model: {error:.3e}\n")

monarch = vmonarch_opt.optimize(model, batch, methods=("monarch",), budget=None, min_seq_len=256)
error = output_error(monarch)
print(monarch.report)
print(f"output relative error vs the original model: {error:.3e}")
monarch.report.to_json("wan_report.json")
print("report written to wan_report.json  (view it again: vmonarch-opt report wan_report.json)")
