"""One DICOM instance from a PACS → decoded, scored by the pipeline, SR + SC built, stored in the outbox (then
delivered).

`score_dicom` is the `/score` path (scores only, nothing stored); `ingest` is the STOW-RS path. Either raises a
`DicomProblem` for a bad object before anything is written, so a refused instance leaves nothing behind: an object
none of whose frames holds a retina (a model of the retina band) is `NoRetinaInObject`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.requests import Request

from service import redaction
from service.answers import volume_answer
from service.budget import Budget, inflight
from service.dicom.attributes import SourceRepairs, prepare_source
from service.dicom.decode import DicomImage, decode_dicom
from service.dicom.errors import DicomProblem, NoRetinaInObject, OwnResult, ResultsNotBuildable, StudyMismatch
from service.dicom.outbox import Outbox, dicom_bytes
from service.dicom.results import MANUFACTURER, ResultIds, is_uid
from service.dicom.sc import build_sc
from service.dicom.schemas import Delivery, ResultInstance, ResultRecord, SourceAttributes, VolumeScoreResult
from service.dicom.sr import build_sr
from service.errors import NoRetina
from service.pipeline.pipeline import ScoringPipeline
from service.pipeline.results import VolumeResult
from service.redaction import library_error

log = logging.getLogger("oct.dicom")


@asynccontextmanager
async def decoded(pipeline: ScoringPipeline, data: bytes, voxels: Budget | None = None) -> AsyncIterator[DicomImage]:
    """The decoded object, its voxels counted against `voxels` (OCT_MAX_INFLIGHT_VOXELS) while the caller holds it,
    and its text values kept out of this request's logs and errors (service.redaction)."""
    s = pipeline.settings
    taken = 0

    def reserve(n: int) -> None:
        nonlocal taken
        if voxels is not None:
            voxels.take(n)
            taken = n

    try:
        try:
            image = await pipeline.run_cpu(lambda: decode_dicom(
                data, max_total_pixels=s.dicom_max_voxels, max_side=s.dicom_max_side,
                max_frame_pixels=s.max_image_pixels, reserve=reserve))
        except DicomProblem as e:
            redaction.remember(getattr(e, "phi", ()))
            raise
        redaction.remember(image.phi)
        log.debug("decoded %s: %d frames of %d×%d, transfer syntax %s", image.sop_instance_uid,
                  image.number_of_frames, image.stored.shape[2], image.stored.shape[1], image.transfer_syntax_uid)
        yield image
    finally:
        if voxels is not None and taken:
            voxels.give(taken)


async def _score(pipeline: ScoringPipeline, image: DicomImage, *, maps: bool, preview: bool = False) -> VolumeResult:
    try:
        return await pipeline.score_volume(image, maps=maps, preview=preview)
    except NoRetina as e:
        raise NoRetinaInObject(e.detail) from e


async def score_dicom(pipeline: ScoringPipeline, data: bytes, *, heatmaps: bool, preview: bool = False,
                      request_id: str | None = None, started: float | None = None,
                      voxels: Budget | None = None) -> VolumeScoreResult:
    """`/score` with a DICOM body: per-frame and volume scores (see service.dicom.schemas.AGGREGATION_DOC)."""
    started = time.perf_counter() if started is None else started
    async with decoded(pipeline, data, voxels) as image:
        result = await _score(pipeline, image, maps=heatmaps, preview=preview)
        return await volume_answer(pipeline, result, image, started=started, request_id=request_id)


async def ingest(pipeline: ScoringPipeline, outbox: Outbox, data: bytes, *, base_url: str, study: str | None = None,
                 deliver: bool = True, request_id: str | None = None, voxels: Budget | None = None) -> ResultRecord:
    """Score one STOW-RS instance and store its SR + SC (status `pending` when `deliver`, else `local`).
    `base_url` is the base of the links stored with it (OCT_PUBLIC_URL, else the request's own: see
    `service.routes.dicomweb.public_base`); reading the result back rebuilds them for the reader's base."""
    started = time.perf_counter()
    async with decoded(pipeline, data, voxels) as image:
        return await _ingest(pipeline, outbox, image, base_url=base_url, study=study, deliver=deliver,
                             request_id=request_id, started=started)


async def _ingest(pipeline: ScoringPipeline, outbox: Outbox, image: DicomImage, *, base_url: str, study: str | None,
                  deliver: bool, request_id: str | None, started: float) -> ResultRecord:
    ds = image.dataset
    if study is not None and image.study_instance_uid != study:
        raise StudyMismatch(f"instance is in study {image.study_instance_uid}, the URL names {study}")
    if str(ds.get("Manufacturer", "")) == MANUFACTURER:
        raise OwnResult("this instance was produced by the OCT anomaly service; a router loop?")
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not is_uid(str(ds.get(name, ""))):
            raise ResultsNotBuildable(f"{name} is missing or not a valid UID")
    result = await _score(pipeline, image, maps=False)
    answer = await volume_answer(pipeline, result, image, started=started, request_id=request_id)
    # The heatmap for the overlay: the most anomalous frame again, with maps (same input → same scores).
    gray = image.frame(result.decision.max_frame)
    top = await pipeline.score_image(gray, maps=True)
    ids = ResultIds(image.series_instance_uid, image.sop_instance_uid, result.model)

    def build() -> tuple[dict[str, Any], SourceRepairs]:
        repairs = prepare_source(ds)  # what highdicom copies: valid, repaired or left out
        objs: dict[str, Any] = {"sr": build_sr(ds, result, ids)}
        maps = top.maps or {}
        if maps:
            name = pipeline.overlay if pipeline.overlay in maps else next(iter(maps))
            objs["sc"] = build_sc(ds, gray, name, maps[name], top.box, result, ids)
        return objs, repairs

    try:
        objs, repairs = await pipeline.run_cpu(build)
        files = await pipeline.run_cpu(lambda: {f"{k}.dcm": dicom_bytes(o) for k, o in objs.items()})
    except DicomProblem:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # highdicom validating the source's attributes
        # By type only: highdicom's messages quote attribute values, which may be the patient's (service.redaction).
        raise ResultsNotBuildable(f"highdicom refused the source's attributes ({library_error(e)})") from e
    uid = image.sop_instance_uid
    record = ResultRecord(
        source_sop_instance_uid=uid, study_instance_uid=image.study_instance_uid, created_at=time.time(),
        result=answer, delivery=Delivery(status="pending" if deliver else "local"),
        source_attributes=SourceAttributes(repaired=repairs.repaired, left_out=repairs.left_out),
        instances=[ResultInstance(kind=k, sop_class_uid=str(o.SOPClassUID), sop_instance_uid=str(o.SOPInstanceUID),
                                  series_instance_uid=str(o.SeriesInstanceUID),
                                  url=f"{base_url}/dicomweb/results/{uid}/{k}.dcm") for k, o in objs.items()])
    await asyncio.to_thread(outbox.put, record, files)
    return record


async def score_dicom_upload(request: Request, pipeline: ScoringPipeline, data: bytes, *, heatmaps: bool,
                             started: float, preview: bool = False) -> VolumeScoreResult:
    """The DICOM branch of `POST /score`: scores + the audit fields (UIDs and scores only, never patient data)."""
    result = await score_dicom(pipeline, data, heatmaps=heatmaps, preview=preview,
                               request_id=request.scope.get("oct.request_id"), started=started,
                               voxels=inflight(request.app).voxels)
    request.scope.setdefault("oct.audit", {}).update(
        score=result.score, is_anomalous=result.is_anomalous, percentile=round(result.percentile, 2),
        frames=result.number_of_frames, max_frame=result.max_frame, sop_instance_uid=result.sop_instance_uid)
    return result
