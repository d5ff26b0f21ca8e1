"""Overload and shutdown: 503 + Retry-After at once when the queue is full; SIGTERM drops nothing accepted, and a
drain answers every connection that reached the service."""

from __future__ import annotations

import asyncio
import http.client
import signal
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


async def fire(url: str, data: bytes, n: int, after_s: float = 0.0,
               on_sent=None, done: list[tuple[float, int]] | None = None) -> list[httpx.Response | Exception]:
    """n concurrent uploads; the results in the order they were sent. `done` (if given) collects (monotonic time,
    index) as each one completes."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        tasks = [asyncio.ensure_future(c.post("/score", params={"heatmaps": "false"},
                                              files={"file": ("a.jpeg", data)})) for _ in range(n)]
        if done is not None:
            for i, t in enumerate(tasks):
                t.add_done_callback(lambda _, i=i: done.append((time.monotonic(), i)))
        if on_sent is not None:
            await asyncio.sleep(after_s)
            on_sent()
        return await asyncio.gather(*tasks, return_exceptions=True)


def test_overload_gives_503_at_once_and_the_service_recovers(start_service, slow_model, scan_bytes: bytes) -> None:
    # A batch of the slow scorer takes about a second and only 3 requests may wait meanwhile: a burst of 12
    # overflows the queue.
    svc = start_service(model=slow_model, OCT_MAX_QUEUE="3", OCT_MAX_BATCH_SIZE="16", OCT_RETRY_AFTER_S="2",
                        OCT_WARMUP="false")
    done: list[tuple[float, int]] = []
    results = asyncio.run(fire(svc.url, scan_bytes, 12, done=done))
    codes = sorted(r.status_code for r in results if isinstance(r, httpx.Response))
    assert len(codes) == 12 and codes.count(200) >= 3 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    refused = next(r for r in results if r.status_code == 503)
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith(":overloaded")
    # Refused at once: every 503 completed before any 200 (those wait for the slow batches).
    order = [results[i].status_code for _, i in sorted(done)]
    assert order == sorted(order, reverse=True), order
    assert httpx.get(f"{svc.url}/readyz").status_code == 200
    r = httpx.post(f"{svc.url}/score", files={"file": ("a.jpeg", scan_bytes)}, timeout=30)
    assert r.status_code == 200


def test_sigterm_under_load_answers_every_accepted_request(start_service, slow_model, scan_bytes: bytes) -> None:
    # The slow scorer's first batch (about a second) keeps the accepted requests waiting when SIGTERM arrives.
    svc = start_service(model=slow_model, OCT_MAX_BATCH_SIZE="24", OCT_WARMUP="false")
    sent_at: list[float] = []

    def terminate() -> None:
        sent_at.append(time.monotonic())
        svc.proc.send_signal(signal.SIGTERM)

    done: list[tuple[float, int]] = []
    results = asyncio.run(fire(svc.url, scan_bytes, 16, after_s=0.4, on_sent=terminate, done=done))
    # A request still connecting when the signal came was never accepted; any other failure is a dropped request.
    accepted = [r for r in results if not isinstance(r, httpx.ConnectError)]
    assert len(accepted) >= 8, results
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in accepted), accepted
    # They were still queued at SIGTERM: none completed before the signal was sent.
    assert min(at for at, _ in done) > sent_at[0]
    assert svc.proc.wait(30) == 0
    assert "Shutting down" in svc.log() or "shutting down" in svc.log().lower()


def one_shot(port: int, path: str, body: bytes | None = None, headers: dict | None = None) -> str:
    """One request on its own connection → 'refused' (never connected), 'reset' (connected, got no answer) or the
    HTTP status as text."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.connect()
    except ConnectionRefusedError:
        return "refused"
    try:
        c.request("POST" if body is not None else "GET", path, body=body, headers=headers or {})
        r = c.getresponse()
        r.read()
        return str(r.status)
    except (ConnectionError, http.client.HTTPException, OSError):
        return "reset"
    finally:
        c.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_drain_keeps_answering_for_the_delay_and_resets_no_connection(start_service, scan_bytes: bytes,
                                                                      workers: str) -> None:
    svc = start_service(OCT_WORKERS=workers, OCT_DRAIN_DELAY_S="1.5", OCT_MAX_BATCH_SIZE="8",
                        OCT_MAX_BATCH_DELAY_MS="5")
    boundary = "drain-test"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpeg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + scan_bytes + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:  # one connection per request, until the port refuses for good
        while not stop.is_set():
            started = time.monotonic()
            outcomes.append((started, one_shot(svc.port, "/score?heatmaps=false", body, headers)))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    term_at = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    while one_shot(svc.port, "/readyz") != "503" and time.monotonic() < term_at + 1.0:
        time.sleep(0.02)
    not_ready_at = time.monotonic()
    assert one_shot(svc.port, "/readyz") == "503"  # not ready within the drain delay
    assert svc.proc.wait(60) == 0
    stop.set()
    for t in threads:
        t.join(60)
    kinds = [k for _, k in outcomes]
    # Once /readyz says 503 the service still answers /score for the delay: the requests started after that, in
    # the order they started, are answered until the port closes (and never reset).
    after = [k for _, k in sorted(o for o in outcomes if o[0] > not_ready_at)]
    during_delay = after[:after.index("refused")] if "refused" in after else after
    assert during_delay and set(during_delay) == {"200"}, after
    assert "reset" not in kinds, kinds.count("reset")
    assert set(kinds) <= {"200", "refused"}, sorted(set(kinds))
    assert kinds.count("200") >= 10


def _recv_response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length: the server may send its head and body in separate writes."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_request_still_on_its_way_at_shutdown_is_answered(start_service, scan_bytes: bytes) -> None:
    """Connections accepted before the listener closed: one whose request had not arrived when uvicorn's shutdown
    began, and one half received then, are answered (with Connection: close); an idle keep-alive one is closed at
    once, and one that never sends anything after the keep-alive timeout."""
    svc = start_service(OCT_DRAIN_DELAY_S="0.3")
    request = (b"POST /score?heatmaps=false HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
               b"Content-Length: %d\r\n\r\n" % len(scan_bytes)) + scan_bytes
    silent, late, half, idle = (socket.create_connection(("127.0.0.1", svc.port), timeout=30) for _ in range(4))
    half.sendall(request[:40])
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert _recv_response(idle).startswith(b"HTTP/1.1 200")
    time.sleep(0.3)  # every connection accepted
    svc.proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # the listener closed at 0.3 s, uvicorn's shutdown began at ~0.6 s
    assert idle.recv(65536) == b""  # closed: it was between requests
    late.sendall(request)
    half.sendall(request[40:])
    for sock in (late, half):
        answer = _recv_all(sock)
        assert answer.startswith(b"HTTP/1.1 200") and b"\r\nconnection: close\r\n" in answer.lower(), answer[:200]
    assert _recv_all(silent) == b""  # closed after uvicorn's keep-alive timeout (5 s), nothing sent, nothing lost
    assert svc.proc.wait(30) == 0
