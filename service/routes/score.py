"""`POST /score`: one B-scan in (multipart `file` or a raw image body), scores, decision and heatmaps out."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.deps import SECURITY_REQUIREMENTS, authorize, get_engine
from service.dicom.decode import is_dicom
from service.dicom.ingest import score_dicom_upload
from service.dicom.schemas import VolumeScoreResult
from service.errors import (
    BadRequest,
    Busy,
    DecompressionBomb,
    ImageTooLarge,
    InvalidParameters,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UndecodableImage,
    UnsupportedImage,
    UnsupportedMediaType,
    problem_responses,
)
from service.imaging import DECODERS, Decoder, Limits, decoder_for_upload
from service.multipart import content_type_params
from service.schemas import ScoreQuery, ScoreResult
from service.settings import Settings
from service.upload import read_body

# The hot path reads its key, query and body itself, and says so in OpenAPI (`openapi_extra`; the schema is the same
# as with `Depends`). FastAPI solves a route's dependencies and parameters anew on every request: for the key's two
# security schemes, the engine and the query model that was 540 of the 1,240 Python calls a request made besides
# decoding, and 8 % of the service's CPU per request with a scorer that costs nothing. Other routes keep `Depends`.
router = APIRouter(tags=["score"])

_MAX_PARTS = 16  # form fields and files in one upload: the file and a few a client adds (names, notes)
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _query_parameters() -> list[dict[str, Any]]:
    """`ScoreQuery`'s fields as OpenAPI query parameters, as FastAPI would list them for `Query()` parameters."""
    schema = ScoreQuery.model_json_schema()
    return [{"name": name, "in": "query", "required": False, "description": field.get("description", ""),
             "schema": field}
            for name, field in schema["properties"].items()]


_OPENAPI = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        **{t: _BINARY for t in ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/dicom")},
    }},
    "parameters": _query_parameters(),
    "security": SECURITY_REQUIREMENTS,
}


def score_query(request: Request) -> ScoreQuery:
    """The query string as `ScoreQuery`; a bad value is the 422 problem FastAPI's own validation gives."""
    try:
        return ScoreQuery.model_validate(dict(request.query_params))
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("query", *err["loc"])} for err in e.errors()]) from e


async def read_upload(request: Request, settings: Settings) -> tuple[bytes, Decoder]:
    """The upload's bytes and the decoder for them; the body size limit is enforced while it streams in."""
    media, _ = content_type_params(request.headers.get("content-type", ""))
    if media == "multipart/form-data":
        data = await _form_file(request)
        return data, decoder_for_upload(data)
    decoder = DECODERS.get(media)
    if decoder is None and media != "application/dicom":  # DICOM is decoded by service.dicom in score()
        raise UnsupportedMediaType(f"Content-Type {media or '(none)'!r}; send multipart/form-data with a 'file' "
                                   f"part, or a raw body of type {', '.join(sorted(DECODERS))}")
    return await read_body(request, settings), decoder


async def _form_file(request: Request) -> bytes:
    """The one file part named `file` of a multipart/form-data body, through Starlette's form parser
    (python-multipart): beyond 1 MiB the file spools to disk, and the form's files are closed on the way out."""
    try:
        async with request.form(max_files=_MAX_PARTS, max_fields=_MAX_PARTS) as form:
            files = form.getlist("file")
            if len(files) != 1:
                raise BadRequest(f"{len(files)} parts named 'file'; send one B-scan per request" if files else
                                 "no complete part named 'file' (Content-Disposition: form-data; name=\"file\"; "
                                 "filename=...); was the body cut short?")
            [upload] = files
            if isinstance(upload, str):
                raise BadRequest("the 'file' part has no filename, so it was read as text; send the scan as a file "
                                 "(Content-Disposition: form-data; name=\"file\"; filename=\"scan.jpeg\")")
            data = await upload.read()
    except StarletteHTTPException as e:  # python-multipart's refusals (no boundary, too many parts) arrive as 400s
        raise BadRequest(f"multipart body: {e.detail}") from e
    if not data:
        raise BadRequest("the 'file' part is empty")
    return data


@router.post(
    "/score", response_model=ScoreResult | VolumeScoreResult, response_model_exclude_none=True,
    openapi_extra=_OPENAPI,
    responses=problem_responses(BadRequest, Unauthorized, PayloadTooLarge, UnsupportedMediaType, UndecodableImage,
                                ImageTooLarge, DecompressionBomb, UnsupportedImage, InvalidParameters, Overloaded,
                                Busy, NotReady),
    summary="Score one OCT B-scan",
)
async def score(request: Request) -> Response:
    started = time.perf_counter()
    authorize(request)  # the order FastAPI would solve them in: key, engine, query
    engine = await get_engine(request)
    query = score_query(request)
    heatmaps, heatmap_format, preview = query.heatmaps, query.heatmap_format, query.preview
    settings = engine.settings  # the app's settings; not a second dependency to solve on every request
    request.scope["oct.audit"] = {"model": engine.manifest.name, "model_version": engine.manifest.version}
    if not engine.ready:  # before reading the upload: a client should not send megabytes to be refused
        raise NotReady(engine.not_ready_reason, headers={"Retry-After": str(settings.retry_after_s)})
    data, decoder = await read_upload(request, settings)
    if decoder is None or is_dicom(data):  # a DICOM object: per-frame + volume scores (service/dicom)
        return _json(await score_dicom_upload(request, engine, data, heatmaps=heatmaps, preview=preview,
                                              started=started))
    limits = Limits(max_side=settings.max_image_side, max_pixels=settings.max_image_pixels)
    result = await engine.score_upload(data, decoder, limits, heatmaps=heatmaps, heatmap_format=heatmap_format,
                                       preview=preview, request_id=request.scope.get("oct.request_id"),
                                       started=started)
    request.scope["oct.audit"].update(score=result.score, is_anomalous=result.is_anomalous,
                                      percentile=round(result.percentile, 2))
    return _json(result)


def _json(result: BaseModel) -> Response:
    """Serialise once, in pydantic's Rust core. The model was validated when it was built; returning it for FastAPI
    to check against `response_model` and encode again cost more than the rest of the response."""
    return Response(result.model_dump_json(exclude_none=True), media_type="application/json")
