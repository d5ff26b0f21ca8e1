"""The lock files (scripts/lock.sh writes them): complete, hashed, in step with pyproject.toml and with each other,
and the files that install from them (scripts/setup.sh, so CI; Dockerfile.gpu) do so with hashes checked."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

import pytest
from deployfiles import ROOT
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCKS = {"dev": "requirements.lock", "serve": "requirements-serve.lock", "train": "requirements-train.lock"}


@dataclass
class Pin:
    version: Version
    marker: Marker | None
    hashes: list[str] = field(default_factory=list)


def parse_lock(text: str) -> dict[str, Pin]:
    """name → Pin, from pip's hash-checking requirements format (an entry: `name==version [; marker] \\` then one
    `--hash=sha256:…` line per file of that release)."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.splitlines():
        if re.match(r"[a-z0-9]", line):
            req = Requirement(line.rstrip(" \\"))
            (spec,) = req.specifier
            assert spec.operator == "==", line
            current = pins[canonicalize_name(req.name)] = Pin(Version(spec.version), req.marker)
        elif m := re.match(r"\s+--hash=sha256:([0-9a-f]{64})", line):
            assert current is not None, line
            current.hashes.append(m.group(1))
    return pins


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, Pin]]:
    return {extra: parse_lock((ROOT / name).read_text()) for extra, name in LOCKS.items()}


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_entry_is_pinned_and_hashed(locks) -> None:
    for extra, pins in locks.items():
        assert len(pins) > 20, f"{LOCKS[extra]}: {len(pins)} entries"
        unhashed = [name for name, pin in pins.items() if not pin.hashes]
        assert not unhashed, f"{LOCKS[extra]}: no hash for {unhashed}"


def _requirements(project: dict, extra: str) -> list[Requirement]:
    """pyproject's requirements of one extra, the core ones and those of extras it names (`oct-anomaly[x]`)."""
    out, todo, seen = [Requirement(r) for r in project["dependencies"]], [extra], set()
    while todo:
        e = todo.pop()
        seen.add(e)
        for r in map(Requirement, project["optional-dependencies"][e]):
            if canonicalize_name(r.name) == canonicalize_name(project["name"]):
                todo += [x for x in r.extras if x not in seen]
            else:
                out.append(r)
    return out


@pytest.mark.parametrize("extra", sorted(LOCKS))
def test_lock_satisfies_pyproject(locks, project, extra) -> None:
    """Editing pyproject.toml without `bash scripts/lock.sh` fails here: every requirement of the extra is locked,
    at a release its specifier allows, extras included (uvicorn[standard] brings uvloop, httptools, ...)."""
    pins = locks[extra]
    for req in _requirements(project, extra):
        name = canonicalize_name(req.name)
        assert name in pins, f"{LOCKS[extra]} lacks {req}: run bash scripts/lock.sh"
        assert req.specifier.contains(pins[name].version, prereleases=True), \
            f"{LOCKS[extra]} pins {name}=={pins[name].version}, pyproject asks {req}: run bash scripts/lock.sh"
    # The build backend, so the project installs with --no-build-isolation and fetches nothing unhashed.
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for req in map(Requirement, build):
        assert req.specifier.contains(pins[canonicalize_name(req.name)].version), req


@pytest.mark.parametrize("extra", ["serve", "train"])
def test_image_locks_are_inside_the_dev_lock(locks, extra) -> None:
    """The images run the releases the tests ran: each image lock is resolved within requirements.lock."""
    dev = locks["dev"]
    for name, pin in locks[extra].items():
        assert name in dev, f"{LOCKS[extra]} has {name}, requirements.lock does not"
        assert pin.version == dev[name].version, f"{name}: {pin.version} in {LOCKS[extra]}, {dev[name].version} in dev"
        assert set(pin.hashes) == set(dev[name].hashes), name


def test_torch_is_pinned_as_lock_sh_says(locks) -> None:
    script = (ROOT / "scripts" / "lock.sh").read_text()
    pins = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', script))
    assert set(pins) == {"torch", "torchvision"}, "scripts/lock.sh: TORCH_PINS"
    for extra, lock in locks.items():
        assert str(lock["torch"].version) == pins["torch"], LOCKS[extra]
        if "torchvision" in lock:
            assert str(lock["torchvision"].version) == pins["torchvision"], LOCKS[extra]
    # torchvision 0.N pairs with torch 2.(N-15): the pair must be one that exists.
    assert Version(pins["torchvision"]).minor == Version(pins["torch"]).minor + 15


def test_setup_installs_the_lock_with_hashes() -> None:
    """scripts/setup.sh (and so scripts/test.sh and CI) installs from requirements.lock, hash-checked, and its
    stamp changes with the lock, so an updated lock is installed on the next run."""
    script = (ROOT / "scripts" / "setup.sh").read_text()
    assert "LOCK=requirements.lock" in script
    assert re.search(r'install --require-hashes --no-deps -r "\$LOCK"', script)
    assert re.search(r'want=.*cat "\$LOCK" pyproject\.toml \| sha256sum', script)
    assert "install --no-deps --no-build-isolation -e ." in script
    assert "[dev]" not in script, "an extra resolved by pip would bypass the lock"
