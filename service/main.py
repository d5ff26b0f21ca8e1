"""App factory: settings → pipeline (the loaded model) → routers, middleware and error handlers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import errors, security
from service.budget import InFlight
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestContext
from service.pipeline.pipeline import Pipeline
from service.processes import READY, ServingState
from service.routes import dicomweb, health, metrics, models, page, score
from service.settings import Settings


def create_app(settings: Settings | None = None, pipeline: Pipeline | None = None,
               serving: ServingState | None = None) -> FastAPI:
    """`pipeline` is given when the caller loaded the model already (`python -m service` does, to fail fast);
    `serving` carries the drain flag and, with several worker processes, their shared readiness."""
    settings = settings or Settings()
    security.require_safe(settings)
    metrics_ = pipeline.core.metrics if pipeline is not None else Metrics()
    serving = serving or ServingState()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        p = pipeline or await asyncio.to_thread(Pipeline.load, settings, metrics_)
        app.state.pipeline = p
        p.core.on_ready = lambda: serving.set_state(READY)
        await p.start()
        yield
        await p.stop()  # uvicorn calls this after in-flight requests finished; the batcher drains what is left

    # FastAPI's own OpenTelemetry bridge stays off: its log records carry exception messages unscrubbed (a DICOM
    # error can quote patient data; docs/security.md), and it looks up three global providers on every request. The
    # service's telemetry is its Prometheus metrics and its scrubbed JSON log.
    app = FastAPI(title="OCT anomaly scoring", version="1", lifespan=lifespan,
                  description="VQ-VAE anomaly scores, decisions and heatmaps for retinal OCT B-scans.",
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.settings = settings
    app.state.metrics = metrics_
    app.state.pipeline = None
    app.state.serving = serving
    errors.install(app)
    for r in (score.router, models.router, health.router, metrics.router, page.router):
        app.include_router(r)
    app.include_router(dicomweb.router)  # STOW-RS ingest + results; its lifespan runs the PACS delivery worker
    # Added last = outermost: every request gets an id and a metrics/audit record, even a refused upload.
    app.state.inflight = InFlight.from_settings(settings)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes, budget=app.state.inflight.bytes)
    app.add_middleware(RequestContext, metrics=metrics_)
    return app
