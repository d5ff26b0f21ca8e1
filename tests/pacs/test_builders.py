"""SR and SC builders: real highdicom objects from a real source dataset, re-read with pydicom/highdicom."""

from __future__ import annotations

import base64
import io

import highdicom as hd
import numpy as np
import pydicom
from oct_dicom import PHI, oct_dataset, phantom_frames, to_bytes
from PIL import Image

from octcore.preprocess import Preprocessing
from service.dicom.decode import decode_dicom
from service.dicom.results import MANUFACTURER, ResultIds
from service.dicom.sc import build_sc
from service.dicom.schemas import FrameScore, VolumeScoreResult
from service.dicom.sr import ANOMALY_SCORE, build_sr
from service.schemas import ModelRef, TimingMs

MODEL = ModelRef(name="tiny", version=3)


def _result(image, scores=(0.1, 0.9, 0.3)) -> VolumeScoreResult:
    frames = [FrameScore(index=i, frame_number=i + 1, score=s, scores={"residual": s, "alm": s / 2},
                         is_anomalous=s > 0.5, percentile=min(100.0, s * 100)) for i, s in enumerate(scores)]
    top = int(np.argmax(scores))
    return VolumeScoreResult(
        request_id="r", model=MODEL, study_instance_uid=image.study_instance_uid,
        series_instance_uid=image.series_instance_uid, sop_instance_uid=image.sop_instance_uid,
        sop_class_uid=image.sop_class_uid, number_of_frames=len(scores), score=scores[top],
        scores=frames[top].scores, threshold=0.5, is_anomalous=True, percentile=frames[top].percentile,
        max_frame=top, frames=frames, timing_ms=TimingMs(queue=0, inference=0, total=0))


def _roundtrip(obj) -> pydicom.Dataset:
    buf = io.BytesIO()
    obj.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_sr_same_study_new_series_scores_and_frames() -> None:
    image = decode_dicom(to_bytes(oct_dataset(phantom_frames(3, 64, 96))))
    result = _result(image)
    ids = ResultIds(image.series_instance_uid, image.sop_instance_uid, MODEL)
    ds = _roundtrip(build_sr(image.dataset, result, ids))
    assert ds.StudyInstanceUID == image.study_instance_uid
    assert ds.SeriesInstanceUID not in (image.series_instance_uid, "") and ds.Modality == "SR"
    assert ds.SOPInstanceUID == ids.sr_sop_uid and ds.Manufacturer == MANUFACTURER
    # Patient module copied by highdicom from the source, not retyped.
    assert str(ds.PatientName) == PHI["PatientName"] and ds.PatientID == PHI["PatientID"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    measurement_groups = report.get_image_measurement_groups()
    assert len(measurement_groups) == 4  # the volume + one per frame
    values = {g.tracking_identifier: [m.value for m in g.get_measurements(name=ANOMALY_SCORE)]
              for g in measurement_groups}
    assert values == {"volume": [0.9], "frame 1": [0.1], "frame 2": [0.9], "frame 3": [0.3]}
    assert "tiny" in str(ds.SoftwareVersions) and "3" in str(ds.SoftwareVersions)


def test_result_uids_are_deterministic_per_source_and_model() -> None:
    a = ResultIds("1.2.3", "1.2.3.4", MODEL)
    assert a.sr_sop_uid == ResultIds("1.2.3", "1.2.3.4", MODEL).sr_sop_uid
    assert a.sr_sop_uid != ResultIds("1.2.3", "1.2.3.4", ModelRef(name="tiny", version=4)).sr_sop_uid
    assert len({a.sr_sop_uid, a.sc_sop_uid, a.sr_series_uid, a.sc_series_uid}) == 4


def test_sc_overlay_rgb_of_max_frame() -> None:
    frames = phantom_frames(3, 64, 96)
    image = decode_dicom(to_bytes(oct_dataset(frames)))
    result = _result(image)
    heat = np.zeros((64, 96), np.uint8)
    heat[20:40, 30:60] = 255
    buf = io.BytesIO()
    Image.fromarray(heat).save(buf, format="PNG")
    ids = ResultIds(image.series_instance_uid, image.sop_instance_uid, MODEL)
    sc = build_sc(image.dataset, image.frames[1], "residual", base64.b64encode(buf.getvalue()).decode(),
                  Preprocessing(size=64), result, ids)
    ds = _roundtrip(sc)
    assert ds.StudyInstanceUID == image.study_instance_uid and ds.SOPInstanceUID == ids.sc_sop_uid
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    rgb = ds.pixel_array
    assert rgb.shape == (64, 96, 3)
    hot, cold = rgb[30, 45].astype(int), rgb[5, 5].astype(int)
    assert hot[0] > hot[2] + 50  # red-yellow where the heatmap is high
    assert abs(cold[0] - cold[2]) <= 1 and abs(int(cold[0]) - round(frames[1][5, 5])) <= 1  # plain gray elsewhere
    assert ds.SourceImageSequence[0].ReferencedFrameNumber == 2
