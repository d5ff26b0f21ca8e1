"""Live processes for the PACS tests: `python -m service` on a free loopback port, and polling helpers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service import launch
from service.launch import ROOT, free_port

__all__ = ["DEFAULTS", "ROOT", "Service", "free_port", "local_service", "post_dicom", "running", "wait_for"]


def wait_for(what: str, check: Callable[[], object], timeout: float = 90.0, every: float = 0.3) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# Unless a test asks otherwise: no warm-up (no PACS test is about it; ready once the model is loaded) and no drain
# delay (tests/service/test_shutdown.py covers the drain; here the default 5 s of it would idle every stop).
DEFAULTS = {"OCT_WARMUP": "false", "OCT_DRAIN_DELAY_S": "0"}


class Service(launch.ServiceProcess):
    """`python -m service` as a subprocess on a free port; `start()` waits until it is ready."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__({**DEFAULTS, **env}, log_path=log)

    def start(self, wait: bool = True, timeout: float = 120.0) -> Service:
        try:
            super().start(wait, timeout)
        except launch.StartFailed as e:
            pytest.fail(f"service {e}")
        return self


def local_service(model, tmp: Path) -> Service:
    """A service on loopback serving `model` (the fixture scorer), results in `tmp/results`, no PACS to deliver to."""
    return Service({"OCT_MODEL_STORE": str(model.store), "OCT_MODEL_NAME": model.name, "OCT_DEVICE": "cpu",
                    "OCT_HOST": "127.0.0.1", "OCT_TORCH_THREADS": "1", "OCT_MAX_BATCH_SIZE": "4",
                    "OCT_RESULTS_DIR": str(tmp / "results"), "OCT_PACS_STOW_URL": ""}, tmp / "service.log")


@contextmanager
def running(model, tmp: Path, **env: str) -> Iterator[Service]:
    """`local_service(model, tmp)` with `env` added, started (ready) for the block and stopped after it."""
    svc = local_service(model, tmp)
    svc.env.update(env)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def post_dicom(service: Service, data: bytes, **params: str) -> httpx.Response:
    """`POST /score` with a DICOM body."""
    return httpx.post(f"{service.url}/score", params=params, content=data,
                      headers={"Content-Type": "application/dicom"}, timeout=120)
