"""Two small ASGI middlewares: request context (id, metrics, audit line) and the streaming upload limit."""

from __future__ import annotations

import re
import time
import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, problem_response
from service.logs import audit
from service.metrics import Metrics

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Probes are polled every few seconds; auditing them would bury the requests that matter.
_NOT_AUDITED = {"/healthz", "/readyz", "/metrics"}


class RequestContext:
    """Gives every request an id (`X-Request-ID`, echoed), counts and times it, and writes its audit line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if _CLIENT_ID.match(offered) else uuid.uuid4().hex
        scope["oct.request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            took = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(took)
            if route not in _NOT_AUDITED:
                result = scope.get("oct.audit", {})
                audit(request_id=request_id, method=scope["method"], route=route, status=status,
                      latency_ms=round(took * 1e3, 2), **result)


class BodyLimit:
    """Refuses bodies over `max_bytes`: at once from Content-Length, else as soon as the streamed bytes pass it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = problem_response(Request(scope), PayloadTooLarge.status, PayloadTooLarge.slug,
                                        PayloadTooLarge.title, self._detail(f"Content-Length {int(declared)}"))
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self._detail(f"over {received} bytes received"))
            return message

        await self.app(scope, counting_receive, send)

    def _detail(self, what: str) -> str:
        return f"{what}; the limit is {self.max_bytes} bytes (OCT_MAX_UPLOAD_BYTES)"
