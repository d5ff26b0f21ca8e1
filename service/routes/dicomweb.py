"""DICOMweb: STOW-RS ingest (`POST /dicomweb/studies[/{study}]`) and the results resource (`/dicomweb/results`).

STOW is synchronous: each instance is decoded, scored, and its SR + SC written to the outbox before the response
names it in ReferencedSOPSequence, so "stored" means "scored and durable". Delivery of the results to the PACS
(OCT_PACS_STOW_URL) runs in the background worker this router's lifespan starts. See docs/pacs.md for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from service.budget import inflight
from service.deps import PipelineDep, require_api_key, require_results_key
from service.dicom.decode import identify
from service.dicom.delivery import DeliveryWorker, Outbox, PacsTarget
from service.dicom.errors import PROCESSING_FAILURE, DicomProblem, ResultNotFound
from service.dicom.ingest import ingest
from service.dicom.results import is_uid
from service.dicom.schemas import ResultRecord, ResultSummary
from service.dicom.stow import DICOM_JSON, StowOutcome
from service.errors import (
    BadRequest,
    Busy,
    InvalidParameters,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    problem_responses,
)
from service.multipart import MultipartError, content_type_params, split_parts
from service.pipeline.pipeline import Pipeline
from service.upload import read_body

log = logging.getLogger("oct.dicomweb")
# A Host header: a DNS name or IPv4 address, or a bracketed IPv6 literal, then an optional port. Narrower than
# RFC 3986's reg-name on purpose: the host goes into URLs other systems store, so nothing that could end or bend one.
_HOST = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def public_base(request: Request) -> str:
    """The base of every URL this service hands out (RetrieveURL, result links), without a trailing slash.

    OCT_PUBLIC_URL when set: behind a proxy or gateway, the request's own view of the host is not the clients'.
    Otherwise the request's scheme, host and port: the Host header's port when it names one, else the port the
    connection actually arrived on (the ASGI scope's `server`) — a client such as dicomweb-client sends `Host`
    without the port, and a URL without it would point at the default port, where nothing listens."""
    configured: str = request.app.state.settings.public_url
    if configured:
        return configured
    scheme = str(request.scope.get("scheme") or "http")
    server = request.scope.get("server")  # (host, port); None on a Unix socket
    host, port = None, None
    header = request.headers.get("host", "").strip()
    if header:
        m = _HOST.fullmatch(header)
        if m is None or (m["port"] is not None and int(m["port"]) > 65535):
            raise BadRequest("the Host header is not a host name or address with an optional port")
        host, port = m["host"], int(m["port"]) if m["port"] is not None else None
    if host is None:  # HTTP/1.0 without Host: the address the connection arrived at
        host = str(server[0]) if server else "localhost"
        host = f"[{host}]" if ":" in host else host
    if port is None and server:
        port = int(server[1])
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    return f"{scheme}://{netloc}{str(request.scope.get('root_path') or '').rstrip('/')}"



@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The outbox and its delivery worker live as long as the app (merged into the app's lifespan by FastAPI)."""
    settings = app.state.settings
    outbox = await asyncio.to_thread(Outbox, settings.results_dir)
    target = PacsTarget.from_settings(settings)
    worker = DeliveryWorker(outbox, target) if target.url else None
    task = asyncio.create_task(worker.run(), name="pacs-delivery") if worker else None
    retention = (asyncio.create_task(_purge_forever(outbox, settings.results_retention_days * 86400.0),
                                     name="results-retention") if settings.results_retention_days else None)
    app.state.dicom_outbox, app.state.dicom_delivery = outbox, worker
    log.info("results in %s (%s); delivery to the PACS %s", settings.results_dir,
             f"kept {settings.results_retention_days:g} days after delivery" if retention else "kept for ever",
             "enabled" if worker else "off (OCT_PACS_STOW_URL empty)")
    try:
        yield
    finally:
        if retention:
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
        if worker and task:
            await worker.stop()
            await task
        await asyncio.to_thread(outbox.close)


async def _purge_forever(outbox: Outbox, older_than_s: float) -> None:
    """OCT_RESULTS_RETENTION_DAYS: delete delivered (or local) results past it, at start and then hourly."""
    while True:
        try:
            while (n := await asyncio.to_thread(outbox.purge, older_than_s)) > 0:
                log.info("retention: deleted %d results older than %.0f s", n, older_than_s)
        except Exception as e:  # a full disk or a locked index must not end the service
            log.error("retention sweep failed: %s", type(e).__name__)
        await asyncio.sleep(min(3600.0, max(1.0, older_than_s / 10)))


router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_api_key)],
                   responses=problem_responses(Unauthorized), lifespan=lifespan)


def get_outbox(request: Request) -> Outbox:
    outbox = getattr(request.app.state, "dicom_outbox", None)
    if outbox is None:
        raise NotReady("results store not open yet", headers={"Retry-After": "1"})
    return outbox


OutboxDep = Annotated[Outbox, Depends(get_outbox)]
_STOW_BODY = {"requestBody": {"required": True, "content": {
    'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}}}}
_STOW_RESPONSES = {
    200: {"description": "Every instance scored; results stored (and queued for the PACS)",
          "content": {DICOM_JSON: {}}},
    202: {"description": "Some instances scored, others listed in FailedSOPSequence", "content": {DICOM_JSON: {}}},
    409: {"description": "No instance could be scored; reasons in FailedSOPSequence", "content": {DICOM_JSON: {}}},
    **problem_responses(BadRequest, Unauthorized, PayloadTooLarge, UnsupportedMediaType, InvalidParameters, Overloaded,
                        Busy, NotReady),
}


@router.post("/studies", summary="STOW-RS: score DICOM instances", openapi_extra=_STOW_BODY,
             responses=_STOW_RESPONSES, response_class=JSONResponse)
async def stow(request: Request, pipeline: PipelineDep, outbox: OutboxDep) -> JSONResponse:
    return await _stow(request, pipeline, outbox, None)


@router.post("/studies/{study}", summary="STOW-RS: score DICOM instances of one study", openapi_extra=_STOW_BODY,
             responses=_STOW_RESPONSES, response_class=JSONResponse)
async def stow_study(request: Request, pipeline: PipelineDep, outbox: OutboxDep,
                     study: Annotated[str, Path(description="Study Instance UID")]) -> JSONResponse:
    if not is_uid(study):
        raise BadRequest(f"{study!r} is not a UID")
    return await _stow(request, pipeline, outbox, study)


async def _stow(request: Request, pipeline: Pipeline, outbox: Outbox, study: str | None) -> JSONResponse:
    media, params = content_type_params(request.headers.get("content-type", ""))
    if media != "multipart/related" or params.get("type", "application/dicom").lower() != "application/dicom":
        raise UnsupportedMediaType(f"STOW-RS takes multipart/related; type=\"application/dicom\", got "
                                   f"{request.headers.get('content-type') or '(none)'!r}")
    pipeline.check_ready()
    body = await read_body(request, pipeline.settings)
    try:
        parts = split_parts(body, params.get("boundary", ""))
    except MultipartError as e:
        raise BadRequest(f"malformed multipart/related body: {e}") from e
    if not parts:
        raise BadRequest("the multipart/related body has no parts")
    base_url = public_base(request)
    worker: DeliveryWorker | None = request.app.state.dicom_delivery
    outcome = StowOutcome()
    for n, part in enumerate(parts, 1):
        if part.media_type not in ("application/dicom", ""):
            outcome.failed.append(("", "", 0xC000))
            log.warning("STOW part %d refused: Content-Type %s", n, part.media_type)
            continue
        try:
            record = await ingest(pipeline, outbox, part.body, base_url=base_url, study=study,
                                  deliver=worker is not None, request_id=request.scope.get("oct.request_id"),
                                  voxels=inflight(request.app).voxels)
        except DicomProblem as e:
            sop_class, sop_uid = identify(part.body)
            outcome.failed.append((sop_class, sop_uid, e.failure_reason))
            log.warning("STOW part %d (%s) refused: %s: %s", n, sop_uid or "no UID", e.slug, e.detail)
            continue
        except (NotReady, Overloaded, Busy):
            raise  # the whole request gets a 503 and the router retries; what was stored is stored idempotently
        except Exception as e:  # a bug must cost one instance (reported as a processing failure), not a 500
            sop_class, sop_uid = identify(part.body)
            outcome.failed.append((sop_class, sop_uid, PROCESSING_FAILURE))
            log.error("STOW part %d (%s) failed: %s", n, sop_uid or "no UID", type(e).__name__, exc_info=e)
            continue
        r = record.result
        url = f"{base_url}/dicomweb/results/{r.sop_instance_uid}"
        outcome.stored.append((r.sop_class_uid, r.sop_instance_uid, url))
        log.info("scored %s (%d frames): score %.6g, anomalous %s, max frame %d", r.sop_instance_uid,
                 r.number_of_frames, r.score, r.is_anomalous, r.max_frame)
        fixes = record.source_attributes
        if fixes.repaired or fixes.left_out:  # by keyword: the values themselves never reach a log
            log.warning("%s: source attributes not valid as written; repaired: %s; left out of the results: %s",
                        r.sop_instance_uid, ", ".join(fixes.repaired) or "none", ", ".join(fixes.left_out) or "none")
        if worker is not None:
            worker.notify()
    audit = request.scope.setdefault("oct.audit", {})
    audit.update(model=pipeline.model.name, model_version=pipeline.model.version, stored=len(outcome.stored),
                 failed=len(outcome.failed))
    return JSONResponse(outcome.to_json(), status_code=outcome.http_status, media_type=DICOM_JSON)


_RESULTS_KEY = [Depends(require_results_key)]


@router.get("/results", response_model=list[ResultSummary], summary="The newest results, oldest first",
            dependencies=_RESULTS_KEY, responses=problem_responses(NotReady))
async def list_results(request: Request, outbox: OutboxDep,
                       study_instance_uid: Annotated[str | None, Query()] = None,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[ResultSummary]:
    base = public_base(request)
    rows = await asyncio.to_thread(outbox.summaries, limit, study_instance_uid)
    return [ResultSummary(source_sop_instance_uid=r.uid, study_instance_uid=r.study, score=r.score,
                          is_anomalous=r.is_anomalous, delivery_status=r.status, url=f"{base}/dicomweb/results/{r.uid}")
            for r in rows]


@router.get("/results/{sop_instance_uid}", response_model=ResultRecord,
            responses=problem_responses(ResultNotFound, NotReady),
            dependencies=_RESULTS_KEY,
            summary="Scores, result instances (SR, SC) and delivery status of one scored instance")
async def get_result(request: Request, outbox: OutboxDep, sop_instance_uid: str) -> ResultRecord:
    record = await asyncio.to_thread(outbox.get, sop_instance_uid)
    if record is None:
        raise ResultNotFound(f"no result for SOP Instance UID {sop_instance_uid!r}")
    # The stored links carry the base of the request that stored them; answer with this request's (or
    # OCT_PUBLIC_URL), so a changed proxy or setting never hands out stale links.
    base = public_base(request)
    instances = [i.model_copy(update={"url": f"{base}/dicomweb/results/{record.source_sop_instance_uid}/{i.kind}.dcm"})
                 for i in record.instances]
    return record.model_copy(update={"instances": instances})


@router.get("/results/{sop_instance_uid}/{kind}.dcm", response_class=FileResponse,
            responses={200: {"content": {"application/dicom": {}}}, **problem_responses(ResultNotFound, NotReady)},
            dependencies=_RESULTS_KEY,
            summary="Download a result instance (sr: Structured Report, sc: heatmap overlay)")
async def get_result_file(outbox: OutboxDep, sop_instance_uid: str, kind: Literal["sr", "sc"]) -> FileResponse:
    path = outbox.file(sop_instance_uid, f"{kind}.dcm") if is_uid(sop_instance_uid) else None
    if path is None:
        raise ResultNotFound(f"no {kind} result for SOP Instance UID {sop_instance_uid!r}")
    return FileResponse(path, media_type="application/dicom", filename=f"{sop_instance_uid}.{kind}.dcm")
