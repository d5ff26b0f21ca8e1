"""bench_overhead.py's reference row: a bare Starlette endpoint that reads the whole upload and answers a small JSON,
served by the same uvicorn. It reads the body raw, without parsing the form: the framework's floor, the same yardstick
as the acceptance check's.

Run: python -m uvicorn bench.overhead_bare_app:app --port 8001
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def score(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


async def readyz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ready"})


app = Starlette(routes=[Route("/score", score, methods=["POST"]), Route("/readyz", readyz)])
