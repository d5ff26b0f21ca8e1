"""What the pipeline answers: typed results that carry arrays (heatmaps as uint8, the decoded scan when a preview was
asked). The REST layer (`service.answers`) turns them into JSON with image files; the DICOM builders take the arrays
as they are."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ModelId:
    name: str
    version: int


@dataclass(frozen=True)
class Decision:
    """The decision on the primary score of one B-scan or of a volume (`service.pipeline.decide`)."""

    score: float  # a B-scan's primary score; a volume's statistic over its scored frames
    threshold: float  # for this many frames
    is_anomalous: bool
    percentile: float  # of the most anomalous frame's score among the normal calibration scans, 0-100
    max_frame: int  # index (among the scores decided on) of the most anomalous; 0 for a B-scan
    window: int  # adjacent frames averaged into `score`


@dataclass(frozen=True)
class Timing:
    queue_s: float  # waiting for the batch to start
    inference_s: float  # the batch's forward pass


@dataclass(frozen=True)
class ImageResult:
    """One B-scan (or one frame of a volume), scored."""

    scores: dict[str, float]
    decision: Decision
    box: Box  # the crop the input came from, in image pixels: what the heatmaps cover
    maps: dict[str, np.ndarray] | None  # score name → uint8 heatmap (h, w); None unless asked
    gray: np.ndarray | None  # the decoded image, when a preview was asked
    timing: Timing


@dataclass(frozen=True)
class FrameResult:
    index: int  # 0-based, in the object
    image: ImageResult | None  # None when the frame was refused
    refused: str | None = None  # why it has no score (one line, no pixel values)
    gray: np.ndarray | None = None  # a refused frame's decoded pixels, when a preview was asked


@dataclass(frozen=True)
class VolumeResult:
    """Every frame of a volume (a single-frame object: one), and the decision on the frames that were scored."""

    frames: list[FrameResult]
    decision: Decision  # max_frame: an index into `frames`
    model: ModelId

    @property
    def scored(self) -> list[FrameResult]:
        return [f for f in self.frames if f.image is not None]

    @property
    def top(self) -> ImageResult:
        """The most anomalous frame's result."""
        image = self.frames[self.decision.max_frame].image
        assert image is not None
        return image
