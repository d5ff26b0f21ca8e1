"""Request parameters and response bodies (what `/docs` shows). Error bodies live in `service.errors.ProblemDetail`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.encode import HeatmapFormat

HEATMAP_SCALE_DOC = (
    "Base64 PNG per score that has a map (8-bit gray). Each heatmap covers heatmap_box: stretch it over the box. "
    "Its own pixel size is the model's resolution, not the box's: a model of the whole scan gives the box's aspect "
    "ratio with the longer side = the input size; a model of the retina band gives input-size columns and rows as "
    "fine as the band's, 0 outside the band. Pixel value v stands for map value v / 255 * map_scale, "
    "with map_scale = calibration[<score>].map_scale from GET /models (a high percentile of that map on normal "
    "validation scans): 255 means at or above what normal retinas reach. Omitted when heatmaps=false."
)


PREVIEW_DOC = (
    "Base64 PNG of the scan as the service decoded it (8-bit gray, the upload's own pixel size, so heatmap_box "
    "applies to it as is): for clients that cannot decode the upload themselves (DICOM, TIFF, 16-bit). Only with "
    "preview=true."
)


class ScoreQuery(BaseModel):
    """`POST /score`'s query parameters, one model (FastAPI's query parameter models: `Annotated[ScoreQuery,
    Query()]`)."""

    heatmaps: bool = Field(True, description="Return base64 heatmaps (see ScoreResult.heatmaps)")
    heatmap_format: HeatmapFormat = Field("png", description="png (lossless, default), or the smaller lossy webp or "
                                          "jpeg (quality 90)")
    preview: bool = Field(False, description="Return the decoded scan as PNG (see ScoreResult.preview)")


class HeatmapBox(BaseModel):
    """The region of the uploaded image the heatmaps cover, in upload pixels: the scan after white margins are
    cropped. Stretch each heatmap PNG over [x0, x1) × [y0, y1) to overlay it on the upload, whatever its own size."""

    x0: int = Field(description="Left edge (inclusive)")
    y0: int = Field(description="Top edge (inclusive)")
    x1: int = Field(description="Right edge (exclusive)")
    y1: int = Field(description="Bottom edge (exclusive)")


class ModelRef(BaseModel):
    name: str
    version: int


class TimingMs(BaseModel):
    queue: float = Field(description="Waiting for a batch to start")
    inference: float = Field(description="The batch's forward pass (shared by every image in it)")
    total: float = Field(description="Request received → response ready (decode, queue, inference, heatmaps)")


class ScoreResult(BaseModel):
    request_id: str
    model: ModelRef
    score: float = Field(description="The manifest's primary score")
    scores: dict[str, float] = Field(description="Every score the model emits (residual, alm, …)")
    threshold: float = Field(description="Decision threshold on the primary score")
    is_anomalous: bool
    percentile: float = Field(description="Where the primary score falls among normal calibration scans, 0–100")
    heatmaps: dict[str, str] | None = Field(default=None, description=HEATMAP_SCALE_DOC)
    heatmap_box: HeatmapBox
    preview: str | None = Field(default=None, description=PREVIEW_DOC)
    timing_ms: TimingMs


class ScoreInfo(BaseModel):
    description: str
    map: str | None
    higher_is_anomalous: bool
    threshold: float
    threshold_percentile: float
    map_scale: float | None = Field(description="Map value that heatmap pixel 255 stands for")


class ModelSummary(BaseModel):
    name: str
    version: int
    device: str
    format: str
    sha256: str
    torch_version: str
    created: str
    input_size: int
    preprocessing: dict[str, Any]
    maps: list[str]
    primary_score: str
    overlay_score: str | None = Field(
        description="The score whose heatmap is shown first (viewer, PACS overlay), chosen at export: the primary "
                    "score's when it has a map, else the fused map's")
    scores: dict[str, ScoreInfo]
    max_batch_size: int
    evaluation: dict[str, Any]


class Health(BaseModel):
    status: str
    detail: str | None = None
