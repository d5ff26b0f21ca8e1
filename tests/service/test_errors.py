"""Every bad request gets its 4xx as application/problem+json with a stable type; none reaches a 5xx."""

from __future__ import annotations

import socket

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import encode, png_with_header

pytestmark = pytest.mark.slow
PREFIX = "urn:oct-anomaly:problem:"


def problem(r: httpx.Response, status: int, slug: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == PREFIX + slug and body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in r.text
    return body


def form(*parts: tuple[str, bytes]) -> bytes:
    """A multipart/form-data body, boundary `B`, from (Content-Disposition parameters, content) pairs."""
    return b"".join(b"--B\r\nContent-Disposition: form-data; " + d.encode() + b"\r\n\r\n" + c + b"\r\n"
                    for d, c in parts) + b"--B--\r\n"


def post_form(client: httpx.Client, body: bytes,
              content_type: str = "multipart/form-data; boundary=B") -> httpx.Response:
    return client.post("/score", content=body, headers={"Content-Type": content_type}, params={"heatmaps": "false"})


def test_the_form_file_is_the_part_named_file(client: httpx.Client, scan_bytes: bytes) -> None:
    """Other fields and files around it are ignored; the name may be quoted or not."""
    body = form(('name="note"', b"x"), ('filename="name=file.jpeg"; name="file"', scan_bytes),
                ('name="files"; filename="b"', b"y"))
    assert post_form(client, body).status_code == 200
    assert post_form(client, form(('name=file; filename=a.jpeg', scan_bytes))).status_code == 200


@pytest.mark.parametrize("body,why", [
    (form(('name="image"; filename="a.png"', b"x")), "no complete part named 'file'"),
    (form(('name="file"; filename="a"', b"x"), ('name="file"; filename="b"', b"y")), "2 parts named 'file'"),
    (form(('name="file"', b"x")), "no filename"),
    (form(('name="file"; filename="a"', b"")), "is empty"),
    (form(*[(f'name="f{i}"; filename="a"', b"x") for i in range(17)]), "Too many files"),
    (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc", "cut short"),
    (b"", "no complete part"),
])
def test_400_malformed_forms(client: httpx.Client, body: bytes, why: str) -> None:
    assert why in problem(post_form(client, body), 400, "bad-request")["detail"]


def test_400_malformed(client: httpx.Client, scan_bytes: bytes) -> None:
    problem(client.post("/score", content=b"", headers={"Content-Type": "image/png"}), 400, "bad-request")
    body = problem(post_form(client, form(('name="file"; filename="a"', scan_bytes)), "multipart/form-data"),
                   400, "bad-request")
    assert "boundary" in body["detail"]


def test_422_invalid_parameters(client: httpx.Client, scan_bytes: bytes) -> None:
    """Parameter validation answers 422, the code the OpenAPI documents for it, as problem+json."""
    body = problem(client.post("/score", params={"heatmaps": "perhaps"}, content=scan_bytes,
                               headers={"Content-Type": "image/jpeg"}), 422, "invalid-parameters")
    assert body["errors"][0]["loc"] == ["query", "heatmaps"]
    problem(client.get("/dicomweb/results", params={"limit": "0"}), 422, "invalid-parameters")


def test_415_unsupported_type(client: httpx.Client, scan_bytes: bytes) -> None:
    problem(client.post("/score", content=b"hello", headers={"Content-Type": "text/plain"}), 415,
            "unsupported-media-type")
    problem(client.post("/score", content=scan_bytes, headers={"Content-Type": "image/gif"}), 415,
            "unsupported-media-type")
    problem(client.post("/score", content=scan_bytes, headers={"Content-Type": ""}), 415, "unsupported-media-type")


def test_422_bad_images(client: httpx.Client, scan_bytes: bytes) -> None:
    rng = np.random.default_rng(1)
    cases = {
        "undecodable-image": [rng.bytes(3000), scan_bytes[:2000]],
        "image-too-large": [png_with_header(50_000, 100)],
        "decompression-bomb": [encode(Image.new("L", (7000, 7000)))],
        "unsupported-image": [encode(Image.fromarray(rng.random((30, 40), dtype=np.float32)), "TIFF")],
    }
    for slug, payloads in cases.items():
        for data in payloads:
            problem(client.post("/score", files={"file": ("x.jpeg", data, "image/jpeg")}), 422, slug)
            problem(client.post("/score", content=data, headers={"Content-Type": "image/png"}), 422, slug)
    assert client.get("/readyz").status_code == 200


def test_404_and_405_are_problems_too(client: httpx.Client) -> None:
    problem(client.get("/nope"), 404, "not-found")
    problem(client.get("/score"), 405, "method-not-allowed")


def raw_request(url: str, head: bytes, chunks: int, chunk: bytes = b"\0" * 65536) -> bytes:
    """Send headers, then `chunks` body chunks without ever finishing the body; return what the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        for _ in range(chunks):
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            got = s.recv(65536)
            if not got:
                break
            answer += got
        return answer


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_413_refused_while_streaming(start_service) -> None:
    svc = start_service(OCT_MAX_UPLOAD_BYTES="100000", OCT_WARMUP="false")  # nothing is scored here
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        # Declared too big: refused from the headers alone, the body is never read.
        r = c.post("/score", content=b"\0" * 100_001, headers={"Content-Type": "image/png"})
        problem(r, 413, "payload-too-large")
        assert "Content-Length" in r.json()["detail"]
    # Chunked, no Content-Length: the answer comes once the limit is passed, while the body is still unfinished.
    raw = b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = raw_request(svc.url, raw, chunks=3)
    assert answer.startswith(b"HTTP/1.1 413") and b"application/problem+json" in answer
    part = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    raw = (b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=B\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(part) + part + b"\r\n")
    answer = raw_request(svc.url, raw, chunks=3)
    assert answer.startswith(b"HTTP/1.1 413") and b"payload-too-large" in answer
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200


def test_401_when_keys_are_set(start_service, scan_bytes: bytes) -> None:
    svc = start_service(OCT_API_KEYS="alpha,beta", OCT_WARMUP="false")  # warm-up: no part of the answers checked
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        files = {"file": ("a.jpeg", scan_bytes)}
        r = problem(c.post("/score", files=files), 401, "unauthorized")
        problem(c.post("/score", files=files, headers={"X-API-Key": "gamma"}), 401, "unauthorized")
        problem(c.post("/score", files=files, headers={"Authorization": "Basic YWxwaGE6"}), 401, "unauthorized")
        problem(c.get("/models"), 401, "unauthorized")
        assert r
        assert c.post("/score", files=files, headers={"X-API-Key": "beta"}).status_code == 200
        assert c.post("/score", files=files, headers={"Authorization": "Bearer alpha"}).status_code == 200
        assert c.get("/models", headers={"X-API-Key": "alpha"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(open_path).status_code == 200, open_path
        # /score checks the key itself (routes/score.py); /models through the FastAPI security dependencies. Both
        # must take and refuse the same headers.
        for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "alpha"}, {"x-api-key": "beta"}, {"X-API-Key": "alph"},
                        {"Authorization": "Bearer beta"}, {"Authorization": "bearer alpha"},
                        {"Authorization": "BEARER  alpha"}, {"Authorization": "Bearer"},
                        {"Authorization": "Basic alpha"}, {"Authorization": "alpha"},
                        {"X-API-Key": "", "Authorization": "Bearer beta"},
                        {"X-API-Key": "gamma", "Authorization": "Bearer alpha"},
                        {"X-API-Key": "alpha", "Authorization": "Bearer gamma"}):
            scored = c.post("/score", files=files, headers=headers, params={"heatmaps": "false"}).status_code
            assert scored in (200, 401) and scored == c.get("/models", headers=headers).status_code, headers
