"""Two small ASGI middlewares: request context (id, metrics, audit line) and the streaming upload limits."""

from __future__ import annotations

import re
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.budget import Budget
from service.errors import Busy, PayloadTooLarge, problem_response
from service.logs import audit
from service.metrics import Metrics
from service.request_ids import new_request_id

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
        request_id = offered if _CLIENT_ID.match(offered) else new_request_id()
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
    """Refuses bodies over `max_bytes` (413) and bodies the bytes-in-flight `budget` cannot hold (503): at once from
    Content-Length, else as soon as the streamed bytes pass either. What a request took is given back when it ends."""

    def __init__(self, app: ASGIApp, max_bytes: int, budget: Budget | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        declared_n = int(declared) if declared is not None and declared.isdigit() else None
        if declared_n is not None and declared_n > self.max_bytes:
            response = problem_response(Request(scope), PayloadTooLarge.status, PayloadTooLarge.slug,
                                        PayloadTooLarge.title, self._detail(f"Content-Length {declared_n}"))
            await response(scope, receive, send)
            return
        received = taken = 0
        try:
            if self.budget is not None and declared_n:
                try:
                    self.budget.take(declared_n)
                except Busy as e:
                    response = problem_response(Request(scope), e.status, e.slug, e.title, e.detail,
                                                headers=e.headers)
                    await response(scope, receive, send)
                    return
                taken = declared_n

            async def counting_receive() -> Message:
                nonlocal received, taken
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_bytes:
                        raise PayloadTooLarge(self._detail(f"over {received} bytes received"))
                    if self.budget is not None and received > taken:  # chunked, or more than declared
                        self.budget.take(received - taken)
                        taken = received
                return message

            await self.app(scope, counting_receive, send)
        finally:
            if self.budget is not None and taken:
                self.budget.give(taken)

    def _detail(self, what: str) -> str:
        return f"{what}; the limit is {self.max_bytes} bytes (OCT_MAX_UPLOAD_BYTES)"
