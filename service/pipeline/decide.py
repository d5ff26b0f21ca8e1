"""Score every frame of a decoded DICOM object through the engine's batcher and aggregate (see AGGREGATION_DOC)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from octcore.manifest import Calibration, volume_statistic
from service.dicom.decode import DicomImage
from service.dicom.schemas import FrameScore, VolumeScoreResult
from service.schemas import ScoreResult, TimingMs


async def score_volume(engine: Any, image: DicomImage, *, heatmaps: bool, preview: bool = False,
                       request_id: str | None = None, started: float | None = None) -> VolumeScoreResult:
    """`engine` is the service's Engine (`score_gray`, `settings`, `higher_is_anomalous`)."""
    started = time.perf_counter() if started is None else started
    # Keep about two batches in flight: the batcher always has a full next batch, and a long volume cannot fill
    # the bounded queue by itself and push other clients into 503s.
    gate = asyncio.Semaphore(2 * engine.settings.max_batch_size)

    async def one(i: int) -> ScoreResult:
        async with gate:
            return await engine.score_gray(image.frame(i), heatmaps=heatmaps, preview=preview, started=started)

    results = await asyncio.gather(*(one(i) for i in range(image.number_of_frames)))
    return aggregate(results, image, engine.calibration, higher_is_anomalous=engine.higher_is_anomalous,
                     request_id=request_id, started=started)


def aggregate(results: list[ScoreResult], image: DicomImage, calibration: Calibration, *,
              higher_is_anomalous: bool = True, request_id: str | None = None,
              started: float | None = None) -> VolumeScoreResult:
    frames = [FrameScore(index=i, frame_number=i + 1, score=r.score, scores=r.scores, is_anomalous=r.is_anomalous,
                         percentile=r.percentile, heatmaps=r.heatmaps, heatmap_box=r.heatmap_box, preview=r.preview)
              for i, r in enumerate(results)]
    pick = max if higher_is_anomalous else min
    top = pick(range(len(results)), key=lambda i: results[i].score)  # first frame wins a tie
    worst = results[top]
    # A lesion spans adjacent B-scans; and the most anomalous of n normal B-scans rises with n, so the volume's
    # threshold depends on n (octcore.manifest.Calibration).
    score, _ = volume_statistic([r.score for r in results], calibration.volume_window, higher_is_anomalous)
    threshold = calibration.volume_threshold(len(results), higher_is_anomalous)
    over = score > threshold if higher_is_anomalous else score < threshold
    total_ms = (time.perf_counter() - started) * 1e3 if started is not None else sum(r.timing_ms.total for r in results)
    return VolumeScoreResult(
        request_id=request_id or uuid.uuid4().hex, model=worst.model,
        study_instance_uid=image.study_instance_uid, series_instance_uid=image.series_instance_uid,
        sop_instance_uid=image.sop_instance_uid, sop_class_uid=image.sop_class_uid,
        number_of_frames=image.number_of_frames, volume_window=min(calibration.volume_window, len(results)),
        score=score, scores=worst.scores, threshold=threshold,
        is_anomalous=bool(over), percentile=worst.percentile, max_frame=top, heatmap_box=worst.heatmap_box,
        frames=frames,
        # Frames share batches, so per-frame times do not add up; report the slowest frame's.
        timing_ms=TimingMs(queue=max(r.timing_ms.queue for r in results),
                           inference=max(r.timing_ms.inference for r in results), total=total_ms))
