"""The ``vmonarch-opt`` command line.

Subcommands are contributed by the modules listed in ``_COMMAND_MODULES``; each defines
``add_commands(subparsers)`` and sets ``func`` on its parsers.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

_COMMAND_MODULES = ("vmonarch_opt.profiles.commands", "vmonarch_opt.deploy.commands")


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
