"""Patient data never leaves through a log line or an error text (docs/security.md, "What may be logged").

Two layers. First, messages are written by this service: an exception raised by pydicom or highdicom is reported
by its type only (`library_error`), because such messages may quote attribute values. Second, as a net under the
first: once a DICOM object is parsed, the text values it carries (names, IDs, dates, accession numbers,
institutions, free text; UIDs and coded strings excepted) are remembered for the rest of the request (`remember`),
and `scrub` blanks any of them out of a log line or an error body written in that request.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable

from pydicom.dataset import Dataset

# Value representations that hold free or personal text. UI (UIDs) and CS (coded strings such as MONOCHROME2 or
# a sex code) are left out: UIDs may appear (docs/security.md) and coded strings are enumerations, not identities.
PHI_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "DA", "DT", "TM", "AS", "AE", "UR"})
REDACTED = "[redacted]"
MIN_LENGTH = 3  # shorter values ("M", "12") would blank out ordinary words and numbers

_values: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("oct_phi_values", default=frozenset())


def text_values(ds: Dataset) -> set[str]:
    """Every PHI-bearing text value in `ds`, nested sequences and multi-valued elements included."""
    out: set[str] = set()
    elements = ds.iterall()
    while True:
        try:
            elem = next(elements)
        except StopIteration:
            return out
        except Exception:  # a value pydicom cannot convert (a broken file): what was read so far is remembered
            return out
        if elem.VR not in PHI_VRS or elem.value in (None, ""):
            continue
        for v in (elem.value if elem.VM > 1 else [elem.value]):
            s = str(v).strip()
            if len(s) >= MIN_LENGTH:
                out.add(s)
                out.update(p for p in re.split(r"[\s^=]+", s) if len(p) >= MIN_LENGTH)


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
