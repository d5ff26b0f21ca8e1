"""Multipart framing: multipart/related, what STOW-RS clients send and what the service sends a PACS."""

from __future__ import annotations

import pytest

from service.multipart import MultipartError, build_related, content_type_params, split_parts

DICM = b"\0" * 128 + b"DICM" + b"payload\r\n--not-the-boundary\r\n" + bytes(range(256))


def test_roundtrip_with_binary_bodies() -> None:
    bodies = [DICM, b"second\r\n\r\nbody", b""]
    body, ctype = build_related(bodies)
    media, params = content_type_params(ctype)
    assert media == "multipart/related" and params["type"] == "application/dicom"
    parts = split_parts(body, params["boundary"])
    assert [p.body for p in parts] == bodies
    assert all(p.media_type == "application/dicom" for p in parts)


def test_quoted_boundary_preamble_padding_epilogue_and_lf_in_headers() -> None:
    ctype = 'Multipart/Related; boundary="a b:c"; type="application/dicom"; start="<x>"'
    media, params = content_type_params(ctype)
    assert media == "multipart/related" and params["boundary"] == "a b:c"
    body = (b"this is a preamble\r\n--a b:c  \t\r\nContent-Type: application/dicom\r\nContent-ID: <1>\r\n\r\n"
            + DICM + b"\r\n--a b:c\r\n\r\nno headers\r\n--a b:c--\r\nepilogue\r\n--a b:c\r\nignored")
    parts = split_parts(body, params["boundary"])
    assert [p.body for p in parts] == [DICM, b"no headers"]
    assert parts[0].headers["content-id"] == "<1>" and parts[1].media_type == ""


def test_body_may_start_with_crlf_delimiter() -> None:
    assert split_parts(b"\r\n--b\r\n\r\nx\r\n--b--", "b")[0].body == b"x"


def test_overlong_boundary_as_orthanc_sends_it() -> None:
    b = "0b73d3ae-a24c-4400-bb32-1a38e9da07e3-0b73d3ae-a24c-4400-bb32-1a38e9da07e3"  # 73 characters
    assert split_parts(f"--{b}\r\n\r\nx\r\n--{b}--".encode(), b)[0].body == b"x"


@pytest.mark.parametrize("body,boundary,why", [
    (b"--b\r\n\r\nunterminated", "b", "not closed"),
    (b"no delimiter at all", "b", "no delimiter"),
    (b"--b\r\nContent-Type application/dicom\r\n\r\nx\r\n--b--", "b", "malformed header"),
    (b"--bxyz\r\n\r\nx\r\n--b--", "b", "other than CRLF"),
    (b"--b\r\n\r\nx\r\n--b--", "", "boundary"),
])
def test_malformed(body: bytes, boundary: str, why: str) -> None:
    with pytest.raises(MultipartError, match=why):
        split_parts(body, boundary)


@pytest.mark.parametrize(("header", "media", "params"), [
    ('multipart/related; type="application/dicom"; boundary=x', "multipart/related",
     {"type": "application/dicom", "boundary": "x"}),
    ('Multipart/Form-Data;BOUNDARY="a b\\"c;d"', "multipart/form-data", {"boundary": 'a b"c;d'}),
    ("multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW", "multipart/form-data",
     {"boundary": "----WebKitFormBoundary7MA4YWxkTrZu0gW"}),
    ('multipart/related ; type="application/dicom" ; boundary = "q" ; charset=utf-8', "multipart/related",
     {"type": "application/dicom", "boundary": "q", "charset": "utf-8"}),
    ("image/jpeg", "image/jpeg", {}),
    ("", "", {}),
])
def test_content_type_parameters(header: str, media: str, params: dict[str, str]) -> None:
    assert content_type_params(header) == (media, params)
