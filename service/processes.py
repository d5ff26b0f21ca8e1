"""Serving processes: one listening socket, `OCT_WORKERS` front-end processes on it, and a drain without resets.

Design (docs/service.md, "Processes"): each worker is a whole service — HTTP, decoding, its own batcher, its own
copy of the model on the shared device. The kernel spreads connections across the workers' accept calls on the one
socket. A supervisor (the first process) binds the socket, starts the workers with the `spawn` method (no forked
torch or CUDA state), restarts a worker that dies after it had loaded, and on SIGTERM drains them all.

Drain (`DrainingServer`): on SIGTERM `/readyz` answers 503 at once, and for `OCT_DRAIN_DELAY_S` the worker keeps
accepting and answering (load balancers and Kubernetes stop routing meanwhile; responses say `Connection: close`, so
keep-alive clients move on). Then it accepts everything already waiting in the listen backlog, closes the listener
in the same event-loop step, lets those connections deliver their requests, and finishes what it holds. A connection
the kernel completed after that step is refused, not reset: there is no window in which it sits unaccepted in a
backlog that is about to be closed, beyond the microseconds between the last accept and the close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

if TYPE_CHECKING:
    from service.pipeline.pipeline import Pipeline

log = logging.getLogger("oct.processes")

# Per-process states in the shared array (slot 0 holds the drain flag).
STARTING, LOADED, READY = 0, 1, 2
# After closing the listener: time for connections taken from the backlog to deliver their request bytes before
# uvicorn's shutdown begins (DrainingHttpToolsProtocol then gives a request still on its way up to 5 s more).
_LINGER_S = 0.3


class Warm(Protocol):
    """What readiness reads of the loaded model (service.pipeline.pipeline.Pipeline)."""

    @property
    def ready(self) -> bool: ...

    @property
    def not_ready_reason(self) -> str: ...


# Builds the app a serving process serves from its loaded pipeline (service.main.create_app); passed in, so this
# module needs nothing from the app factory and a spawned worker gets it by reference.
AppFactory = Callable[[Settings, "Pipeline", "ServingState"], ASGIApp]


class ServingState:
    """What `/readyz` needs beyond the model: the drain flag and, with several workers, every worker's state.

    `shared` is a process-shared byte array (slot 0 = draining, slot i = worker i's state) or None in one process."""

    def __init__(self, shared: Any = None, index: int = 0) -> None:
        self._shared = shared
        self._index = index
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining or (self._shared is not None and bool(self._shared[0]))

    def begin_drain(self) -> None:
        self._draining = True
        if self._shared is not None:
            self._shared[0] = 1

    def set_state(self, state: int) -> None:
        if self._shared is not None:
            self._shared[self._index] = state

    def not_ready_reason(self, model: Warm | None) -> str | None:
        """None when ready; else why not (this worker's model first, then the drain, then the other workers)."""
        if model is None:
            return "model not loaded"
        if not model.ready:
            return model.not_ready_reason
        if self.draining:
            return "draining: shutting down"
        if self._shared is not None:
            waiting = [i for i in range(1, len(self._shared)) if self._shared[i] != READY]
            if waiting:
                return f"{len(waiting)} of {len(self._shared) - 1} worker processes not ready"
        return None


class CloseWhenDraining:
    """ASGI wrapper: while draining, every response says `Connection: close`, so clients stop reusing the socket."""

    def __init__(self, app: ASGIApp, state: ServingState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.state.draining:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_closing)


class DrainingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's shutdown closes every connection that has no request in progress: also one accepted a moment before
    whose request is still on its way, or half received, and that client sees a reset although nothing refused it.
    Here such a connection keeps uvicorn's keep-alive timeout (5 s) for its request to arrive, which is then answered
    with `Connection: close` (CloseWhenDraining); one that stays silent is closed then. Connections idle between
    requests are closed at once, as before."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_due = True  # a client opens a connection to send a request on it

    def on_message_begin(self) -> None:
        self._request_due = True
        super().on_message_begin()

    def on_response_complete(self) -> None:
        self._request_due = False
        super().on_response_complete()

    def shutdown(self) -> None:
        between_requests = self.cycle is None or self.cycle.response_complete
        if between_requests and self._request_due and not self.transport.is_closing():
            self._unset_keepalive_if_required()  # bytes arriving cancel this again (uvicorn's data_received)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
            return
        super().shutdown()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above. A second SIGTERM skips the rest of the delay; a second SIGINT forces."""

    def __init__(self, config: uvicorn.Config, state: ServingState, drain_delay_s: float,
                 ignore_sigint: bool = False) -> None:
        super().__init__(config)
        self.state = state
        self.drain_delay_s = drain_delay_s
        self.ignore_sigint = ignore_sigint  # a worker: Ctrl-C reaches the whole process group, the supervisor decides
        self._drain_started: float | None = None
        self._closed_at: float | None = None
        self._listeners: list[socket.socket] = []

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._listeners = list(sockets or [])
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # The signal is not kept for uvicorn to raise again after shutdown (as its own handler does): the drain is
        # the stop the signal asked for, so `run` returns and the process exits 0.
        if sig == signal.SIGINT and self.ignore_sigint:
            return
        if self._drain_started is None:
            self._drain_started = time.monotonic()
            self.state.begin_drain()
            log.info("draining: /readyz is 503; still accepting for %.1f s", self.drain_delay_s)
        elif sig == signal.SIGINT:
            self.should_exit = self.force_exit = True
        else:
            self.drain_delay_s = 0.0

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self._drain_started is None:
            return False
        now = time.monotonic()
        if self._closed_at is None and now - self._drain_started >= self.drain_delay_s:
            self._stop_accepting()
            self._closed_at = now
        return self._closed_at is not None and now - self._closed_at >= _LINGER_S

    def _stop_accepting(self) -> None:
        """Take every connection already in the backlog, then close the listener — with no await in between."""
        waiting: list[socket.socket] = []
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                while True:
                    try:
                        conn, _ = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    waiting.append(conn)
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        protocol = functools.partial(self.config.http_protocol_class, config=self.config,
                                     server_state=self.server_state, app_state=self.lifespan.state)
        for conn in waiting:
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(protocol, conn))
            self.server_state.tasks.add(task)
            task.add_done_callback(self.server_state.tasks.discard)
        log.info("listener closed; %d connection(s) taken from the backlog", len(waiting))


def bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_one(settings: Settings, app: ASGIApp, sock: socket.socket, state: ServingState,
              worker: bool = False) -> None:
    """Run `app` (its model loaded and checked already) on `sock` until drained."""
    # The event loop decodes and preprocesses (OCT_CPU_WORKERS=0): one torch thread, set once for the process's
    # lifetime, so preprocessing's resize finds its count at 1 and changes nothing per request. The inference
    # threads took the model's count already (service/inference/core.py).
    import torch

    torch.set_num_threads(1)
    # Everything allocated so far (torch, the model, FastAPI's and pydantic's schemas: ~460,000 tracked objects) lives
    # as long as the process. Left to the collector, each full collection walked all of it: ~190 ms with the event
    # loop stopped, every ~10 s under load (2 % of the CPU, and every request in flight 190 ms late). Frozen, they are
    # skipped; a full collection of what serving allocates takes ~1 ms (gc.callbacks, docs/service.md).
    gc.freeze()
    # log_config=None keeps our handlers; the audit line replaces uvicorn's access log.
    config = uvicorn.Config(CloseWhenDraining(app, state), log_config=None, access_log=False,
                            http=DrainingHttpToolsProtocol,
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=settings.drain_timeout_s)
    DrainingServer(config, state, settings.drain_delay_s, ignore_sigint=worker).run(sockets=[sock])


def _worker_main(settings: Settings, sock: socket.socket, shared: Any, index: int, make_app: AppFactory) -> None:
    """Entry point of a spawned worker process."""
    from octcore.manifest import ModelStoreError
    from service import logs
    from service.metrics import Metrics
    from service.pipeline.pipeline import Pipeline

    logs.configure(settings.log_format, settings.log_level)
    logs.quiet_libraries()
    state = ServingState(shared, index)
    try:
        pipeline = Pipeline.load(settings, Metrics())
    except ModelStoreError as e:
        print(f"oct-service: cannot load model: {e}", file=sys.stderr)
        sys.exit(1)
    state.set_state(LOADED)
    serve_one(settings, make_app(settings, pipeline, state), sock, state, worker=True)


def supervise(settings: Settings, sock: socket.socket, make_app: AppFactory) -> int:
    """Start `settings.workers` worker processes on `sock`, each serving `make_app`'s app; restart the ones that die;
    drain all on SIGTERM."""
    ctx = multiprocessing.get_context("spawn")
    n = settings.workers
    shared = ctx.Array("b", n + 1, lock=False)
    metrics_dir = tempfile.mkdtemp(prefix="oct-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client when a worker imports it
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start(i: int) -> None:
        shared[i] = STARTING
        p = ctx.Process(target=_worker_main, args=(settings, sock, shared, i, make_app), name=f"oct-worker-{i}")
        p.start()
        procs[i] = p

    def on_signal(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        shared[0] = 1  # every worker's /readyz turns 503 now, whichever gets the probe
        stopping = True
        for p in procs.values():  # a second signal reaches the workers as a second SIGTERM: skip the rest of the delay
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for i in range(1, n + 1):
            start(i)
        log.info("%d worker processes on %s:%d, metrics in %s", n, settings.host, settings.port, metrics_dir)
        while procs:
            time.sleep(0.2)
            for i, p in list(procs.items()):
                if p.is_alive():
                    continue
                p.join()
                del procs[i]
                _mark_dead(p.pid)
                if stopping:
                    status = status or (p.exitcode or 0)
                elif shared[i] == STARTING:  # never loaded the model: restarting would fail the same way
                    log.error("worker %d exited %s before loading the model; stopping", i, p.exitcode)
                    status = 1
                    on_signal(signal.SIGTERM, None)
                else:
                    log.warning("worker %d exited %s; restarting it", i, p.exitcode)
                    start(i)
            if stopping and sock.fileno() != -1:
                sock.close()  # the workers hold the socket now; the last one to close it drains the backlog
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _mark_dead(pid: int | None) -> None:
    if pid is None:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)
