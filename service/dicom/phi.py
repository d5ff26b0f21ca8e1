"""Which values of a DICOM object are patient data: the text values `service.redaction` keeps out of every log line
and error body of the request that parsed the object."""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from service.redaction import MIN_LENGTH

# Value representations that hold free or personal text. UI (UIDs) and CS (coded strings such as MONOCHROME2 or
# a sex code) are left out: UIDs may appear (docs/security.md) and coded strings are enumerations, not identities.
PHI_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "DA", "DT", "TM", "AS", "AE", "UR"})


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
