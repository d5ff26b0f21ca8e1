"""The inference core: the one owner of the loaded model. Tensors in, tensors out.

`InferenceCore.load` resolves, verifies and loads the scorer synchronously and checks one forward pass (so
`python -m service` can refuse to start with a one-line reason); `start` then warms every batch size in the
background and flips `ready`. Everything else submits work through `infer(x, tag)`: one preprocessed input (S, S)
in, every score and — when `tag` is not None — what the device stage made of the maps out. The core knows nothing
about images, decisions or heatmaps: the pipeline hands it a `DeviceStage` (service.pipeline.render) that turns a
batch's maps into small tensors on the device, and a tag per image that says how.

The path of a batch (`_infer`, in an inference thread): one host→device copy from a pinned buffer, the scorer under
the configured autocast precision, then only the scores and the device stage's output come back to the host. On
CUDA each inference thread has its own stream, so with two batches in flight one batch's copies overlap the other's
compute. CPU work of a request (decoding, preprocessing, encoding) runs where `run_cpu`/`run_image` put it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from octcore.manifest import Manifest, ModelStoreError, load_scorer, resolve_version_dir
from service.errors import NotReady
from service.inference.batcher import Batcher, BatchTiming
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("oct.inference")

R = TypeVar("R")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Larger uploads (a 12 MP PNG, a DICOM frame over 1,000² in float) are decoded in a thread even with
# OCT_CPU_WORKERS=0: their tens of milliseconds would stall every other connection of the process.
INLINE_MAX_BYTES = 4 * 1024 * 1024

MapGroup = tuple[list[int], dict[str, torch.Tensor]]
DeviceStage = Callable[[dict[str, torch.Tensor], Sequence[Any]], list[MapGroup]]
"""Run on a batch's outputs on the device, in the inference thread: (the scorer's outputs, one tag or None per image)
→ groups of (the images' indices in the batch, {name: tensor (n, ...) of those images}). The core copies each group
to the host once; an image in no group gets no maps."""


@dataclass(frozen=True)
class Inferred:
    """One image's share of a batch: every score, and the device stage's tensors for it (on the host, numpy)."""

    scores: dict[str, float]
    maps: dict[str, np.ndarray] | None


def pick_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelStoreError("OCT_DEVICE=cuda but torch sees no CUDA device")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_model(settings: Settings) -> tuple[Manifest, Any, str, Path]:
    """(manifest, scorer, device, version dir) of the configured model. Raises ModelStoreError with a reason."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    version_dir = resolve_version_dir(settings.model_store, settings.model_name, settings.model_version)
    manifest, scorer = load_scorer(version_dir, device=device)
    return manifest, scorer, device, version_dir


class InferenceCore:
    def __init__(self, settings: Settings, metrics: Metrics, manifest: Manifest, scorer: Any, device: str,
                 stage: DeviceStage | None = None, warm_tag: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.manifest = manifest
        self.scorer = scorer
        self.device = device
        self.size = manifest.input.size
        self.score_names = list(manifest.scores)
        self._maps = {s.map for s in manifest.scores.values() if s.map}
        self._wanted = set(manifest.scores) | self._maps
        self._stage = stage
        self._warm_tag = warm_tag  # a tag the device stage accepts, so warm-up runs it too
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
        self.batcher: Batcher[Inferred] = Batcher(
            self._infer, self._infer_pool, max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0, max_queue=settings.max_queue,
            retry_after_s=settings.retry_after_s, metrics=metrics, max_inflight=inflight)
        self._warmup_task: asyncio.Task | None = None

    def check(self) -> None:
        """One forward pass of a blank input: the outputs the manifest names, at their shapes. Raises
        ModelStoreError with a reason."""
        with torch.inference_mode():
            out = self.scorer(torch.zeros((1, 1, self.size, self.size), device=self.device))
        missing = sorted(self._wanted - set(out))
        if missing:
            raise ModelStoreError(f"scorer output lacks {missing} named in the manifest")
        for k in sorted(self._maps):
            if tuple(out[k].shape) != (1, 1, self.size, self.size):
                raise ModelStoreError(f"scorer map {k!r} has shape {tuple(out[k].shape[1:])}, "
                                      f"expected (1, {self.size}, {self.size})")

    def announce(self, version_dir: Path) -> None:
        """Log and expose (oct_model_info) what is loaded where."""
        m, s = self.manifest, self.settings
        if s.precision == "bf16":
            log.warning("OCT_PRECISION=bf16 moves feature-distance and NLL scores by up to ~20 %% (2-4 standard "
                        "deviations of their normal spread); use fp16 or fp32 where decisions depend on them")
        log.info("loaded %s v%d from %s on %s%s", m.name, m.version, version_dir, self.device,
                 "" if self.cuda else " (no CUDA device)" if s.device == "auto" else "")
        self.metrics.model_info.labels(m.name, str(m.version), self.device, m.sha256[:12]).set(1)
        if self.cuda:
            self.metrics.track_gpu()

    def expecting(self) -> contextlib.AbstractContextManager[None]:
        """Hold while preparing an input that will go to `infer`: the open batch waits for it (the batcher)."""
        return self.batcher.expecting()

    async def infer(self, x: np.ndarray, tag: Any = None) -> tuple[Inferred, BatchTiming]:
        """Score one preprocessed input (S, S) float32 in the next batch; `tag` (not None) asks for its maps."""
        if not self.ready:
            raise NotReady(self.not_ready_reason, headers={"Retry-After": str(self.settings.retry_after_s)})
        return await self.batcher.submit(x, tag)

    def _infer(self, xs: np.ndarray, tags: list[Any]) -> list[Inferred]:
        """(B, S, S) preprocessed + a tag or None per image → B `Inferred`. Inference thread."""
        n = xs.shape[0]
        with torch.inference_mode(), self._on_own_stream():
            out = self._forward(self._to_device(xs))
            for k in self._wanted:
                if out[k].shape[0] != n:
                    raise RuntimeError(f"scorer output {k!r} has {out[k].shape[0]} rows for a batch of {n}")
            scores = self._to_host(torch.stack([out[k].reshape(n).float() for k in self.score_names]))  # (K, B)
            groups = []
            if self._stage is not None and any(t is not None for t in tags):
                with self._stage_threads():
                    groups = [(idx, {k: self._to_host(t) for k, t in maps.items()})
                              for idx, maps in self._stage(out, tags)]
            if self.cuda:
                torch.cuda.current_stream().synchronize()
        table = scores.numpy().T.tolist()  # (B, K) Python floats
        per_image: list[dict[str, np.ndarray] | None] = [None] * n
        for idx, maps in groups:
            for j, i in enumerate(idx):
                per_image[i] = {k: t[j].numpy() for k, t in maps.items()}
        return [Inferred(dict(zip(self.score_names, row, strict=True)), m)
                for row, m in zip(table, per_image, strict=True)]

    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._autocast_dtype is None:
            return self.scorer(batch)
        with torch.autocast("cuda" if self.cuda else "cpu", dtype=self._autocast_dtype):
            return self.scorer(batch)

    @contextlib.contextmanager
    def _stage_threads(self) -> Iterator[None]:
        """On the CPU the device stage runs on this thread alone: its tensors are a few maps, and split over the
        inference threads each of its many small ops woke and spun the others (a retina band's maps, through
        grid_sample: 18 ms of CPU a request more than on one thread, for no time saved)."""
        threads = torch.get_num_threads()
        if self.cuda or threads == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

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
        started = time.perf_counter()
        # On CUDA twice per size: TorchScript's profiling executor builds a shape's fused kernels on its second run.
        passes = 2 if self.cuda else 1
        for b in range(1, self.settings.max_batch_size + 1):
            for _ in range(passes):
                self._infer(x[:b], [self._warm_tag] + [None] * (b - 1))
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
