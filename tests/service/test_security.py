"""service/security.py: no anonymous service off loopback unless asked for, and never anonymous results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.security import is_loopback, startup_refusal
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                                ("::", False), ("10.1.2.3", False), ("scorer.example", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) == loopback


def test_refusal_needs_off_loopback_and_no_key() -> None:
    assert startup_refusal(Settings(host="127.0.0.1")) is None
    assert startup_refusal(Settings(host="0.0.0.0", api_keys=["k"])) is None
    assert startup_refusal(Settings(host="0.0.0.0", allow_anonymous=True)) is None
    reason = startup_refusal(Settings(host="0.0.0.0"))
    assert reason and "OCT_API_KEYS" in reason and "OCT_ALLOW_ANONYMOUS" in reason and "\n" not in reason
    with pytest.raises(RuntimeError, match="without an API key"):
        create_app(Settings(host="0.0.0.0"))


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OCT_")}
    return subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**clean, "OCT_DEVICE": "cpu", "OCT_PORT": "0", "OCT_MODEL_STORE": "/nonexistent",
                               **env})


def test_python_m_service_refuses_then_warns_when_allowed() -> None:
    refused = _run({"OCT_HOST": "0.0.0.0"})
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to serve on 0.0.0.0 without an API key" in lines[0]
    # Allowed: it warns, then goes on to load the model (which does not exist here: exit 1, after the warning).
    allowed = _run({"OCT_HOST": "0.0.0.0", "OCT_ALLOW_ANONYMOUS": "true"})
    assert allowed.returncode == 1 and "OCT_ALLOW_ANONYMOUS=true" in allowed.stderr
    assert "cannot load model" in allowed.stderr


@pytest.mark.parametrize("path", ["/dicomweb/results", "/dicomweb/results/1.2.3", "/dicomweb/results/1.2.3/sr.dcm"])
def test_results_need_a_key_off_loopback_even_when_anonymous_is_allowed(path: str) -> None:
    # No lifespan: the outbox is not open, so a request that passes the key check answers 503 not-ready.
    open_ = TestClient(create_app(Settings(host="0.0.0.0", allow_anonymous=True)))
    r = open_.get(path)
    assert r.status_code == 401 and "patient data" in r.json()["detail"]
    assert TestClient(create_app(Settings(host="127.0.0.1"))).get(path).status_code == 503
    keyed = TestClient(create_app(Settings(host="0.0.0.0", api_keys=["k1", "k2"])))
    assert keyed.get(path).status_code == 401
    assert keyed.get(path, headers={"X-API-Key": "k2"}).status_code == 503
