"""The STOW-RS response data set: statuses and the tags a PACS reads."""

from __future__ import annotations

import pydicom

from service.dicom.stow import StowOutcome


def test_stow_response_statuses_and_tags() -> None:
    ok = StowOutcome(stored=[("1.2.840.10008.5.1.4.1.1.77.1.5.4", "1.2.3", "http://x/dicomweb/results/1.2.3")])
    assert ok.http_status == 200
    j = ok.to_json()
    ds = pydicom.Dataset.from_json(j)
    ref = ds.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == "1.2.3" and ref.RetrieveURL.endswith("/1.2.3")
    assert "00081198" not in j
    partial = StowOutcome(stored=ok.stored, failed=[("", "", 0xC000)])
    assert partial.http_status == 202
    none = StowOutcome(failed=[("1.2.840.10008.5.1.4.1.1.88.33", "1.9", 0x0122)])
    assert none.http_status == 409
    failed = pydicom.Dataset.from_json(none.to_json()).FailedSOPSequence[0]
    assert failed.FailureReason == 0x0122 and failed.ReferencedSOPInstanceUID == "1.9"
    assert none.to_json()["00081198"]["vr"] == "SQ"
