"""The batcher on its own: a real thread pool and a plain function standing in for the model's batch call."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import Overloaded, ShuttingDown
from service.metrics import Metrics


class Recorder:
    """Batch function: doubles each item, remembers batch sizes, optionally sleeps or fails."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.sleep_s = sleep_s
        self.fail_next = False
        self.short_next = False
        self.gate: threading.Event | None = None

    def __call__(self, xs: np.ndarray, tags: list | None = None) -> list[float]:
        self.sizes.append(len(xs))
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
        assert metrics.batch_size._sum.get() == 10
        await b.drain()
        pool.shutdown()

    asyncio.run(main())


def test_a_lone_request_waits_at_most_the_delay() -> None:
    async def main() -> None:
        fn = Recorder()
        b, pool, _ = make(fn, max_delay_s=0.2, max_batch_size=64)
        b.start()
        t0 = time.perf_counter()
        result, timing = await b.submit(item(3))
        took = time.perf_counter() - t0
        assert result == 6.0 and fn.sizes == [1]
        assert timing.queue_s >= 0.15 and took < 2.0  # closed by the deadline, not by size
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
        assert metrics.queue_depth._value.get() == 3
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as e:
            await b.submit(item(9))
        assert time.perf_counter() - t0 < 0.05
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
        await asyncio.sleep(0.05)  # the first batch is now inside the (gated) model call
        gone = asyncio.ensure_future(b.submit(item(2)))
        kept = asyncio.ensure_future(b.submit(item(3)))
        await asyncio.sleep(0.01)
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
        b, pool, _ = make(fn, max_delay_s=5.0, max_batch_size=64)
        b.start()
        queued = [asyncio.ensure_future(b.submit(item(i))) for i in range(5)]
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await b.drain()
        assert time.perf_counter() - t0 < 2.0  # drain closes the batch now, not at its 5 s deadline
        assert [r for r, _ in await asyncio.gather(*queued)] == [0.0, 2.0, 4.0, 6.0, 8.0]
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
    running, peak = 0, 0
    lock = threading.Lock()
    sizes: list[int] = []

    def fn(xs: np.ndarray, tags: list) -> list[float]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            sizes.append(len(xs))
        time.sleep(0.1)
        with lock:
            running -= 1
        return [0.0] * len(xs)

    async def main() -> None:
        pool = ThreadPoolExecutor(max_workers=2)
        b = Batcher(fn, pool, max_batch_size=1 if inflight == 2 else 64, max_delay_s=0.0, max_queue=100,
                    max_inflight=inflight)
        b.start()
        await asyncio.gather(*(b.submit(item(i)) for i in range(6)))
        await b.drain()
        pool.shutdown()

    asyncio.run(main())
    assert peak == inflight, sizes
    assert sum(sizes) == 6
