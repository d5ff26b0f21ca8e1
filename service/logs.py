"""Logging set-up (`OCT_LOG_FORMAT` json|text) and the audit trail: one JSON line per request, no image or patient
data. Every line passes `scrub`, which blanks the text values of any DICOM object the current request parsed, and
every record of a DICOM library has what it quotes redacted first (what may appear in a log: docs/security.md)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings
from typing import Any

from service.redaction import REDACTED, scrub

audit_log = logging.getLogger("oct.audit")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name}
        if isinstance(record.msg, dict):
            out.update(record.msg)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(out, default=str))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):  # audit lines stay JSON in text mode: they are meant for machines
            record = logging.makeLogRecord({**record.__dict__, "msg": json.dumps(record.msg, default=str),
                                            "args": None})
        return scrub(super().format(record))


# Loggers whose messages may quote a value of the DICOM object being read or built (pydicom's "Invalid value for VR
# DA: '1951-02-03'", highdicom's 'value of argument "patient_name" is potentially invalid: "…"'), and the warnings
# libraries raise, which reach the log as `py.warnings` records. Such a value may be read in a thread or process where
# `scrub` does not know it, so these records are redacted by their shape instead: whatever they quote goes.
LIBRARY_LOGGERS = ("pydicom", "highdicom", "py.warnings")
_QUOTE = re.compile("['\"`]")


def redact_quoted(text: str) -> str:
    """`text` with each quoted part replaced, from a quote to the last quote of the same kind (a value may hold
    quotes of its own), and everything after a quote that is never closed."""
    out, i = [], 0
    while (m := _QUOTE.search(text, i)) is not None:
        end = text.rfind(m.group(), m.end())
        out += [text[i:m.start()], REDACTED]
        if end < 0:
            return "".join(out)
        i = end + 1
    return "".join(out) + text[i:]


class LibraryRedaction(logging.Filter):
    """On the handler, so it sees every record of every thread: a DICOM library's record leaves with what it
    quotes redacted, and with its exception's type instead of a traceback, whose messages may quote values too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in LIBRARY_LOGGERS or record.name == "py.warnings":
            record.msg, record.args = redact_quoted(record.getMessage()), None
            if record.exc_info:
                record.msg += f" ({record.exc_info[0].__name__ if record.exc_info[0] else 'exception'})"
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def configure(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LibraryRedaction())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Neither format shows the thread or the process, so records need not collect them: the public switches the
    # logging HOWTO gives for this ("Optimization"). The caller's file and line are still looked up (a stack walk
    # per record, ~6 µs: ~0.1 % of the service's own CPU per request); skipping it needs logging's private _srcfile.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def quiet_libraries() -> None:
    """Process-wide switches for the libraries, set where a serving process starts (`python -m service` and each
    worker process it spawns), never on import. pydicom does not validate values as it reads them (the warnings
    quoted the value; service/dicom/attributes.py checks what the results copy and names only keywords), and its
    warnings, which repeat its log records, are ignored; highdicom's INFO lines (each module it copies) are noise;
    torchvision's notice that its image decoders are deprecated (they still ship and work) comes on every decode
    and is ignored, for that message only; every other library's warning goes to the log, through
    LibraryRedaction, instead of raw to stderr."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are "
                            "deprecated", category=DeprecationWarning)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.captureWarnings(True)


def audit(**fields: Any) -> None:
    audit_log.info({"event": "request", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields})
