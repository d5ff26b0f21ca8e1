"""The loaded model and everything around one scoring: preprocessing, the batcher, decisions and heatmaps.

`Engine.load` reads, verifies and checks the model synchronously (so `python -m service` can refuse to start with a
one-line reason); `start` then warms every batch size in the background and flips `ready`. Routes (and the DICOM
work) call `score_gray` with a decoded image.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from octcore.manifest import Manifest, ModelStoreError, load_scorer, resolve_version_dir
from octcore.preprocess import preprocess_gray
from service.batcher import Batcher
from service.errors import NotReady
from service.heatmaps import render_all as render_heatmaps
from service.metrics import Metrics
from service.preview import encode_preview
from service.schemas import HeatmapBox, ModelRef, ModelSummary, ScoreInfo, ScoreResult, TimingMs
from service.settings import Settings

log = logging.getLogger("oct.engine")

R = TypeVar("R")
Outputs = dict[str, np.ndarray]  # one image's scores (0-d) and maps (1, S, S)


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
        self.map_scales = {k: float(manifest.calibration[k].map_scale or 1.0) for k in self.score_maps}
        for k in self.score_maps:
            if not manifest.calibration[k].map_scale:
                log.warning("calibration[%r] has no map_scale: its heatmap uses map_scale 1.0", k)
        self._wanted = set(manifest.scores) | set(self.score_maps.values())
        self.ready = False
        self.not_ready_reason = "warming up"
        # One inference thread: the device runs one batch at a time and batching does the rest.
        self._infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oct-infer")
        self.cpu_pool = ThreadPoolExecutor(max_workers=settings.cpu_workers, thread_name_prefix="oct-cpu")
        self.batcher: Batcher[Outputs] = Batcher(
            self._infer, self._infer_pool, max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0, max_queue=settings.max_queue,
            retry_after_s=settings.retry_after_s, metrics=metrics)
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
        engine._check_outputs(engine._infer(np.zeros((1, engine.size, engine.size), np.float32)))
        log.info("loaded %s v%d from %s on %s%s", manifest.name, manifest.version, version_dir, device,
                 "" if device == "cuda" else " (no CUDA device)" if settings.device == "auto" else "")
        metrics.model_info.labels(manifest.name, str(manifest.version), device, manifest.sha256[:12]).set(1)
        if device == "cuda":
            metrics.track_gpu()
        return engine

    def _check_outputs(self, results: list[Outputs]) -> None:
        missing = sorted(self._wanted - set(results[0]))
        if missing:
            raise ModelStoreError(f"scorer output lacks {missing} named in the manifest")
        for k in self.score_maps.values():
            if results[0][k].shape != (1, self.size, self.size):
                raise ModelStoreError(f"scorer map {k!r} has shape {results[0][k].shape}, "
                                      f"expected (1, {self.size}, {self.size})")

    def _infer(self, xs: np.ndarray) -> list[Outputs]:
        """(B, S, S) preprocessed → B per-image output dicts. Runs in the inference thread."""
        with torch.inference_mode():
            batch = torch.from_numpy(xs).unsqueeze(1).to(self.device, non_blocking=True)
            out = self.scorer(batch)
            arrays = {k: v.detach().float().cpu().numpy() for k, v in out.items() if k in self._wanted}
        n = xs.shape[0]
        for k, v in arrays.items():
            if v.shape[0] != n:
                raise RuntimeError(f"scorer output {k!r} has {v.shape[0]} rows for a batch of {n}")
        return [{k: v[i] for k, v in arrays.items()} for i in range(n)]

    def _warm(self) -> None:
        x = np.zeros((self.settings.max_batch_size, self.size, self.size), np.float32)
        started = time.perf_counter()
        # On CUDA twice per size: TorchScript's profiling executor builds a shape's fused kernels on its second run.
        passes = 2 if self.device == "cuda" else 1
        for b in range(1, self.settings.max_batch_size + 1):
            for _ in range(passes):
                self._infer(x[:b])
        if self.device == "cuda":
            torch.cuda.synchronize()
        log.info("warmed batch sizes 1..%d in %.1f s", self.settings.max_batch_size, time.perf_counter() - started)

    async def start(self) -> None:
        """Start the batcher and warm up in the background; `ready` turns true when done."""
        self.batcher.start()
        if not self.settings.warmup:
            self.ready = True
            return
        self._warmup_task = asyncio.get_running_loop().create_task(self._warm_then_ready())

    async def _warm_then_ready(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._infer_pool, self._warm)
        except Exception as e:
            self.not_ready_reason = f"warm-up failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.error("never ready: %s", self.not_ready_reason)
            return
        self.ready = True

    async def stop(self) -> None:
        """Graceful: refuse new work, finish queued and in-flight batches, release the threads."""
        self.ready = False
        self.not_ready_reason = "shutting down"
        if self._warmup_task is not None and not self._warmup_task.done():
            self._warmup_task.cancel()
        await self.batcher.drain()
        self._infer_pool.shutdown(wait=True)
        self.cpu_pool.shutdown(wait=True)

    async def run_cpu(self, fn: Callable[..., R], *args: Any) -> R:
        """Run CPU work (decoding, preprocessing, PNG encoding) off the event loop, in parallel with inference."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, functools.partial(fn, *args))

    async def score_gray(self, gray: np.ndarray, *, heatmaps: bool, preview: bool = False,
                         request_id: str | None = None, started: float | None = None) -> ScoreResult:
        """Score one decoded image, float32 (H, W) in [0, 1]. `started` (perf_counter) counts decode time too."""
        started = time.perf_counter() if started is None else started
        if not self.ready:
            raise NotReady(self.not_ready_reason, headers={"Retry-After": str(self.settings.retry_after_s)})
        x, box = await self.run_cpu(preprocess_gray, gray, self.cfg)
        out, timing = await self.batcher.submit(x)
        scores = {k: float(out[k]) for k in self.manifest.scores}
        score = scores[self.primary]
        over = score > self.calibration.threshold if self.higher_is_anomalous else score < self.calibration.threshold
        if over:
            self.metrics.anomalies.inc()
        maps = None
        if heatmaps:
            maps = await self.run_cpu(render_heatmaps, {k: out[m] for k, m in self.score_maps.items()},
                                      self.map_scales, box)
        image = await self.run_cpu(encode_preview, gray) if preview else None
        return ScoreResult(
            request_id=request_id or uuid.uuid4().hex,
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
            torch_version=m.torch_version, created=m.created, input_size=m.input.size, preprocessing=m.preprocessing,
            maps=m.maps, primary_score=m.primary_score, max_batch_size=self.settings.max_batch_size,
            evaluation=m.evaluation,
            scores={k: ScoreInfo(description=s.description, map=s.map, higher_is_anomalous=s.higher_is_anomalous,
                                 threshold=m.calibration[k].threshold,
                                 threshold_percentile=m.calibration[k].threshold_percentile,
                                 map_scale=m.calibration[k].map_scale) for k, s in m.scores.items()})

