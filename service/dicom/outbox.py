"""The durable outbox: result files on disk, their delivery state in a sqlite index (docs/pacs.md, "Outbox").

Files: `root/<source SOP Instance UID>/{record.json, sr.dcm, sc.dcm}`, written into a temporary folder and renamed
into place, so a folder is always complete. Index: `root/index.sqlite3`, one row per result with its delivery state,
so a delivery wake and a listing cost what they return, not what the outbox holds.

Each `put` gets a new `revision`. The row first records the revision being written (`writing`), then the folder is
renamed into place, then the row takes the revision and becomes pending. A delivery updates the row only if the
revision it sent is still the row's, so a result re-sent while its old bytes were on the wire is never marked
delivered with them. A crash at any step loses nothing: on open, a row still `writing` is settled from the
folder's record.json, and an index that is missing is rebuilt from the folders.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from service.dicom.results import is_uid
from service.dicom.schemas import Delivery, ResultRecord

RECORD = "record.json"
INDEX = "index.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    uid TEXT PRIMARY KEY, study TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL DEFAULT 0,
    revision TEXT, writing TEXT, status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, next_attempt_at REAL, delivered_at REAL, score REAL, is_anomalous INTEGER);
CREATE INDEX IF NOT EXISTS results_due ON results (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS results_created ON results (created_at);
CREATE INDEX IF NOT EXISTS results_study ON results (study, created_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass(frozen=True)
class Summary:
    uid: str
    study: str
    created_at: float
    status: str
    score: float
    is_anomalous: bool


@dataclass(frozen=True)
class Due:
    uid: str
    revision: str
    delivery: Delivery


class Outbox:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # a crash mid-write or mid-purge leaves only these
            shutil.rmtree(stale, ignore_errors=True)
        # One connection, serialised by a lock: calls come from worker threads (asyncio.to_thread). Other
        # processes on the same folder are serialised by sqlite itself.
        self._db = sqlite3.connect(self.root / INDEX, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed delivery state survives power loss
            self._db.executescript(_SCHEMA)
            built = self._db.execute("SELECT value FROM meta WHERE key='built'").fetchone()
        if built is None:
            self._rebuild()
        self._recover()

    # --- files ------------------------------------------------------------------------------------------------

    def path(self, source_uid: str) -> Path:
        if not is_uid(source_uid):
            raise KeyError(source_uid)
        return self.root / source_uid

    def file(self, source_uid: str, name: str) -> Path | None:
        try:
            p = self.path(source_uid) / name
        except KeyError:
            return None
        return p if p.is_file() else None

    def put(self, record: ResultRecord, files: dict[str, bytes]) -> str:
        """Store a complete result (replacing an older one for the same source instance); returns its revision."""
        uid = record.source_sop_instance_uid
        final = self.path(uid)
        revision = uuid.uuid4().hex
        self._exec("INSERT INTO results (uid, writing) VALUES (?, ?) "
                   "ON CONFLICT(uid) DO UPDATE SET writing=excluded.writing", (uid, revision))
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        for name, data in files.items():
            _write_synced(tmp / name, data)
        _write_synced(tmp / RECORD, json.dumps({**record.model_dump(mode="json"), "revision": revision}).encode())
        old = None
        if final.exists():
            old = self.root / f".tmp-{uuid.uuid4().hex}"
            final.rename(old)
        tmp.rename(final)
        _sync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._settle(uid, revision, record)
        return revision

    def _settle(self, uid: str, revision: str, record: ResultRecord) -> None:
        """The folder of `revision` is in place: the row takes it, with a fresh delivery state."""
        d = record.delivery
        self._exec("UPDATE results SET revision=?, writing=NULL, study=?, created_at=?, status=?, attempts=?, "
                  "last_error=?, next_attempt_at=?, delivered_at=?, score=?, is_anomalous=? "
                  "WHERE uid=? AND writing=?",
                  (revision, record.study_instance_uid, record.created_at, d.status, d.attempts, d.last_error,
                   d.next_attempt_at, d.delivered_at, record.result.score, int(record.result.is_anomalous), uid,
                   revision))

    # --- reading ----------------------------------------------------------------------------------------------

    def get(self, source_uid: str) -> ResultRecord | None:
        try:
            raw = (self.path(source_uid) / RECORD).read_bytes()
        except (KeyError, FileNotFoundError):
            return None
        record = ResultRecord.model_validate_json(raw)
        rows = self._rows("SELECT status, attempts, last_error, next_attempt_at, delivered_at FROM results "
                          "WHERE uid=?", (source_uid,))
        if rows:
            row = rows[0]
            record.delivery = Delivery(status=row[0], attempts=row[1], last_error=row[2], next_attempt_at=row[3],
                                       delivered_at=row[4])
        return record

    def summaries(self, limit: int, study: str | None = None) -> list[Summary]:
        """The newest `limit` results (of `study`), oldest first."""
        where, args = ("WHERE revision IS NOT NULL AND study=?", (study,)) if study else (
            "WHERE revision IS NOT NULL", ())
        rows = self._rows(f"SELECT uid, study, created_at, status, score, is_anomalous FROM results {where} "
                          "ORDER BY created_at DESC LIMIT ?", (*args, limit))
        return [Summary(r[0], r[1], r[2], r[3], r[4] or 0.0, bool(r[5])) for r in reversed(rows)]

    def records(self) -> list[ResultRecord]:
        uids = [r[0] for r in self._rows("SELECT uid FROM results WHERE revision IS NOT NULL ORDER BY created_at")]
        return [rec for uid in uids if (rec := self.get(uid)) is not None]

    def pending(self) -> list[ResultRecord]:
        return [r for r in self.records() if r.delivery.status == "pending"]

    def counts(self) -> dict[str, int]:
        return dict(self._rows("SELECT status, COUNT(*) FROM results GROUP BY status"))

    # --- delivery ---------------------------------------------------------------------------------------------

    def claim_due(self, now: float, lease_s: float, limit: int = 32) -> list[Due]:
        """Pending results due at `now`, claimed for `lease_s` (another process's worker skips them meanwhile)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT uid, revision, attempts, last_error, next_attempt_at FROM results WHERE status='pending' "
                    "AND revision IS NOT NULL AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
                    "ORDER BY next_attempt_at LIMIT ?", (now, limit)).fetchall()
                self._db.executemany("UPDATE results SET next_attempt_at=? WHERE uid=? AND revision=?",
                                     [(now + lease_s, r[0], r[1]) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [Due(r[0], r[1], Delivery(status="pending", attempts=r[2], last_error=r[3], next_attempt_at=r[4]))
                for r in rows]

    def next_due(self) -> float | None:
        return self._rows("SELECT MIN(COALESCE(next_attempt_at, 0)) FROM results WHERE status='pending' "
                          "AND revision IS NOT NULL")[0][0]

    def update_delivery(self, source_uid: str, delivery: Delivery, revision: str | None = None) -> bool:
        """Record an attempt; only for `revision` when given (False: the result was replaced meanwhile)."""
        sql = ("UPDATE results SET status=?, attempts=?, last_error=?, next_attempt_at=?, delivered_at=? "
               "WHERE uid=?")
        args: tuple = (delivery.status, delivery.attempts, delivery.last_error, delivery.next_attempt_at,
                       delivery.delivered_at, source_uid)
        if revision is not None:
            sql, args = sql + " AND revision=?", (*args, revision)
        return self._exec(sql, args) > 0

    # --- retention --------------------------------------------------------------------------------------------

    def purge(self, older_than_s: float, now: float | None = None, limit: int = 1000) -> int:
        """Delete results delivered (or, with no PACS, stored: `local`) more than `older_than_s` ago."""
        cutoff = (now or time.time()) - older_than_s
        rows = self._rows("SELECT uid FROM results WHERE (status='delivered' AND delivered_at < ?) "
                          "OR (status='local' AND created_at < ?) LIMIT ?", (cutoff, cutoff, limit))
        for (uid,) in rows:
            gone = self.root / f".tmp-{uuid.uuid4().hex}"
            try:
                self.path(uid).rename(gone)  # out of sight first; a crash leaves a .tmp- folder, removed on open
            except (FileNotFoundError, KeyError):
                gone = None
            self._exec("DELETE FROM results WHERE uid=?", (uid,))
            if gone is not None:
                shutil.rmtree(gone, ignore_errors=True)
        return len(rows)

    # --- recovery ---------------------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        """No index (first start, or it was lost): every folder's record becomes a row. Reads each record once."""
        for d in self.root.iterdir():
            if d.is_dir() and is_uid(d.name) and (d / RECORD).is_file():
                raw = json.loads((d / RECORD).read_bytes())
                record = ResultRecord.model_validate(raw)
                revision = raw.get("revision") or uuid.uuid4().hex
                self._exec("INSERT OR REPLACE INTO results (uid, writing) VALUES (?, ?)", (d.name, revision))
                self._settle(d.name, revision, record)
        self._exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('built', ?)", (str(time.time()),))

    def _recover(self) -> None:
        """Rows a crash left mid-`put`: the folder on disk says which revision made it."""
        for uid, writing in self._rows("SELECT uid, writing FROM results WHERE writing IS NOT NULL"):
            try:
                raw = json.loads((self.path(uid) / RECORD).read_bytes())
            except (FileNotFoundError, KeyError, ValueError):
                raw = None
            if raw is not None and raw.get("revision") == writing:  # renamed into place: settle it as pending
                self._settle(uid, writing, ResultRecord.model_validate(raw))
            elif raw is None:  # never renamed, and no older result: nothing was stored
                self._exec("DELETE FROM results WHERE uid=? AND revision IS NULL", (uid,))
                self._exec("UPDATE results SET writing=NULL WHERE uid=?", (uid,))
            else:  # never renamed: the older result stands as it was
                self._exec("UPDATE results SET writing=NULL WHERE uid=?", (uid,))

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    """The renames in it survive a power loss (the files themselves were fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
