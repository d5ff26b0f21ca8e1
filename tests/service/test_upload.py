"""Bounded memory: request bodies stream through a spooled file, and budgets of bytes and voxels in flight answer
503 + Retry-After instead of letting the process grow (service/upload.py, service/budget.py, BodyLimit)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
from starlette.requests import Request

from service.budget import Budget
from service.dicom.decode import decode_dicom
from service.errors import BadRequest, Busy
from service.middleware import BodyLimit
from service.settings import Settings
from service.upload import read_body

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pacs"))
from oct_dicom import oct_dataset, phantom_frames, to_bytes


def test_budget_refuses_past_the_limit_and_gives_back() -> None:
    b = Budget(100, "bytes", "OCT_X", retry_after_s=3)
    b.take(60)
    with pytest.raises(Busy) as e:
        b.take(41)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "3"} and "OCT_X" in e.value.detail
    b.take(40)
    b.give(100)
    assert b.in_use == 0 and b.peak == 100
    b.take(500)  # alone, a request larger than the budget still runs
    assert b.in_use == 500


def _receive_of(chunks: list[bytes]):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


def _scope(length: int | None) -> dict:
    headers = [(b"content-type", b"application/octet-stream")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": "/score", "headers": headers, "query_string": b"",
            "server": ("t", 80), "scheme": "http", "root_path": ""}


def test_body_limit_holds_bytes_while_a_request_runs_and_refuses_what_does_not_fit() -> None:
    budget = Budget(100, "bytes of request bodies", "OCT_MAX_INFLIGHT_BYTES")
    release = asyncio.Event()
    seen: list[int] = []

    async def app(scope: dict, receive, send) -> None:
        body = await read_body(Request(scope, receive), Settings(upload_spool_bytes=8))
        seen.append(len(body))
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limit = BodyLimit(app, max_bytes=1000, budget=budget)

    async def run() -> list[dict]:
        sent_a: list[dict] = []
        sent_b: list[dict] = []

        async def collect(into: list[dict]):
            async def send(m: dict) -> None:
                into.append(m)
            return send

        a = asyncio.create_task(limit(_scope(80), _receive_of([b"a" * 50, b"a" * 30]), await collect(sent_a)))
        while not seen:
            await asyncio.sleep(0)
        assert budget.in_use == 80
        await limit(_scope(50), _receive_of([b"b" * 50]), await collect(sent_b))  # does not fit: 503 at once
        release.set()
        await a
        return [sent_a[0], sent_b[0], json.loads(sent_b[1]["body"])]

    a_start, b_start, b_body = asyncio.run(run())
    assert seen == [80] and a_start["status"] == 200
    assert b_start["status"] == 503 and (b"retry-after", b"1") in b_start["headers"]
    assert b_body["type"].endswith(":busy") and "OCT_MAX_INFLIGHT_BYTES" in b_body["detail"]
    assert budget.in_use == 0  # everything given back


def test_chunked_body_is_counted_as_it_streams() -> None:
    budget = Budget(100, "bytes", "OCT_MAX_INFLIGHT_BYTES")
    budget.take(60)  # another request holds 60

    async def app(scope: dict, receive, send) -> None:
        await read_body(Request(scope, receive), Settings())

    with pytest.raises(Busy):
        asyncio.run(BodyLimit(app, max_bytes=1000, budget=budget)(_scope(None), _receive_of([b"x" * 30] * 3),
                                                                   None))  # type: ignore[arg-type]
    assert budget.in_use == 60


def test_read_body_spools_and_refuses_empty() -> None:
    data = bytes(range(256)) * 40
    chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    got = asyncio.run(read_body(Request(_scope(len(data)), _receive_of(chunks)), Settings(upload_spool_bytes=100)))
    assert got == data
    # One chunk, with the empty ones a server may add, is returned as it came: not copied through the spool.
    with patch("tempfile.SpooledTemporaryFile", side_effect=AssertionError("spooled one chunk")):
        got = asyncio.run(read_body(Request(_scope(len(data)), _receive_of([b"", data, b""])),
                                    Settings(upload_spool_bytes=100)))
    assert got == data
    got = asyncio.run(read_body(Request(_scope(len(data)), _receive_of([data[:5], b"", data[5:]])), Settings()))
    assert got == data
    with pytest.raises(BadRequest):
        asyncio.run(read_body(Request(_scope(0), _receive_of([b""])), Settings()))
    with pytest.raises(BadRequest):
        asyncio.run(read_body(Request(_scope(0), _receive_of([b"", b"", b""])), Settings()))


def test_decode_reserves_voxels_before_decoding_and_keeps_stored_samples() -> None:
    frames = phantom_frames(3, 32, 48)
    asked: list[int] = []
    image = decode_dicom(to_bytes(oct_dataset(frames)), reserve=asked.append)
    assert asked == [3 * 32 * 48]
    assert image.stored.dtype == frames.dtype and image.stored.nbytes == frames.nbytes  # not float32
    assert image.frame(1) == pytest.approx(frames[1] / 255.0)
    assert "PixelData" not in image.dataset

    def refuse(n: int) -> None:
        raise Busy("full")

    with pytest.raises(Busy):
        decode_dicom(to_bytes(oct_dataset(frames)), reserve=refuse)


def test_inflight_settings() -> None:
    s = Settings()
    assert s.max_inflight_bytes == 512 * 1024 * 1024 and s.max_inflight_voxels == 256 * 1024 * 1024
    assert s.dicom_max_voxels == 128 * 1024 * 1024 and s.upload_spool_bytes == 1024 * 1024
