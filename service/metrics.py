"""Prometheus metrics. Each `Metrics` owns its own registry, so several apps can live in one process (tests).

With several worker processes (`OCT_WORKERS` > 1) the supervisor sets PROMETHEUS_MULTIPROC_DIR before it starts
them: `prometheus_client` then keeps every value in a per-process file there, and `render` aggregates all processes
(counters and histograms summed, the queue-depth gauge summed over live processes), so a scrape that reaches any
worker describes the whole service.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Latency buckets from 1 ms to 10 s: a GPU batch is milliseconds, a loaded CPU host can take seconds.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("oct_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.request_duration = Histogram("oct_request_duration_seconds", "Time from request start to response",
                                          ["route"], buckets=_SECONDS, registry=r)
        self.queue_wait = Histogram("oct_queue_wait_seconds", "Time a request waited for its batch to start",
                                    buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("oct_batch_size", "Images per inference batch", buckets=_BATCH, registry=r)
        self.inference = Histogram("oct_inference_seconds", "Wall time of one batch through the scorer",
                                   buckets=_SECONDS, registry=r)
        self.queue_depth = Gauge("oct_queue_depth", "Requests waiting for inference", registry=r,
                                 multiprocess_mode="livesum")
        self.anomalies = Counter("oct_anomalies", "Scored images over the primary threshold", registry=r)
        self.model_info = Gauge("oct_model_info", "The loaded model (value is always 1)",
                                ["name", "version", "device", "sha256"], registry=r, multiprocess_mode="livemax")
        self._gpu_allocated: Gauge | None = None
        self._gpu_reserved: Gauge | None = None

    def track_gpu(self) -> None:
        """Add the GPU memory gauges; called once when the scorer lives on CUDA."""
        if self._gpu_allocated is None:
            self._gpu_allocated = Gauge("oct_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated()",
                                        registry=self.registry, multiprocess_mode="livesum")
            self._gpu_reserved = Gauge("oct_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved()",
                                       registry=self.registry, multiprocess_mode="livesum")

    def render(self) -> bytes:
        if self._gpu_allocated is not None and self._gpu_reserved is not None:
            import torch

            self._gpu_allocated.set(torch.cuda.memory_allocated())
            self._gpu_reserved.set(torch.cuda.memory_reserved())
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return generate_latest(registry)
