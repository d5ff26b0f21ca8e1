"""One PACS-ready service for the session: modules that need nothing but `local_service`'s settings share it instead
of starting (and warming) a service each. A module that needs other settings (a log level, a public URL, a PACS to
deliver to) defines its own `service` fixture, which takes precedence over this one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live import Service, local_service


@pytest.fixture(scope="session")
def service(fixture_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`local_service` on the tiny model; its results folder is `service.results`. Shared: every instance a test
    stores gets fresh UIDs (tests/pacs/oct_dicom.py), so tests look their own results up and never count the folder."""
    tmp = tmp_path_factory.mktemp("pacs-service")
    svc = local_service(fixture_model, tmp)
    svc.results = tmp / "results"  # type: ignore[attr-defined]
    svc.start()
    yield svc
    svc.stop()
