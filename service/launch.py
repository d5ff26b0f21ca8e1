"""Start the service (or another ASGI server) as a child process and wait until `/readyz` answers 200: the one
helper the scripts, benchmarks and tests use. Not used by the service itself."""

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

ROOT = Path(__file__).resolve().parents[1]


class StartFailed(RuntimeError):
    """The process exited, or did not become ready in time. `str()` ends with the tail of its log when there is one."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0,
               log: Callable[[], str] | None = None) -> None:
    """Poll `url`/readyz until it answers 200. StartFailed when `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise StartFailed(f"exited {proc.returncode} before it was ready{_tail(log)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise StartFailed(f"not ready in {timeout:.0f} s{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Callable[[], str] | None) -> str:
    return f":\n{log()[-3000:]}" if log is not None else ""


class ServiceProcess:
    """`python -m service` (or `command`, any server that answers /readyz) on a free loopback port, with `env` added
    to this process's environment (without its OCT_* settings when `clean`), output to `log_path` (else discarded).
    `cpus` pins it and its children."""

    def __init__(self, env: dict[str, str] | None = None, *, log_path: Path | None = None,
                 command: list[str] | None = None, port: int | None = None, cpus: set[int] | None = None,
                 clean: bool = False) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = command or [sys.executable, "-m", "service"]
        inherited = {k: v for k, v in os.environ.items() if not (clean and k.startswith("OCT_"))}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", "OCT_HOST": "127.0.0.1", **(env or {}),
                    "OCT_PORT": str(self.port)}
        self.cpus = cpus
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 120.0) -> ServiceProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 -- closed below
        pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        try:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=pin)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child holds its own descriptor
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        assert self.proc is not None, "start() first"
        wait_ready(self.url, self.proc, timeout, self.log if self.log_path else None)

    def pid(self) -> int:
        assert self.proc is not None, "start() first"
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
