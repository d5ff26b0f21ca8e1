"""Fixtures that run the real service: `python -m service` as a subprocess on a free loopback port, serving the
fixture scorer (tests/conftest.py) unless a test needs a trained model's numbers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import KERMANY, ServiceProcess


@pytest.fixture(scope="session")
def start_service(fixture_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: `start_service(OCT_X="…")` → a ready ServiceProcess of the fixture scorer (or of `model`), stopped at
    the end of the session."""
    started: list[ServiceProcess] = []
    logs = tmp_path_factory.mktemp("service-logs")

    def start(wait: bool = True, model: Any = None, **env: str) -> ServiceProcess:
        m = model or fixture_model
        svc = ServiceProcess(m.store, m.name, logs / f"service-{len(started)}.log", **env)
        started.append(svc)
        if wait:
            svc.wait_ready()
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture(scope="session")
def service(start_service) -> ServiceProcess:
    """The default service most tests share (open, batch ≤ 8, 20 ms batch window)."""
    return start_service()


@pytest.fixture(scope="session")
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def scan_path() -> Path:
    """A real B-scan (tests/data/kermany) with a white margin at its top, as registration left it."""
    return KERMANY / "CNV-103044-2.jpeg"


@pytest.fixture(scope="session")
def scan_bytes(scan_path: Path) -> bytes:
    return scan_path.read_bytes()
