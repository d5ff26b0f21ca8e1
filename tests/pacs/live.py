"""Live processes for the PACS tests: `python -m service` on a free loopback port, and polling helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Service:
    """`python -m service` as a subprocess on a free port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **DEFAULTS, **env, "OCT_PORT": str(self.port)}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"service exited: {self.log.read_text()[-2000:]}"
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the service to be ready", ready, timeout=120)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def local_service(tiny_model, tmp: Path) -> Service:
    """A service on loopback serving the tests' tiny model, results in `tmp/results`, no PACS to deliver to."""
    return Service({"OCT_MODEL_STORE": str(tiny_model.store), "OCT_MODEL_NAME": tiny_model.name, "OCT_DEVICE": "cpu",
                    "OCT_HOST": "127.0.0.1", "OCT_TORCH_THREADS": "1", "OCT_MAX_BATCH_SIZE": "4",
                    "OCT_RESULTS_DIR": str(tmp / "results"), "OCT_PACS_STOW_URL": ""}, tmp / "service.log")
