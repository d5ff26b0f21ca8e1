"""FastAPI's OpenTelemetry bridge stays off (service/main.py): even with an SDK configured process-wide, serving a
request (answered, refused by validation, refused by the route) records no span and exports no log record, so
nothing unscrubbed leaves through it."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from opentelemetry import _logs, trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.main import create_app
from service.settings import Settings


def test_no_spans_or_log_records_reach_a_configured_sdk(fixture_model, scan_bytes: bytes) -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    records = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(records))
    trace.set_tracer_provider(tracer_provider)
    _logs.set_logger_provider(logger_provider)
    # No warm-up (16 batch sizes through the model in this process): ready as soon as the model is loaded.
    app = create_app(Settings(model_store=fixture_model.store, model_name=fixture_model.name, device="cpu",
                              warmup=False))
    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:  # without warm-up ready at once; with it, in the background
            time.sleep(0.05)
        assert client.get("/models", params={"x": "1"}).status_code == 200
        jpeg = {"Content-Type": "image/jpeg"}
        assert client.post("/score", params={"heatmaps": "maybe"}, content=scan_bytes, headers=jpeg).status_code == 422
        assert client.post("/score", content=b"not an image", headers=jpeg).status_code == 422
    tracer_provider.force_flush()
    logger_provider.force_flush()
    assert trace.get_tracer_provider() is tracer_provider  # the SDK was live, so FastAPI could have used it
    assert spans.get_finished_spans() == ()
    assert records.get_finished_logs() == ()
