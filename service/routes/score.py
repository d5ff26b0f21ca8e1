"""`POST /score`: one B-scan in (multipart `file` or a raw image body), scores, decision and heatmaps out."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.deps import EngineDep, require_api_key
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
from service.multipart import MultipartError, content_type_params, form_file
from service.schemas import ScoreQuery, ScoreResult
from service.settings import Settings
from service.upload import read_body

router = APIRouter(tags=["score"], dependencies=[Depends(require_api_key)])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    **{t: _BINARY for t in ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/dicom")},
}}}


async def read_upload(request: Request, settings: Settings) -> tuple[bytes, Decoder]:
    """The upload's bytes and the decoder for them; the body size limit is enforced while it streams in."""
    media, params = content_type_params(request.headers.get("content-type", ""))
    if media == "multipart/form-data":
        body = await read_body(request, settings)
        try:
            data = bytes(form_file(body, params.get("boundary", "")))
        except MultipartError as e:
            raise BadRequest(f"multipart body: {e}; send the scan as a part named 'file'") from e
        if not data:
            raise BadRequest("the 'file' part is empty")
        return data, decoder_for_upload(data)
    decoder = DECODERS.get(media)
    if decoder is None and media != "application/dicom":  # DICOM is decoded by service.dicom in score()
        raise UnsupportedMediaType(f"Content-Type {media or '(none)'!r}; send multipart/form-data with a 'file' "
                                   f"part, or a raw body of type {', '.join(sorted(DECODERS))}")
    return await read_body(request, settings), decoder


@router.post(
    "/score", response_model=ScoreResult | VolumeScoreResult, response_model_exclude_none=True,
    openapi_extra=_REQUEST_BODY,
    responses=problem_responses(BadRequest, Unauthorized, PayloadTooLarge, UnsupportedMediaType, UndecodableImage,
                                ImageTooLarge, DecompressionBomb, UnsupportedImage, InvalidParameters, Overloaded,
                                Busy, NotReady),
    summary="Score one OCT B-scan",
)
async def score(request: Request, engine: EngineDep, query: Annotated[ScoreQuery, Query()]) -> Response:
    started = time.perf_counter()
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
