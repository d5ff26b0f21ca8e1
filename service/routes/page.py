"""`GET /`: the viewer page (one HTML file, one ES module, one stylesheet from service/static/).

The page calls the same public API as any client (`/models`, `/score?preview=true`); it loads nothing from
anywhere else, which the Content-Security-Policy below also enforces in the browser: hospital networks are
often offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parents[1] / "static"
# The only files served: a fixed list, so no path in a URL can reach anything else on disk.
ASSETS = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
# Heatmaps and previews arrive as base64 PNGs and are drawn from data: URLs.
CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
