"""`multipart/related` bodies (RFC 2387), the framing of DICOMweb's STOW-RS requests and of what it sends a PACS.

Form uploads (`POST /score`) go through Starlette's form parser; STOW parts are whole DICOM files with their own
`Content-Type` and no `Content-Disposition`, which form-data parsers do not take, so this module frames them. The
body arrives size-limited (service.middleware.BodyLimit). The framing rules honoured (RFC 2046): the boundary comes
from the Content-Type (quoted or not), delimiters are `CRLF--boundary` (the first may open the body), transport
padding after a delimiter is ignored, a preamble before the first and an epilogue after the closing `--boundary--`
are discarded, and each part's headers end at the first empty line.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass


class MultipartError(ValueError):
    """The body is not well-formed multipart/related; `str()` says where."""


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]  # lower-cased names
    body: bytes | memoryview  # a view into the request body, not a copy of it

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


# One `; name=value` parameter of a media type (RFC 9110 §5.6.6): a token, or a quoted string with backslash escapes.
_PARAM = re.compile(r';[ \t]*([^\s;=]+)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^\s;]*)')
_ESCAPE = re.compile(r"\\(.)")


def content_type_params(content_type: str) -> tuple[str, dict[str, str]]:
    """'multipart/related; type="application/dicom"; boundary=x' → ('multipart/related', {type:…, boundary:…}).
    Names are lower-cased; quotes and their escapes are removed."""
    media, _, rest = content_type.partition(";")
    params = {}
    for name, value in _PARAM.findall(";" + rest):
        params[name.lower()] = _ESCAPE.sub(r"\1", value[1:-1]) if value.startswith('"') else value
    return media.strip().lower(), params


def split_parts(body: bytes, boundary: str) -> list[Part]:
    # RFC 2046 caps boundaries at 70 characters, but real clients exceed it (Orthanc sends 73): accept up to 200.
    if not boundary or len(boundary) > 200:
        raise MultipartError("the Content-Type needs a boundary parameter of 1 to 200 characters")
    delim = b"--" + boundary.encode("latin-1")
    if body.startswith(delim):
        pos = len(delim)
    else:
        first = body.find(b"\r\n" + delim)
        if first < 0:
            raise MultipartError(f"no delimiter line '--{boundary}' in the body")
        pos = first + 2 + len(delim)
    parts: list[Part] = []
    while True:
        if body[pos:pos + 2] == b"--":
            return parts  # the close delimiter; what follows is epilogue
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise MultipartError("a delimiter line is followed by something other than CRLF")
        start = eol + 2
        end = body.find(b"\r\n" + delim, start)
        if end < 0:
            raise MultipartError(f"part {len(parts) + 1} is not closed: no '--{boundary}' after it (truncated body?)")
        parts.append(_part(body, start, end, len(parts) + 1))
        pos = end + 2 + len(delim)


def _part(body: bytes, start: int, end: int, number: int) -> Part:
    if body.startswith(b"\r\n", start):
        return Part({}, memoryview(body)[start + 2:end])
    head_end = body.find(b"\r\n\r\n", start, end)
    if head_end < 0:
        raise MultipartError(f"part {number} has no empty line ending its headers")
    headers: dict[str, str] = {}
    for line in body[start:head_end].split(b"\r\n"):
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise MultipartError(f"part {number} has a malformed header line")
        headers[name.strip().lower()] = value.strip()
    return Part(headers, memoryview(body)[head_end + 4:end])


def build_related(bodies: list[bytes], media_type: str = "application/dicom") -> tuple[bytes, str]:
    """Bodies → (multipart/related body, its Content-Type header value)."""
    boundary = "oct-" + secrets.token_hex(16)
    out = bytearray()
    for b in bodies:
        out += f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode() + b + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f'multipart/related; type="{media_type}"; boundary={boundary}'
