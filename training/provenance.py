"""What a manifest records so that a model can be rebuilt elsewhere: the commands that made it, the code's commit and
the list of scans it learnt from. Never the folders of the machine it was built on: they mean nothing on another
one, and they may say too much."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def portable(value: Any) -> Any:
    """`value` with every absolute path in it cut to its last part."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or value[1:3] == ":\\"):
        return Path(value).name
    return value


def command_line(module: str, argv: list[str] | None) -> str:
    """`python -m module args…` as it was run (`argv`, or the process's own), absolute paths cut to their last part:
    the folders to pass are the user's own."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *(portable(a) for a in args)])


def code_version() -> dict[str, Any] | None:
    """The git commit of this code, and whether tracked files differed from it; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def data_list(root: Path, groups: dict[str, list[str]]) -> dict[str, Any]:
    """The scans of each group (names relative to `root`, as the checkpoint lists them), and the sha256 of their
    `md5sum` listing ("<md5>  <name>" lines, sorted by name): one number that says whether someone else's copy of
    the data is the same, file by file (samples/*/SOURCES.tsv give every scan's md5)."""
    names = sorted({n for g in groups.values() for n in g})
    lines = "".join(f"{hashlib.md5((root / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    return {**{k: sorted(v) for k, v in groups.items()}, "md5sum_sha256": hashlib.sha256(lines.encode()).hexdigest()}
