"""One pipeline for every upload, REST or DICOM: decode → preprocess → infer → decide → render.

    score_upload(bytes, decoder)  ─┐
    score_image(gray)             ─┼─ preprocess (octcore.preprocess, the manifest's parameters)
    score_volume(frames)          ─┘     → InferenceCore.infer (batched with other requests; maps rendered on the
                                            device by HeatmapRenderer when asked)
                                         → Decider.decide (one rule for a B-scan and a volume)
                                         → ImageResult / VolumeResult (arrays: uint8 heatmaps, the decoded scan)

Decoding and preprocessing run where the core puts CPU work (the event loop for a small B-scan with
OCT_CPU_WORKERS=0, else a thread). A model whose input is the retina band (`region: retina`) refuses an image that
holds no retina: a B-scan answers `NoRetina` (422), a frame of a volume is left out of the volume's decision with the
reason, and a volume with no such frame answers `NoRetina`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from octcore.manifest import Manifest
from octcore.preprocess import Geometry, NoRetinaError, Preprocessing, preprocess_gray
from service.errors import NoRetina, NotReady
from service.inference.core import InferenceCore, load_model
from service.metrics import Metrics
from service.pipeline.decide import Decider
from service.pipeline.decode import Decoder, Limits
from service.pipeline.render import HeatmapRenderer
from service.pipeline.results import FrameResult, ImageResult, ModelId, Timing, VolumeResult
from service.settings import Settings

R = TypeVar("R")


class Frames(Protocol):
    """A decoded volume (service.dicom.decode.DicomImage): its frames one at a time, gray (H, W) in [0, 1]."""

    @property
    def number_of_frames(self) -> int: ...

    def frame(self, index: int) -> np.ndarray: ...


class ScoringPipeline(Protocol):
    """What the DICOM code scores through (`Pipeline`)."""

    settings: Settings
    model: ModelId
    overlay: str | None

    async def run_cpu(self, fn: Callable[..., R], *args: Any) -> R: ...

    async def run_image(self, fn: Callable[..., R], *args: Any, nbytes: int) -> R: ...

    async def score_image(self, gray: np.ndarray, *, maps: bool, preview: bool = False) -> ImageResult: ...

    async def score_volume(self, frames: Frames, *, maps: bool, preview: bool = False) -> VolumeResult: ...


@dataclass(frozen=True)
class Prepared:
    x: np.ndarray  # the model's input (S, S) float32
    geometry: Geometry  # where it came from
    gray: np.ndarray | None  # the decoded image, kept when a preview was asked


class Pipeline:
    def __init__(self, core: InferenceCore, renderer: HeatmapRenderer) -> None:
        self.core = core
        self.renderer = renderer
        self.settings = core.settings
        self.manifest: Manifest = core.manifest
        self.model = ModelId(self.manifest.name, self.manifest.version)
        self.cfg: Preprocessing = self.manifest.preprocessing_config()
        self.primary = self.manifest.primary_score
        self.overlay = self.manifest.overlay()
        self.decider = Decider.for_model(self.manifest)
        self._anomalies = core.metrics.anomalies
        # Finding the retina costs about 11 ms of CPU a 512-wide B-scan: never on the event loop, where it would hold
        # up every other connection of the process; the whole scan's resize (a few ms) may run there
        # (OCT_CPU_WORKERS=0).
        self._prepare_inline = self.cfg.region == "scan"

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> Pipeline:
        """Load and check the model (ModelStoreError with a one-line reason), wired to this pipeline's renderer."""
        manifest, scorer, device, version_dir = load_model(settings)
        renderer = HeatmapRenderer(manifest, device)
        core = InferenceCore(settings, metrics, manifest, scorer, device, stage=renderer, warm_tag=renderer.warm_tag())
        core.check()
        core.announce(version_dir)
        return cls(core, renderer)

    @property
    def ready(self) -> bool:
        return self.core.ready

    @property
    def not_ready_reason(self) -> str:
        return self.core.not_ready_reason

    def check_ready(self) -> None:
        if not self.core.ready:
            raise NotReady(self.core.not_ready_reason, headers={"Retry-After": str(self.settings.retry_after_s)})

    async def run_cpu(self, fn: Callable[..., R], *args: Any) -> R:
        return await self.core.run_cpu(fn, *args)

    async def run_image(self, fn: Callable[..., R], *args: Any, nbytes: int) -> R:
        return await self.core.run_image(fn, *args, nbytes=nbytes)

    # --- decode, preprocess ---

    def _prepare(self, gray: np.ndarray, preview: bool) -> Prepared:
        """The model's input from a decoded image. NoRetinaError for a retina-band model and no retina."""
        x, geometry = preprocess_gray(gray, self.cfg)
        return Prepared(x, geometry, gray if preview else None)

    def _decode_and_prepare(self, data: bytes, decoder: Decoder, limits: Limits, preview: bool) -> Prepared:
        return self._prepare(decoder(data, limits), preview)

    async def _run_prepare(self, fn: Callable[..., Prepared], *args: Any, nbytes: int) -> Prepared:
        """Run `fn` where CPU work runs, as a request the open batch waits for."""
        with self.core.expecting():
            if self._prepare_inline:
                return await self.core.run_image(fn, *args, nbytes=nbytes)
            return await self.core.run_cpu(fn, *args)

    # --- infer, decide, render ---

    async def _score(self, p: Prepared, maps: bool) -> ImageResult:
        inferred, timing = await self.core.infer(p.x, p.geometry if maps else None)
        decision = self.decider.decide([inferred.scores[self.primary]])
        if decision.is_anomalous:
            self._anomalies.inc()
        return ImageResult(scores=inferred.scores, decision=decision, box=p.geometry.box,
                           maps=inferred.maps if maps else None, gray=p.gray,
                           timing=Timing(timing.queue_s, timing.inference_s))

    async def score_upload(self, data: bytes, decoder: Decoder, limits: Limits, *, maps: bool,
                           preview: bool = False) -> ImageResult:
        """An uploaded image file: decoding and preprocessing in one trip to where CPU work runs."""
        self.check_ready()
        try:
            p = await self._run_prepare(self._decode_and_prepare, data, decoder, limits, preview, nbytes=len(data))
        except NoRetinaError as e:
            raise NoRetina(str(e)) from e
        return await self._score(p, maps)

    async def score_image(self, gray: np.ndarray, *, maps: bool, preview: bool = False) -> ImageResult:
        """One decoded image, (H, W) float [0, 1] or uint8."""
        self.check_ready()
        try:
            p = await self._run_prepare(self._prepare, gray, preview, nbytes=gray.nbytes)
        except NoRetinaError as e:
            raise NoRetina(str(e)) from e
        return await self._score(p, maps)

    async def score_volume(self, frames: Frames, *, maps: bool, preview: bool = False) -> VolumeResult:
        """Every frame through the batcher; the decision on the frames that hold what the model reads."""
        self.check_ready()
        # Keep about two batches in flight: the batcher always has a full next batch, and a long volume cannot fill
        # the bounded queue by itself and push other clients into 503s.
        gate = asyncio.Semaphore(2 * self.settings.max_batch_size)

        async def one(i: int) -> FrameResult:
            async with gate:
                gray = frames.frame(i)
                try:
                    p = await self._run_prepare(self._prepare, gray, preview, nbytes=gray.nbytes)
                except NoRetinaError as e:
                    return FrameResult(i, None, refused=f"no retina: {e}", gray=gray if preview else None)
                return FrameResult(i, await self._score(p, maps))

        results = list(await asyncio.gather(*(one(i) for i in range(frames.number_of_frames))))
        scored = [f for f in results if f.image is not None]
        if not scored:
            raise NoRetina(f"none of the {len(results)} frames holds a retina (frame 1: {results[0].refused})")
        decision = self.decider.decide([f.image.decision.score for f in scored])  # type: ignore[union-attr]
        decision = dataclasses.replace(decision, max_frame=scored[decision.max_frame].index)
        return VolumeResult(frames=results, decision=decision, model=self.model)

    async def start(self) -> None:
        await self.core.start()

    async def stop(self) -> None:
        await self.core.stop()
