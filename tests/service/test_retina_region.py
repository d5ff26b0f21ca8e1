"""A model of the retina band (preprocessing region `retina`) behind the real service: real scans are answered with
heatmaps over their box at the band's resolution; an upload without a retina is a 422 `no-retina` problem, counted
as a client error."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import ROOT, ServiceProcess, encode, kermany_files

from octcore.manifest import read_manifest
from octcore.preprocess import preprocess_gray
from octcore.scanmap import scan_size

pytestmark = pytest.mark.slow
C8 = sorted((ROOT / "tests" / "data" / "kermany-c8").glob("*.jpg"))


@pytest.fixture(scope="module")
def retina_service(start_service, retina_model) -> ServiceProcess:
    return start_service(model=retina_model, OCT_WARMUP="false")


def test_real_scans_are_answered_with_heatmaps_of_the_band(retina_service: ServiceProcess, retina_model) -> None:
    cfg = read_manifest(retina_model.version_dir).preprocessing_config()
    for path in kermany_files()[::3] + C8:
        r = httpx.post(f"{retina_service.url}/score", files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                       timeout=60)
        assert r.status_code == 200, (path.name, r.text)
        body = r.json()
        geometry = preprocess_gray(np.asarray(Image.open(path).convert("L")), cfg)[1]
        box = body["heatmap_box"]
        assert (box["x0"], box["y0"], box["x1"], box["y1"]) == geometry.box
        for b64 in body["heatmaps"].values():
            assert Image.open(io.BytesIO(base64.b64decode(b64))).size == scan_size(geometry, cfg.size), path.name


@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_an_upload_without_a_retina_is_422_no_retina(retina_service: ServiceProcess, kind: str) -> None:
    pixels = (np.random.default_rng(5).integers(0, 256, (496, 512), dtype=np.uint8) if kind == "noise"
              else np.zeros((496, 512), np.uint8))
    before = _count_422(retina_service)
    r = httpx.post(f"{retina_service.url}/score", content=encode(Image.fromarray(pixels)),
                   headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == "urn:oct-anomaly:problem:no-retina" and body["title"] == "No retina found"
    assert body["detail"] and "\n" not in body["detail"]
    assert _count_422(retina_service) == before + 1  # a client error in the metrics, not a 500


def _count_422(svc: ServiceProcess) -> float:
    for line in httpx.get(f"{svc.url}/metrics", timeout=10).text.splitlines():
        if line.startswith('oct_requests_total{route="/score",status="422"}'):
            return float(line.split()[-1])
    return 0.0
