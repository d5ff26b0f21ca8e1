"""The uvicorn internals service/processes.py's drain relies on, by name.

No public option gives the drain's guarantee (SIGTERM under load loses no accepted request): uvicorn's own
`timeout_graceful_shutdown` closes the listener with connections still in its backlog (reset) and closes every
connection with no request in progress, also one whose request is on its way. So processes.py subclasses uvicorn's
Server and HttpToolsProtocol and touches the attributes below; pyproject.toml pins uvicorn to one minor release.
When an upgrade moves one of them, this fails naming it, before tests/service/test_shutdown.py fails less clearly.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.version import Version
from uvicorn.protocols.http import httptools_impl

ROOT = Path(__file__).resolve().parents[2]


def _source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


def test_uvicorn_is_pinned_to_the_minor_release_checked_here() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    (req,) = [Requirement(r) for r in deps if Requirement(r).name == "uvicorn"]
    (spec,) = req.specifier
    assert spec.operator in ("~=", "=="), f"pyproject.toml: {req}: private internals need a minor pin"
    installed = Version(version("uvicorn"))
    assert req.specifier.contains(installed), f"uvicorn {installed} installed, pyproject.toml asks {req}"
    assert (installed.major, installed.minor) == (0, 55), \
        "uvicorn's minor release moved: re-check each name below against its source, then update this pin"


@pytest.mark.parametrize("name", ["connection_made", "on_message_begin", "on_response_complete", "shutdown",
                                  "data_received", "timeout_keep_alive_handler", "_unset_keepalive_if_required"])
def test_http_tools_protocol_methods(name: str) -> None:
    assert callable(getattr(httptools_impl.HttpToolsProtocol, name, None)), \
        f"uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.{name} is gone (service/processes.py uses it)"


@pytest.mark.parametrize("attribute", ["cycle", "transport", "loop", "timeout_keep_alive", "timeout_keep_alive_task"])
def test_http_tools_protocol_attributes(attribute: str) -> None:
    protocol = httptools_impl.HttpToolsProtocol
    init = _source(protocol.__init__) + _source(protocol.connection_made)
    assert re.search(rf"self\.{attribute}\b[^=\n]*=", init), \
        f"HttpToolsProtocol no longer sets self.{attribute} (DrainingHttpToolsProtocol.shutdown reads it)"


def test_protocol_constructor_takes_what_stop_accepting_passes() -> None:
    params = inspect.signature(httptools_impl.HttpToolsProtocol.__init__).parameters
    for name in ("config", "server_state", "app_state"):
        assert name in params, f"HttpToolsProtocol.__init__ lost {name!r} (DrainingServer._stop_accepting passes it)"


def test_keep_alive_timer_is_cancelled_by_arriving_bytes() -> None:
    """The drain gives a silent connection the keep-alive timer; a request arriving must cancel it."""
    assert "_unset_keepalive_if_required()" in _source(httptools_impl.HttpToolsProtocol.data_received), \
        "HttpToolsProtocol.data_received no longer calls _unset_keepalive_if_required"
    assert "response_complete" in _source(httptools_impl.RequestResponseCycle.__init__), \
        "RequestResponseCycle.response_complete is gone (the drain's between-requests test)"


def test_server_internals() -> None:
    init, serve = _source(uvicorn.Server.__init__), _source(uvicorn.Server._serve)
    startup, shutdown = _source(uvicorn.Server.startup), _source(uvicorn.Server.shutdown)
    # After shutdown uvicorn raises again only the signals its handle_exit kept; DrainingServer.handle_exit keeps
    # none, so a drained stop returns from run() and the process exits 0.
    assert "for captured_signal in reversed(self._captured_signals)" in _source(uvicorn.Server.capture_signals), \
        "uvicorn.Server.capture_signals raises again other signals than those kept in _captured_signals"
    assert "self.server_state" in init, "uvicorn.Server.server_state is gone"
    assert "self.lifespan = " in serve, "uvicorn.Server.lifespan is gone (its .state reaches new connections)"
    assert "app_state=self.lifespan.state" in startup, "connections no longer get app_state=self.lifespan.state"
    assert "self.servers" in startup, "uvicorn.Server.servers is gone (DrainingServer._stop_accepting closes them)"
    assert "connection.shutdown()" in shutdown, "uvicorn's shutdown no longer calls each connection's shutdown()"
    assert "timeout_graceful_shutdown" in shutdown, "uvicorn's shutdown no longer bounds the wait for tasks"
    assert "server_state.tasks" in shutdown, "uvicorn's shutdown no longer waits for server_state.tasks"
    assert list(inspect.signature(uvicorn.Server.handle_exit).parameters) == ["self", "sig", "frame"]
    assert inspect.iscoroutinefunction(uvicorn.Server.on_tick), "uvicorn.Server.on_tick is no longer a coroutine"
    assert list(inspect.signature(uvicorn.Server.on_tick).parameters) == ["self", "counter"]
    for name in ("should_exit", "force_exit"):
        assert f"self.{name} = " in init, f"uvicorn.Server.{name} is gone"
    from uvicorn.server import ServerState

    assert "self.tasks" in _source(ServerState.__init__), "uvicorn.server.ServerState.tasks is gone"
