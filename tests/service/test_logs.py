"""service/logs.py: one JSON audit line per call, in both formats, with the fields the formatter promises."""

from __future__ import annotations

import json
import logging

import pytest

from service import logs


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_audit_line(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure(fmt, "INFO")
        logs.audit(request_id="r1", method="POST", route="/score", status=200, latency_ms=1.5, score=0.25)
        logging.getLogger("oct.test").warning("plain %s", "message")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    audit_line, plain_line = capsys.readouterr().err.strip().splitlines()
    record = json.loads(audit_line if fmt == "json" else audit_line.split(": ", 1)[1])
    assert {k: record[k] for k in ("event", "request_id", "route", "status", "score")} == {
        "event": "request", "request_id": "r1", "route": "/score", "status": 200, "score": 0.25}
    assert record["at"].endswith("Z")
    if fmt == "json":
        assert json.loads(plain_line) | {"ts": 0} == {"ts": 0, "level": "WARNING", "logger": "oct.test",
                                                     "msg": "plain message"}
    else:
        assert plain_line.endswith("WARNING oct.test: plain message")


def test_configure_uses_only_public_switches() -> None:
    """Threads and processes are not collected (logging's public switches); the caller still is: configure leaves
    logging's private _srcfile alone, so a record says where it was logged."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.logThreads, logging.logProcesses, logging.logMultiprocessing
    records: list[logging.LogRecord] = []
    try:
        logs.configure("json", "INFO")
        capture = logging.Handler()
        capture.emit = records.append  # type: ignore[method-assign]
        root.addHandler(capture)
        logging.getLogger("oct.test").info("here")
    finally:
        root.handlers[:], level, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved
        root.setLevel(level)
    (record,) = records
    assert record.thread is None and record.process is None
    assert record.funcName == "test_configure_uses_only_public_switches"
