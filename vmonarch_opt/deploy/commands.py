"""``vmonarch-opt export-onnx MODULE:FACTORY [--profile P.json] -o model.onnx``.

``FACTORY`` is a function returning ``(model, example_inputs)`` — e.g. ``vmonarch_fixtures.models:wan``
from a checkout of the repository (see :func:`vmonarch_opt.cli.load_factory`).
The model is optimized (with the profile's per-site choices when ``--profile`` is given), then
written as ONNX, checked and verified in onnxruntime.
"""
from __future__ import annotations

from ..cli import FACTORY_EXAMPLE, fail, input_file, json_arg, load_factory, output_file

_EPILOG = """examples (the vmonarch_fixtures factories from the root of a checkout of the repository;
MODULE is imported from the current directory or PYTHONPATH):
  vmonarch-opt export-onnx vmonarch_fixtures.models:wan --methods monarch --no-calibrate --min-seq-len 0 -o wan.onnx
  vmonarch-opt export-onnx my_pkg.build:make_model --profile wan_profile.json -o model.onnx
  vmonarch-opt export-onnx vmonarch_fixtures.models:cogvideox --kwargs '{"frames": 4}' -o cog.onnx
"""


def build(spec: str, factory_kwargs: dict):
    """Call the factory; it must return ``(model, example_inputs)``."""
    import torch

    out = load_factory(spec)(**factory_kwargs)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module)):
        fail(f"{spec} must return (model, example_inputs) — the model and what it is called with (a dict, tuple "
             f"or tensor); it returned {type(out).__name__}")
    return out


def _load_profile(path: str):
    from ..profiles.profile import load_profile

    return load_profile(input_file(path, "profile JSON file"))  # a ProfileError is one line in main()


def _cmd_export_onnx(args) -> int:
    import vmonarch_opt

    from .onnx import export_onnx

    output_file(args.output, ".onnx file")
    if args.report:
        output_file(args.report, "report")
    factory_kwargs = json_arg(args.kwargs, "--kwargs") if args.kwargs else {}
    profile = _load_profile(args.profile) if args.profile else None
    model, inputs = build(args.factory, factory_kwargs)
    kw = {}
    if args.no_calibrate:
        kw["budget"] = None
    elif args.max_rel_error is not None:
        from ..profiles.budget import Budget

        kw["budget"] = Budget(max_rel_error=args.max_rel_error)
    # a VMonarchError (a site that cannot be lowered, onnxruntime disagreeing) is one line in main()
    opt = vmonarch_opt.optimize(model, inputs, profile=profile, methods=args.methods, min_seq_len=args.min_seq_len,
                                **kw)
    print(opt.report)
    if args.report:
        opt.report.to_json(args.report)
    result = export_onnx(opt, inputs, args.output, opset=args.opset, strict=not args.allow_dense_fallback,
                         verify=not args.no_verify, rtol=args.rtol, dynamic_batch=args.dynamic_batch)
    print(result)
    return 0


def add_commands(subparsers) -> None:
    import argparse

    from ..profiles.commands import count_arg, methods_arg, methods_help

    p = subparsers.add_parser(
        "export-onnx", help="optimize a model given as MODULE:FACTORY and write it as ONNX",
        description="Optimize the model built by FACTORY (a function returning (model, example_inputs)) and "
                    "export it to ONNX with every rewritten attention lowered to standard ONNX ops; the file "
                    "is checked with onnx.checker and compared with PyTorch in onnxruntime.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", help=f"MODULE:FUNCTION returning (model, example_inputs), e.g. {FACTORY_EXAMPLE} "
                                   f"from a checkout of the repository")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--profile", help="calibration profile (JSON) whose per-site choices are used")
    p.add_argument("--methods", type=methods_arg, default=None,
                   help=methods_help())
    p.add_argument("--min-seq-len", type=count_arg, default=None,
                   help="sites with fewer tokens keep the model's attention (default 1024, or the "
                        "profile's own with --profile)")
    p.add_argument("--max-rel-error", type=float, default=None,
                   help="calibrate with this per-site error budget (default: optimize()'s own)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="no calibration: the default policy within --methods (budget=None)")
    p.add_argument("--kwargs", "--factory-kwargs", dest="kwargs",
                   help="JSON object of keyword arguments for FACTORY, e.g. '{\"frames\": 4}'")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="largest relative error of onnxruntime vs PyTorch accepted (default 1e-4)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="dynamic batch dimension in the ONNX graph (the factory's batch must be >= 2)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--allow-dense-fallback", action="store_true",
                   help="export sites that do not fit the example inputs as the model's own attention "
                        "instead of failing")
    p.add_argument("--report", help="also write the optimization report as JSON here")
    p.set_defaults(func=_cmd_export_onnx)
