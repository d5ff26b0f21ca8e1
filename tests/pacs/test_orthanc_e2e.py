"""End to end with a real Orthanc (Debian package + DICOMweb plugin, started by scripts/orthanc.sh on loopback) and
a real `python -m service` on the tiny exported model:

1. a multi-frame OCT DICOM stored into Orthanc is auto-routed (docker/orthanc/autoroute.lua) to the service by
   STOW-RS; the service scores it and stores an SR and a heatmap SC back into the same study in Orthanc; the SR's
   score equals what `/score` answers for the same DICOM, and for the same pixels as a PNG;
2. with Orthanc down, a study the router hands to the service is scored and kept; the service is restarted while
   Orthanc is still down; once Orthanc is back, the results arrive.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from live import Service, free_port, wait_for
from oct_dicom import PHI, oct_dataset, to_bytes
from PIL import Image

from service.dicom.sr import ANOMALY_SCORE
from service.multipart import build_related

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "orthanc.sh"
PASSWORD = "e2e-secret"
PLUGIN = Path(os.environ.get("ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("Orthanc") is None or not PLUGIN.is_file(),
                       reason="Orthanc + DICOMweb plugin not installed: run `bash scripts/orthanc.sh install`"),
]


class Orthanc:
    def __init__(self, workdir: Path, service_url: str) -> None:
        self.dir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ORTHANC_HTTP_PORT": str(self.port), "ORTHANC_DICOM_PORT": str(free_port()),
                    "ORTHANC_STABLE_AGE": "1", "ORTHANC_PASSWORD": PASSWORD,
                    "OCT_SERVICE_DICOMWEB_URL": f"{service_url}/dicomweb/"}
        self.http = httpx.Client(base_url=self.url, auth=("oct", PASSWORD), timeout=30)

    def _script(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=60)

    def start(self, *, first: bool = False) -> None:
        proc = self._script("start", str(self.dir))
        if proc.returncode != 0:
            reason = f"Orthanc cannot be started here: {proc.stderr.strip()[-500:]}"
            if first:  # no usable Orthanc on this machine at all: say so and skip
                pytest.skip(reason)
            pytest.fail(reason)  # it ran before in this test: failing to come back is a real failure

    def stop(self) -> None:
        self._script("stop", str(self.dir))

    def series(self, study: str) -> list[dict]:
        """QIDO-RS: the study's series with modality and manufacturer ([] while the study is unknown)."""
        r = self.http.get(f"/dicom-web/studies/{study}/series", params={"includefield": "00080070"})
        return r.json() if r.status_code == 200 and r.content else []

    def instance_bytes(self, sop_uid: str) -> bytes:
        found = self.http.post("/tools/lookup", content=sop_uid).json()
        (inst,) = [f for f in found if f["Type"] == "Instance"]
        return self.http.get(f"/instances/{inst['ID']}/file").content


@pytest.fixture
def stack(fixture_model, tmp_path: Path) -> Iterator[tuple[Service, Orthanc]]:
    # The two need each other's URL: pick the service port first, hand it to Orthanc's config.
    env = {"OCT_MODEL_STORE": str(fixture_model.store), "OCT_MODEL_NAME": fixture_model.name, "OCT_DEVICE": "cpu",
           "OCT_HOST": "127.0.0.1", "OCT_TORCH_THREADS": "1", "OCT_MAX_BATCH_SIZE": "4", "OCT_LOG_FORMAT": "json",
           "OCT_RESULTS_DIR": str(tmp_path / "results"), "OCT_PACS_USERNAME": "oct", "OCT_PACS_PASSWORD": PASSWORD,
           "OCT_PACS_RETRY_BACKOFF_S": "0.2", "OCT_PACS_TIMEOUT_S": "10", "OCT_MAX_UPLOAD_BYTES": str(256 << 20)}
    service = Service(env, tmp_path / "service.log")
    orthanc = Orthanc(tmp_path / "orthanc", service.url)
    service.env["OCT_PACS_STOW_URL"] = f"{orthanc.url}/dicom-web/studies"
    orthanc.start(first=True)
    try:
        service.start()
        yield service, orthanc
    finally:
        service.stop()
        orthanc.stop()


def real_volume(n: int = 3) -> np.ndarray:
    """n real B-scans (tests/data/kermany) as uint8 (n, 248, 256)."""
    paths = sorted((ROOT / "tests" / "data" / "kermany").glob("*.jpeg"))[:n]
    assert len(paths) == n, "tests/data/kermany holds the real sample scans"
    return np.stack([np.asarray(Image.open(p).convert("L").resize((256, 248))) for p in paths])


def results_in_study(orthanc: Orthanc, study: str) -> dict[str, dict] | None:
    """{'SR': series, 'OT': series} once both result series made by the service are in the study."""
    ours = {s["00080060"]["Value"][0]: s for s in orthanc.series(study)
            if s.get("00080070", {}).get("Value", [""])[0] == "oct-anomaly"}
    return ours if {"SR", "OT"} <= set(ours) else None


def sr_volume_score(sr_bytes: bytes) -> float:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(sr_bytes)))
    report = hd.sr.MeasurementReport.from_sequence([sr])
    (volume,) = [g for g in report.get_image_measurement_groups() if g.tracking_identifier == "volume"]
    return float(volume.get_measurements(name=ANOMALY_SCORE)[0].value)


def test_orthanc_routes_study_and_gets_sr_and_heatmap_back(stack, fixture_model) -> None:
    service, orthanc = stack
    frames = real_volume()
    ds = oct_dataset(frames)
    data = to_bytes(ds)

    stored = orthanc.http.post("/instances", content=data)
    assert stored.status_code == 200, stored.text
    series = wait_for("SR + SC in the study in Orthanc", lambda: results_in_study(orthanc, ds.StudyInstanceUID))
    assert set(series) == {"SR", "OT"}

    record = httpx.get(f"{service.url}/dicomweb/results/{ds.SOPInstanceUID}", timeout=10).json()
    assert record["delivery"]["status"] == "delivered"
    by_kind = {i["kind"]: i for i in record["instances"]}
    sr_bytes = orthanc.instance_bytes(by_kind["sr"]["sop_instance_uid"])
    sc = pydicom.dcmread(io.BytesIO(orthanc.instance_bytes(by_kind["sc"]["sop_instance_uid"])))
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == ds.StudyInstanceUID
    assert sr.SeriesInstanceUID != ds.SeriesInstanceUID and sc.PhotometricInterpretation == "RGB"
    assert sc.Rows == frames.shape[1] and sc.Columns == frames.shape[2]

    # The score in the PACS equals /score on the same DICOM, and on the same pixels sent as a PNG.
    scored = httpx.post(f"{service.url}/score", params={"heatmaps": "false"}, content=data,
                        headers={"Content-Type": "application/dicom"}, timeout=60)
    assert scored.status_code == 200, scored.text
    body = scored.json()
    assert sr_volume_score(sr_bytes) == pytest.approx(body["score"], rel=1e-6)
    assert body["max_frame"] == record["result"]["max_frame"] and len(body["frames"]) == len(frames)
    png = io.BytesIO()
    Image.fromarray(frames[body["max_frame"]]).save(png, format="PNG")
    as_png = httpx.post(f"{service.url}/score", params={"heatmaps": "false"}, content=png.getvalue(),
                        headers={"Content-Type": "image/png"}, timeout=60).json()
    assert as_png["score"] == pytest.approx(body["score"], rel=1e-6)

    # The SR also sits in the service's results resource; no patient data left the service in its answers or logs.
    assert httpx.get(by_kind["sr"]["url"], timeout=10).content == sr_bytes
    for text in (scored.text, str(record), service.log()):
        for value in PHI.values():
            assert value not in text


def test_results_survive_pacs_outage_and_service_restart(stack, fixture_model) -> None:
    service, orthanc = stack
    ds = oct_dataset(real_volume(2))
    orthanc.stop()

    # What the router does when a study is stable: STOW-RS to the service. Orthanc is down from here on.
    body, ctype = build_related([to_bytes(ds)])
    r = httpx.post(f"{service.url}/dicomweb/studies/{ds.StudyInstanceUID}", content=body,
                   headers={"Content-Type": ctype, "Accept": "application/dicom+json"}, timeout=60)
    assert r.status_code == 200, r.text
    ref = pydicom.Dataset.from_json(r.json()).ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID

    def failed_attempt() -> dict | None:
        rec = httpx.get(f"{service.url}/dicomweb/results/{ds.SOPInstanceUID}", timeout=10).json()
        return rec if rec["delivery"]["attempts"] >= 1 else None

    rec = wait_for("a failed delivery attempt", failed_attempt)
    assert rec["delivery"]["status"] == "pending" and rec["delivery"]["last_error"]

    service.stop()  # restart while results are still undelivered: they wait on disk
    service.start()
    orthanc.start()
    wait_for("SR + SC in Orthanc after it came back", lambda: results_in_study(orthanc, ds.StudyInstanceUID))
    rec = httpx.get(f"{service.url}/dicomweb/results/{ds.SOPInstanceUID}", timeout=10).json()
    assert rec["delivery"]["status"] == "delivered" and rec["delivery"]["attempts"] >= 2
