"""Reading a request body without holding it twice.

`request.body()` keeps every received chunk and then joins them: two copies of the body at the peak. Here the
chunks stream into a spooled temporary file (memory up to OCT_UPLOAD_SPOOL_BYTES, disk beyond) and are read back
once. Size limits and the bytes-in-flight budget are enforced while the body streams in (service.middleware.BodyLimit).
"""

from __future__ import annotations

import tempfile

from starlette.requests import Request

from service.errors import BadRequest
from service.settings import Settings


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body as one bytes object; 400 when it is empty."""
    with tempfile.SpooledTemporaryFile(max_size=settings.upload_spool_bytes) as spool:
        async for chunk in request.stream():
            spool.write(chunk)
        size = spool.tell()
        if not size:
            raise BadRequest("empty request body")
        spool.seek(0)
        return spool.read(size)
