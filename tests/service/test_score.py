"""POST /score against the real service: the answer equals the scorer called directly on the same file."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import encode, gray16, kermany_files

from octcore.manifest import load_scorer
from octcore.preprocess import preprocess, preprocess_gray, to_gray
from octcore.scanmap import scan_size
from service.schemas import ScoreQuery

pytestmark = pytest.mark.slow


def direct(fixture_model, image: Image.Image) -> dict[str, float]:
    """What the scorer says when called without the service: load_scorer + the shared preprocessing."""
    manifest, scorer = load_scorer(fixture_model.version_dir)
    x = torch.from_numpy(preprocess(image, manifest.preprocessing_config()))[None, None]
    with torch.inference_mode():
        out = scorer(x)
    return {k: float(out[k][0]) for k in manifest.scores}


def check_result(r: httpx.Response, fixture_model, image: Image.Image, heatmaps: bool = True) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    manifest, _ = load_scorer(fixture_model.version_dir)
    expected = direct(fixture_model, image)
    assert body["model"] == {"name": fixture_model.name, "version": fixture_model.version}
    assert body["scores"].keys() == expected.keys()
    for k, v in expected.items():
        assert body["scores"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    cal = manifest.calibration[manifest.primary_score]
    assert body["score"] == body["scores"][manifest.primary_score]
    assert body["threshold"] == pytest.approx(cal.threshold)
    assert body["is_anomalous"] == (body["score"] > cal.threshold)
    assert body["percentile"] == pytest.approx(cal.percentile_of(body["score"]), abs=1e-3)
    assert set(body["timing_ms"]) == {"queue", "inference", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] > 0
    assert body["request_id"] == r.headers["x-request-id"]
    if not heatmaps:
        assert "heatmaps" not in body
        return body
    geometry = preprocess_gray(to_gray(image), manifest.preprocessing_config())[1]
    with_maps = {k for k, s in manifest.scores.items() if s.map}
    assert set(body["heatmaps"]) == with_maps
    for k in with_maps:
        png = Image.open(io.BytesIO(base64.b64decode(body["heatmaps"][k])))
        assert png.format == "PNG" and png.mode == "L"
        assert png.size == scan_size(geometry, manifest.input.size)
    return body


def test_multipart_upload(client: httpx.Client, fixture_model, scan_path: Path, scan_bytes: bytes) -> None:
    r = client.post("/score", files={"file": (scan_path.name, scan_bytes, "image/jpeg")})
    with Image.open(scan_path) as im:
        check_result(r, fixture_model, im)


def test_raw_body_without_heatmaps(client: httpx.Client, fixture_model, scan_path: Path, scan_bytes: bytes) -> None:
    r = client.post("/score", params={"heatmaps": "false"}, content=scan_bytes,
                    headers={"Content-Type": "image/jpeg", "X-Request-ID": "case-42"})
    with Image.open(scan_path) as im:
        body = check_result(r, fixture_model, im, heatmaps=False)
    assert body["request_id"] == "case-42"


@pytest.mark.parametrize("mode", ["I;16", "RGB", "RGBA", "P"])
def test_bit_depths_and_colour_modes(client: httpx.Client, fixture_model, scan_path: Path, mode: str) -> None:
    with Image.open(scan_path) as im:
        image = gray16() if mode == "I;16" else im.convert("RGB").convert(mode) if mode == "P" else im.convert(mode)
    data = encode(image, "PNG")
    r = client.post("/score", content=data, headers={"Content-Type": "image/png"})
    check_result(r, fixture_model, Image.open(io.BytesIO(data)))


def test_tiff_and_bmp(client: httpx.Client, fixture_model, scan_path: Path) -> None:
    with Image.open(scan_path) as im:
        for fmt, ctype in (("TIFF", "image/tiff"), ("BMP", "image/bmp")):
            data = encode(im.convert("L"), fmt)
            r = client.post("/score", content=data, headers={"Content-Type": ctype})
            check_result(r, fixture_model, Image.open(io.BytesIO(data)))


def test_real_kermany_scans(client: httpx.Client, fixture_model) -> None:
    assert kermany_files(), "tests/data/kermany holds the real sample scans"
    for path in kermany_files()[::2]:
        r = client.post("/score", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
        with Image.open(path) as im:
            body = check_result(r, fixture_model, im)
        w, h = Image.open(io.BytesIO(base64.b64decode(body["heatmaps"]["residual"]))).size
        assert w >= h  # Kermany scans are wider than tall, and so are their heatmaps


def test_heatmap_values_follow_map_scale(client: httpx.Client, fixture_model, scan_path: Path,
                                         scan_bytes: bytes) -> None:
    manifest, scorer = load_scorer(fixture_model.version_dir)
    with Image.open(scan_path) as im:
        x = torch.from_numpy(preprocess(im, manifest.preprocessing_config()))[None, None]
    with torch.inference_mode():
        out = scorer(x)
    body = client.post("/score", files={"file": ("a.jpeg", scan_bytes)}).json()
    for k, spec in manifest.scores.items():
        if not spec.map:
            continue
        scale = manifest.calibration[k].map_scale or 1.0
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmaps"][k]))), np.float32)
        # Resizing blurs pixels, not the overall level: the means agree within a few gray levels.
        expected = np.clip(out[spec.map][0, 0].numpy() / scale, 0, 1) * 255
        assert abs(png.mean() - expected.mean()) < 4.0, k


def test_operations_endpoints(client: httpx.Client, fixture_model) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").status_code == 200
    models = client.get("/models").json()
    assert models["name"] == fixture_model.name and models["version"] == fixture_model.version
    assert models["device"] == "cpu" and set(models["scores"]) >= {"residual", "alm"}
    schema = client.get("/openapi.json").json()
    assert "ScoreResult" in schema["components"]["schemas"]
    score = schema["paths"]["/score"]["post"]
    assert "multipart/form-data" in score["requestBody"]["content"]
    # The query model's fields, as FastAPI lists a query parameter model; the key's two schemes, as alternatives.
    assert {p["name"]: p["in"] for p in score["parameters"]} == dict.fromkeys(ScoreQuery.model_fields, "query")
    assert score["parameters"][1]["schema"]["enum"] == ["png", "webp", "jpeg"]
    schemes = schema["components"]["securitySchemes"]
    assert score["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    assert schemes["HTTPBearer"]["scheme"] == "bearer" and schemes["APIKeyHeader"]["name"] == "X-API-Key"
    assert score["security"] == schema["paths"]["/models"]["get"]["security"]
