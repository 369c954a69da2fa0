"""vmonarch_opt: sub-quadratic attention for video diffusion transformers, without retraining.

    import vmonarch_opt
    optimized = vmonarch_opt.optimize(model, calib_batch)
    print(optimized.report)

    with vmonarch_opt.record(pipe) as rec:       # a diffusers pipeline: record a real generation,
        pipe(prompt_embeds=emb)
    fast = vmonarch_opt.optimize_pipeline(pipe, rec)   # then optimize every transformer
"""
from . import methods  # noqa: F401  registers the methods and their torch.ops.vmonarch.* ops
from .methods import DenseConfig, MonarchConfig, MonarchRTConfig, VMoBAConfig
from .errors import CalibrationBatchError, CaptureError, ProfileError, VMonarchError
from .optimize import optimize, restore, stats
from .finetune import FinetuneResult, distillation_loss, finetune
from . import parallel  # noqa: F401  context parallelism: parallel.process_group (docs/multi_gpu.md)
from .deploy import export_onnx  # noqa: F401  (ONNX export; needs onnx + onnxscript at call time)
from .profiles import Budget, Profile, calibrate, load_profile
from .report import Report
from .switch import set_original_attention
from .pipelines import PipelineReport, Recording, optimize_pipeline, record

__version__ = "0.1.0"

__all__ = ["optimize", "restore", "stats", "set_original_attention", "record", "optimize_pipeline", "Recording",
           "PipelineReport", "calibrate", "load_profile", "Budget", "Profile", "Report",
           "finetune", "FinetuneResult", "distillation_loss",
           "MonarchConfig", "MonarchRTConfig", "VMoBAConfig", "DenseConfig",
           "CalibrationBatchError", "CaptureError", "ProfileError", "VMonarchError"]
