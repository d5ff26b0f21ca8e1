"""The README's first command, `bash scripts/serve.sh`, run as a user runs it: with `.venv` set up, no model settings
and no training, it serves the shipped real model on loopback and answers a real CNV B-scan, flagged, within 90 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from octcore.manifest import list_versions
from service.launch import free_port
from service.settings import SHIPPED_MODEL, SHIPPED_STORE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_the_first_command_answers_a_real_scan_with_the_shipped_model(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.split("bash scripts/", 1)[1].startswith("serve.sh"), "README's first command is not serve.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCT_")}
    env |= {"OCT_PORT": str(free_port()), "OCT_DRAIN_DELAY_S": "0"}
    started = time.monotonic()
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve.sh")], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the script prints the answer to its sample scan once the service is ready
            lines.append(line)
            if line.startswith('{"request_id"'):  # the answer (the log's JSON lines start with "ts")
                break
            assert time.monotonic() - started < 90, "".join(lines[-20:])
        seconds = time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    answer = json.loads(lines[-1])
    newest = list_versions(SHIPPED_STORE, SHIPPED_MODEL)[-1]
    assert answer["model"] == {"name": "kermany-oct", "version": newest}, answer["model"]
    assert answer["is_anomalous"] is True  # samples/kermany/CNV/CNV-1188386-2.jpeg: large fluid pockets
    assert seconds < 90, f"first answer after {seconds:.0f} s"
