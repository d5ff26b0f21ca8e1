"""The batcher on its own: a real thread pool and a plain function standing in for the model's batch call."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.errors import Overloaded, ShuttingDown
from service.inference.batcher import Batcher
from service.metrics import Metrics


class Recorder:
    """Batch function: doubles each item, remembers batch sizes, optionally sleeps or fails."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.sleep_s = sleep_s
        self.fail_next = False
        self.short_next = False
        self.gate: threading.Event | None = None
        self.entered = threading.Event()  # set by the first call

    def __call__(self, xs: np.ndarray, tags: list | None = None) -> list[float]:
        self.sizes.append(len(xs))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.sleep_s)
        if self.fail_next:
            self.fail_next = False
            raise ValueError("boom")
        if self.short_next:
            self.short_next = False
            return [float(x.sum()) * 2 for x in xs[:-1]]
        return [float(x.sum()) * 2 for x in xs]


def make(fn: Recorder, **kw) -> tuple[Batcher, ThreadPoolExecutor, Metrics]:
    pool = ThreadPoolExecutor(max_workers=1)
    metrics = Metrics()
    opts = {"max_batch_size": 4, "max_delay_s": 0.05, "max_queue": 100, "metrics": metrics, **kw}
    return Batcher(fn, pool, **opts), pool, metrics


def item(v: float) -> np.ndarray:
    return np.full((2, 2), v / 4, np.float32)


def test_concurrent_requests_share_batches_and_get_their_own_results() -> None:
    async def main() -> None:
        fn = Recorder()
        b, pool, metrics = make(fn)
        b.start()
        results = await asyncio.gather(*(b.submit(item(i)) for i in range(10)))
        assert [r for r, _ in results] == [2.0 * i for i in range(10)]
        assert fn.sizes == [4, 4, 2]
        assert all(t.batch_size in (4, 2) for _, t in results)
        assert metrics.registry.get_sample_value("oct_batch_size_sum") == 10
        assert metrics.registry.get_sample_value("oct_batch_size_count") == 3
        await b.drain()
        pool.shutdown()

    asyncio.run(main())


async def settle() -> None:
    """Let every task that is ready run (the consumer included): loop turns, not time."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_an_open_batch_waits_for_a_request_on_its_way_and_a_lone_one_does_not_wait() -> None:
    async def main() -> None:
        fn = Recorder()
        b, pool, _ = make(fn, max_delay_s=3600.0, max_batch_size=64)  # an hour: the deadline closes nothing here
        b.start()
        with b.expecting():  # a second request is being decoded
            first = asyncio.ensure_future(b.submit(item(1)))
            await settle()
            assert b.depth == 1 and not first.done()  # held in the open batch, still queued
            second = asyncio.ensure_future(b.submit(item(2)))
        # wait_for only bounds a hang; nothing below depends on how long a batch took.
        both = await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert [r for r, _ in both] == [2.0, 4.0]
        assert fn.sizes == [2], "the batch closed before the request on its way arrived"
        # Alone, nothing on its way: its batch closes at once, not after the hour.
        result, timing = await asyncio.wait_for(b.submit(item(3)), 30)
        assert result == 6.0 and fn.sizes == [2, 1] and timing.batch_size == 1
        await b.drain()
        pool.shutdown()

    asyncio.run(main())


def test_a_request_on_its_way_holds_the_batch_no_longer_than_the_deadline() -> None:
    async def main() -> None:
        fn = Recorder()
        b, pool, _ = make(fn, max_delay_s=0.05, max_batch_size=64)
        b.start()
        with b.expecting():  # never arrives
            result, timing = await asyncio.wait_for(b.submit(item(1)), 30)
            assert result == 2.0 and fn.sizes == [1] and timing.queue_s >= 0.05
        await b.drain()
        pool.shutdown()

    asyncio.run(main())


def test_full_queue_refuses_at_once_with_retry_after() -> None:
    async def main() -> None:
        fn = Recorder()
        b, pool, metrics = make(fn, max_delay_s=0.3, max_batch_size=64, max_queue=3, retry_after_s=2)
        b.start()
        waiting = [asyncio.ensure_future(b.submit(item(i))) for i in range(3)]
        await asyncio.sleep(0)
        assert metrics.registry.get_sample_value("oct_queue_depth") == 3 and b.depth == 3
        with pytest.raises(Overloaded) as e:
            await b.submit(item(9))
        # At once: refused while the three are still queued, not after their batch freed the queue.
        assert fn.sizes == [] and not any(w.done() for w in waiting) and b.depth == 3
        assert e.value.headers["Retry-After"] == "2"
        assert [r for r, _ in await asyncio.gather(*waiting)] == [0.0, 2.0, 4.0]
        await b.drain()
        pool.shutdown()

    asyncio.run(main())


def test_a_failing_batch_fails_only_its_requests_and_the_loop_goes_on() -> None:
    async def main() -> None:
        fn = Recorder()
        b, pool, _ = make(fn)
        b.start()
        fn.fail_next = True
        with pytest.raises(ValueError, match="boom"):
            await b.submit(item(1))
        fn.short_next = True
        with pytest.raises(RuntimeError, match="results for a batch"):
            await b.submit(item(1))
        assert (await b.submit(item(5)))[0] == 10.0
        await b.drain()
        pool.shutdown()

    asyncio.run(main())


def test_a_client_that_gave_up_is_skipped() -> None:
    async def main() -> None:
        fn = Recorder()
        fn.gate = threading.Event()
        b, pool, _ = make(fn, max_batch_size=1, max_delay_s=0.0)
        b.start()
        first = asyncio.ensure_future(b.submit(item(1)))
        assert await asyncio.get_running_loop().run_in_executor(None, fn.entered.wait, 30)  # in the gated call
        gone = asyncio.ensure_future(b.submit(item(2)))
        kept = asyncio.ensure_future(b.submit(item(3)))
        await settle()
        assert b.depth == 2  # both queued behind the gated batch
        gone.cancel()
        fn.gate.set()
        assert (await first)[0] == 2.0 and (await kept)[0] == 6.0
        assert fn.sizes == [1, 1]  # the cancelled request never reached the model
        await b.drain()
        pool.shutdown()

    asyncio.run(main())


def test_drain_finishes_queued_work_then_refuses() -> None:
    async def main() -> None:
        fn = Recorder(sleep_s=0.05)
        # An hour's deadline, room for 64 and a sixth request on its way that never comes: only the drain can
        # close this batch of five.
        b, pool, _ = make(fn, max_delay_s=3600.0, max_batch_size=64)
        b.start()
        with b.expecting():
            queued = [asyncio.ensure_future(b.submit(item(i))) for i in range(5)]
            await settle()
            assert b.depth == 5 and not any(q.done() for q in queued)
            await b.drain(timeout_s=30)  # a drain that waited for the deadline would time out and fail the five
        assert [r for r, _ in await asyncio.gather(*queued)] == [0.0, 2.0, 4.0, 6.0, 8.0]
        assert fn.sizes == [5]
        with pytest.raises(ShuttingDown):
            await b.submit(item(1))
        pool.shutdown()

    asyncio.run(main())


def test_each_item_brings_its_tag_to_the_batch_function() -> None:
    seen: list[list] = []

    def fn(xs: np.ndarray, tags: list) -> list[float]:
        seen.append(list(tags))
        return [float(x.sum()) for x in xs]

    async def main() -> None:
        b, pool, _ = make(fn)
        b.start()
        await asyncio.gather(*(b.submit(item(i), tag=("box", i)) for i in range(4)))
        await b.drain()
        pool.shutdown()

    asyncio.run(main())
    assert seen == [[("box", i) for i in range(4)]]


@pytest.mark.parametrize("inflight", [1, 2])
def test_max_inflight_batches_run_at_once_and_the_queue_fills_meanwhile(inflight: int) -> None:
    """Overlap is shown by intervals, not by speed: with 2 in flight each batch waits at a barrier until another one
    runs too (one at a time would break it); with 1, the requests sent while the first batch is held form the next."""
    running, peak = 0, 0
    lock = threading.Lock()
    sizes: list[int] = []
    started, release = threading.Event(), threading.Event()
    together = threading.Barrier(inflight, timeout=30)

    def fn(xs: np.ndarray, tags: list) -> list[float]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            sizes.append(len(xs))
        started.set()
        together.wait()
        release.wait(30)
        with lock:
            running -= 1
        return [0.0] * len(xs)

    async def main() -> None:
        pool = ThreadPoolExecutor(max_workers=2)  # room for 2 either way: the batcher alone decides how many run
        b = Batcher(fn, pool, max_batch_size=1 if inflight == 2 else 64, max_delay_s=0.0, max_queue=100,
                    max_inflight=inflight)
        b.start()
        first = asyncio.ensure_future(b.submit(item(0)))
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)  # the first batch runs
        rest = [asyncio.ensure_future(b.submit(item(i))) for i in range(1, 6)]
        await asyncio.sleep(0.05)  # a chance for the batcher to start more batches than it may
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 30)
        await b.drain()
        pool.shutdown()

    asyncio.run(main())
    assert peak == inflight, sizes
    assert sizes == ([1, 5] if inflight == 1 else [1] * 6)
