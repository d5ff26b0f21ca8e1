"""`heatmap_box` and `preview` on /score: where the heatmaps sit on the upload, and the upload as decoded."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import KERMANY, ROOT, encode

from octcore.manifest import load_scorer
from octcore.preprocess import preprocess_gray, to_gray

sys.path.insert(0, str(ROOT / "tests" / "pacs"))
from oct_dicom import oct_dataset, phantom_frames, to_bytes

pytestmark = pytest.mark.slow
MARGIN = 60


def with_white_margins(path: Path, margin: int = MARGIN) -> Image.Image:
    """A real scan padded with white side margins, as registration software exports them."""
    a = np.asarray(Image.open(path).convert("L"))
    out = np.full((a.shape[0], a.shape[1] + 2 * margin), 255, np.uint8)
    out[:, margin:margin + a.shape[1]] = a
    return Image.fromarray(out)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_box_excludes_white_margins_and_preview_is_the_upload(client: httpx.Client, fixture_model) -> None:
    image = with_white_margins(KERMANY / "DME-1102486-1.jpeg")  # a scan without margins of its own
    r = client.post("/score", params={"preview": "true"}, files={"file": ("m.png", encode(image), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    box = body["heatmap_box"]
    manifest, _ = load_scorer(fixture_model.version_dir)
    expected = preprocess_gray(to_gray(image), manifest.preprocessing_config())[1].box
    assert (box["x0"], box["y0"], box["x1"], box["y1"]) == expected
    # The margins are outside, the scan inside: the box is the original scan's place on the padded upload.
    assert (box["x0"], box["y0"], box["x1"], box["y1"]) == (MARGIN, 0, image.width - MARGIN, image.height)
    preview = png(body["preview"])
    assert preview.mode == "L" and preview.size == image.size
    assert np.array_equal(np.asarray(preview), np.asarray(image))  # 8-bit gray upload: the very same pixels


def test_no_preview_unless_asked(client: httpx.Client) -> None:
    image = with_white_margins(KERMANY / "NORMAL-1759350-1.jpeg")
    body = client.post("/score", params={"heatmaps": "false"}, content=encode(image),
                       headers={"Content-Type": "image/png"}).json()
    assert "preview" not in body and "heatmaps" not in body
    assert body["heatmap_box"]["x0"] >= MARGIN and body["heatmap_box"]["x1"] <= image.width - MARGIN


def test_every_frame_of_a_volume_has_its_box_and_preview(client: httpx.Client) -> None:
    frames = phantom_frames(3, rows=96, cols=128)
    frames[1, :, :20] = 255  # one frame with a white margin on the left: its box differs from the others'
    data = to_bytes(oct_dataset(frames))
    r = client.post("/score", params={"preview": "true"}, files={"file": ("v.dcm", data, "application/dicom")})
    assert r.status_code == 200, r.text
    body = r.json()
    boxes = [f["heatmap_box"] for f in body["frames"]]
    assert boxes[0] == boxes[2] == {"x0": 0, "y0": 0, "x1": 128, "y1": 96}
    assert boxes[1]["x0"] == 20 and boxes[1]["x1"] == 128
    assert body["heatmap_box"] == boxes[body["max_frame"]]
    for f, frame in zip(body["frames"], frames, strict=True):
        assert np.array_equal(np.asarray(png(f["preview"])), frame)


def test_openapi_documents_the_box(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert set(schemas["HeatmapBox"]["required"]) == {"x0", "y0", "x1", "y1"}
    assert "heatmap_box" in schemas["ScoreResult"]["required"]
    assert "heatmap_box" in schemas["FrameScore"]["properties"]
