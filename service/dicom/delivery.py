"""Durable outbox of result objects and their delivery to the PACS by STOW-RS.

Files first, network second: a result is written completely to `OCT_RESULTS_DIR/<source SOP Instance UID>/`
(`sr.dcm`, `sc.dcm`, `record.json`) in a temporary folder renamed into place, so a crash never leaves half a
result. Only then is it marked pending and handed to the worker. The worker POSTs pending results to
`OCT_PACS_STOW_URL` (basic auth from OCT_PACS_USERNAME/PASSWORD, or a bearer OCT_PACS_TOKEN) and records each
attempt in `record.json`; on start-up it picks up everything still pending, so a restart loses nothing.

Retry policy: a PACS that is unreachable, times out, or answers 408/429/5xx is retried forever, with exponential
backoff OCT_PACS_RETRY_BACKOFF_S × 2^(attempt−1) capped at MAX_BACKOFF_S; the results wait on disk. A PACS that
refuses the objects (other 4xx, or a STOW response listing failed instances) is retried OCT_PACS_RETRY_MAX times
the same way, then marked `failed` (still on disk and downloadable) because resending will not change its mind.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydicom.dataset import Dataset

from service.dicom.multipart import build_related
from service.dicom.results import is_uid
from service.dicom.schemas import Delivery, ResultRecord

log = logging.getLogger("oct.pacs")

MAX_BACKOFF_S = 300.0
RECORD = "record.json"
_TRANSIENT_STATUS = {408, 425, 429}


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Outbox:
    """`root/<source SOP Instance UID>/{record.json, sr.dcm, sc.dcm}`; all writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # a crash mid-write leaves only these; they were never pending
            shutil.rmtree(stale, ignore_errors=True)

    def path(self, source_uid: str) -> Path:
        if not is_uid(source_uid):
            raise KeyError(source_uid)
        return self.root / source_uid

    def put(self, record: ResultRecord, files: dict[str, bytes]) -> None:
        """Store a complete result (replacing an older one for the same source instance)."""
        final = self.path(record.source_sop_instance_uid)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        for name, data in files.items():
            _write_synced(tmp / name, data)
        _write_synced(tmp / RECORD, record.model_dump_json(indent=1).encode())
        old = None
        if final.exists():
            old = self.root / f".tmp-{uuid.uuid4().hex}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def get(self, source_uid: str) -> ResultRecord | None:
        try:
            return ResultRecord.model_validate_json((self.path(source_uid) / RECORD).read_bytes())
        except (KeyError, FileNotFoundError):
            return None

    def file(self, source_uid: str, name: str) -> Path | None:
        p = self.path(source_uid) / name
        return p if p.is_file() else None

    def update_delivery(self, source_uid: str, delivery: Delivery) -> None:
        record = self.get(source_uid)
        if record is None:
            return
        record.delivery = delivery
        path = self.path(source_uid) / RECORD
        tmp = path.with_name(f".{RECORD}.{uuid.uuid4().hex}")
        _write_synced(tmp, record.model_dump_json(indent=1).encode())
        os.replace(tmp, path)

    def records(self) -> list[ResultRecord]:
        out = []
        for d in self.root.iterdir():
            if d.is_dir() and is_uid(d.name) and (rec := self.get(d.name)) is not None:
                out.append(rec)
        return sorted(out, key=lambda r: r.created_at)

    def pending(self) -> list[ResultRecord]:
        return [r for r in self.records() if r.delivery.status == "pending"]


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class PacsTarget:
    url: str
    username: str = ""
    password: str = ""
    token: str = ""
    timeout_s: float = 30.0
    retry_max: int = 8
    backoff_s: float = 2.0

    @classmethod
    def from_settings(cls, s: object) -> PacsTarget:
        return cls(url=s.pacs_stow_url, username=s.pacs_username, password=s.pacs_password, token=s.pacs_token,
                   timeout_s=s.pacs_timeout_s, retry_max=s.pacs_retry_max, backoff_s=s.pacs_retry_backoff_s)

    def client(self) -> httpx.AsyncClient:
        headers = {"Accept": "application/dicom+json"}
        auth = None
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        elif self.username:
            auth = httpx.BasicAuth(self.username, self.password)
        return httpx.AsyncClient(timeout=self.timeout_s, headers=headers, auth=auth)

    def backoff(self, attempts: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** max(0, attempts - 1))


class DeliveryWorker:
    """One background task: delivers due results, sleeps until the next one is due or `notify()` wakes it."""

    def __init__(self, outbox: Outbox, target: PacsTarget) -> None:
        self.outbox = outbox
        self.target = target
        self._wake = asyncio.Event()
        self._stopping = False

    def notify(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        async with self.target.client() as client:
            while not self._stopping:
                try:
                    wait_s = await self._deliver_due(client)
                except Exception as e:  # never let the loop die: a broken record must not stop the others
                    log.error("delivery loop error: %s: %s", type(e).__name__, e)
                    wait_s = 5.0
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait_s)

    async def _deliver_due(self, client: httpx.AsyncClient) -> float:
        """Deliver every due result; return how long to sleep before the next one is due."""
        next_due = 60.0
        for record in await asyncio.to_thread(self.outbox.pending):
            if self._stopping:
                break
            due_in = (record.delivery.next_attempt_at or 0) - time.time()
            if due_in > 0:
                next_due = min(next_due, due_in)
                continue
            delivery = await self.deliver(client, record)
            if delivery.status == "pending" and delivery.next_attempt_at is not None:
                next_due = min(next_due, max(0.0, delivery.next_attempt_at - time.time()))
        return next_due

    async def deliver(self, client: httpx.AsyncClient, record: ResultRecord) -> Delivery:
        uid = record.source_sop_instance_uid
        bodies = []
        for inst in record.instances:
            path = self.outbox.file(uid, f"{inst.kind}.dcm")
            if path is not None:
                bodies.append(await asyncio.to_thread(path.read_bytes))
        body, content_type = build_related(bodies)
        d = record.delivery.model_copy()
        d.attempts += 1
        permanent, error = False, None
        try:
            resp = await client.post(self.target.url, content=body, headers={"Content-Type": content_type})
            error = _stow_error(resp)
            permanent = error is not None and resp.status_code < 500 and resp.status_code not in _TRANSIENT_STATUS
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"[:300]
        now = time.time()
        if error is None:
            d.status, d.last_error, d.next_attempt_at, d.delivered_at = "delivered", None, None, now
            log.info("delivered results of %s to the PACS (attempt %d)", uid, d.attempts)
        elif permanent and d.attempts >= self.target.retry_max:
            d.status, d.last_error, d.next_attempt_at = "failed", error, None
            log.error("PACS refused results of %s %d times, giving up: %s", uid, d.attempts, error)
        else:
            d.last_error, d.next_attempt_at = error, now + self.target.backoff(d.attempts)
            log.warning("delivery of %s failed (attempt %d, next in %.0f s): %s", uid, d.attempts,
                        d.next_attempt_at - now, error)
        await asyncio.to_thread(self.outbox.update_delivery, uid, d)
        return d


def _stow_error(resp: httpx.Response) -> str | None:
    """None when the PACS stored every instance; otherwise why not."""
    if resp.status_code == 200:
        return None
    if resp.status_code == 202:
        try:
            failed = resp.json().get("00081198", {}).get("Value", [])
        except (ValueError, AttributeError):
            failed = []
        if not failed:
            return None  # accepted with warnings only (e.g. coerced attributes): stored
        reasons = [str(f.get("00081197", {}).get("Value", ["?"])[0]) for f in failed]
        return f"PACS stored only some instances; failure reasons {reasons}"
    # Status only: a PACS's error text may quote the objects' patient attributes, and this string is logged and
    # served in /dicomweb/results.
    return f"HTTP {resp.status_code} {resp.reason_phrase}".strip()

