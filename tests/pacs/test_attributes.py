"""service/dicom/attributes.py: a source's malformed attributes repaired or left out before the builders copy them,
on the corpus of tests/pacs/malformed.py (decoded as the service decodes it) and value by value."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from malformed import CASES, malformed
from oct_dicom import MODEL, conformant_oct, oct_dataset, phantom_frames, to_bytes, volume_result
from pydicom.datadict import dictionary_VR

from service.dicom.attributes import TYPE2_COPIED, _ascii_printable, _fix, prepare_source
from service.dicom.decode import decode_dicom
from service.dicom.results import ResultIds
from service.dicom.sc import build_sc
from service.dicom.sr import build_sr


def _reread(obj: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    obj.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_case_is_repaired_or_left_out_and_the_results_build(case: str) -> None:
    image = decode_dicom(malformed(case))
    ds = image.dataset
    gray = image.frame(1)
    repairs = prepare_source(ds)
    for keyword, written in CASES[case].items():
        if written.expected is None:
            assert keyword in repairs.left_out, (keyword, repairs)
            if keyword in TYPE2_COPIED:
                assert keyword in ds and ds[keyword].value in (None, ""), f"{keyword}: Type 2 stays, empty"
            else:
                assert keyword not in ds, keyword
        else:
            assert str(ds[keyword].value) == written.expected, keyword
            assert dictionary_VR(keyword) == ds[keyword].VR, f"{keyword} keeps the VR {ds[keyword].VR}"
            assert keyword in repairs.repaired or written.raw.strip(b"\x00 ").decode("latin-1") == written.expected
    assert not set(repairs.repaired) & set(repairs.left_out)
    result = volume_result((0.2, 0.8))
    ids = ResultIds(image.series_instance_uid, image.sop_instance_uid, MODEL)
    sr = _reread(build_sr(ds, result, ids))
    sc = _reread(build_sc(ds, gray, "fused", np.full((48, 64), 128, np.uint8), (0, 0, 128, 96), result, ids))
    for built in (sr, sc):  # what the results copy: the repaired values, empty Type 2 attributes
        for keyword in TYPE2_COPIED:
            assert keyword in built, keyword
            written = CASES[case].get(keyword)
            if written is not None:
                assert str(built[keyword].value or "") == (written.expected or ""), keyword
    hd.sr.Comprehensive3DSR.from_dataset(sr)


def test_a_conformant_source_is_left_as_it_is() -> None:
    ds = decode_dicom(to_bytes(conformant_oct(phantom_frames(2, 32, 48)))).dataset
    before = ds.to_json_dict()
    assert not (repairs := prepare_source(ds)).repaired and not repairs.left_out
    assert ds.to_json_dict() == before


def test_absent_type2_attributes_are_added_empty() -> None:
    ds = oct_dataset(phantom_frames(1, 8, 8))
    del ds.AccessionNumber, ds.StudyTime
    repairs = prepare_source(ds)
    assert ds.AccessionNumber in (None, "") and ds.StudyTime in (None, "") and not repairs.left_out


def test_a_sequence_with_an_unrepairable_value_is_left_out_whole_and_repairs_inside_it_stay() -> None:
    ds = oct_dataset(phantom_frames(1, 8, 8))
    bad, good = pydicom.Dataset(), pydicom.Dataset()
    bad.PatientID, bad.IssuerOfPatientID = "MKR" * 30, "x"  # LO: 90 characters
    good.PatientID, good.TypeOfPatientID = "P2", "text"  # CS in lower case: repaired, then dropped with the rest
    ds.OtherPatientIDsSequence = [good, bad]
    ds.ReferencedStudySequence = [pydicom.Dataset()]
    ds.ReferencedStudySequence[0].ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    ds.RequestAttributesSequence = [pydicom.Dataset()]
    ds.RequestAttributesSequence[0].ScheduledProcedureStepStartDate = "2024-05-06"
    repairs = prepare_source(ds)
    assert repairs.left_out == ["OtherPatientIDsSequence"] and "OtherPatientIDsSequence" not in ds
    assert repairs.repaired == ["RequestAttributesSequence>ScheduledProcedureStepStartDate"]
    assert ds.RequestAttributesSequence[0].ScheduledProcedureStepStartDate == "20240506"
    assert "ReferencedStudySequence" in ds


@pytest.mark.parametrize(("vr", "written", "expected"), [
    ("DA", "19510203", "19510203"), ("DA", "1951-02-03", "19510203"), ("DA", "1951.2.3", "19510203"),
    ("DA", "1951-02-30", None), ("DA", "03/02/1951", None), ("DA", "19510203-", None),
    ("TM", "103107", "103107"), ("TM", "10:31:07", "103107"), ("TM", "9:05", "0905"), ("TM", "10", "10"),
    ("TM", "10:31:07.25", "103107.25"), ("TM", "24:00", None), ("TM", "10:31:07 PM", None), ("TM", "1031.5", None),
    ("DT", "20240506103107", "20240506103107"), ("DT", "2024-05-06T10:31:07", "20240506103107"),
    ("DT", "2024-05-06 10:31:07.5+01:00", "20240506103107.5+0100"), ("DT", "2024-05-06T10:31:07Z",
                                                                       "20240506103107+0000"),
    ("DT", "2024", "2024"), ("DT", "20241306", None), ("DT", "2024-05-06T10", None),
    ("AS", "077Y", "077Y"), ("AS", "77 years", "077Y"), ("AS", "6M", "006M"), ("AS", "3 weeks", "003W"),
    ("AS", "77", None), ("AS", "1077Y", None),
    ("CS", "female", "FEMALE"), ("CS", "ISO-IR", None), ("CS", "A" * 17, None),
    ("DS", "1.75", "1.75"), ("DS", "1.234567890123456789", "1.23456789012346"), ("DS", "70kg", None),
    ("DS", "nan", None), ("IS", "12", "12"), ("IS", "1.0", "1"), ("IS", "1.5", None), ("IS", "99999999999", None),
    ("SH", "ACC-1", "ACC-1"), ("SH", "A" * 17, None), ("SH", "A\x01", None), ("SH", "Ü", None), ("SH", "AB\x00", "AB"),
    ("LO", "x" * 64, "x" * 64), ("LO", "x" * 65, None), ("LT", "two\r\nlines", "two\r\nlines"),
    ("LT", "bell\x07", None), ("ST", "  indented", "  indented"),
    ("PN", "Doe^Jane", "Doe^Jane"), ("PN", "Doe^Jane^M^Dr^Jr", "Doe^Jane^M^Dr^Jr"), ("PN", "A^B^C^D^E^F", None),
    ("PN", "A=B=C=D", None), ("PN", "x" * 65, None),
    ("UI", "1.2.840.10008", "1.2.840.10008"), ("UI", "1.02.3", None), ("AE", "ORTHANC", "ORTHANC"), ("AE", "Ü", None),
])
def test_values(vr: str, written: str, expected: str | None) -> None:
    assert _fix(vr, written, "", _ascii_printable) == expected


@pytest.mark.parametrize(("written", "expected"), [("M", "M"), ("male", "M"), ("Female", "F"), ("o", "O"),
                                                   ("W", None), ("unknown", None)])
def test_patient_sex_takes_its_enumerated_values_only(written: str, expected: str | None) -> None:
    assert _fix("CS", written, "PatientSex", _ascii_printable) == expected


def test_a_character_set_declared_lets_its_characters_through() -> None:
    assert _fix("PN", "Müller^Anna", "PatientName", str.isprintable) == "Müller^Anna"
    assert _fix("PN", "Müller^Anna", "PatientName", _ascii_printable) is None


def test_a_repair_in_every_item_of_a_sequence_is_named_once() -> None:
    """128 frames' functional groups with the same over-long DS (pydicom writes 0.05 × 3 with 19 characters) are
    one repair, not 128: the report names keywords, not items."""
    ds = decode_dicom(to_bytes(conformant_oct(phantom_frames(8, 16, 16)))).dataset
    repairs = prepare_source(ds)
    assert repairs.repaired == ["PerFrameFunctionalGroupsSequence>PlanePositionSequence>ImagePositionPatient"]
    positions = [item.PlanePositionSequence[0].ImagePositionPatient for item in ds.PerFrameFunctionalGroupsSequence]
    assert all(len(str(v)) <= 16 for p in positions for v in p) and float(positions[3][1]) == pytest.approx(0.15)
