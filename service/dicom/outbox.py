"""The durable outbox: result files on disk, their delivery state in a sqlite index (docs/pacs.md, "Outbox").

Files: `root/<source SOP Instance UID>/{record.json, sr.dcm, sc.dcm}`, written into a temporary folder and renamed
into place, so a folder is always complete. Index: `root/index.sqlite3`, one row per result with its delivery state,
so a delivery wake and a listing cost what they return, not what the outbox holds.

Each `put` gets a new `revision`. The row first records the revision being written (`writing`) and who writes it
(`writer`), then the folder is renamed into place, then the row takes the revision and becomes pending. A delivery
updates the row only if the revision it sent is still the row's and its claim is still the row's, so a result re-sent
while its old bytes were on the wire is never marked delivered with them.

Several processes may open one folder (`OCT_WORKERS`). Each open `Outbox` is a *writer* with a name
(`<pid>-<random>`) and an exclusive flock on `root/.writers/<name>`, held while it is open: the kernel drops it when
the process dies, so "is this writer alive" is one non-blocking flock away, whatever pid the system hands out next.
A writer's temporary folders carry its name, and a crash's leftovers (its temporary folders, its rows still
`writing`) are recovered only once its lock is free, never while it may still be writing them. Delivery has one owner
per folder: the `Outbox` that holds the flock on `root/.delivery.lock` (`try_own`); another process's worker takes
over when that process stops or dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from service.dicom.results import is_uid
from service.dicom.schemas import Delivery, ResultRecord

log = logging.getLogger("oct.pacs")

RECORD = "record.json"
INDEX = "index.sqlite3"
WRITERS = ".writers"
WRITE_LOCK = ".write.lock"
DELIVERY_LOCK = ".delivery.lock"
_WRITER = re.compile(r"^[0-9]+-[0-9a-f]{12}$")
_TMP = re.compile(r"^\.tmp-([0-9]+-[0-9a-f]{12})-[0-9a-f]{16}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    uid TEXT PRIMARY KEY, study TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL DEFAULT 0,
    revision TEXT, writing TEXT, status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, next_attempt_at REAL, delivered_at REAL, score REAL, is_anomalous INTEGER,
    writer TEXT, claim TEXT);
CREATE INDEX IF NOT EXISTS results_due ON results (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS results_created ON results (created_at);
CREATE INDEX IF NOT EXISTS results_study ON results (study, created_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
# Columns an index written by an older version lacks; added on open.
_ADDED_COLUMNS = ("writer", "claim")


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
    claim: str | None = None


class Outbox:
    def __init__(self, root: Path, *, on_step: Callable[[str], None] | None = None) -> None:
        """`on_step` is a crash point for tests of recovery: `put` calls it with "write" before each file it writes
        and with "renamed" once the result's folder is in place, before the index row takes it. What it raises is a
        crash at that step; what it blocks on is a writer caught halfway."""
        self.root = Path(root)
        self._on_step = on_step or _no_step
        self.root.mkdir(parents=True, exist_ok=True)
        self._writers = self.root / WRITERS
        self._writers.mkdir(exist_ok=True)
        self.writer = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._writer_fd = self._register()
        self._closed = False
        # Folder swaps and the `writing` marks of the rows are serialised across threads (the lock) and processes
        # (the flock on a descriptor of this instance's own: flock is per open file, not per thread).
        self._write_lock = threading.Lock()
        self._write_fd = os.open(self.root / WRITE_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        self._owner_fd = os.open(self.root / DELIVERY_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        self._owns = False
        # One connection, serialised by a lock: calls come from worker threads (asyncio.to_thread). Other
        # processes on the same folder are serialised by sqlite itself.
        self._db = sqlite3.connect(self.root / INDEX, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed delivery state survives power loss
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(results)")}
            for column in _ADDED_COLUMNS:
                if column not in columns:
                    with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                        self._db.execute(f"ALTER TABLE results ADD COLUMN {column} TEXT")
            self._db.execute("CREATE INDEX IF NOT EXISTS results_writing ON results (writer) "
                             "WHERE writing IS NOT NULL")
            built = self._db.execute("SELECT value FROM meta WHERE key='built'").fetchone()
        if built is None:
            self._rebuild()
        self._reap_dead()

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
        with self._exclusive():
            self._exec("INSERT INTO results (uid, writing, writer) VALUES (?, ?, ?) ON CONFLICT(uid) DO UPDATE "
                       "SET writing=excluded.writing, writer=excluded.writer", (uid, revision, self.writer))
        tmp, old = self._tmp(), None
        try:
            tmp.mkdir()
            for name, data in files.items():
                self._on_step("write")
                _write_synced(tmp / name, data)
            self._on_step("write")
            _write_synced(tmp / RECORD, json.dumps({**record.model_dump(mode="json"), "revision": revision}).encode())
            with self._exclusive():
                if final.exists():
                    old = self._tmp()
                    final.rename(old)
                try:
                    tmp.rename(final)
                except BaseException:
                    if old is not None and not final.exists():
                        old.rename(final)  # the older result stands
                        old = None
                    raise
                _sync_dir(self.root)
                self._on_step("renamed")
                if not self._settle(uid, revision, record):
                    raise RuntimeError(f"the index row of {uid} vanished while its result was stored")
        except BaseException:
            # Left as a crash would leave it, and recovered the same way, now: the folder on disk decides.
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and final.exists():
                shutil.rmtree(old, ignore_errors=True)  # replaced: the swap went through before the failure
            with self._exclusive():
                self._resolve(uid, revision, self.writer)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return revision

    def _settle(self, uid: str, revision: str, record: ResultRecord,
                mark: tuple[str, str | None] | None = None) -> bool:
        """The folder of `revision` is in place (the write lock is held): the row takes it, pending afresh.

        From `put` (no `mark`), the row's `writing` mark is cleared only if it is this revision's: a newer `put` of
        the same instance that marked the row meanwhile swaps its own folder in next. In recovery, `mark` is the
        (writing, writer) the row must still carry: a row that another process settled or marked again since is not
        ours to settle. Returns whether the row was updated."""
        d = record.delivery
        sql = ("UPDATE results SET revision=?, study=?, created_at=?, status=?, attempts=?, last_error=?, "
               "next_attempt_at=?, delivered_at=?, score=?, is_anomalous=?, claim=NULL, ")
        args: tuple = (revision, record.study_instance_uid, record.created_at, d.status, d.attempts, d.last_error,
                       d.next_attempt_at, d.delivered_at, record.result.score, int(record.result.is_anomalous))
        if mark is None:
            sql += ("writer=CASE WHEN writing=? THEN NULL ELSE writer END, "
                    "writing=CASE WHEN writing=? THEN NULL ELSE writing END WHERE uid=?")
            args = (*args, revision, revision, uid)
        else:
            sql += "writer=NULL, writing=NULL WHERE uid=? AND writing=? AND writer IS ?"
            args = (*args, uid, *mark)
        changed = self._exec(sql, args)
        if changed != 1:
            log.warning("results of %s (revision %s): the index row is %s; not settled", uid, revision,
                        "missing" if mark is None else "no longer the one to recover (settled or marked again)")
        return changed == 1

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

    @property
    def owns(self) -> bool:
        """Whether this instance is the folder's one deliverer (see `try_own`)."""
        return self._owns

    def try_own(self) -> bool:
        """Become the folder's one deliverer, if no other open `Outbox` is; True when this one is.

        On taking over, the leftovers of writers that died are recovered, and claims are given back: no other
        process delivers now, so a claim still in the index belongs to an owner that stopped or died mid-send."""
        if self._owns:
            return True
        try:
            fcntl.flock(self._owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._owns = True
        self._reap_dead()
        now = time.time()
        released = self._exec("UPDATE results SET claim=NULL, next_attempt_at=? WHERE status='pending' "
                              "AND claim IS NOT NULL AND next_attempt_at > ?", (now, now))
        if released:
            log.info("took over delivery; %d results claimed by the previous owner are due again", released)
        return True

    def disown(self) -> None:
        """Stop being the deliverer: another process's worker takes over at its next try."""
        if self._owns:
            self._owns = False
            fcntl.flock(self._owner_fd, fcntl.LOCK_UN)

    def claim_due(self, now: float, lease_s: float, limit: int = 32) -> list[Due]:
        """Pending results due at `now`, claimed for `lease_s` (another process's worker skips them meanwhile)."""
        claim = uuid.uuid4().hex
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT uid, revision, attempts, last_error, next_attempt_at FROM results WHERE status='pending' "
                    "AND revision IS NOT NULL AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
                    "ORDER BY next_attempt_at LIMIT ?", (now, limit)).fetchall()
                self._db.executemany("UPDATE results SET next_attempt_at=?, claim=? WHERE uid=? AND revision=?",
                                     [(now + lease_s, claim, r[0], r[1]) for r in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [Due(r[0], r[1], Delivery(status="pending", attempts=r[2], last_error=r[3], next_attempt_at=r[4]),
                    claim) for r in rows]

    def renew(self, due: Due, now: float, lease_s: float) -> bool:
        """Extend `due`'s claim to `now + lease_s`; False if it is no longer this claim's to send (re-claimed,
        replaced by a newer revision, or settled)."""
        return self._exec("UPDATE results SET next_attempt_at=? WHERE uid=? AND revision=? AND claim=? "
                          "AND status='pending'", (now + lease_s, due.uid, due.revision, due.claim)) == 1

    def why_unclaimed(self, due: Due) -> str:
        """Why `due` is no longer its claim's to send or settle: `replaced` (a newer revision was stored, the usual
        and harmless reason), `claimed elsewhere`, `deleted`, or the row's status."""
        rows = self._rows("SELECT revision, claim, status FROM results WHERE uid=?", (due.uid,))
        if not rows:
            return "deleted"
        revision, claim, status = rows[0]
        return "replaced" if revision != due.revision else "claimed elsewhere" if claim != due.claim else status

    def next_due(self) -> float | None:
        return self._rows("SELECT MIN(COALESCE(next_attempt_at, 0)) FROM results WHERE status='pending' "
                          "AND revision IS NOT NULL")[0][0]

    def update_delivery(self, source_uid: str, delivery: Delivery, revision: str | None = None,
                        claim: str | None = None) -> bool:
        """Record an attempt (and end its claim); only for `revision` and `claim` when given (False: the result
        was replaced, or claimed by another worker, meanwhile)."""
        sql = ("UPDATE results SET status=?, attempts=?, last_error=?, next_attempt_at=?, delivered_at=?, "
               "claim=NULL WHERE uid=?")
        args: tuple = (delivery.status, delivery.attempts, delivery.last_error, delivery.next_attempt_at,
                       delivery.delivered_at, source_uid)
        if revision is not None:
            sql, args = sql + " AND revision=?", (*args, revision)
        if claim is not None:
            sql, args = sql + " AND claim=?", (*args, claim)
        return self._exec(sql, args) > 0

    # --- retention --------------------------------------------------------------------------------------------

    def purge(self, older_than_s: float, now: float | None = None, limit: int = 1000) -> int:
        """Delete results delivered (or, with no PACS, stored: `local`) more than `older_than_s` ago."""
        cutoff = (now or time.time()) - older_than_s
        old = ("((status='delivered' AND delivered_at < ?) OR (status='local' AND created_at < ?)) "
               "AND writing IS NULL")
        rows = self._rows(f"SELECT uid, revision FROM results WHERE {old} LIMIT ?", (cutoff, cutoff, limit))
        deleted = 0
        for uid, revision in rows:
            gone: Path | None = self._tmp()
            with self._exclusive():
                # Still as selected: a `put` of the same instance marks its row `writing` first, under this lock.
                if not self._rows(f"SELECT 1 FROM results WHERE uid=? AND revision IS ? AND {old}",
                                  (uid, revision, cutoff, cutoff)):
                    continue
                try:
                    self.path(uid).rename(gone)  # out of sight first; a crash leaves a .tmp- folder, reaped later
                except (FileNotFoundError, KeyError):
                    gone = None
                deleted += self._exec("DELETE FROM results WHERE uid=? AND writing IS NULL", (uid,))
            if gone is not None:
                shutil.rmtree(gone, ignore_errors=True)
        return deleted

    # --- writers and recovery ---------------------------------------------------------------------------------

    def _register(self) -> int:
        """This writer's lock file, locked before its name appears: a name in .writers/ is locked while alive."""
        new = self._writers / f".new-{self.writer}"
        fd = os.open(new, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(new, self._writers / self.writer)
        return fd

    def _tmp(self) -> Path:
        """A temporary name of this writer's: only this writer removes it while it lives."""
        return self.root / f".tmp-{self.writer}-{uuid.uuid4().hex[:16]}"

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._write_lock:
            fcntl.flock(self._write_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._write_fd, fcntl.LOCK_UN)

    def _rebuild(self) -> None:
        """No index (first start, or it was lost): every folder's record becomes a row. Reads each record once.
        A row that exists already (another process stored or rebuilt it meanwhile) is newer and stays."""
        for d in self.root.iterdir():
            if d.is_dir() and is_uid(d.name) and (d / RECORD).is_file():
                raw = json.loads((d / RECORD).read_bytes())
                record = ResultRecord.model_validate(raw)
                revision = raw.get("revision") or uuid.uuid4().hex
                with self._exclusive():
                    if self._exec("INSERT OR IGNORE INTO results (uid, writing, writer) VALUES (?, ?, ?)",
                                  (d.name, revision, self.writer)):
                        self._settle(d.name, revision, record, (revision, self.writer))
        self._exec("INSERT OR REPLACE INTO meta (key, value) VALUES ('built', ?)", (str(time.time()),))

    def _reap_dead(self) -> None:
        """Recover what writers that are gone left behind: rows mid-`put` and temporary folders.

        A temporary folder whose name carries no writer is from an older version of this code (no process writes
        those any more)."""
        tmps: dict[str | None, list[Path]] = {}
        for p in self.root.glob(".tmp-*"):
            m = _TMP.match(p.name)
            tmps.setdefault(m.group(1) if m else None, []).append(p)
        writers: set[str | None] = set(tmps)
        writers.update(w for (w,) in self._rows("SELECT DISTINCT writer FROM results WHERE writing IS NOT NULL"))
        writers.update(p.name for p in self._writers.iterdir() if _WRITER.match(p.name))
        writers.discard(self.writer)
        for writer in writers:
            self._reap(writer, tmps.get(writer, []))

    def _reap(self, writer: str | None, tmps: list[Path]) -> None:
        fd = -1
        if writer is not None and _WRITER.match(writer):
            try:
                fd = os.open(self._writers / writer, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                pass  # reaped before, or never registered: gone either way
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return  # alive: its temporary folders and marks are its own business
        try:
            rows = self._rows("SELECT uid, writing FROM results WHERE writing IS NOT NULL AND writer IS ?", (writer,))
            for uid, writing in rows:
                with self._exclusive():
                    self._resolve(uid, writing, writer)
            for p in tmps:
                shutil.rmtree(p, ignore_errors=True)
            if fd >= 0:
                with contextlib.suppress(FileNotFoundError):
                    (self._writers / writer).unlink()
            if rows or tmps:
                log.info("recovered what writer %s left: %d index rows, %d temporary folders", writer, len(rows),
                         len(tmps))
        finally:
            if fd >= 0:
                os.close(fd)

    def _resolve(self, uid: str, writing: str, writer: str | None) -> None:
        """A row `writer` marked for `writing` that it will not settle (the write lock is held): the folder on disk
        says what was stored."""
        rows = self._rows("SELECT revision FROM results WHERE uid=? AND writing=? AND writer IS ?",
                          (uid, writing, writer))
        if not rows:
            return  # settled or marked again since
        try:
            raw = json.loads((self.path(uid) / RECORD).read_bytes())
        except (FileNotFoundError, KeyError, ValueError):
            raw = None
        # Renamed into place before the crash; or, for a row never settled, a folder a superseded writer left.
        if raw is not None and (raw.get("revision") == writing or rows[0][0] is None):
            self._settle(uid, raw.get("revision") or writing, ResultRecord.model_validate(raw), (writing, writer))
            return
        # Never renamed into place: the older result stands as it was, or, with none, nothing was stored.
        self._exec("DELETE FROM results WHERE uid=? AND writing=? AND writer IS ? AND revision IS NULL",
                   (uid, writing, writer))
        self._exec("UPDATE results SET writing=NULL, writer=NULL WHERE uid=? AND writing=? AND writer IS ?",
                   (uid, writing, writer))

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def close(self) -> None:
        """Close the index and end this writer (its lock file goes; what it left is recovered by the next open)."""
        if self._closed:
            return
        self._closed = True
        self.disown()
        with self._lock:
            self._db.close()
        with contextlib.suppress(FileNotFoundError):
            (self._writers / self.writer).unlink()
        for fd in (self._writer_fd, self._write_fd, self._owner_fd):
            os.close(fd)


def _no_step(step: str) -> None:
    pass


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
