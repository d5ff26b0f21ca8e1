"""Reading a request body without holding it twice.

`request.body()` keeps every received chunk and then joins them: two copies of the body at the peak. Here the
chunks stream into a spooled temporary file (memory up to OCT_UPLOAD_SPOOL_BYTES, disk beyond) and are read back
once. A body that arrives in one chunk (a B-scan over loopback does) is returned as that chunk, unspooled.
Size limits and the bytes-in-flight budget are enforced while the body streams in (service.middleware.BodyLimit).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator

from starlette.requests import Request

from service.errors import BadRequest
from service.settings import Settings


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body as one bytes object; 400 when it is empty."""
    stream = request.stream()
    first = await _next_chunk(stream)
    second = await _next_chunk(stream)
    if not second:
        if not first:
            raise BadRequest("empty request body")
        return first
    with tempfile.SpooledTemporaryFile(max_size=settings.upload_spool_bytes) as spool:
        spool.write(first)
        spool.write(second)
        async for chunk in stream:
            spool.write(chunk)
        size = spool.tell()
        spool.seek(0)
        return spool.read(size)


async def _next_chunk(stream: AsyncIterator[bytes]) -> bytes:
    """The next non-empty chunk (the ASGI server may send empty ones), or b"" at the end."""
    async for chunk in stream:
        if chunk:
            return chunk
    return b""
