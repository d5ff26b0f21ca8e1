"""A source's attributes made fit for the result objects (SR, heatmap SC), which copy them through highdicom.

Devices write patient and study attributes badly: an ISO birth date (`1951-02-03`), a time with colons (`10:31:07`),
an accession number longer than SH allows, characters outside the character set, a value in a VR other than its
attribute's. highdicom refuses some of them and copies others into objects that fail conformance, and neither may
stop a study from being scored. So before the builders run, every attribute of the source is checked against its
attribute's VR (the data dictionary's, whatever VR the file used) and value multiplicity:

- a value whose intent is plain is repaired: a date, time or date-time written the ISO way, an age with its unit in
  words (`77 years` → `077Y`), a code string in lower case, a sex written out (`female` → `F`), NUL padding;
- any other invalid value is left out: emptied when the attribute is a Type 2 patient/study attribute the results
  carry (present and empty means unknown), removed otherwise; a sequence with an invalid value inside goes whole.

`prepare_source` says which attributes it repaired and left out by keyword, never by value (docs/security.md).
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import format_number_as_ds

# Type 2 attributes (present, may be empty) of the Patient and General Study modules the builders copy from the
# source. Many devices omit them; an empty value is what the standard means by "unknown".
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Longest value (characters) per VR; UC, UT and UR are bounded by the length field only.
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240, "SH": 16,
              "ST": 1024, "TM": 14, "UI": 64}
TEXT_VRS = frozenset({"LT", "ST", "UT"})  # free text: CR, LF, FF and TAB allowed, leading spaces significant
STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI", "UR"}) | TEXT_VRS
# Enumerated values of the coded patient attributes the SR copies; a value outside them fails conformance.
ENUMERATED = {
    "PatientSex": {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"},
    "PatientSexNeutered": {"ALTERED": "ALTERED", "UNALTERED": "UNALTERED"},
    "PatientIdentityRemoved": {"YES": "YES", "NO": "NO"},
    "QualityControlSubject": {"YES": "YES", "NO": "NO"},
    "SmokingStatus": {"YES": "YES", "NO": "NO", "UNKNOWN": "UNKNOWN"},
}
_CS = re.compile(r"[A-Z0-9 _]*")
_DS = re.compile(r" *[+\-]?(\d+|\d+\.\d*|\.\d+)([eE][+\-]?\d+)? *")
_IS = re.compile(r" *[+\-]?\d+ *")
_UI = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UR = re.compile(r"[A-Za-z_\d:/?#\[\]@!$&'()*+,;=%\-.~]*")
_AGE = re.compile(r"(\d{1,3}) *(D|DAYS?|W|WEEKS?|M|MONTHS?|Y|YEARS?)", re.IGNORECASE)
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})|(\d{4})[-./](\d{1,2})[-./](\d{1,2})")
_TIME = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?|(\d{1,2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")
_DT_DICOM = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?")
_DT_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?)?(Z|[+-]\d{2}:?\d{2})?")


@dataclass
class SourceRepairs:
    """Keywords (`Sequence>Keyword` inside a sequence) of what `prepare_source` repaired and left out."""

    repaired: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def prepare_source(ds: Dataset) -> SourceRepairs:
    """Make `ds` (in memory) fit for the builders: every invalid value repaired or left out, every absent Type 2
    patient/study attribute added empty (no value is ever invented). Returns what it changed, by keyword."""
    repairs = SourceRepairs()
    if "SpecificCharacterSet" in ds:
        terms = _charset_terms(ds.SpecificCharacterSet)
        if terms is None:  # values were decoded with pydicom's fallback: hold them to the default repertoire
            del ds.SpecificCharacterSet
            repairs.left_out.append("SpecificCharacterSet")
        elif terms != _as_list(ds.SpecificCharacterSet):
            ds.SpecificCharacterSet = terms[0] if len(terms) == 1 else terms
            repairs.repaired.append("SpecificCharacterSet")
    printable = str.isprintable if "SpecificCharacterSet" in ds else _ascii_printable
    _clean(ds, printable, "", repairs)
    for name in TYPE2_COPIED:
        if name not in ds:
            setattr(ds, name, None)
    return repairs


def _clean(ds: Dataset, printable: Callable[[str], bool], prefix: str, repairs: SourceRepairs) -> bool:
    """Repair `ds`'s invalid values in place; at the top level (no `prefix`) leave out what cannot be repaired.
    Returns whether a nested item holds a value that can be neither (its top-level sequence then goes whole)."""
    unfixable = False
    for tag in list(ds.keys()):
        if tag.is_private or tag.element == 0 or tag == 0x00080005:
            continue  # private and group-length elements are never copied; the character set is checked above
        name = prefix + (keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})")
        try:
            elem = ds[tag]
            if elem.VR == "SQ":
                nested = [_clean(item, printable, f"{name}>", repairs) for item in elem.value]
                ok, fixed = not any(nested), None
            else:
                ok, fixed = _check(elem, printable)
        except Exception:  # a value pydicom cannot even convert
            ok, fixed = False, None
        if fixed is not None:
            ds[tag] = fixed
            if name not in repairs.repaired:  # once, however many items of a sequence had it
                repairs.repaired.append(name)
        elif not ok and prefix:
            unfixable = True
        elif not ok:
            repairs.repaired[:] = [r for r in repairs.repaired if not r.startswith(f"{name}>")]  # it goes whole
            if name in TYPE2_COPIED:
                ds[tag] = DataElement(tag, dictionary_VR(tag), None)
            else:
                del ds[tag]
            repairs.left_out.append(name)
    return unfixable


def _check(elem: DataElement, printable: Callable[[str], bool]) -> tuple[bool, DataElement | None]:
    """(valid as it is, None) or (True, the repaired element) or (False, None)."""
    vr = _dictionary_vr(elem.tag) or elem.VR
    if vr not in STRING_VRS:
        return vr == elem.VR or elem.VR not in STRING_VRS, None  # binary values were read as their VR says
    if elem.VR not in STRING_VRS:
        return False, None
    raw = elem.value
    if raw is None or raw == "" or raw == b"":
        values: list[str] = []
    elif isinstance(raw, bytes):
        return False, None  # text pydicom could not decode
    else:
        values = [_as_written(v) for v in (raw if elem.VM > 1 else [raw])]
    if not _vm_allows(len(values), elem.tag):
        return False, None
    fixed = [_fix(vr, v, elem.keyword, printable) for v in values]
    if any(f is None for f in fixed):
        return False, None
    if fixed == [_unpadded(vr, v) for v in values] and vr == elem.VR:
        return True, None
    value = None if not fixed else fixed[0] if len(fixed) == 1 else fixed
    return True, DataElement(elem.tag, vr, value)


def _fix(vr: str, value: str, keyword: str, printable: Callable[[str], bool]) -> str | None:
    """The value valid for `vr` as it is (padding stripped), repaired, or None."""
    v = _unpadded(vr, value.rstrip("\x00 "))  # some devices pad with NUL bytes
    fixed: str | None
    if vr in ("SH", "LO", "UC") or vr in TEXT_VRS:
        allowed = "\t\n\f\r" if vr in TEXT_VRS else ""
        fixed = v if all(printable(c) or c in allowed for c in v) else None
    elif vr == "PN":
        groups = v.split("=")
        fits = len(groups) <= 3 and all(len(g) <= 64 and g.count("^") <= 4 for g in groups)
        fixed = v if fits and all(printable(c) for c in v) else None
    elif vr == "CS":
        code = v.upper()
        fixed = ENUMERATED[keyword].get(code) if keyword in ENUMERATED else code if _CS.fullmatch(code) else None
    elif vr == "AE":
        fixed = v if all(_ascii_printable(c) for c in v) else None
    elif vr == "DA":
        fixed = _date(v)
    elif vr == "TM":
        fixed = _time(v)
    elif vr == "DT":
        fixed = _datetime(v)
    elif vr == "AS":
        m = _AGE.fullmatch(v)
        fixed = f"{int(m[1]):03d}{m[2][0].upper()}" if m else None
    elif vr in ("DS", "IS"):
        as_is = (_DS if vr == "DS" else _IS).fullmatch(v) and len(v) <= MAX_LENGTH[vr]
        fixed = v if as_is and _number(vr, v) is not None else _number(vr, v)
    elif vr == "UI":
        fixed = v if _UI.fullmatch(v) else None
    else:  # UR
        fixed = v if _UR.fullmatch(v) else None
    return fixed if fixed is not None and len(fixed) <= MAX_LENGTH.get(vr, 0xFFFFFFFE) else None


def _unpadded(vr: str, v: str) -> str:
    """Without the padding DICOM ignores: trailing spaces in free text (leading ones are text), both ends elsewhere."""
    return v.rstrip(" ") if vr in TEXT_VRS else v.strip(" ")


def _number(vr: str, v: str) -> str | None:
    """A DS or IS written another way (too many digits, `1.0` for an integer) in its VR's form, or None."""
    try:
        x = float(v)
    except ValueError:
        return None
    if not math.isfinite(x):
        return None
    if vr == "DS":
        return format_number_as_ds(x)
    return str(int(x)) if x.is_integer() and -(2**31) <= x < 2**31 else None


def _date(v: str) -> str | None:
    m = _DATE.fullmatch(v)
    if m is None:
        return None
    y, mo, d = (int(g) for g in (m.groups()[:3] if m[1] else m.groups()[3:]))
    try:
        datetime.date(y, mo, d)
    except ValueError:
        return None
    return f"{y:04d}{mo:02d}{d:02d}"


def _time(v: str) -> str | None:
    m = _TIME.fullmatch(v)
    if m is None:
        return None
    hh, mm, ss, frac = m.groups()[:4] if m[1] else m.groups()[4:]
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        return None
    return f"{int(hh):02d}{mm or ''}{ss or ''}{frac or ''}"


def _datetime(v: str) -> str | None:
    m = _DT_DICOM.fullmatch(v)
    if m is not None:
        y, mo, d, hh, mm, ss, frac, zone = m.groups()
    else:
        m = _DT_ISO.fullmatch(v)
        if m is None:
            return None
        y, mo, d, hh, mm, ss, frac, zone = m.groups()
        zone = None if zone is None else "+0000" if zone == "Z" else zone.replace(":", "")
    if (frac and not ss) or (d and not mo) or (hh and not d) or (mm and not hh) or (ss and not mm):
        return None
    if mo and _date(f"{y}{mo}{d or '01'}") is None:
        return None
    if hh and _time(f"{hh}{mm or ''}{ss or ''}{frac or ''}") is None:
        return None
    if zone and (int(zone[1:3]) > 14 or int(zone[3:]) > 59):
        return None
    return "".join(p or "" for p in (y, mo, d, hh, mm, ss, frac, zone))


def _as_written(value: object) -> str:
    """A value as the file wrote it: a number read from a file keeps its original string."""
    original = getattr(value, "original_string", None)
    return original if isinstance(original, str) else str(value)


def _dictionary_vr(tag: BaseTag) -> str | None:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return None if " or " in vr else vr


def _vm_allows(n: int, tag: BaseTag) -> bool:
    """Whether `n` values fit the attribute's multiplicity (`1`, `1-3`, `1-n`, `2-2n`); empty always does."""
    try:
        spec = dictionary_VM(tag)
        low, _, high = spec.partition("-")
        if n == 0:
            return True
        if not high:
            return n == int(low)
        if high == "n":
            return n >= int(low)
        if high.endswith("n"):
            return n >= int(low) and n % int(high[:-1]) == 0
        return int(low) <= n <= int(high)
    except (KeyError, ValueError):
        return True


def _charset_terms(value: object) -> list[str] | None:
    """The Specific Character Set's defined terms, `ISO-IR 100` or `iso_ir100` written as `ISO_IR 100` (pydicom
    decoded the values the same way), or None when one is unknown."""
    terms = []
    for term in _as_list(value):
        t = re.sub(r"^ISO[-_ ]?IR[-_ ]?(\d+)$", r"ISO_IR \1", term.strip().upper())
        if t not in python_encoding:
            return None
        terms.append(t)
    return terms


def _as_list(value: object) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]  # type: ignore[attr-defined]


def _ascii_printable(c: str) -> bool:
    return " " <= c <= "~"
