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
            summary="The model is loaded and warm, and the service is not draining")
async def readyz(request: Request) -> Health | JSONResponse:
    # Not ready while warming, from the first moment of a drain (while requests are still answered), and while any
    # other worker process is not ready: a probe reaches one worker but speaks for the port.
    reason = request.app.state.serving.not_ready_reason(getattr(request.app.state, "pipeline", None))
    if reason is not None:
        raise NotReady(reason, headers={"Retry-After": "1"})
    return Health(status="ready")
