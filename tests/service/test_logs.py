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


def test_dicom_library_records_leave_without_what_they_quote(capsys: pytest.CaptureFixture[str]) -> None:
    """pydicom and highdicom quote the values they find wrong, possibly the patient's, from any thread: their records
    (and warnings) reach the log with the quoted parts redacted and no traceback; the service's own are untouched."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("json", "DEBUG")
        logging.getLogger("pydicom").warning("Invalid value for VR DA: '1951-02-03'.")
        logging.getLogger("highdicom.base").warning('value of argument "patient_name" is potentially invalid: '
                                                    '"O\'Malformed^Mary"')
        try:
            raise ValueError("Unable to convert '10:31:07' to 'TM' object")
        except ValueError:
            logging.getLogger("highdicom").exception("cannot copy %s", "'ACC-31337'")
        logging.getLogger("py.warnings").warning("%s", 'x.py:1: UserWarning: The string "MAL-31337" is unlikely')
        logging.getLogger("oct.test").info("kept 'as it is'")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert [line["msg"] for line in lines] == [
        "Invalid value for VR DA: [redacted].", "value of argument [redacted]", "cannot copy [redacted] (ValueError)",
        "x.py:1: UserWarning: The string [redacted] is unlikely", "kept 'as it is'"]
    assert not any("exc" in line for line in lines)


def test_importing_the_service_changes_no_process_wide_state() -> None:
    """The libraries are quieted where a serving process starts (service/__main__.py, each worker process), not as a
    side effect of importing a module: warning filters, where warnings go, every logger's level and pydicom's
    validation are as the libraries left them, whatever module of the service is imported, until `quiet_libraries`
    runs."""
    import subprocess
    import sys

    probe = """
import importlib, logging, pkgutil, warnings
from pydicom import config
import highdicom, torchvision.io, fastapi, uvicorn
def state():
    levels = {n: l.level for n, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger)}
    return (list(warnings.filters), warnings.showwarning, logging.root.level, levels,
            config.settings.reading_validation_mode)
before = state()
import service
for m in pkgutil.walk_packages(service.__path__, "service."):
    importlib.import_module(m.name)
after = state()
assert after[0] == before[0], "an import changed the warning filters"
assert after[1:3] == before[1:3] and after[4] == before[4], "an import changed where warnings go or a setting"
assert all(after[3].get(n) == l for n, l in before[3].items()), "an import changed a logger's level"
assert all(l == logging.NOTSET for n, l in after[3].items() if n not in before[3]), "an import set a new logger's level"
service.logs.quiet_libraries()
assert config.settings.reading_validation_mode == config.IGNORE and logging.getLogger("highdicom").level == 30
seen = []
logging.getLogger("py.warnings").addHandler(type("H", (logging.Handler,), {"emit": lambda h, r: seen.append(r)})())
warnings.warn("probe", UserWarning)
assert seen and "probe" in seen[-1].getMessage()  # warnings go to the log
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
