"""Coalesced response writes: one socket write per event-loop step, nothing lost on close, big writes not held."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from service.transport import FLUSH_BYTES, CoalescingTransport


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 8000) if name == "sockname" else default


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def coalescing(loop: asyncio.AbstractEventLoop) -> tuple[Recorder, CoalescingTransport]:
    raw = Recorder()
    return raw, CoalescingTransport(raw, loop)


def step(loop: asyncio.AbstractEventLoop) -> None:
    """Let the loop run what is scheduled: the end of the event-loop step that wrote."""
    loop.run_until_complete(asyncio.sleep(0))


def test_writes_of_one_step_leave_together(loop: asyncio.AbstractEventLoop) -> None:
    raw, t = coalescing(loop)
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(memoryview(b"body"))
    t.write(b"")
    assert raw.writes == [] and t.get_write_buffer_size() == 23
    step(loop)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"] and t.get_write_buffer_size() == 0
    t.write(b"next")
    step(loop)
    assert raw.writes[1:] == [b"next"]
    assert t.get_extra_info("sockname") == ("127.0.0.1", 8000)  # everything else passes through


def test_close_sends_what_is_held_and_abort_drops_it(loop: asyncio.AbstractEventLoop) -> None:
    raw, t = coalescing(loop)
    t.write(b"last words")
    t.close()
    assert raw.writes == [b"last words"] and raw.closed
    step(loop)
    assert raw.writes == [b"last words"]  # the scheduled flush finds nothing left
    raw, t = coalescing(loop)
    t.write(b"never")
    t.abort()
    step(loop)
    assert raw.writes == [] and raw.aborted


def test_big_writes_are_not_held(loop: asyncio.AbstractEventLoop) -> None:
    raw, t = coalescing(loop)
    t.write(b"headers")
    t.write(b"x" * FLUSH_BYTES)
    assert raw.writes == [b"headers" + b"x" * FLUSH_BYTES]
