"""Patient data never leaves through a log line or an error text (docs/security.md, "What may be logged").

The bottom of the service: the error handlers, the log formatters and the DICOM code all use it. Two layers. First,
messages are written by this service: an exception raised by a DICOM library is reported by its type only
(`library_error`), because such messages may quote attribute values. Second, as a net under the first: once a DICOM
object is parsed, the text values it carries (`service.dicom.phi.text_values`: names, IDs, dates, accession numbers,
institutions, free text) are remembered for the rest of the request (`remember`), and `scrub` blanks any of them out
of a log line or an error body written in that request.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable

REDACTED = "[redacted]"
MIN_LENGTH = 3  # shorter values ("M", "12") would blank out ordinary words and numbers

_values: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("oct_phi_values", default=frozenset())


def remember(values: Iterable[str]) -> None:
    """Scrub these values (`text_values` of a dataset) from every later log line and error body of the current
    request (context)."""
    _values.set(_values.get() | frozenset(values))


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    values = _values.get()
    if extra:
        values = values | frozenset(extra)
    if not values or not text:
        return text
    # Longest first ("Jane^Doe" before "Jane"), any case: a library may upper-case what it quotes.
    pattern = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.sub(pattern, REDACTED, text, flags=re.IGNORECASE)


def library_error(e: BaseException) -> str:
    """How an exception from a DICOM library is reported: by its type, never by its message."""
    return type(e).__name__
