"""Results are sent once: the real service with two worker processes on one outbox, a PACS that takes seconds to
answer each STOW-RS, and a worker killed while it writes a result, then restarted by the supervisor.

Every result the service accepted (listed in the STOW response's ReferencedSOPSequence) must be listed by
/dicomweb/results and reach the PACS exactly once; none may reach it twice. The worker that is killed is one that
is writing a result and is not the one delivering: a process killed while its STOW to the PACS is on the wire
leaves a result that can only be sent again (the PACS stores it once: its UIDs are derived), so no design delivers
"exactly once" through that crash, while it must through a crash of a writer.
"""

from __future__ import annotations

import http.server
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from live import ROOT, Service, wait_for
from oct_dicom import oct_dataset, phantom_frames, to_bytes

from service.dicom.outbox import Outbox
from service.dicom.schemas import Delivery, ResultInstance, ResultRecord, VolumeScoreResult
from service.multipart import build_related, content_type_params, split_parts
from service.schemas import ModelRef, TimingMs

SOP = "1.2.840.10008.5.1.4.1.1.88.34"


def _record(uid: str) -> ResultRecord:
    result = VolumeScoreResult(
        request_id="r", model=ModelRef(name="m", version=1), study_instance_uid="1.2.3", series_instance_uid="1.2.4",
        sop_instance_uid=uid, sop_class_uid=SOP, number_of_frames=1, score=1.0, scores={"a": 1.0}, threshold=0.5,
        is_anomalous=True, percentile=99.0, max_frame=0, frames=[], timing_ms=TimingMs(queue=0, inference=0, total=0))
    return ResultRecord(source_sop_instance_uid=uid, study_instance_uid="1.2.3", created_at=time.time(), result=result,
                        instances=[ResultInstance(kind="sr", sop_class_uid=SOP, sop_instance_uid=uid + ".1",
                                                  series_instance_uid="1.2.5", url="u")],
                        delivery=Delivery(status="pending"))


def _listed(outbox: Outbox) -> set[str]:
    return {s.uid for s in outbox.summaries(100)}


def test_opening_the_outbox_leaves_a_living_writers_half_written_result_alone(tmp_path: Path) -> None:
    """A worker (re)starting beside one that is writing: the writer's result is stored, listed and due, whole."""
    halfway, resume = threading.Event(), threading.Event()

    def slow_write(step: str) -> None:
        if step == "write" and not halfway.is_set():
            halfway.set()
            assert resume.wait(10)

    writer = Outbox(tmp_path, on_step=slow_write)
    put = threading.Thread(target=writer.put, args=(_record("1.2.1"), {"sr.dcm": b"sr"}))
    put.start()
    assert halfway.wait(10)
    restarted = Outbox(tmp_path)  # what a sibling process does on start, while the put is half done
    resume.set()
    put.join()
    assert _listed(restarted) == _listed(writer) == {"1.2.1"}
    assert restarted.get("1.2.1").delivery.status == "pending"
    assert [d.uid for d in restarted.claim_due(time.time(), lease_s=60)] == ["1.2.1"]
    assert not list(tmp_path.glob(".tmp-*"))


_CRASHING_WRITER = """
import os, sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from service.dicom import outbox
from test_outbox_exactly_once import _record

stuck = False


def step(name):  # the second result's first file: tell the test, then wait to be killed
    if stuck and name == "write":
        print("writing", flush=True)
        time.sleep(60)


box = outbox.Outbox(Path(sys.argv[1]), on_step=step)
box.put(_record("1.2.1"), {"sr.dcm": b"sr"})
stuck = True
box.put(_record("1.2.2"), {"sr.dcm": b"sr"})
"""


def test_a_writer_killed_mid_write_is_recovered_by_the_next_open(tmp_path: Path) -> None:
    survivor = Outbox(tmp_path)  # a sibling process's outbox, open throughout
    survivor.put(_record("1.2.9"), {"sr.dcm": b"sr"})
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_WRITER, str(tmp_path), str(ROOT),
                             str(Path(__file__).parent)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert len(list(tmp_path.glob(".tmp-*"))) == 1  # its half-written result
    finally:
        proc.kill()
        proc.wait()
    restarted = Outbox(tmp_path)
    assert _listed(restarted) == {"1.2.1", "1.2.9"}  # the stored one stays, the half-written one is gone
    assert restarted.get("1.2.2") is None and not list(tmp_path.glob(".tmp-*"))
    assert {d.uid for d in survivor.claim_due(time.time(), lease_s=60)} == {"1.2.1", "1.2.9"}


def test_one_outbox_at_a_time_delivers_and_a_new_owner_takes_over_its_claims(tmp_path: Path) -> None:
    first, second = Outbox(tmp_path), Outbox(tmp_path)
    assert first.try_own() and not second.try_own()
    first.put(_record("1.2.1"), {"sr.dcm": b"sr"})
    [due] = first.claim_due(time.time(), lease_s=600)
    assert second.claim_due(time.time(), lease_s=600) == []  # claimed
    first.close()  # as when its process dies: the kernel drops the lock
    assert second.try_own()
    [again] = second.claim_due(time.time(), lease_s=600)  # no other deliverer is left: the claim is void
    assert again.uid == due.uid and again.claim != due.claim


def test_a_claim_that_is_no_longer_ours_is_neither_renewed_nor_settled(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.put(_record("1.2.1"), {"sr.dcm": b"sr"})
    [stale] = outbox.claim_due(time.time(), lease_s=1)
    [current] = outbox.claim_due(time.time() + 2, lease_s=60)  # the lease ran out: claimed afresh
    delivered = Delivery(status="delivered", attempts=1, delivered_at=time.time())
    assert not outbox.renew(stale, time.time(), 60)
    assert not outbox.update_delivery(stale.uid, delivered, stale.revision, stale.claim)
    assert outbox.why_unclaimed(stale) == "claimed elsewhere"
    assert outbox.get("1.2.1").delivery.status == "pending"
    assert outbox.renew(current, time.time(), 60)
    assert outbox.update_delivery(current.uid, delivered, current.revision, current.claim)
    assert outbox.get("1.2.1").delivery.status == "delivered"
    outbox.put(_record("1.2.1"), {"sr.dcm": b"sr"})  # stored again: pending with a new revision
    assert not outbox.renew(current, time.time(), 60) and outbox.why_unclaimed(current) == "replaced"


ANSWER_S = 2.5  # each STOW-RS to the PACS takes this long
TIMEOUT_S = 4.0  # OCT_PACS_TIMEOUT_S: a claim lasts 2 × 4 + 10 = 18 s, less than sending a burst takes
BURST = 12  # instances in the first STOW: stored together, so most are claimed together and sent for ~30 s
MAX_SINGLES = 24  # bound on the single-instance STOWs sent while waiting to catch a worker mid-write


class SlowPacs(http.server.ThreadingHTTPServer):
    """Answers every STOW-RS with 200 after ANSWER_S; records the SOP Instance UIDs of every request on arrival."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SlowHandler)
        self.lock = threading.Lock()
        self.received: list[str] = []
        self.in_flight = 0
        self.last_seen = time.monotonic()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web/studies"

    def quiet_for(self, seconds: float) -> bool:
        with self.lock:
            return self.in_flight == 0 and time.monotonic() - self.last_seen >= seconds


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    server: SlowPacs

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _, params = content_type_params(self.headers["Content-Type"])
        uids = [str(pydicom.dcmread(io.BytesIO(p.body)).SOPInstanceUID) for p in split_parts(body, params["boundary"])]
        with self.server.lock:
            self.server.received.extend(uids)
            self.server.in_flight += 1
            self.server.last_seen = time.monotonic()
        try:
            time.sleep(ANSWER_S)
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        except ConnectionError:
            pass  # the sender was killed while waiting for the answer
        finally:
            with self.server.lock:
                self.server.in_flight -= 1
                self.server.last_seen = time.monotonic()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pacs() -> Iterator[SlowPacs]:
    server = SlowPacs()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _instance(seed: int) -> bytes:
    return to_bytes(oct_dataset(phantom_frames(2, 64, 96, seed=seed)))


def _stow(url: str, bodies: list[bytes]) -> set[str]:
    """The SOP Instance UIDs the service accepted; none when the request failed (its worker was killed)."""
    body, ctype = build_related(bodies)
    try:
        r = httpx.post(f"{url}/dicomweb/studies", content=body, headers={"Content-Type": ctype}, timeout=60)
    except httpx.HTTPError:
        return set()
    if r.status_code not in (200, 202):
        return set()
    return {item["00081155"]["Value"][0] for item in r.json().get("00081199", {}).get("Value", [])}


def _get(url: str, **params: object) -> object | None:
    """The JSON of a 200 answer; None for anything else (a worker may be restarting)."""
    try:
        r = httpx.get(url, params=params, timeout=10)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def _started(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"Started server process \[(\d+)\]", log.read_text(errors="replace"))]


def _delivery_owner(results: Path, pids: list[int]) -> int | None:
    """Which of `pids` holds the flock on the outbox's delivery lock file, from /proc/locks (None: none does)."""
    try:
        inode = os.stat(results / ".delivery.lock").st_ino
    except FileNotFoundError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
        if "FLOCK" in fields and fields[-3].rsplit(":", 1)[-1] == str(inode) and int(fields[-4]) in pids:
            return int(fields[-4])
    return None


def _writing(pid: int, results: Path) -> bool:
    """Whether `pid` has a file of a result being written (in a temporary folder of the outbox) open."""
    prefix = str(results / ".tmp-")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _kill_while_writing(pids: list[int], results: Path, until: threading.Event) -> int | None:
    """Stop each candidate in turn and look at its open files; kill the first caught mid-write. Bounded by `until`."""
    while not until.is_set():
        owner = _delivery_owner(results, pids)
        for pid in pids:
            if pid == owner:
                continue  # the deliverer may have a STOW on the wire (see the module docstring)
            os.kill(pid, signal.SIGSTOP)
            try:
                if _writing(pid, results):
                    os.kill(pid, signal.SIGKILL)
                    return pid
            finally:
                os.kill(pid, signal.SIGCONT)  # no effect on a killed process; resumes one that was not caught
        time.sleep(0.002)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc to find and stop a writing worker")
def test_two_workers_a_killed_writer_and_a_slow_pacs_deliver_each_result_once(fixture_model, tmp_path: Path,
                                                                             pacs: SlowPacs) -> None:
    results = tmp_path / "results"
    log = tmp_path / "service.log"
    svc = Service({"OCT_MODEL_STORE": str(fixture_model.store), "OCT_MODEL_NAME": fixture_model.name,
                   "OCT_DEVICE": "cpu", "OCT_HOST": "127.0.0.1", "OCT_TORCH_THREADS": "1", "OCT_MAX_BATCH_SIZE": "4",
                   "OCT_WARMUP": "false", "OCT_WORKERS": "2", "OCT_DRAIN_DELAY_S": "0", "OCT_RESULTS_DIR": str(results),
                   "OCT_PACS_STOW_URL": pacs.url, "OCT_PACS_TIMEOUT_S": str(TIMEOUT_S),
                   "OCT_PACS_RETRY_BACKOFF_S": "0.5"}, log)
    svc.start()
    try:
        workers = _started(log)
        assert len(workers) == 2
        # 1. A burst in one request: stored together, so one claim takes them all while the PACS answers slowly.
        accepted = _stow(svc.url, [_instance(i) for i in range(BURST)])
        assert len(accepted) == BURST
        # 2. Single-instance STOWs from two clients, landing on both workers, until a worker is caught writing.
        caught = threading.Event()
        lock = threading.Lock()
        seeds = iter(range(100, 100 + MAX_SINGLES))

        def client() -> None:
            while not caught.is_set():
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                got = _stow(svc.url, [_instance(seed)])
                with lock:
                    accepted.update(got)

        clients = [threading.Thread(target=client) for _ in range(2)]
        for t in clients:
            t.start()
        done = threading.Event()
        threading.Thread(target=lambda: ([t.join() for t in clients], done.set()), daemon=True).start()
        victim = _kill_while_writing(workers, results, until=done)
        caught.set()
        for t in clients:
            t.join()
        assert victim is not None, "no worker was caught writing a result"
        # 3. The supervisor restarts it; the restarted worker opens the outbox while its sibling works on.
        wait_for("the killed worker to be restarted", lambda: len(_started(log)) == 3, timeout=90, every=0.2)
        wait_for("the service to be ready again", lambda: _get(f"{svc.url}/readyz") is not None, timeout=90)
        after = _stow(svc.url, [_instance(200)])
        assert after, "the STOW after the restart was not accepted"
        accepted |= after

        def delivered() -> bool:
            listed = _get(f"{svc.url}/dicomweb/results", limit=1000) or []
            status = {r["source_sop_instance_uid"]: r["delivery_status"] for r in listed}
            return all(status.get(uid) == "delivered" for uid in accepted)

        wait_for("every accepted result to be delivered", delivered, timeout=150, every=0.5)
        # Whatever else is still on its way to the PACS arrives before it has been quiet for a while.
        wait_for("the PACS to be quiet", lambda: pacs.quiet_for(ANSWER_S), timeout=60, every=0.2)

        sent = Counter(pacs.received)
        assert [uid for uid, n in sent.items() if n > 1] == [], "results delivered more than once"
        for uid in accepted:
            record = httpx.get(f"{svc.url}/dicomweb/results/{uid}", timeout=10).json()
            assert record["delivery"]["status"] == "delivered" and record["delivery"]["attempts"] == 1, record
            for inst in record["instances"]:
                assert sent[inst["sop_instance_uid"]] == 1, (uid, inst["kind"])
        text = log.read_text(errors="replace")
        for uid in accepted:
            assert text.count(f"delivered results of {uid} ") == 1, uid
        assert not list(results.glob(".tmp-*"))  # the killed writer's half-written result was cleaned up
    finally:
        svc.stop()
