"""Prometheus metrics: each app its own registry; concurrent requests visibly form batches larger than one."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from service.metrics import Metrics


def value(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.requests.labels("/score", "200").inc()
    assert 'oct_requests_total{route="/score",status="200"} 1.0' in a.render().decode()
    assert "oct_requests_total{" not in b.render().decode()


async def burst(url: str, data: bytes, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        rs = await asyncio.gather(*(c.post("/score", params={"heatmaps": "false"}, files={"file": ("a.jpeg", data)})
                                    for _ in range(n)))
    return [r.status_code for r in rs]


@pytest.mark.slow
def test_concurrent_requests_form_batches(start_service, scan_bytes: bytes) -> None:
    # Warm-up runs the model outside the batcher (no metric moves), so it is skipped: ready at once.
    svc = start_service(OCT_MAX_BATCH_DELAY_MS="100", OCT_MAX_BATCH_SIZE="8", OCT_WARMUP="false")
    assert asyncio.run(burst(svc.url, scan_bytes, 24)) == [200] * 24
    text = httpx.get(f"{svc.url}/metrics").text
    batches = value(text, "oct_batch_size_count")
    assert value(text, "oct_batch_size_sum") == 24
    assert 24 / batches > 1.5, f"{batches:.0f} batches for 24 concurrent requests"
    assert value(text, "oct_requests_total", '{route="/score",status="200"}') == 24
    assert value(text, "oct_request_duration_seconds_count", '{route="/score"}') == 24
    assert value(text, "oct_queue_wait_seconds_count") == 24
    assert value(text, "oct_inference_seconds_count") == batches
    assert value(text, "oct_queue_depth") == 0
    assert "oct_anomalies_total" in text
    assert re.search(r'^oct_model_info\{.*device="cpu".*\} 1\.0$', text, re.M)
