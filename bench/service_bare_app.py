"""The framework's ceiling for bench_service.py (d): a FastAPI endpoint that only reads the same upload.

Run: python -m uvicorn bench.service_bare_app:app --port 8001
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile

app = FastAPI()


@app.post("/score")
async def score(request: Request) -> dict[str, int]:
    async with request.form() as form:
        file = form.get("file")
        n = len(await file.read()) if isinstance(file, UploadFile) else 0
    return {"bytes": n}


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}
