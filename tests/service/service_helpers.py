"""Helpers for the service tests: the service subprocess and image builders."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from service.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
KERMANY = ROOT / "tests" / "data" / "kermany"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """One `python -m service` process. `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, store: Path, name: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OCT_MODEL_STORE": str(store), "OCT_MODEL_NAME": name,
                    "OCT_DEVICE": "cpu", "OCT_HOST": "127.0.0.1", "OCT_PORT": str(self.port),
                    "OCT_TORCH_THREADS": "1", "OCT_CPU_WORKERS": "2", "OCT_MAX_BATCH_SIZE": "8",
                    "OCT_MAX_BATCH_DELAY_MS": "20", "OCT_DRAIN_DELAY_S": "0", **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 -- lives as long as the process it records
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"service exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"service not ready in {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gray16(h: int = 120, w: int = 200, seed: int = 0) -> Image.Image:
    """A 16-bit gray image whose low byte matters (a test that truncates to 8 bits would see the difference)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 65535, size=(h, w), dtype=np.uint16))


def kermany_files() -> list[Path]:
    return sorted(KERMANY.rglob("*.jpeg"))


def submit_batches(engine: Engine, *batches: list[tuple[np.ndarray, Any]]) -> list[list[tuple[Any, Any]]]:
    """Start `engine`, send each batch's items (preprocessed (S, S) image, crop box or None for no heatmaps) together
    through its batcher, the public queue the routes use, one batch after the other, then stop it.
    → per batch, its items' (Outputs, BatchTiming)."""
    async def main() -> list[list[tuple[Any, Any]]]:
        await engine.start()
        try:
            return [list(await asyncio.gather(*(engine.batcher.submit(x, box) for x, box in batch)))
                    for batch in batches]
        finally:
            await engine.stop()

    return asyncio.run(main())
