"""Liveness and readiness probes (always open, never audited)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.errors import NotReady, problem_responses
from service.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, response_model_exclude_none=True, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, response_model_exclude_none=True, responses=problem_responses(NotReady),
            summary="The model is loaded and warm")
async def readyz(request: Request) -> Health | JSONResponse:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready:
        reason = "model not loaded" if engine is None else engine.not_ready_reason
        raise NotReady(reason, headers={"Retry-After": "1"})
    return Health(status="ready")
