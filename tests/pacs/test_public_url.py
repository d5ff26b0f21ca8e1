"""The base of the URLs the service hands out (STOW-RS RetrieveURL, result links): OCT_PUBLIC_URL when set, else the
request's scheme, host and port — the Host header's port when it has one, else the port the connection came in on."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pydicom
import pytest
from fastapi import FastAPI
from live import Service, local_service
from oct_dicom import oct_dataset, phantom_frames, to_bytes
from starlette.requests import Request

from service.errors import BadRequest
from service.multipart import build_related
from service.routes.dicomweb import public_base
from service.settings import Settings

FRAMES = phantom_frames(2, 64, 96, seed=5)
GATEWAY = "https://gateway.example:8443/oct"


def request(host: str | None, *, server: tuple[str, int] | None = ("10.0.0.5", 8000), scheme: str = "http",
            public_url: str = "", root_path: str = "") -> Request:
    app = FastAPI()
    app.state.settings = Settings(public_url=public_url)
    headers = [(b"host", host.encode())] if host is not None else []
    return Request({"type": "http", "app": app, "scheme": scheme, "server": server, "headers": headers,
                    "method": "POST", "path": "/dicomweb/studies", "root_path": root_path, "query_string": b""})


@pytest.mark.parametrize(("host", "server", "scheme", "expected"), [
    ("scanner.example:9000", ("10.0.0.5", 8000), "http", "http://scanner.example:9000"),
    ("scanner.example", ("10.0.0.5", 8000), "http", "http://scanner.example:8000"),  # dicomweb-client's Host
    ("127.0.0.1", ("127.0.0.1", 41234), "http", "http://127.0.0.1:41234"),
    ("scanner.example", ("10.0.0.5", 443), "https", "https://scanner.example"),  # the default port is left out
    ("scanner.example:80", ("10.0.0.5", 8000), "http", "http://scanner.example"),
    ("[::1]", ("::1", 8000), "http", "http://[::1]:8000"),
    ("[::1]:8080", ("::1", 8000), "http", "http://[::1]:8080"),
    (None, ("::1", 8000), "http", "http://[::1]:8000"),  # HTTP/1.0, no Host: where the connection arrived
    (None, ("10.0.0.5", 8000), "http", "http://10.0.0.5:8000"),
    ("scanner.example", None, "http", "http://scanner.example"),  # a Unix socket: no port to add
])
def test_base_from_the_request(host: str | None, server: tuple[str, int] | None, scheme: str,
                               expected: str) -> None:
    assert public_base(request(host, server=server, scheme=scheme)) == expected


def test_root_path_is_kept() -> None:
    assert public_base(request("scanner.example:9000", root_path="/oct/")) == "http://scanner.example:9000/oct"


def test_public_url_wins_over_the_request() -> None:
    r = request("internal:8000", public_url=GATEWAY + "/")
    assert public_base(r) == GATEWAY


@pytest.mark.parametrize("host", ["evil.example/path", "a b", "scanner.example:99999", "scanner.example:",
                                  "user@scanner.example", "scanner.example:80:80", '"><x'])
def test_a_malformed_host_header_is_a_400(host: str) -> None:
    with pytest.raises(BadRequest) as e:
        public_base(request(host))
    assert e.value.status == 400


# --- against the real service ----------------------------------------------------------------------------------

def _start(fixture_model, tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Service:
    svc = local_service(fixture_model, tmp_path_factory.mktemp(name))
    svc.env.update(env)
    svc.start()
    return svc


@pytest.fixture(scope="module")
def service(fixture_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = _start(fixture_model, tmp_path_factory, "public-url-unset")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def gateway_service(fixture_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = _start(fixture_model, tmp_path_factory, "public-url-set", OCT_PUBLIC_URL=GATEWAY)
    yield svc
    svc.stop()


def stow(service: Service, host: str | None = None) -> tuple[httpx.Response, pydicom.Dataset]:
    ds = oct_dataset(FRAMES)
    body, ctype = build_related([to_bytes(ds)])
    headers = {"Content-Type": ctype, **({"Host": host} if host else {})}
    return httpx.post(f"{service.url}/dicomweb/studies", content=body, headers=headers, timeout=120), ds


@pytest.mark.slow
def test_host_without_port_gets_the_server_port(service: Service) -> None:
    r, ds = stow(service, host="127.0.0.1")
    assert r.status_code == 200, r.text
    url = pydicom.Dataset.from_json(r.json()).ReferencedSOPSequence[0].RetrieveURL
    assert url == f"http://127.0.0.1:{service.port}/dicomweb/results/{ds.SOPInstanceUID}"
    assert httpx.get(url, timeout=30).status_code == 200  # the link works as handed out


@pytest.mark.slow
def test_host_with_port_is_taken_as_sent(service: Service) -> None:
    r, ds = stow(service, host="scanner.example:9000")
    url = pydicom.Dataset.from_json(r.json()).ReferencedSOPSequence[0].RetrieveURL
    assert url == f"http://scanner.example:9000/dicomweb/results/{ds.SOPInstanceUID}"
    record = httpx.get(f"{service.url}/dicomweb/results/{ds.SOPInstanceUID}", timeout=30).json()
    # Result links follow the request that reads them, not the one that stored them.
    assert {i["url"] for i in record["instances"]} == {
        f"{service.url}/dicomweb/results/{ds.SOPInstanceUID}/{k}.dcm" for k in ("sr", "sc")}


@pytest.mark.slow
def test_malformed_host_is_a_problem_not_a_500(service: Service) -> None:
    r, _ = stow(service, host="evil.example/x")
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")


@pytest.mark.slow
def test_public_url_sets_every_link(gateway_service: Service) -> None:
    r, ds = stow(gateway_service)
    assert r.status_code == 200, r.text
    uid = ds.SOPInstanceUID
    url = pydicom.Dataset.from_json(r.json()).ReferencedSOPSequence[0].RetrieveURL
    assert url == f"{GATEWAY}/dicomweb/results/{uid}"
    record = httpx.get(f"{gateway_service.url}/dicomweb/results/{uid}", timeout=30).json()
    links = {f"{GATEWAY}/dicomweb/results/{uid}/{k}.dcm" for k in ("sr", "sc")}
    assert {i["url"] for i in record["instances"]} == links
    listing = httpx.get(f"{gateway_service.url}/dicomweb/results", params={"study_instance_uid": ds.StudyInstanceUID},
                        timeout=30).json()
    assert [x["url"] for x in listing] == [f"{GATEWAY}/dicomweb/results/{uid}"]
