"""Several front-end processes (`OCT_WORKERS`): one port, metrics aggregated across processes, readiness for the
whole port, overload 503s, a dead worker replaced, and a clean stop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from service_helpers import ROOT
from test_metrics import burst, value

pytestmark = pytest.mark.slow


def started_pids(log: str) -> set[str]:
    return set(re.findall(r"Started server process \[(\d+)\]", log))


def test_two_workers_share_the_port_and_the_metrics(start_service, scan_bytes: bytes) -> None:
    svc = start_service(OCT_WORKERS="2", OCT_MAX_BATCH_DELAY_MS="50")
    assert len(started_pids(svc.log())) == 2
    codes = asyncio.run(burst(svc.url, scan_bytes, 24))
    assert codes == [200] * 24
    # Whichever worker answers the scrape, the counts are the whole service's: every request, every batch.
    for _ in range(4):
        text = httpx.get(f"{svc.url}/metrics").text
        assert value(text, "oct_requests_total", '{route="/score",status="200"}') == 24
        assert value(text, "oct_batch_size_sum") == 24
        assert value(text, "oct_batch_size_count") < 24  # batches still form within each worker
        assert value(text, "oct_queue_depth") == 0
    assert len(re.findall(r"^oct_model_info\{.*\} 1\.0$", text, re.M)) == 1  # once, not once per process


def test_overload_gives_503_with_several_workers(start_service, scan_bytes: bytes) -> None:
    # 16 < the batch size of 24: batches wait 1.5 s, and 2 waiting per worker overflow.
    svc = start_service(OCT_WORKERS="2", OCT_MAX_QUEUE="2", OCT_MAX_BATCH_SIZE="24", OCT_MAX_BATCH_DELAY_MS="1500")
    codes = asyncio.run(burst(svc.url, scan_bytes, 16))
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 2, codes
    r = httpx.post(f"{svc.url}/score", params={"heatmaps": "false"}, files={"file": ("a.jpeg", scan_bytes)},
                   timeout=30)
    assert r.status_code == 200


def test_a_dead_worker_is_replaced_and_the_service_stops_cleanly(start_service, scan_bytes: bytes) -> None:
    svc = start_service(OCT_WORKERS="2")
    victim = int(sorted(started_pids(svc.log()))[0])
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while len(started_pids(svc.log())) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(started_pids(svc.log())) == 3, svc.log()[-2000:]
    svc.wait_ready()
    r = httpx.post(f"{svc.url}/score", params={"heatmaps": "false"}, files={"file": ("a.jpeg", scan_bytes)},
                   timeout=30)
    assert r.status_code == 200
    dirs = re.findall(r'metrics in ([^\s"]+)', svc.log())
    assert len(dirs) == 1 and os.path.isdir(dirs[0])
    assert svc.stop() == 0
    assert not os.path.exists(dirs[0])  # the supervisor removes PROMETHEUS_MULTIPROC_DIR


def test_a_serving_process_freezes_its_start_up_heap(fixture_model) -> None:
    """`serve_one` moves what start-up allocated (torch, the model, the app) out of the collector's reach before it
    serves, so a full collection does not stop the event loop to walk it (docs/service.md)."""
    code = f"""
import gc, socket
from service import processes
from service.main import create_app
from service.metrics import Metrics
from service.pipeline.pipeline import Pipeline
from service.settings import Settings
processes.DrainingServer.run = lambda self, sockets=None: None  # everything before serving, then return
settings = Settings(model_store={str(fixture_model.store)!r}, model_name={fixture_model.name!r}, device="cpu")
state = processes.ServingState()
app = create_app(settings, Pipeline.load(settings, Metrics()), state)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
before = gc.get_freeze_count()
processes.serve_one(settings, app, sock, state)
print(before, gc.get_freeze_count(), len(gc.get_objects()))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, frozen, tracked = map(int, out.stdout.split()[-3:])
    assert before == 0 and frozen > 100_000 and tracked < frozen // 10, (before, frozen, tracked)
