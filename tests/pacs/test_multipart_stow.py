"""multipart/related parsing (what STOW-RS clients send) and the STOW-RS response data set."""

from __future__ import annotations

import pydicom
import pytest

from service.dicom.multipart import MultipartError, build_related, content_type_params, parse_related
from service.dicom.stow import StowOutcome

DICM = b"\0" * 128 + b"DICM" + b"payload\r\n--not-the-boundary\r\n" + bytes(range(256))


def test_roundtrip_with_binary_bodies() -> None:
    bodies = [DICM, b"second\r\n\r\nbody", b""]
    body, ctype = build_related(bodies)
    media, params = content_type_params(ctype)
    assert media == "multipart/related" and params["type"] == "application/dicom"
    parts = parse_related(body, params["boundary"])
    assert [p.body for p in parts] == bodies
    assert all(p.media_type == "application/dicom" for p in parts)


def test_quoted_boundary_preamble_padding_epilogue_and_lf_in_headers() -> None:
    ctype = 'Multipart/Related; boundary="a b:c"; type="application/dicom"; start="<x>"'
    media, params = content_type_params(ctype)
    assert media == "multipart/related" and params["boundary"] == "a b:c"
    body = (b"this is a preamble\r\n--a b:c  \t\r\nContent-Type: application/dicom\r\nContent-ID: <1>\r\n\r\n"
            + DICM + b"\r\n--a b:c\r\n\r\nno headers\r\n--a b:c--\r\nepilogue\r\n--a b:c\r\nignored")
    parts = parse_related(body, params["boundary"])
    assert [p.body for p in parts] == [DICM, b"no headers"]
    assert parts[0].headers["content-id"] == "<1>" and parts[1].media_type == ""


def test_body_may_start_with_crlf_delimiter() -> None:
    assert parse_related(b"\r\n--b\r\n\r\nx\r\n--b--", "b")[0].body == b"x"


def test_overlong_boundary_as_orthanc_sends_it() -> None:
    b = "0b73d3ae-a24c-4400-bb32-1a38e9da07e3-0b73d3ae-a24c-4400-bb32-1a38e9da07e3"  # 73 characters
    assert parse_related(f"--{b}\r\n\r\nx\r\n--{b}--".encode(), b)[0].body == b"x"


@pytest.mark.parametrize("body,boundary,why", [
    (b"--b\r\n\r\nunterminated", "b", "not closed"),
    (b"no delimiter at all", "b", "no delimiter"),
    (b"--b\r\nContent-Type application/dicom\r\n\r\nx\r\n--b--", "b", "malformed header"),
    (b"--bxyz\r\n\r\nx\r\n--b--", "b", "other than CRLF"),
    (b"--b\r\n\r\nx\r\n--b--", "", "boundary"),
])
def test_malformed(body: bytes, boundary: str, why: str) -> None:
    with pytest.raises(MultipartError, match=why):
        parse_related(body, boundary)


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
