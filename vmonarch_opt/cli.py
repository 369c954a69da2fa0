"""The ``vmonarch-opt`` command line.

Subcommands are contributed by the modules listed in ``_COMMAND_MODULES``; each defines
``add_commands(subparsers)`` and sets ``func`` on its parsers. Commands that build a model take it
as ``module:factory`` and resolve it with :func:`load_factory`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

_COMMAND_MODULES = ("vmonarch_opt.profiles.commands", "vmonarch_opt.deploy.commands")

#: The ``module:factory`` the help texts show; it imports from the root of a checkout of the repository.
FACTORY_EXAMPLE = "vmonarch_fixtures.models:wan"


@contextlib.contextmanager
def _current_directory_on_path():
    """The current directory first on ``sys.path`` for the block (unless it is there already, as
    ``''`` or by name), as ``python -m`` would have it; ``sys.path`` is restored afterwards."""
    cwd = os.getcwd()
    if any(isinstance(p, str) and os.path.abspath(p) == cwd for p in sys.path):
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def load_factory(spec: str):
    """``"package.module:function"`` -> the function (a dotted ``function`` reaches into the module).

    The module is imported from ``sys.path`` or the current directory, so ``my_models:make`` finds
    ``my_models.py`` where the command runs, and ``vmonarch_fixtures.models:wan`` works from the root
    of a checkout of the repository.
    """
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise SystemExit(f"vmonarch-opt: {spec!r}: give the model as module:factory (MODULE:FUNCTION, a function "
                         f"returning the model and its inputs), e.g. {FACTORY_EXAMPLE} from a checkout of the "
                         f"repository")
    try:
        with _current_directory_on_path():
            mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"vmonarch-opt: cannot import {mod_name!r} ({e}); is it in the current directory or "
                         f"on PYTHONPATH?")
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise SystemExit(f"vmonarch-opt: module {mod_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise SystemExit(f"vmonarch-opt: {spec} is not callable")
    return fn


def load_json_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"vmonarch-opt: {path}: no such file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"vmonarch-opt: {path}: not valid JSON ({e}); is the file truncated?")


def _cmd_report(args) -> int:
    data = load_json_file(args.file)
    fmt = str(data.get("format", ""))
    if fmt.startswith("vmonarch_opt.report/"):
        from .report import Report

        r = Report(data)
        print(r.to_markdown() if args.markdown else str(r))
        return 0
    if fmt.startswith("vmonarch_opt.profile/"):
        from .profiles.profile import Profile

        print(Profile.load(args.file))
        return 0
    raise SystemExit(f"vmonarch-opt: {args.file}: not a vmonarch_opt report or profile (format {fmt!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmonarch-opt", description="Sub-quadratic attention for video DiTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="print the table of a saved report or profile (JSON)")
    p.add_argument("file", help="report.json written by optimized.report.to_json(), or a profile")
    p.add_argument("--markdown", action="store_true", help="print as a Markdown table")
    p.set_defaults(func=_cmd_report)
    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name):
            importlib.import_module(name).add_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
