"""The outbox and its STOW-RS delivery against a local HTTP endpoint that plays a PACS going down and coming back
(the end-to-end tests do the same with a real Orthanc)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from live import ROOT
from oct_dicom import oct_dataset, phantom_frames

from service.dicom.delivery import DeliveryWorker, PacsTarget
from service.dicom.outbox import Outbox, dicom_bytes
from service.dicom.schemas import Delivery, ResultInstance, ResultRecord, VolumeScoreResult
from service.multipart import content_type_params, split_parts
from service.schemas import ModelRef, TimingMs


class Pacs(http.server.ThreadingHTTPServer):
    """Answers the first `fail_first` STOW requests with `fail_status`, then 200; records what it got."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail_first, self.fail_status = fail_first, fail_status
        self.requests: list[tuple[dict, list[pydicom.Dataset]]] = []
        self.stored: list[pydicom.Dataset] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web/studies"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Pacs

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _, params = content_type_params(self.headers["Content-Type"])
        datasets = [pydicom.dcmread(io.BytesIO(p.body)) for p in split_parts(body, params["boundary"])]
        self.server.requests.append((dict(self.headers), datasets))
        status = self.server.fail_status if len(self.server.requests) <= self.server.fail_first else 200
        if status == 200:
            self.server.stored.extend(datasets)
        out = json.dumps({}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pacs_factory() -> Iterator:
    servers: list[Pacs] = []

    def make(**kw: int) -> Pacs:
        s = Pacs(**kw)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def _record(outbox: Outbox, uid: str) -> None:
    ds = oct_dataset(phantom_frames(1, 32, 32))
    ds.SOPInstanceUID = uid
    result = VolumeScoreResult(
        request_id="r", model=ModelRef(name="m", version=1), study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID, sop_instance_uid=uid, sop_class_uid=ds.SOPClassUID,
        number_of_frames=1, score=1.0, scores={"a": 1.0}, threshold=0.5, is_anomalous=True, percentile=99.0,
        max_frame=0, frames=[], timing_ms=TimingMs(queue=0, inference=0, total=0))
    inst = ResultInstance(kind="sr", sop_class_uid=ds.SOPClassUID, sop_instance_uid=uid,
                          series_instance_uid=ds.SeriesInstanceUID, url="u")
    outbox.put(ResultRecord(source_sop_instance_uid=uid, study_instance_uid=ds.StudyInstanceUID,
                            created_at=time.time(), result=result, instances=[inst],
                            delivery=Delivery(status="pending")), {"sr.dcm": dicom_bytes(ds)})


async def _run_until(worker: DeliveryWorker, done, timeout: float = 20.0) -> None:
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "delivery did not finish in time"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
        await task


def test_outbox_put_is_atomic_and_replaces(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    _record(outbox, "1.2.3")
    _record(outbox, "1.2.3")
    assert [r.source_sop_instance_uid for r in outbox.records()] == ["1.2.3"]
    assert not list(tmp_path.glob(".tmp-*"))
    (tmp_path / ".tmp-crashed").mkdir()  # what a crash mid-write leaves behind
    assert [r.source_sop_instance_uid for r in Outbox(tmp_path).records()] == ["1.2.3"]
    assert not (tmp_path / ".tmp-crashed").exists()
    assert outbox.get("../etc") is None and outbox.get("1.2.4") is None


def test_retries_with_backoff_until_the_pacs_accepts(tmp_path: Path, pacs_factory) -> None:
    pacs = pacs_factory(fail_first=2, fail_status=503)
    outbox = Outbox(tmp_path)
    _record(outbox, "1.2.3")
    target = PacsTarget(url=pacs.url, username="oct", password="s3cret", backoff_s=0.1, retry_max=1)
    asyncio.run(_run_until(DeliveryWorker(outbox, target), lambda: outbox.get("1.2.3").delivery.status == "delivered"))
    d = outbox.get("1.2.3").delivery
    assert d.attempts == 3 and d.last_error is None  # 503 is transient: retried past retry_max
    assert len(pacs.requests) == 3 and pacs.stored[0].SOPInstanceUID == "1.2.3"
    headers = pacs.requests[0][0]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"oct:s3cret").decode()
    assert headers["Content-Type"].startswith("multipart/related")


def test_pacs_down_then_back_and_restart_loses_nothing(tmp_path: Path, pacs_factory) -> None:
    outbox = Outbox(tmp_path)
    _record(outbox, "1.2.3")
    dead = PacsTarget(url="http://127.0.0.1:9/dicom-web/studies", backoff_s=0.05, timeout_s=2)  # nothing listens
    asyncio.run(_run_until(DeliveryWorker(outbox, dead), lambda: outbox.get("1.2.3").delivery.attempts >= 2))
    d = outbox.get("1.2.3").delivery
    assert d.status == "pending" and "Connect" in (d.last_error or "")
    # "Restart": a new outbox and worker on the same folder, the PACS now up, token auth.
    pacs = pacs_factory()
    outbox2 = Outbox(tmp_path)
    worker = DeliveryWorker(outbox2, PacsTarget(url=pacs.url, token="tok", backoff_s=0.05))
    # The restarted worker must not wait out the old backoff forever: it was set in the past few ms anyway.
    asyncio.run(_run_until(worker, lambda: outbox2.get("1.2.3").delivery.status == "delivered"))
    assert pacs.requests[0][0]["Authorization"] == "Bearer tok"


def test_refusal_is_given_up_after_retry_max(tmp_path: Path, pacs_factory) -> None:
    pacs = pacs_factory(fail_first=100, fail_status=400)
    outbox = Outbox(tmp_path)
    _record(outbox, "1.2.3")
    target = PacsTarget(url=pacs.url, backoff_s=0.02, retry_max=3)
    asyncio.run(_run_until(DeliveryWorker(outbox, target), lambda: outbox.get("1.2.3").delivery.status == "failed"))
    d = outbox.get("1.2.3").delivery
    assert d.attempts == 3 and "HTTP 400" in d.last_error
    assert (tmp_path / "1.2.3" / "sr.dcm").is_file()  # still downloadable


def _delivered(uid: str, revision: str, outbox: Outbox, at: float | None = None) -> bool:
    return outbox.update_delivery(uid, Delivery(status="delivered", attempts=1, delivered_at=at or time.time()),
                                  revision)


def test_a_result_re_sent_during_its_delivery_is_not_marked_delivered(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    _record(outbox, "1.2.3")
    [first] = outbox.claim_due(time.time(), lease_s=60)
    _record(outbox, "1.2.3")  # re-sent (new bytes) while the first revision is on the wire
    assert not _delivered("1.2.3", first.revision, outbox)  # the old bytes' success does not count
    assert outbox.get("1.2.3").delivery.status == "pending"
    [second] = outbox.claim_due(time.time(), lease_s=60)
    assert second.revision != first.revision and _delivered("1.2.3", second.revision, outbox)
    assert outbox.get("1.2.3").delivery.status == "delivered"


_DIES_AFTER_RENAME = """
import os, sys
from pathlib import Path
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from service.dicom.outbox import Outbox
from test_delivery import _record

_record(Outbox(Path(sys.argv[1]), on_step=lambda step: step == "renamed" and os._exit(3)), "1.2.3")
"""


def test_a_crash_at_any_step_loses_no_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = Outbox(tmp_path)
    _record(outbox, "1.2.1")
    [due] = outbox.claim_due(time.time(), lease_s=60)
    assert _delivered("1.2.1", due.revision, outbox)
    # 1. Crash before the folder is renamed into place: the delivered result stands, nothing half-written shows.
    with monkeypatch.context() as m:
        m.setattr(Path, "rename", lambda self, target: (_ for _ in ()).throw(OSError("crash")))
        with pytest.raises(OSError):
            _record(outbox, "1.2.1")
        with pytest.raises(OSError):
            _record(outbox, "1.2.2")  # a first result that never reached its folder
    # 2. The process dies after the rename, before the index row takes the new revision.
    died = subprocess.run([sys.executable, "-c", _DIES_AFTER_RENAME, str(tmp_path), str(ROOT),
                           str(Path(__file__).parent)], cwd=ROOT)
    assert died.returncode == 3
    # 3. Crash after a claim, before the attempt is recorded (no update at all).
    _record(outbox, "1.2.4")
    claimed = {d.uid for d in outbox.claim_due(time.time(), lease_s=5)}
    assert claimed == {"1.2.4"}
    outbox.close()

    reopened = Outbox(tmp_path)
    assert reopened.get("1.2.1").delivery.status == "delivered"
    assert reopened.get("1.2.2") is None and "1.2.2" not in {s.uid for s in reopened.summaries(10)}
    assert reopened.get("1.2.3").delivery.status == "pending"  # the renamed folder was settled on open
    due_later = {d.uid for d in reopened.claim_due(time.time() + 6, lease_s=60)}
    assert due_later == {"1.2.3", "1.2.4"}  # the crashed claim's lease ran out: delivered again, not lost
    assert not list(tmp_path.glob(".tmp-*"))


def test_index_is_rebuilt_from_the_folders_when_lost(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    for uid in ("1.2.1", "1.2.2"):
        _record(outbox, uid)
    outbox.close()
    for f in tmp_path.glob("index.sqlite3*"):
        f.unlink()
    rebuilt = Outbox(tmp_path)
    assert [s.uid for s in rebuilt.summaries(10)] == ["1.2.1", "1.2.2"]
    assert {d.uid for d in rebuilt.claim_due(time.time(), lease_s=60)} == {"1.2.1", "1.2.2"}


def test_retention_deletes_only_old_delivered_results(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    for uid in ("1.2.1", "1.2.2", "1.2.3"):
        _record(outbox, uid)
    dues = {d.uid: d for d in outbox.claim_due(time.time(), lease_s=60)}
    _delivered("1.2.1", dues["1.2.1"].revision, outbox, at=time.time() - 100)
    _delivered("1.2.2", dues["1.2.2"].revision, outbox, at=time.time())
    assert outbox.purge(older_than_s=50) == 1
    assert outbox.get("1.2.1") is None and not (tmp_path / "1.2.1").exists()
    assert outbox.get("1.2.2").delivery.status == "delivered" and outbox.get("1.2.3") is not None
