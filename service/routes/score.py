"""`POST /score`: one B-scan (multipart `file` or a raw image body) or one DICOM object in, scores, decision and
heatmaps out. The route reads the upload and hands it to the pipeline (service.pipeline): decode → preprocess →
infer → decide → render; the answer (service.answers) encodes the heatmaps. Its key, pipeline and query arrive
through FastAPI's dependencies, and FastAPI checks the answer against the response model."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.answers import image_answer
from service.deps import PipelineDep, ScoreQueryDep, require_api_key
from service.dicom.decode import is_dicom
from service.dicom.ingest import score_dicom_upload
from service.dicom.schemas import VolumeScoreResult
from service.errors import (
    BadRequest,
    Busy,
    DecompressionBomb,
    ImageTooLarge,
    InvalidParameters,
    NoRetina,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UndecodableImage,
    UnsupportedImage,
    UnsupportedMediaType,
    problem_responses,
)
from service.multipart import content_type_params
from service.pipeline.decode import DECODERS, Decoder, Limits, decoder_for_upload
from service.schemas import ScoreResult
from service.settings import Settings
from service.upload import read_body

router = APIRouter(tags=["score"], dependencies=[Depends(require_api_key)])

_MAX_PARTS = 16  # form fields and files in one upload: the file and a few a client adds (names, notes)
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# The body is read by the route (a form file or a raw body of any of these types), so OpenAPI is told its shapes.
_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    **{t: _BINARY for t in ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/dicom")},
}}}


async def read_upload(request: Request, settings: Settings) -> tuple[bytes, Decoder | None]:
    """The upload's bytes and the decoder for them (None: DICOM); the body size limit is enforced while it streams
    in."""
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
    "/score", response_model=ScoreResult | VolumeScoreResult, response_model_exclude_none=True, openapi_extra=_BODY,
    responses=problem_responses(BadRequest, Unauthorized, PayloadTooLarge, UnsupportedMediaType, UndecodableImage,
                                ImageTooLarge, DecompressionBomb, UnsupportedImage, NoRetina, InvalidParameters,
                                Overloaded, Busy, NotReady),
    summary="Score one OCT B-scan",
)
async def score(request: Request, pipeline: PipelineDep, query: ScoreQueryDep) -> ScoreResult | VolumeScoreResult:
    started = time.perf_counter()
    request.scope["oct.audit"] = {"model": pipeline.model.name, "model_version": pipeline.model.version}
    pipeline.check_ready()  # before reading the upload: a client should not send megabytes to be refused
    data, decoder = await read_upload(request, pipeline.settings)
    if decoder is None or is_dicom(data):  # a DICOM object: per-frame + volume scores (service/dicom)
        return await score_dicom_upload(request, pipeline, data, heatmaps=query.heatmaps, preview=query.preview,
                                        started=started)
    limits = Limits(max_side=pipeline.settings.max_image_side, max_pixels=pipeline.settings.max_image_pixels)
    result = await pipeline.score_upload(data, decoder, limits, maps=query.heatmaps, preview=query.preview)
    answer = await image_answer(pipeline, result, started=started, request_id=request.scope.get("oct.request_id"),
                                heatmap_format=query.heatmap_format)
    request.scope["oct.audit"].update(score=answer.score, is_anomalous=answer.is_anomalous,
                                      percentile=round(answer.percentile, 2))
    return answer
