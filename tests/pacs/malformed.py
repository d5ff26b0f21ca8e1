"""A corpus of OCT objects whose patient and study attributes are malformed the ways devices write them: ISO dates
and times, over-long strings, characters outside the character set, values in the wrong VR, a malformed age, sex or
character set. Each case is a conformant OCT (tests/pacs/oct_dicom.py) with those attributes written as raw bytes,
so the file carries exactly what a device would send, and says what the service must do with each attribute."""

from __future__ import annotations

import re
from dataclasses import dataclass

from oct_dicom import conformant_oct, phantom_frames, to_bytes
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag


@dataclass(frozen=True)
class Written:
    """An attribute as the file writes it (`vr` may not be its own), and what the results must carry: the repaired
    value, or None when it is left out (a Type 2 attribute copied empty, any other left out of the copy)."""

    vr: str
    raw: bytes
    expected: str | None


CASES: dict[str, dict[str, Written]] = {
    "iso-dates-and-times": {
        "PatientBirthDate": Written("DA", b"1901-12-31", "19011231"),
        "StudyDate": Written("DA", b"1987-06-05", "19870605"),
        "StudyTime": Written("TM", b"23:17:59.123456", "231759.123456"),
        "AcquisitionDateTime": Written("DT", b"1987-06-05T23:17:59", "19870605231759"),
    },
    "too-long": {
        "AccessionNumber": Written("SH", b"MKRACC-4711-an-accession-number-too-long", None),
        "PatientID": Written("LO", b"MKRPID-" + b"31337" * 14, None),
        "StudyDescription": Written("LO", b"Mkrstudydesc " * 6, None),
    },
    "wrong-characters": {
        "PatientName": Written("PN", b"Mkrsurname\x01^Mkrgiven", None),
        "InstitutionName": Written("LO", "Mkrklinik Übersee".encode("latin-1"), None),  # no character set declared
        "ReferringPhysicianName": Written("PN", b"Mkrdoctor^Who^A^B^C^D", None),  # six components
        "StudyID": Written("SH", b"MKRST\x00\x00", "MKRST"),  # NUL padding
    },
    "wrong-vr": {
        "PatientBirthDate": Written("LO", b"1901-12-31", "19011231"),
        "StudyDate": Written("DT", b"19870605", "19870605"),
        "PatientSize": Written("LO", b"1.75", "1.75"),
        "PatientWeight": Written("DS", b"70kg", None),
        "OperatorsName": Written("US", b"\x01\x00", None),
    },
    "age-sex-and-multiplicity": {
        "PatientAge": Written("AS", b"77 years", "077Y"),
        "PatientSex": Written("CS", b"female", "F"),
        "OtherPatientIDs": Written("LO", b"MKROTHERID", "MKROTHERID"),
        "StudyID": Written("SH", b"MKRS1\\MKRS2", None),  # two values where one is allowed
    },
    "unrepairable-age-sex-time": {
        "PatientAge": Written("AS", b"seventy-seven", None),
        "PatientSex": Written("CS", b"MKRSEX", None),
        "StudyTime": Written("TM", b"25:61", None),
        "PatientBirthDate": Written("DA", b"19011331", None),  # no 13th month
    },
    "character-set": {
        "SpecificCharacterSet": Written("CS", b"ISO-IR 100", "ISO_IR 100"),
        "PatientName": Written("PN", "Mkrmüller^Mkrgiven".encode("latin-1"), "Mkrmüller^Mkrgiven"),
    },
}
# What no log line may carry: the marker every text value holds ("mkr"), and the dates, times and ages, as
# written and as repaired (none of them can turn up by chance in a timestamp, a UID or a score).
NEEDLES = re.compile("|".join(["mkr", *map(re.escape, (
    "1901-12-31", "19011231", "1987-06-05", "19870605", "23:17:59", "231759.123456", "77 years", "077Y", "seventy",
    "25:61", "19011331", "ISO-IR"))]), re.IGNORECASE)


def malformed_dataset(case: str, frames: int = 2) -> Dataset:
    ds = conformant_oct(phantom_frames(frames, 96, 128, seed=len(case)))
    for keyword, written in CASES[case].items():
        raw = written.raw + (b" " if len(written.raw) % 2 else b"")
        tag = Tag(tag_for_keyword(keyword))
        ds[tag] = RawDataElement(tag, written.vr, len(raw), raw, 0, False, True)
    return ds


def malformed(case: str, frames: int = 2) -> bytes:
    """The case as Part 10 bytes, Explicit VR Little Endian (so each attribute keeps the VR it is written with)."""
    return to_bytes(malformed_dataset(case, frames))
