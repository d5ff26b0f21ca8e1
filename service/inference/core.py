"""The loaded model and everything around one scoring: preprocessing, the batcher, decisions and heatmaps.

`Engine.load` reads, verifies and checks the model synchronously (so `python -m service` can refuse to start with a
one-line reason); `start` then warms every batch size in the background and flips `ready`. Routes call
`score_upload` with the upload's bytes (decoded and preprocessed in one trip to a CPU thread), the DICOM work calls
`score_gray` with a decoded frame. This file owns the loaded model; everything else only submits work to it.

The inference path (`_infer`, in the inference threads): one host→device copy per batch from a pinned buffer, the
scorer under the configured autocast precision, then only scores and — for the requests that asked — uint8 heatmaps
come back to the host. On CUDA each inference thread has its own stream, so with two batches in flight one batch's
copies overlap the other's compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from octcore.manifest import Manifest, ModelStoreError, load_scorer, resolve_version_dir
from octcore.preprocess import preprocess_gray
from service.batcher import Batcher
from service.errors import NotReady
from service.heatmaps import HeatmapFormat, encode_all, heatmap_size, to_u8
from service.imaging import Decoder, Limits
from service.metrics import Metrics
from service.preview import encode_preview
from service.request_ids import new_request_id
from service.schemas import HeatmapBox, ModelRef, ModelSummary, ScoreInfo, ScoreResult, TimingMs
from service.settings import Settings

log = logging.getLogger("oct.engine")

R = TypeVar("R")
Box = tuple[int, int, int, int]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Larger uploads (a 12 MP PNG, a DICOM frame over 1,000² in float) are decoded in a thread even with
# OCT_CPU_WORKERS=0: their tens of milliseconds would stall every other connection of the process.
INLINE_MAX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Outputs:
    """One image's result from a batch: every score, and uint8 heatmaps when its request asked for them."""

    scores: dict[str, float]
    maps: dict[str, np.ndarray] | None  # score name → uint8 (h, w) at the crop box's aspect ratio


def pick_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelStoreError("OCT_DEVICE=cuda but torch sees no CUDA device")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics, manifest: Manifest, scorer: Any, device: str) -> None:
        self.settings = settings
        self.metrics = metrics
        self.manifest = manifest
        self.scorer = scorer
        self.device = device
        self.cfg = manifest.preprocessing_config()
        self.size = manifest.input.size
        self.primary = manifest.primary_score
        self.calibration = manifest.calibration[self.primary]
        self.higher_is_anomalous = manifest.scores[self.primary].higher_is_anomalous
        # score name → the output holding its map; driven by the manifest so new scores need no service change.
        self.score_maps = {k: s.map for k, s in manifest.scores.items() if s.map}
        self.overlay = manifest.overlay()
        self.map_scales = {k: float(manifest.calibration[k].map_scale or 1.0) for k in self.score_maps}
        for k in self.score_maps:
            if not manifest.calibration[k].map_scale:
                log.warning("calibration[%r] has no map_scale: its heatmap uses map_scale 1.0", k)
        self._wanted = set(manifest.scores) | set(self.score_maps.values())
        self.score_names = list(manifest.scores)
        self.ready = False
        self.not_ready_reason = "warming up"
        self.on_ready: Callable[[], None] | None = None  # called once, when `ready` turns true
        self.cuda = device.startswith("cuda")
        self._autocast_dtype = _DTYPES.get(settings.precision)
        # On CPU one batch at a time (inference already uses every thread torch has); on CUDA two, each on its own
        # stream, so the copies of one overlap the compute of the other.
        inflight = settings.inflight_batches or (2 if self.cuda else 1)
        # Each thread's torch count is set once, when it starts, and never changed per request: the inference threads
        # take the count as it is now (OCT_TORCH_THREADS, else torch's default); the CPU threads, which decode and
        # preprocess, take 1 (a resize is a few passes over memory: more CPU split over a pool than on one thread), as
        # the event loop does in a serving process (service.processes.serve_one). Without that, a thread's count
        # is fixed at its first torch op from whatever another thread last set.
        self._infer_pool = ThreadPoolExecutor(max_workers=inflight, thread_name_prefix="oct-infer",
                                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        self._local = threading.local()  # per inference thread: CUDA stream and pinned staging buffer
        self.cpu_pool = ThreadPoolExecutor(max_workers=max(1, settings.cpu_workers), thread_name_prefix="oct-cpu",
                                           initializer=torch.set_num_threads, initargs=(1,))
        self._inline = settings.cpu_workers == 0
        self.batcher: Batcher[Outputs] = Batcher(
            self._infer, self._infer_pool, max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0, max_queue=settings.max_queue,
            retry_after_s=settings.retry_after_s, metrics=metrics, max_inflight=inflight)
        self._warmup_task: asyncio.Task | None = None

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> Engine:
        """Resolve, verify and load the model, then check one forward pass. Raises ModelStoreError with a reason."""
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = pick_device(settings.device)
        version_dir = resolve_version_dir(settings.model_store, settings.model_name, settings.model_version)
        manifest, scorer = load_scorer(version_dir, device=device)
        engine = cls(settings, metrics, manifest, scorer, device)
        with torch.inference_mode():
            engine._check_outputs(scorer(torch.zeros((1, 1, engine.size, engine.size), device=device)))
        if settings.precision == "bf16":
            log.warning("OCT_PRECISION=bf16 moves feature-distance and NLL scores by up to ~20 %% (2-4 standard "
                        "deviations of their normal spread); use fp16 or fp32 where decisions depend on them")
        log.info("loaded %s v%d from %s on %s%s", manifest.name, manifest.version, version_dir, device,
                 "" if device == "cuda" else " (no CUDA device)" if settings.device == "auto" else "")
        metrics.model_info.labels(manifest.name, str(manifest.version), device, manifest.sha256[:12]).set(1)
        if device == "cuda":
            metrics.track_gpu()
        return engine

    def _check_outputs(self, out: dict[str, torch.Tensor]) -> None:
        missing = sorted(self._wanted - set(out))
        if missing:
            raise ModelStoreError(f"scorer output lacks {missing} named in the manifest")
        for k in self.score_maps.values():
            if tuple(out[k].shape) != (1, 1, self.size, self.size):
                raise ModelStoreError(f"scorer map {k!r} has shape {tuple(out[k].shape[1:])}, "
                                      f"expected (1, {self.size}, {self.size})")

    def _infer(self, xs: np.ndarray, boxes: list[Box | None]) -> list[Outputs]:
        """(B, S, S) preprocessed + per image the crop box when it wants heatmaps → B `Outputs`. Inference thread."""
        n = xs.shape[0]
        with torch.inference_mode(), self._on_own_stream():
            out = self._forward(self._to_device(xs))
            for k in self._wanted:
                if out[k].shape[0] != n:
                    raise RuntimeError(f"scorer output {k!r} has {out[k].shape[0]} rows for a batch of {n}")
            scores = self._to_host(torch.stack([out[k].reshape(n).float() for k in self.score_names]))  # (K, B)
            heat = self._heatmaps(out, boxes)
            if self.cuda:
                torch.cuda.current_stream().synchronize()
        table = scores.numpy().T.tolist()  # (B, K) Python floats
        maps: list[dict[str, np.ndarray] | None] = [None] * n
        for per_score, idx in heat:  # one uint8 (n_group, h, w) on the host per score
            for j, i in enumerate(idx):
                maps[i] = {k: u8[j].numpy() for k, u8 in zip(self.score_maps, per_score, strict=True)}
        return [Outputs(dict(zip(self.score_names, row, strict=True)), m) for row, m in zip(table, maps, strict=True)]

    def _heatmaps(self, out: dict[str, torch.Tensor],
                  boxes: list[Box | None]) -> list[tuple[list[torch.Tensor], list[int]]]:
        """uint8 heatmaps of the images that asked, on their way to the host: images whose crop boxes give the same
        heatmap size are resized and scaled together, one score's map at a time. Stacking the scores first cost ~40 %
        more CPU (a copy of every map, and every pass over a tensor K times larger)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, box in enumerate(boxes):
            if box is not None:
                groups.setdefault(heatmap_size(box, self.size), []).append(i)
        result: list[tuple[list[torch.Tensor], list[int]]] = []
        if not groups:
            return result
        for idx in groups.values():
            rows = None if len(idx) == len(boxes) else torch.tensor(idx, device=self.device)  # usually all
            per_score = []
            for k, name in self.score_maps.items():
                m = out[name][:, 0]
                per_score.append(self._to_host(to_u8(m if rows is None else m.index_select(0, rows),
                                                     self.map_scales[k], boxes[idx[0]])))  # type: ignore[arg-type]
            result.append((per_score, idx))
        return result

    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._autocast_dtype is None:
            return self.scorer(batch)
        with torch.autocast("cuda" if self.cuda else "cpu", dtype=self._autocast_dtype):
            return self.scorer(batch)

    @contextlib.contextmanager
    def _on_own_stream(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        if getattr(self._local, "stream", None) is None:
            self._local.stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._local.stream):
            yield

    def _to_device(self, xs: np.ndarray) -> torch.Tensor:
        """(B, S, S) → (B, 1, S, S) on the device. On CUDA through this thread's pinned buffer, so the copy is
        asynchronous (`non_blocking` from pageable memory is a synchronous copy)."""
        x = torch.from_numpy(xs).unsqueeze(1)
        if not self.cuda:
            return x
        staging = getattr(self._local, "staging", None)
        if staging is None or staging.shape[0] < x.shape[0]:
            staging = self._local.staging = torch.empty((self.settings.max_batch_size, *x.shape[1:]),
                                                        dtype=x.dtype, pin_memory=True)
        staging[: x.shape[0]].copy_(x)
        return staging[: x.shape[0]].to(self.device, non_blocking=True)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        # From CUDA, a non-blocking copy lands in pinned memory; the caller synchronises the stream once.
        return t.to("cpu", non_blocking=True) if self.cuda else t

    def _warm(self) -> None:
        x = np.zeros((self.settings.max_batch_size, self.size, self.size), np.float32)
        full: Box = (0, 0, self.size, self.size)
        started = time.perf_counter()
        # On CUDA twice per size: TorchScript's profiling executor builds a shape's fused kernels on its second run.
        passes = 2 if self.cuda else 1
        for b in range(1, self.settings.max_batch_size + 1):
            for _ in range(passes):
                self._infer(x[:b], [full] + [None] * (b - 1))
        if self.cuda:
            torch.cuda.synchronize()
        log.info("warmed batch sizes 1..%d in %.1f s", self.settings.max_batch_size, time.perf_counter() - started)

    async def start(self) -> None:
        """Start the batcher and warm up in the background; `ready` turns true when done."""
        self.batcher.start()
        if not self.settings.warmup:
            self._set_ready()
            return
        self._warmup_task = asyncio.get_running_loop().create_task(self._warm_then_ready())

    async def _warm_then_ready(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._infer_pool, self._warm)
        except Exception as e:
            self.not_ready_reason = f"warm-up failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.error("never ready: %s", self.not_ready_reason)
            return
        self._set_ready()

    def _set_ready(self) -> None:
        self.ready = True
        if self.on_ready is not None:
            self.on_ready()

    async def stop(self) -> None:
        """Graceful: refuse new work, finish queued and in-flight batches, release the threads."""
        self.ready = False
        self.not_ready_reason = "shutting down"
        if self._warmup_task is not None and not self._warmup_task.done():
            self._warmup_task.cancel()
        await self.batcher.drain(self.settings.drain_timeout_s)
        self._infer_pool.shutdown(wait=True)
        self.cpu_pool.shutdown(wait=True)

    async def run_cpu(self, fn: Callable[..., R], *args: Any) -> R:
        """Run CPU work (DICOM decoding, building result objects) off the event loop, in parallel with inference."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, functools.partial(fn, *args))

    async def run_image(self, fn: Callable[..., R], *args: Any, nbytes: int) -> R:
        """One B-scan's CPU work (`nbytes`: its upload or pixel size): on the event loop with OCT_CPU_WORKERS=0
        when it is small (a few ms at most), else in the thread pool."""
        if self._inline and nbytes <= INLINE_MAX_BYTES:
            return fn(*args)
        return await self.run_cpu(fn, *args)

    def _prepare(self, gray: np.ndarray, preview: bool) -> tuple[np.ndarray, Box, str | None]:
        """Model input, crop box and (when asked) the preview PNG of one decoded image."""
        x, geometry = preprocess_gray(gray, self.cfg)
        return x, geometry.box, encode_preview(gray) if preview else None

    def _decode_and_prepare(self, data: bytes, decoder: Decoder, limits: Limits,
                            preview: bool) -> tuple[np.ndarray, Box, str | None]:
        return self._prepare(decoder(data, limits), preview)

    async def score_upload(self, data: bytes, decoder: Decoder, limits: Limits, *, heatmaps: bool,
                           heatmap_format: HeatmapFormat = "png", preview: bool = False,
                           request_id: str | None = None, started: float | None = None) -> ScoreResult:
        """Score an uploaded image file: decoding and preprocessing in one trip to a CPU thread."""
        started = time.perf_counter() if started is None else started
        self._check_ready()
        x, box, image = await self.run_image(self._decode_and_prepare, data, decoder, limits, preview,
                                             nbytes=len(data))
        return await self._score(x, box, image, heatmaps, heatmap_format, request_id, started)

    async def score_gray(self, gray: np.ndarray, *, heatmaps: bool, heatmap_format: HeatmapFormat = "png",
                         preview: bool = False, request_id: str | None = None,
                         started: float | None = None) -> ScoreResult:
        """Score one decoded image, (H, W) float [0, 1] or uint8. `started` (perf_counter) counts decode time too."""
        started = time.perf_counter() if started is None else started
        self._check_ready()
        x, box, image = await self.run_image(self._prepare, gray, preview, nbytes=gray.nbytes)
        return await self._score(x, box, image, heatmaps, heatmap_format, request_id, started)

    def _check_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.not_ready_reason, headers={"Retry-After": str(self.settings.retry_after_s)})

    async def _score(self, x: np.ndarray, box: Box, image: str | None, heatmaps: bool, heatmap_format: HeatmapFormat,
                     request_id: str | None, started: float) -> ScoreResult:
        out, timing = await self.batcher.submit(x, box if heatmaps else None)
        scores = out.scores
        score = scores[self.primary]
        over = score > self.calibration.threshold if self.higher_is_anomalous else score < self.calibration.threshold
        if over:
            self.metrics.anomalies.inc()
        maps = None
        if heatmaps and out.maps:
            maps = await self.run_image(encode_all, out.maps, heatmap_format,
                                        nbytes=sum(m.nbytes for m in out.maps.values()))
        return ScoreResult(
            request_id=request_id or new_request_id(),
            model=ModelRef(name=self.manifest.name, version=self.manifest.version),
            score=score, scores=scores, threshold=self.calibration.threshold, is_anomalous=bool(over),
            percentile=self.calibration.percentile_of(score), heatmaps=maps,
            heatmap_box=HeatmapBox(x0=box[0], y0=box[1], x1=box[2], y1=box[3]), preview=image,
            timing_ms=TimingMs(queue=timing.queue_s * 1e3, inference=timing.inference_s * 1e3,
                               total=(time.perf_counter() - started) * 1e3))

    def summary(self) -> ModelSummary:
        m = self.manifest
        return ModelSummary(
            name=m.name, version=m.version, device=self.device, format=m.format, sha256=m.sha256,
            torch_version=m.torch_version, created=m.created, input_size=m.input.size,
            preprocessing=m.preprocessing.to_dict(),
            maps=m.maps, primary_score=m.primary_score, overlay_score=self.overlay,
            max_batch_size=self.settings.max_batch_size,
            evaluation=m.evaluation,
            scores={k: ScoreInfo(description=s.description, map=s.map, higher_is_anomalous=s.higher_is_anomalous,
                                 threshold=m.calibration[k].threshold,
                                 threshold_percentile=m.calibration[k].threshold_percentile,
                                 map_scale=m.calibration[k].map_scale) for k, s in m.scores.items()})

