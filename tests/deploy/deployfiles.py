"""Readers for the deployment files, for tests that check them without a Docker engine.

A small Dockerfile parser (stages, ARG substitution, instructions), a `.dockerignore` matcher with Docker's rules
(last matching pattern wins, a pattern matching a parent folder matches its files), and a compose loader that
understands the `!reset` / `!override` merge tags and merges override files the way `docker compose -f a -f b` does
for mappings.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).resolve().parent / "compose_spec" / "compose-spec.json"

# --- Dockerfile -----------------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-+?]([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def substitute(text: str, variables: dict[str, str]) -> str:
    """`${X}`, `$X`, `${X:-default}`, `${X:+alt}`, `${X:?error}` with the given values (unset → empty or the
    default; a required `?` variable that is unset → empty, as the check of what compose would refuse lives in
    the tests)."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        alt = m.group(2)
        value = variables.get(name, "")
        if m.group(1) and alt is not None:
            op = m.group(0)[len(name) + 2:].lstrip(":")[:1]
            if op == "+":
                return alt if value else ""
            if op == "?":
                return value
            return value or alt
        return value

    return _VAR.sub(repl, text)


@dataclass
class Instruction:
    cmd: str
    args: str
    line: int

    def words(self) -> list[str]:
        """Arguments as a list: JSON (exec) form or shell-split."""
        a = self.args.strip()
        if a.startswith("["):
            try:
                return list(json.loads(a))
            except json.JSONDecodeError:
                pass
        return shlex.split(a, posix=True)


@dataclass
class Stage:
    name: str | None
    base: str  # after ARG substitution
    raw_base: str
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults visible in this stage

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for w in ins.words():
                if "=" in w:
                    k, v = w.split("=", 1)
                    out[k] = v
        return out


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"{self.path.name} has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def lineage(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, nearest first."""
        out = [self.stage(name)]
        names = {s.name for s in self.stages}
        while out[-1].base in names:
            out.append(self.stage(out[-1].base))
        return out

    def effective_env(self, name: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for s in reversed(self.lineage(name)):
            env.update(s.env())
        return env


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines = text.splitlines()
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(lines, 1):
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue  # comments, parser directives and blank lines between instructions
        if buf and (not s or s.startswith("#")):
            continue  # comments inside a continued instruction are dropped by Docker too
        if not buf:
            start = n
        if s.endswith("\\"):
            buf.append(s[:-1].rstrip())
            continue
        buf.append(s)
        out.append((start, " ".join(buf)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        cmd, _, args = text.partition(" ")
        cmd = cmd.upper()
        args = args.strip()
        if cmd == "FROM":
            parts = [p for p in args.split() if not p.startswith("--")]
            raw = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=substitute(raw, global_args), raw_base=raw))
            continue
        if cmd == "ARG":
            key, _, default = args.partition("=")
            if not stages:
                global_args[key] = default.strip('"')
            else:
                # An ARG re-declared without a value inside a stage takes the global default.
                stages[-1].args[key] = default.strip('"') if "=" in args else global_args.get(key, "")
        if not stages:
            continue
        stages[-1].instructions.append(Instruction(cmd, args, line))
    return Dockerfile(path=path, global_args=global_args, stages=stages)


@dataclass
class Copy:
    stage: str | None
    sources: list[str]
    dest: str
    from_stage: str | None
    line: int


def copies(df: Dockerfile) -> list[Copy]:
    out = []
    for st in df.stages:
        variables = {**df.global_args, **st.args}
        for ins in st.all("COPY") + st.all("ADD"):
            words = [substitute(w, variables) for w in ins.words()]
            flags = {w.split("=", 1)[0]: [*w.split("=", 1), ""][1] for w in words if w.startswith("--")}
            rest = [w for w in words if not w.startswith("--")]
            out.append(Copy(st.name, rest[:-1], rest[-1], flags.get("--from"), ins.line))
    return out


# --- .dockerignore --------------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            s = raw.strip()
            if not s or s.startswith("#"):
                continue
            negate = s.startswith("!")
            s = s[1:].strip() if negate else s
            s = s.strip("/")
            s = re.sub(r"/+", "/", s)
            if s.startswith("./"):
                s = s[2:]
            self.rules.append((negate, _pattern_regex(s)))

    def excluded(self, rel: str) -> bool:
        """True when Docker leaves `rel` (a path relative to the context, `/`-separated) out of the context."""
        parts = rel.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, rx in self.rules:
            if any(rx.match(c) for c in candidates):
                result = not negate
        return result


# --- compose --------------------------------------------------------------------------------------------------------


class Reset:
    """`!reset`: the attribute is removed when this file is merged over another."""


@dataclass
class Override:
    """`!override`: the value replaces the other file's value instead of being merged into it."""

    value: Any


class ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass: no arbitrary objects


def merge(base: Any, over: Any) -> Any:
    """Merge `over` onto `base` as Compose does for mappings; `!reset` removes, `!override` replaces."""
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v)
            else:
                out[k] = strip_tags(v)
        return out
    return strip_tags(over)


def strip_tags(value: Any) -> Any:
    if isinstance(value, Override):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value


def compose_schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


def env_dict(environment: Any) -> dict[str, str]:
    """A service's `environment` (mapping or KEY=VAL list) as a dict."""
    if not environment:
        return {}
    if isinstance(environment, dict):
        return {k: "" if v is None else str(v) for k, v in environment.items()}
    return dict([*e.split("=", 1), ""][:2] for e in environment)


def env_file_paths(service: dict[str, Any]) -> list[tuple[str, bool]]:
    """(path, required) for each env_file entry of a service."""
    ef = service.get("env_file") or []
    if isinstance(ef, str):
        ef = [ef]
    return [(e, True) if isinstance(e, str) else (e["path"], bool(e.get("required", True))) for e in ef]


def read_env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(assignments, names of commented-out examples) of a dotenv file."""
    values: dict[str, str] = {}
    commented: set[str] = set()
    for raw in path.read_text().splitlines():
        s = raw.strip()
        m = re.match(r"^#\s*([A-Z][A-Z0-9_]*)=", s)
        if m:
            commented.add(m.group(1))
            continue
        if not s or s.startswith("#"):
            continue
        k, sep, v = s.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        values[k.strip()] = v.strip()
    return values, commented


def interpolate(value: str) -> str:
    """Compose interpolation with nothing set in the environment: `${X:-default}` → default, `${X}` → ''."""
    return substitute(value, {})


def port_target(spec: Any) -> int:
    """Container port of a `ports` entry (short `[HOST:]CONTAINER[/proto]` or long syntax)."""
    if isinstance(spec, dict):
        return int(interpolate(str(spec["target"])))
    s = interpolate(str(spec)).split("/")[0]
    return int(s.rsplit(":", 1)[-1])


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each entry of a service's `volumes`."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.append((v.get("source", ""), v["target"], bool(v.get("read_only", False))))
            continue
        parts = v.split(":")
        # ${VAR:-default} contains a colon; re-join the interpolation before splitting on mount separators.
        joined: list[str] = []
        for p in parts:
            if joined and joined[-1].count("${") > joined[-1].count("}"):
                joined[-1] += ":" + p
            else:
                joined.append(p)
        src, tgt = joined[0], joined[1]
        mode = joined[2] if len(joined) > 2 else "rw"
        out.append((src, tgt, "ro" in mode.split(",")))
    return out


def image_reference_pinned(ref: str) -> str | None:
    """None when `ref` names an explicit tag other than `latest` (or a digest); else the reason it is not."""
    if "@sha256:" in ref:
        return None
    name = ref.rsplit("/", 1)[-1]
    if ":" not in name:
        return f"{ref}: no tag (means latest)"
    tag = name.split(":", 1)[1]
    if not tag or tag == "latest":
        return f"{ref}: tag {tag or '(empty)'!r}"
    return None


# --- the service --------------------------------------------------------------------------------------------------


def settings_env_names() -> set[str]:
    """Every environment variable name the service's Settings reads (`OCT_*`, plus explicit aliases)."""
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    for f in Settings.model_fields.values():
        if isinstance(f.validation_alias, str):
            names.add(f.validation_alias.upper())
    return names
