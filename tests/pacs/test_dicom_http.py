"""DICOM over HTTP against a real `python -m service` (tiny model, no PACS configured): `/score` with DICOM bodies,
STOW-RS success / partial / refusal, the results resource, and bad DICOM → 4xx problem+json, never a 500."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from live import Service, post_dicom
from oct_dicom import PHI, compress, oct_dataset, phantom_frames, to_bytes
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless

from octcore.manifest import read_manifest
from service.multipart import build_related

pytestmark = pytest.mark.slow
FRAMES = phantom_frames(3, 96, 128, seed=1)


def stow(service: Service, bodies: list[bytes], study: str | None = None) -> httpx.Response:
    body, ctype = build_related(bodies)
    path = "/dicomweb/studies" + (f"/{study}" if study else "")
    return httpx.post(service.url + path, content=body, headers={"Content-Type": ctype}, timeout=60)


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def test_volume_scores_per_frame_equal_png_scores(service: Service, fixture_model) -> None:
    ds = oct_dataset(FRAMES)
    r = post_dicom(service, to_bytes(ds), heatmaps="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["study_instance_uid"], body["sop_instance_uid"]) == (ds.StudyInstanceUID, ds.SOPInstanceUID)
    assert body["number_of_frames"] == 3 and [f["index"] for f in body["frames"]] == [0, 1, 2]
    for f in body["frames"]:
        single = httpx.post(f"{service.url}/score", params={"heatmaps": "false"}, content=png(FRAMES[f["index"]]),
                            headers={"Content-Type": "image/png"}, timeout=60).json()
        # The same input pixels (8-bit v and the DICOM frame's v / 255 are bit-identical after preprocessing), but
        # the frames share a batch and each PNG has one to itself: convolutions round differently per batch size,
        # up to ~1e-6 of the score on the tiny model.
        assert f["score"] == pytest.approx(single["score"], rel=1e-5)
        heatmap = base64.b64decode(next(iter(f["heatmaps"].values())))
        assert Image.open(io.BytesIO(heatmap)).format == "PNG"
    scores = [f["score"] for f in body["frames"]]
    assert body["max_frame"] == int(np.argmax(scores))
    # The volume's score is its most anomalous frame's (export's default window of one frame), its threshold the
    # fitted normal tail's for the maximum of 3 frames; each frame is judged against the B-scan threshold.
    manifest = read_manifest(fixture_model.version_dir)
    cal = manifest.calibration[manifest.primary_score]
    assert cal.volume_window == 1 and body["volume_window"] == 1 and body["aggregation"] == "window_mean_max"
    assert body["score"] == max(scores)
    assert body["threshold"] == pytest.approx(cal.volume_threshold(3)) and body["threshold"] > cal.threshold
    assert body["is_anomalous"] == (body["score"] > body["threshold"])
    assert [f["is_anomalous"] for f in body["frames"]] == [f["score"] > cal.threshold for f in body["frames"]]
    for value in PHI.values():
        assert value not in r.text


def test_compressed_and_multipart_dicom_on_score(service: Service) -> None:
    reference = post_dicom(service, to_bytes(oct_dataset(FRAMES)), heatmaps="false").json()
    for ts in (JPEGLSLossless, JPEG2000Lossless):
        r = post_dicom(service, to_bytes(compress(oct_dataset(FRAMES), ts)), heatmaps="false")
        assert r.status_code == 200, r.text
        assert [f["score"] for f in r.json()["frames"]] == pytest.approx([f["score"] for f in reference["frames"]])
    r = httpx.post(f"{service.url}/score", params={"heatmaps": "false"}, timeout=60,
                   files={"file": ("scan.dcm", to_bytes(oct_dataset(FRAMES)), "application/octet-stream")})
    assert r.status_code == 200 and len(r.json()["frames"]) == 3


def _bad_dicoms() -> dict[str, tuple[bytes, int, str]]:
    good = to_bytes(oct_dataset(FRAMES))
    no_pixels = oct_dataset(FRAMES)
    del no_pixels.PixelData
    unsupported = compress(oct_dataset(FRAMES), JPEG2000Lossless)
    unsupported.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    sr = oct_dataset(FRAMES, sop_class="1.2.840.10008.5.1.4.1.1.88.33")
    for k in ("PixelData", "Rows", "Columns", "NumberOfFrames"):
        delattr(sr, k)
    frames = oct_dataset(FRAMES)
    frames.NumberOfFrames = 7
    return {
        "not dicom": (png(FRAMES[0])[:50] + b"\0" * 100, 422, "dicom-not-dicom"),
        "truncated": (good[: len(good) * 2 // 3], 422, "dicom-truncated"),
        "no pixel data": (to_bytes(no_pixels), 422, "dicom-no-pixel-data"),
        "unsupported transfer syntax": (to_bytes(unsupported), 415, "dicom-unsupported-transfer-syntax"),
        "non-image": (to_bytes(sr), 422, "dicom-not-an-image"),
        "frame count": (to_bytes(frames), 422, "dicom-frame-count-mismatch"),
    }


@pytest.mark.parametrize("case", list(_bad_dicoms()))
def test_bad_dicom_on_score_is_a_clear_4xx(service: Service, case: str) -> None:
    data, status, slug = _bad_dicoms()[case]
    r = post_dicom(service, data)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith(slug)


def test_stow_stores_results_for_download(service: Service) -> None:
    ds = oct_dataset(FRAMES)
    r = stow(service, [to_bytes(ds)], study=ds.StudyInstanceUID)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    ref = pydicom.Dataset.from_json(r.json()).ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    record = httpx.get(ref.RetrieveURL, timeout=10).json()
    assert record["delivery"]["status"] == "local"  # no OCT_PACS_STOW_URL: kept for download only
    kinds = {i["kind"]: i for i in record["instances"]}
    assert set(kinds) == {"sr", "sc"}
    sr = pydicom.dcmread(io.BytesIO(httpx.get(kinds["sr"]["url"], timeout=10).content))
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.SOPInstanceUID == kinds["sr"]["sop_instance_uid"]
    listing = httpx.get(f"{service.url}/dicomweb/results", params={"study_instance_uid": ds.StudyInstanceUID}).json()
    assert [x["source_sop_instance_uid"] for x in listing] == [ds.SOPInstanceUID]
    for value in PHI.values():
        assert value not in r.text and value not in str(record)


def test_stow_partial_and_total_failure(service: Service) -> None:
    bad = _bad_dicoms()
    good = oct_dataset(FRAMES)
    r = stow(service, [to_bytes(good), bad["no pixel data"][0], bad["truncated"][0]])
    assert r.status_code == 202, r.text
    resp = pydicom.Dataset.from_json(r.json())
    assert [x.ReferencedSOPInstanceUID for x in resp.ReferencedSOPSequence] == [good.SOPInstanceUID]
    assert sorted(x.FailureReason for x in resp.FailedSOPSequence) == [0xA900, 0xC000]
    r = stow(service, [bad["non-image"][0], bad["unsupported transfer syntax"][0]])
    assert r.status_code == 409, r.text
    reasons = [x.FailureReason for x in pydicom.Dataset.from_json(r.json()).FailedSOPSequence]
    assert reasons == [0x0122, 0xC122]


def test_stow_nothing_written_for_refused_instances(service: Service) -> None:
    refused = oct_dataset(FRAMES)
    refused.NumberOfFrames = 9
    before = set(Path(service.results).iterdir())  # type: ignore[attr-defined]
    assert stow(service, [to_bytes(refused)]).status_code == 409
    mismatch = oct_dataset(FRAMES)
    assert stow(service, [to_bytes(mismatch)], study="1.2.3.4").status_code == 409  # instance of another study
    assert set(Path(service.results).iterdir()) == before  # type: ignore[attr-defined]
    assert httpx.get(f"{service.url}/dicomweb/results/{refused.SOPInstanceUID}").status_code == 404


def test_stow_request_errors(service: Service) -> None:
    r = httpx.post(f"{service.url}/dicomweb/studies", content=b"x", headers={"Content-Type": "application/dicom"})
    assert r.status_code == 415 and r.headers["content-type"].startswith("application/problem+json")
    r = httpx.post(f"{service.url}/dicomweb/studies", content=b"--b\r\n\r\nunterminated",
                   headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert r.status_code == 400 and r.json()["type"].endswith("bad-request")
    r = httpx.post(f"{service.url}/dicomweb/studies", content=b"",
                   headers={"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b'})
    assert r.status_code == 415
    assert httpx.get(f"{service.url}/dicomweb/results/..%2Fetc").status_code == 404
