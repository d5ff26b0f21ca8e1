"""DICOM on a model of the retina band (preprocessing region `retina`): a frame without a retina is refused and left
out of the volume's decision; an object with no such frame is a 422 `no-retina` on /score and, in STOW-RS, a failed
instance (processing failure) of which nothing is stored, while the other instances of the request are stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from live import Service, post_dicom, running
from oct_dicom import oct_dataset, to_bytes
from PIL import Image

from service.dicom.errors import PROCESSING_FAILURE
from service.multipart import build_related

pytestmark = pytest.mark.slow
KERMANY = Path(__file__).resolve().parents[1] / "data" / "kermany"
REAL = [np.asarray(Image.open(KERMANY / f).convert("L"))
        for f in ("NORMAL-1017237-1.jpeg", "CNV-103044-2.jpeg", "DME-30521-11.jpeg")]  # 512 × 496
NOISE = np.random.default_rng(11).integers(0, 256, (496, 512), dtype=np.uint8)


@pytest.fixture(scope="module")
def service(retina_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running(retina_model, tmp_path_factory.mktemp("no-retina")) as svc:
        yield svc


def test_a_frame_without_a_retina_is_refused_and_left_out(service: Service) -> None:
    frames = np.stack([REAL[0], NOISE, REAL[1], REAL[2]])
    r = post_dicom(service, to_bytes(oct_dataset(frames)))
    assert r.status_code == 200, r.text
    body = r.json()
    refused = body["frames"][1]
    assert refused["refused"].startswith("no retina: ") and "score" not in refused and "heatmaps" not in refused
    scored = [f for f in body["frames"] if "refused" not in f]
    assert [f["index"] for f in scored] == [0, 2, 3] and all(f["heatmaps"] for f in scored)
    assert body["number_of_frames"] == 4 and body["frames_scored"] == 3 and body["max_frame"] != 1
    # The volume is the volume of its three scored frames: the same answer as an object of those frames alone.
    alone = post_dicom(service, to_bytes(oct_dataset(np.stack([REAL[0], REAL[1], REAL[2]])))).json()
    assert (body["score"], body["threshold"], body["is_anomalous"]) == pytest.approx(
        (alone["score"], alone["threshold"], alone["is_anomalous"]))
    assert [f["score"] for f in scored] == pytest.approx([f["score"] for f in alone["frames"]])


def test_an_object_without_any_retina_is_422_on_score(service: Service) -> None:
    r = post_dicom(service, to_bytes(oct_dataset(np.stack([NOISE, NOISE[::-1]]))))
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "urn:oct-anomaly:problem:no-retina"


def test_stow_fails_an_object_without_a_retina_and_stores_the_others(service: Service) -> None:
    empty, real = oct_dataset(np.stack([NOISE])), oct_dataset(np.stack(REAL[:2]))
    body, ctype = build_related([to_bytes(empty), to_bytes(real)])
    r = httpx.post(f"{service.url}/dicomweb/studies", content=body, headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 202, r.text  # some stored, some failed
    answer = pydicom.Dataset.from_json(r.json())
    [failed] = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == empty.SOPInstanceUID and failed.FailureReason == PROCESSING_FAILURE
    assert [s.ReferencedSOPInstanceUID for s in answer.ReferencedSOPSequence] == [real.SOPInstanceUID]
    results = httpx.get(f"{service.url}/dicomweb/results", timeout=30).json()
    assert {x["source_sop_instance_uid"] for x in results} == {real.SOPInstanceUID}  # nothing of the refused one
    record = httpx.get(f"{service.url}/dicomweb/results/{real.SOPInstanceUID}", timeout=30).json()
    assert record["result"]["frames_scored"] == 2
    assert "no retina" in service.log() and empty.SOPInstanceUID in service.log()
