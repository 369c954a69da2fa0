"""Deployment of optimized models: ONNX export with the ``vmonarch::*`` ops lowered to standard ops.

``torch.compile`` (CUDA graphs included) and ``torch.export`` need nothing from here: the
rewritten model traces through them with the custom ops in the graph (docs/deploying.md).
"""
from .onnx import OnnxExport, OnnxExportError, export_onnx, lower_site

__all__ = ["export_onnx", "OnnxExport", "OnnxExportError", "lower_site"]
