"""Response bodies of the DICOM paths: a scored DICOM object on `/score`, and the results resource of
`/dicomweb/results`. They carry Study/Series/SOP Instance UIDs and never patient name, ID or birth date."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.schemas import HEATMAP_SCALE_DOC, PREVIEW_DOC, HeatmapBox, ModelRef, TimingMs

AGGREGATION_DOC = (
    "Volume score = the highest mean primary score over `volume_window` adjacent frames (the lowest, for a model "
    "whose primary score is lower-when-anomalous; one frame: its own score): a lesion spans neighbouring B-scans, "
    "an odd normal frame stands alone. The volume is anomalous when its score passes `threshold`, which depends on "
    "the number of frames: the same statistic's quantile, at the B-scan threshold's percentile, over volumes of that "
    "many independent B-scans drawn from the normal scans' fitted score distribution, so a normal volume of any "
    "length is flagged about as rarely as one normal B-scan. `max_frame` is the most anomalous frame (where to look "
    "first); `scores` and `percentile` are that frame's, and each frame's `is_anomalous` is against the B-scan "
    "threshold. A frame the model cannot read (a model of the retina band, and a frame without a retina) has no "
    "score, says why in `refused`, and is left out: the statistic and the threshold are those of the scored frames "
    "(`frames_scored`)."
)


class FrameScore(BaseModel):
    index: int = Field(description="0-based frame index in the DICOM object")
    frame_number: int = Field(description="DICOM frame number (index + 1), as in ReferencedFrameNumber")
    score: float | None = Field(default=None, description="The manifest's primary score for this B-scan; none when "
                                "the frame was refused")
    scores: dict[str, float] | None = None
    is_anomalous: bool | None = None
    percentile: float | None = Field(default=None, description="Where the score falls among normal calibration "
                                     "scans, 0–100")
    refused: str | None = Field(default=None, description="Why this frame has no score (e.g. `no retina: …`): it "
                                "is left out of the volume's score and decision")
    heatmaps: dict[str, str] | None = Field(default=None, description=HEATMAP_SCALE_DOC)
    # Optional here: result records stored by earlier versions lack it.
    heatmap_box: HeatmapBox | None = Field(default=None, description="Region of this frame the heatmaps cover")
    preview: str | None = Field(default=None, description=PREVIEW_DOC)


class VolumeScoreResult(BaseModel):
    """`/score` answer for a DICOM upload: per-frame results plus the volume's (single-frame objects: one frame)."""

    request_id: str
    model: ModelRef
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    number_of_frames: int
    # Absent in results stored by earlier versions (every frame was scored).
    frames_scored: int | None = Field(default=None, description="Frames the volume's score and decision rest on "
                                      "(the others were refused: see each frame's `refused`)")
    # "max": results stored by earlier versions (the most anomalous frame alone).
    aggregation: Literal["window_mean_max", "max"] = Field(default="window_mean_max", description=AGGREGATION_DOC)
    volume_window: int = Field(default=1, description="Adjacent frames averaged into the volume score")
    score: float = Field(description="Volume score: " + AGGREGATION_DOC)
    scores: dict[str, float] = Field(description="Every score of the most anomalous frame")
    threshold: float = Field(description="The volume's decision threshold on `score` (see aggregation)")
    is_anomalous: bool
    percentile: float
    max_frame: int = Field(description="0-based index of the most anomalous frame")
    heatmap_box: HeatmapBox | None = Field(default=None, description="The most anomalous frame's heatmap_box")
    frames: list[FrameScore]
    timing_ms: TimingMs


class ResultInstance(BaseModel):
    kind: Literal["sr", "sc"] = Field(description="sr: Structured Report with the scores; sc: heatmap overlay image")
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    url: str = Field(description="Download as application/dicom")


class Delivery(BaseModel):
    status: Literal["pending", "delivered", "failed", "local"] = Field(
        description="pending: waiting for (another) STOW-RS attempt; delivered: the PACS accepted every instance; "
                    "failed: the PACS refused them (not a network error) OCT_PACS_RETRY_MAX times; "
                    "local: no OCT_PACS_STOW_URL configured, kept for download only")
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: float | None = Field(default=None, description="Unix time of the next attempt when pending")
    delivered_at: float | None = None


class SourceAttributes(BaseModel):
    """What the source's attributes needed before the result objects could copy them (service/dicom/attributes.py):
    keywords only (`Sequence>Keyword` inside a sequence), never values."""

    repaired: list[str] = Field(default_factory=list, description="Invalid as written, copied repaired (an ISO "
                                "date as DICOM's YYYYMMDD, a time without colons, a sex written out as its code)")
    left_out: list[str] = Field(default_factory=list, description="Invalid and not repairable: left out of the "
                                "results (a Type 2 patient/study attribute is copied empty)")


class ResultRecord(BaseModel):
    """One scored source instance: its scores, the result objects built for it and their delivery to the PACS."""

    source_sop_instance_uid: str
    study_instance_uid: str
    created_at: float
    result: VolumeScoreResult
    instances: list[ResultInstance]
    delivery: Delivery
    # Empty in records stored by earlier versions.
    source_attributes: SourceAttributes = Field(default_factory=SourceAttributes)


class ResultSummary(BaseModel):
    source_sop_instance_uid: str
    study_instance_uid: str
    score: float
    is_anomalous: bool
    delivery_status: str
    url: str
