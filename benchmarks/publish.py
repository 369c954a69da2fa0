"""Where benchmark results go: the exact command, ``$OUT`` files and BENCHMARKS.md."""
from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def out_dir() -> Optional[Path]:
    """``$OUT`` (created) when set: the device tool brings back what is written there."""
    if not os.environ.get("OUT"):
        return None
    out = Path(os.environ["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    return out


def revision() -> str:
    """The git commit of the code that ran, ``+dirty`` when tracked files differ from it. A copy of
    the tree without git metadata (e.g. a remote GPU machine) gives it in ``VMONARCH_REVISION``."""
    env = os.environ.get("VMONARCH_REVISION")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git metadata; set VMONARCH_REVISION)"
    return sha + ("+dirty" if dirty else "")


def publish(name: str, section: str, payload: dict, *, append: bool) -> None:
    """Write ``$OUT/{name}.json`` and ``$OUT/{name}_section.md``, append the markdown section to
    BENCHMARKS.md when ``append``, and print it. The section and the payload are stamped with the
    git revision of the code that ran (``revision()``)."""
    rev = revision()
    payload = {**payload, "revision": rev}
    head, _, rest = section.partition("\n")
    section = f"{head}\n\nRevision: `{rev}`.\n{rest}"
    out = out_dir()
    if out:
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
        (out / f"{name}_section.md").write_text(section)
    if append:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n" + section)
    print("\n" + section, flush=True)
