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
import traceback
from pathlib import Path
from typing import NoReturn

_COMMAND_MODULES = ("vmonarch_opt.profiles.commands", "vmonarch_opt.deploy.commands")

#: The ``module:factory`` the help texts show; it imports from the root of a checkout of the repository.
FACTORY_EXAMPLE = "vmonarch_fixtures.models:wan"

PROG = "vmonarch-opt"


class UsageError(SystemExit):
    """A mistake in what the command line was given: :func:`main` prints ``vmonarch-opt: error:
    <message>`` and the command exits with status 2 (``str(e)`` is the message)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> NoReturn:
    """Stop the command on a user mistake (see :class:`UsageError`)."""
    raise UsageError(message)


def input_file(path: str, what: str = "file") -> Path:
    """``path`` as a file to read, or a :class:`UsageError` saying why not."""
    p = Path(path)
    if p.is_dir():
        fail(f"{path}: is a directory; give the {what} itself")
    if not p.exists():
        fail(f"{path}: no such file")
    return p


def output_file(path: str, what: str = "file") -> Path:
    """``path`` as a file to write, checked before any work is done."""
    p = Path(path)
    if p.is_dir():
        fail(f"{path}: is a directory; give the name of the {what} to write (a file in it, say)")
    return p


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
        fail(f"{spec!r}: give the model as module:factory (MODULE:FUNCTION, a function returning the model and its "
             f"inputs), e.g. {FACTORY_EXAMPLE} from a checkout of the repository")
    try:
        with _current_directory_on_path():
            mod = importlib.import_module(mod_name)
    except ImportError as e:
        fail(f"cannot import {mod_name!r} ({e}); is it in the current directory or on PYTHONPATH?")
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            fail(f"module {mod_name!r} has no attribute {attr!r}")
    if not callable(fn):
        fail(f"{spec} is not callable")
    return fn


def load_json_file(path: str):
    p = input_file(path, "JSON file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e}); is the file truncated?")
    except UnicodeDecodeError:
        fail(f"{path}: not a text file; give a report or profile written as JSON")


def json_arg(text: str, what: str) -> dict:
    """A command-line JSON object argument (``--kwargs``, ``--overrides``, …)."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{what} must be a JSON object, e.g. '{{\"frames\": 3}}' ({e})")
    if not isinstance(d, dict):
        fail(f"{what} must be a JSON object, e.g. '{{\"frames\": 3}}', got {type(d).__name__}")
    return d


def _cmd_report(args) -> int:
    data = load_json_file(args.file)
    fmt = str(data.get("format", "")) if isinstance(data, dict) else ""
    if fmt.startswith("vmonarch_opt.report/"):
        from .report import Report

        try:
            r = Report(data)
            text = r.to_markdown() if args.markdown else str(r)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            fail(f"{args.file}: a damaged vmonarch_opt report ({type(e).__name__}: {e}); write it again with "
                 f"optimized.report.to_json(path)")
        print(text)
        return 0
    if fmt.startswith("vmonarch_opt.profile/"):
        from .profiles.profile import load_profile

        p = load_profile(args.file)
        print(p.to_markdown() if args.markdown else str(p))
        return 0
    what = f"format {fmt!r}" if fmt else ("no \"format\" field" if isinstance(data, dict)
                                         else f"a JSON {type(data).__name__}")
    fail(f"{args.file}: not a vmonarch_opt report or profile ({what}); give a file written by "
         f"optimized.report.to_json(path) or Profile.save(path)")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as one line too (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Sub-quadratic attention for video DiTs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of one line (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="print the table of a saved report or profile (JSON)")
    p.add_argument("file", help="report.json written by optimized.report.to_json(), or a profile")
    p.add_argument("--markdown", action="store_true", help="print as a Markdown table")
    p.set_defaults(func=_cmd_report)
    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name):
            importlib.import_module(name).add_commands(sub)
    return parser


#: What a command raises for a mistake in its inputs besides a VMonarchError (what vmonarch_opt
#: refuses): a bad value (ValueError, TypeError), a file that is missing, a directory or unreadable (OSError).
USER_ERRORS = (ValueError, TypeError, OSError)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e) or type(e).__name__


def _quiet_stdout() -> None:
    """stdout's reader went away (``vmonarch-opt report x.json | head``): drop what is left."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured)
        pass


def main(argv=None) -> int:
    """Run one command. A user mistake prints ``vmonarch-opt: error: <what and how to fix it>`` on
    stderr and exits with status 2 (raised as :class:`UsageError`, a ``SystemExit``); ``--debug``
    shows the traceback instead."""
    from .errors import VMonarchError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {e.message}", file=sys.stderr)
        raise
    except (VMonarchError, *USER_ERRORS) as e:
        if debug:
            raise
        msg = _one_line(e)
        hint = "" if isinstance(e, VMonarchError) else f" ({PROG} --debug ... shows where)"
        print(f"{PROG}: error: {msg}{hint}", file=sys.stderr)
        raise UsageError(msg) from None


if __name__ == "__main__":  # python -m vmonarch_opt.cli: the package's module, whose UsageError the commands raise
    from vmonarch_opt.cli import main as _main

    sys.exit(_main())
