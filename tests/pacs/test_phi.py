"""No patient data in any log line or error text: a DICOM whose every text attribute carries a marker goes through
/score and STOW-RS, intact and broken in several ways, and so does the corpus of malformed attributes
(tests/pacs/malformed.py), at DEBUG, in one serving process and in worker processes; neither the service's log nor any
answer body that is not a result object may contain a marker or a malformed value (docs/security.md: UIDs may
appear, names, IDs and dates may not)."""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterator

import httpx
import pytest
from live import Service
from malformed import CASES, malformed
from malformed import NEEDLES as MALFORMED_VALUES
from oct_dicom import oct_dataset, phantom_frames, to_bytes

from service.dicom.phi import text_values
from service.multipart import build_related
from service.redaction import REDACTED, remember, scrub

pytestmark = pytest.mark.slow

# Every text attribute the service might quote, each with a value found nowhere else.
MARKERS = {
    "PatientName": "Mkrsurname^Mkrgiven", "PatientID": "MKRPID-31337", "PatientBirthDate": "19011231",
    "AccessionNumber": "MKRACC-4711", "InstitutionName": "Mkrclinic", "ReferringPhysicianName": "Mkrdoctor^Who",
    "StudyDescription": "Mkrstudydesc", "SeriesDescription": "Mkrseriesdesc", "StudyID": "MKRSTUDY",
    "OperatorsName": "Mkroperator", "PatientComments": "Mkrcomment about Mkrsubject",
    "InstitutionAddress": "Mkrstreet 1", "StationName": "MKRSTATION", "PatientAge": "077Y",
    "OtherPatientIDs": "MKROTHERID", "DeviceSerialNumber": "MKRSERIAL", "StudyTime": "231759",
}
NEEDLES = re.compile("|".join(re.escape(p) for v in MARKERS.values() for p in re.split(r"[\s^]+", v)
                              if len(p) >= 4), re.IGNORECASE)


def marked(**override: object) -> bytes:
    ds = oct_dataset(phantom_frames(2, 64, 96, seed=4))
    for k, v in {**MARKERS, **override}.items():
        setattr(ds, k, v)
    return to_bytes(ds)


def truncated() -> bytes:
    data = marked()
    return data[: len(data) - 64 * 96 // 2]  # the pixel data ends early


def bits12() -> bytes:
    ds = oct_dataset(phantom_frames(1, 64, 96))
    for k, v in MARKERS.items():
        setattr(ds, k, v)
    ds.BitsAllocated = 12
    return to_bytes(ds)


def bad_sex() -> bytes:
    return marked(PatientSex="MKRSEX")  # a value highdicom refuses when it copies the patient module


def debug_service(fixture_model, tmp_path_factory: pytest.TempPathFactory, workers: int) -> Service:
    tmp = tmp_path_factory.mktemp("phi")
    return Service({"OCT_MODEL_STORE": str(fixture_model.store), "OCT_MODEL_NAME": fixture_model.name,
                    "OCT_DEVICE": "cpu", "OCT_HOST": "127.0.0.1", "OCT_TORCH_THREADS": "1", "OCT_MAX_BATCH_SIZE": "4",
                    "OCT_LOG_LEVEL": "DEBUG", "OCT_RESULTS_DIR": str(tmp / "results"), "OCT_PACS_STOW_URL": "",
                    "OCT_WORKERS": str(workers)}, tmp / "service.log")


@pytest.fixture(scope="module")
def service(fixture_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = debug_service(fixture_model, tmp_path_factory, workers=1)
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def workers_service(fixture_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Two worker processes decode and build: each must silence the DICOM libraries itself."""
    svc = debug_service(fixture_model, tmp_path_factory, workers=2)
    svc.start()
    yield svc
    svc.stop()


def test_markers_appear_nowhere_but_in_result_objects(service: Service) -> None:
    bodies = {"valid": marked(), "truncated": truncated(), "12-bit": bits12(), "bad-sex": bad_sex(),
              "not-dicom": b"\0" * 128 + b"DICM" + MARKERS["PatientID"].encode() * 20}
    answers: list[tuple[str, httpx.Response]] = []
    with httpx.Client(base_url=service.url, timeout=60) as c:
        for name, data in bodies.items():
            answers.append((f"/score {name}", c.post("/score", content=data, params={"heatmaps": "false"},
                                                     headers={"Content-Type": "application/dicom"})))
            body, ctype = build_related([data])
            answers.append((f"STOW {name}", c.post("/dicomweb/studies", content=body,
                                                   headers={"Content-Type": ctype})))
        answers.append(("results", c.get("/dicomweb/results")))
        for uid in [r["source_sop_instance_uid"] for r in answers[-1][1].json()]:
            answers.append((f"result {uid}", c.get(f"/dicomweb/results/{uid}")))
    status = {what: r.status_code for what, r in answers}
    assert status["/score valid"] == 200 and status["STOW valid"] == 200, status
    for broken in ("truncated", "12-bit", "not-dicom"):
        assert 400 <= status[f"/score {broken}"] < 500 and status[f"STOW {broken}"] == 409, status
    for what, r in answers:
        assert r.status_code < 500, (what, r.text)
        found = NEEDLES.findall(r.text)
        assert not found, f"{what} answered {found}"
    log = service.log()
    assert "refused" in log  # the broken objects were logged, so the grep below looks at real lines
    assert not NEEDLES.findall(log), NEEDLES.findall(log)[:5]


@pytest.mark.parametrize("which", ["service", "workers_service"])
def test_malformed_attributes_are_scored_and_their_values_reach_no_log(which: str,
                                                                       request: pytest.FixtureRequest) -> None:
    svc: Service = request.getfixturevalue(which)
    answers: list[tuple[str, httpx.Response]] = []
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        for case in CASES:
            data = malformed(case)
            answers.append((f"/score {case}", c.post("/score", content=data, params={"heatmaps": "false"},
                                                     headers={"Content-Type": "application/dicom"})))
            body, ctype = build_related([data])
            answers.append((f"STOW {case}", c.post("/dicomweb/studies", content=body,
                                                   headers={"Content-Type": ctype})))
            uid = answers[-1][1].json()["00081199"]["Value"][0]["00081155"]["Value"][0]
            answers.append((f"result {case}", c.get(f"/dicomweb/results/{uid}")))
    for what, r in answers:
        assert r.status_code == 200, (what, r.text)
        assert "00081198" not in r.text, (what, r.text)  # no FailedSOPSequence: every instance stored
        assert not MALFORMED_VALUES.findall(r.text), f"{what} answered {MALFORMED_VALUES.findall(r.text)}"
    log = svc.log()
    levels = {line.split('"level": "', 1)[1].split('"', 1)[0] for line in log.splitlines() if '"level": "' in line}
    assert "source attributes not valid" in log and "DEBUG" in levels, levels  # real lines, at DEBUG
    assert not MALFORMED_VALUES.findall(log), [line for line in log.splitlines() if MALFORMED_VALUES.search(line)][:5]


def test_scrub_blanks_remembered_values_in_any_case() -> None:
    ds = oct_dataset(phantom_frames(1, 8, 8))
    ds.PatientName = "Doe^Jane"
    values = text_values(ds)
    assert {"Doe^Jane", "Jane", "19500101", "PHI-98765"} <= values and ds.SOPInstanceUID not in values
    assert "MONOCHROME2" not in values  # coded strings are not identities

    def in_a_request() -> str:
        remember(values)
        return scrub("patient DOE^JANE born 19500101")

    assert contextvars.copy_context().run(in_a_request) == f"patient {REDACTED} born {REDACTED}"
    assert scrub("Jane") == "Jane"  # another request (context) remembers nothing
