"""The shipped model's answers do not move when the service's code does: scores, decisions, heatmap boxes and heatmap
pixels of a JPEG, a PNG and a three-frame DICOM volume of real scans, recorded from `kermany-oct` version 1 (before
the service was redrawn in layers) in `tests/service/golden/`, compared with what `/score` answers now. Pixels: every
heatmap of the JPEG, the overlay score's heatmap of the others (kept small).

Re-record, only when a change of answers is intended (a new preprocessing step, say), with
`.venv/bin/python tests/service/test_answers_unchanged.py --record`, and say why in the commit.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "pacs"))
from oct_dicom import oct_dataset, to_bytes  # noqa: E402

from service.main import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden"
KERMANY = ROOT / "tests" / "data" / "kermany"
VOLUME = ("NORMAL-1017237-1.jpeg", "CNV-103044-2.jpeg", "DRUSEN-228939-1.jpeg")  # all 512 × 496
DECISION = ("score", "threshold", "is_anomalous", "percentile")


def inputs() -> dict[str, tuple[str, bytes]]:
    """name → (Content-Type, body): the same bytes on every run."""
    png = io.BytesIO()
    Image.open(KERMANY / "DME-30521-11.jpeg").save(png, format="PNG")
    frames = np.stack([np.asarray(Image.open(KERMANY / f).convert("L")) for f in VOLUME])
    return {"jpeg": ("image/jpeg", (KERMANY / "CNV-154835-1.jpeg").read_bytes()),
            "png": ("image/png", png.getvalue()),
            "dicom": ("application/dicom", to_bytes(oct_dataset(frames)))}


def settings() -> Settings:
    return Settings(model_store=ROOT / "model_store", model_name="kermany-oct", model_version=1, device="cpu",
                    warmup=False, max_batch_size=4)


def answer(body: dict[str, Any], maps: dict[str, np.ndarray], key: str, kept: set[str] | None) -> dict[str, Any]:
    """What is compared of one answer (a B-scan's or one frame's): decision, scores, box; its heatmaps named in
    `kept` (None: all) go to `maps`."""
    out = {k: body[k] for k in (*DECISION, "scores", "heatmap_box") if k in body}
    for name, b64 in (body.get("heatmaps") or {}).items():
        if kept is None or name in kept:
            maps[f"{key}/{name}"] = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    return out


def answers(client: TestClient) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    got: dict[str, Any] = {}
    maps: dict[str, np.ndarray] = {}
    overlay = {client.get("/models").json()["overlay_score"]}
    for name, (media, body) in inputs().items():
        r = client.post("/score", content=body, headers={"Content-Type": media})
        assert r.status_code == 200, r.text
        a = r.json()
        kept = None if name == "jpeg" else overlay
        got[name] = answer(a, maps, name, kept)
        if "frames" in a:
            got[name].update(max_frame=a["max_frame"], volume_window=a["volume_window"],
                             frames=[answer(f, maps, f"{name}/{f['index']}", kept) for f in a["frames"]])
    return got, maps


def record() -> None:
    with TestClient(create_app(settings())) as client:
        got, maps = answers(client)
    GOLDEN.mkdir(exist_ok=True)
    (GOLDEN / "answers.json").write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(GOLDEN / "heatmaps.npz", **maps)


def assert_same(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_answers_of_the_shipped_model_are_unchanged() -> None:
    want = json.loads((GOLDEN / "answers.json").read_text())
    with np.load(GOLDEN / "heatmaps.npz") as f:
        want_maps = {k: f[k] for k in f.files}
    with TestClient(create_app(settings())) as client:
        got, maps = answers(client)
    assert_same(got, want, "answer")
    assert set(maps) == set(want_maps)
    for k, w in want_maps.items():
        assert maps[k].shape == w.shape, k
        diff = np.abs(maps[k].astype(int) - w.astype(int))
        # Float sums in another order (another batch) may round a pixel the other way: by one level, rarely.
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"{k}: {int(diff.max())}, {(diff > 0).mean():.2%}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(f"usage: {sys.argv[0]} --record   (writes {GOLDEN})")
    record()
