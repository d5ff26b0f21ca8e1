"""Fixtures that run the real service: `python -m service` as a subprocess on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import ServiceProcess


@pytest.fixture(scope="session")
def start_service(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: `start_service(OCT_X="…")` → a ready ServiceProcess, stopped at the end of the session."""
    started: list[ServiceProcess] = []
    logs = tmp_path_factory.mktemp("service-logs")

    def start(wait: bool = True, **env: str) -> ServiceProcess:
        svc = ServiceProcess(tiny_model.store, tiny_model.name, logs / f"service-{len(started)}.log", **env)
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
def scan_path(tiny_model) -> Path:
    """A phantom B-scan with white margins, as the training data has them."""
    return sorted((tiny_model.data_root / "OCT2017" / "test" / "CNV").glob("*.jpeg"))[0]


@pytest.fixture(scope="session")
def scan_bytes(scan_path: Path) -> bytes:
    return scan_path.read_bytes()
