"""Dynamic batching: concurrent requests share one forward pass.

One future per request, one consumer task per model (after Ray Serve's `batching.py`). A batch closes when it
holds `max_batch_size` items, when its oldest item has waited `max_delay_s`, or as soon as no other request is on
its way (`expecting`: being decoded and preprocessed): then waiting would only make the batch late, not larger. The
batch then runs in a worker thread so the event loop keeps accepting, decoding and encoding while the model
computes. Up to `max_inflight`
batches run at once (2 on a GPU: one batch's copies overlap the next one's compute), and while every slot is busy
the queue keeps filling, so the next batch is larger. The number of requests waiting for inference is bounded: past
`max_queue`, `submit` refuses at once instead of letting latency grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service.errors import Overloaded, ShuttingDown
from service.metrics import Metrics

log = logging.getLogger("oct.batcher")

T = TypeVar("T")


@dataclass(frozen=True)
class BatchTiming:
    queue_s: float  # submit → the batch started
    inference_s: float  # the batch's forward pass
    batch_size: int


@dataclass
class _Item:
    x: np.ndarray
    tag: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher(Generic[T]):
    """`run_batch(stacked (B, ...), tags) -> B results` runs on `executor`; `submit(x, tag)` awaits one result.

    A tag is whatever the batch function needs to know per item besides its array (the engine: whether, and at
    which crop box, the request wants heatmaps)."""

    def __init__(self, run_batch: Callable[[np.ndarray, list[Any]], Sequence[T]], executor: Executor, *,
                 max_batch_size: int, max_delay_s: float, max_queue: int, retry_after_s: int = 1,
                 metrics: Metrics | None = None, max_inflight: int = 1) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.max_inflight = max_inflight
        self._retry_after = str(retry_after_s)
        self._metrics = metrics
        self._items: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self._slots: asyncio.Semaphore | None = None
        self._closing = False
        self._task: asyncio.Task | None = None
        self._coming = 0  # requests on their way to `submit`

    @property
    def depth(self) -> int:
        return len(self._items)

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Held by a request on its way to `submit` (decoding, preprocessing): an open batch waits for it, up to its
        deadline. A batch waits for no one else: at low load a request does not sit out `max_delay_s` alone."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1
            self._arrived.set()  # an open batch looks again: it may close now

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="oct-batcher")

    async def submit(self, x: np.ndarray, tag: Any = None) -> tuple[T, BatchTiming]:
        if self._closing:
            raise ShuttingDown("not accepting new work", headers={"Retry-After": self._retry_after})
        if len(self._items) >= self.max_queue:
            raise Overloaded(f"{len(self._items)} requests already wait for inference (OCT_MAX_QUEUE)",
                             headers={"Retry-After": self._retry_after})
        item = _Item(x, tag, asyncio.get_running_loop().create_future())
        self._items.append(item)
        self._set_depth()
        self._arrived.set()
        return await item.future

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Refuse new work, finish everything queued and in flight, then stop the consumer."""
        self._closing = True
        self._arrived.set()  # a waiting batch closes now instead of at its deadline
        deadline = time.monotonic() + timeout_s
        while (self._items or self._inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in self._items:  # only left when the drain timed out
            if not item.future.done():
                item.future.set_exception(ShuttingDown("shut down before this request was scored"))
        self._items.clear()

    async def _loop(self) -> None:
        self._slots = asyncio.Semaphore(self.max_inflight)
        while True:
            try:
                await self._slots.acquire()  # a free slot first: while all are busy, the queue grows a bigger batch
                try:
                    batch = await self._next_batch()
                except BaseException:
                    self._slots.release()
                    raise
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._inflight.add(task)
                task.add_done_callback(self._finished)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one batch
                log.exception("batcher loop error")

    def _finished(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        if self._slots is not None:
            self._slots.release()

    async def _next_batch(self) -> list[_Item]:
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._items[0].enqueued + self.max_delay_s
        loop = asyncio.get_running_loop()
        while len(self._items) < self.max_batch_size and not self._closing and self._coming:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            # A timer that sets the event, not wait_for: no task per arrival on the per-request path.
            timer = loop.call_later(remaining, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()
        n = min(len(self._items), self.max_batch_size)
        batch = [self._items.popleft() for _ in range(n)]
        self._set_depth()
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        live = [it for it in batch if not it.future.done()]  # a client that gave up needs no inference
        if not live:
            return
        started = time.perf_counter()
        try:
            stacked = np.stack([it.x for it in live])
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, stacked,
                                                                       [it.tag for it in live])
            if len(results) != len(live):
                raise RuntimeError(f"scorer returned {len(results)} results for a batch of {len(live)}")
        except Exception as e:
            log.exception("batch of %d failed", len(live))
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        took = time.perf_counter() - started
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(live))
            self._metrics.inference.observe(took)
        for it, result in zip(live, results, strict=True):
            wait = started - it.enqueued
            if self._metrics is not None:
                self._metrics.queue_wait.observe(wait)
            if not it.future.done():
                it.future.set_result((result, BatchTiming(wait, took, len(live))))

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._items))
