"""Pipeline results → the REST answers (`service.schemas`, `service.dicom.schemas`): the one place where heatmaps and
previews become base64 image files. The image encoding runs where the inference core puts small CPU work (on the
event loop with OCT_CPU_WORKERS=0, else in a thread), as decoding does."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np

from service.dicom.schemas import FrameScore, VolumeScoreResult
from service.encode import HeatmapFormat, encode_all, encode_preview
from service.pipeline.pipeline import Pipeline, ScoringPipeline
from service.pipeline.results import Box, FrameResult, ImageResult, ModelId, VolumeResult
from service.request_ids import new_request_id
from service.schemas import HeatmapBox, ModelRef, ModelSummary, ScoreInfo, ScoreResult, TimingMs

if TYPE_CHECKING:
    from service.dicom.decode import DicomImage


def model_ref(model: ModelId) -> ModelRef:
    return ModelRef(name=model.name, version=model.version)


def heatmap_box(box: Box) -> HeatmapBox:
    return HeatmapBox(x0=box[0], y0=box[1], x1=box[2], y1=box[3])


async def _files(pipeline: ScoringPipeline, maps: dict[str, np.ndarray] | None, gray: np.ndarray | None, *,
                 heatmap_format: HeatmapFormat) -> tuple[dict[str, str] | None, str | None]:
    """(base64 heatmaps, base64 preview) of one image's arrays, each None when there is no such array."""
    files = preview = None
    if maps:
        files = await pipeline.run_image(encode_all, maps, heatmap_format,
                                              nbytes=sum(m.nbytes for m in maps.values()))
    if gray is not None:
        preview = await pipeline.run_image(encode_preview, gray, nbytes=gray.nbytes)
    return files, preview


def _timing(queue_s: float, inference_s: float, started: float) -> TimingMs:
    return TimingMs(queue=queue_s * 1e3, inference=inference_s * 1e3, total=(time.perf_counter() - started) * 1e3)


async def image_answer(pipeline: ScoringPipeline, result: ImageResult, *, started: float, request_id: str | None = None,
                       heatmap_format: HeatmapFormat = "png") -> ScoreResult:
    """`POST /score`'s answer for one B-scan. `started`: perf_counter when the request arrived."""
    maps, preview = await _files(pipeline, result.maps, result.gray, heatmap_format=heatmap_format)
    d = result.decision
    return ScoreResult(
        request_id=request_id or new_request_id(), model=model_ref(pipeline.model), score=d.score,
        scores=result.scores, threshold=d.threshold, is_anomalous=d.is_anomalous, percentile=d.percentile,
        heatmaps=maps, heatmap_box=heatmap_box(result.box), preview=preview,
        timing_ms=_timing(result.timing.queue_s, result.timing.inference_s, started))


def frame_score(f: FrameResult, maps: dict[str, str] | None = None, preview: str | None = None) -> FrameScore:
    base = FrameScore(index=f.index, frame_number=f.index + 1, refused=f.refused, heatmaps=maps, preview=preview)
    if f.image is None:
        return base
    d = f.image.decision
    return base.model_copy(update={"score": d.score, "scores": f.image.scores, "is_anomalous": d.is_anomalous,
                                   "percentile": d.percentile, "heatmap_box": heatmap_box(f.image.box)})


async def volume_answer(pipeline: ScoringPipeline, result: VolumeResult, image: DicomImage, *, started: float,
                        request_id: str | None = None, heatmap_format: HeatmapFormat = "png") -> VolumeScoreResult:
    """The answer for a DICOM object: per frame and for the volume (service.dicom.schemas.AGGREGATION_DOC)."""
    files = await asyncio.gather(*(
        _files(pipeline, f.image.maps if f.image else None, f.image.gray if f.image else f.gray,
               heatmap_format=heatmap_format) for f in result.frames))
    frames = [frame_score(f, *fs) for f, fs in zip(result.frames, files, strict=True)]
    scored = result.scored
    top, d = result.top, result.decision
    # Frames share batches, so per-frame times do not add up; report the slowest frame's.
    queue_s = max(f.image.timing.queue_s for f in scored)  # type: ignore[union-attr]
    inference_s = max(f.image.timing.inference_s for f in scored)  # type: ignore[union-attr]
    return VolumeScoreResult(
        request_id=request_id or new_request_id(), model=model_ref(result.model),
        study_instance_uid=image.study_instance_uid, series_instance_uid=image.series_instance_uid,
        sop_instance_uid=image.sop_instance_uid, sop_class_uid=image.sop_class_uid,
        number_of_frames=image.number_of_frames, frames_scored=len(scored), volume_window=d.window,
        score=d.score, scores=top.scores, threshold=d.threshold, is_anomalous=d.is_anomalous,
        percentile=d.percentile, max_frame=d.max_frame, heatmap_box=heatmap_box(top.box), frames=frames,
        timing_ms=_timing(queue_s, inference_s, started))


def model_summary(pipeline: Pipeline) -> ModelSummary:
    """`GET /models`."""
    m = pipeline.manifest
    return ModelSummary(
        name=m.name, version=m.version, device=pipeline.core.device, format=m.format, sha256=m.sha256,
        torch_version=m.torch_version, created=m.created, input_size=m.input.size,
        preprocessing=m.preprocessing.to_dict(),
        maps=m.maps, primary_score=m.primary_score, overlay_score=pipeline.overlay,
        max_batch_size=pipeline.settings.max_batch_size,
        evaluation=m.evaluation,
        scores={k: ScoreInfo(description=s.description, map=s.map, higher_is_anomalous=s.higher_is_anomalous,
                             threshold=m.calibration[k].threshold,
                             threshold_percentile=m.calibration[k].threshold_percentile,
                             map_scale=m.calibration[k].map_scale) for k, s in m.scores.items()})
