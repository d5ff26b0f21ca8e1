"""SR and SC builders: real highdicom objects from a real source dataset, re-read with pydicom/highdicom."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
from oct_dicom import MODEL, PHI, oct_dataset, phantom_frames, to_bytes, volume_result

from service.dicom.decode import decode_dicom
from service.dicom.results import MANUFACTURER, ResultIds
from service.dicom.sc import build_sc
from service.dicom.sr import ANOMALY_SCORE, FRAMES_SCORED, build_sr
from service.pipeline.results import ModelId


def _roundtrip(obj) -> pydicom.Dataset:
    buf = io.BytesIO()
    obj.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_sr_same_study_new_series_scores_and_frames() -> None:
    image = decode_dicom(to_bytes(oct_dataset(phantom_frames(3, 64, 96))))
    result = volume_result()
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
    assert [m.value for m in measurement_groups[0].get_measurements(name=FRAMES_SCORED)] == [3]
    assert "tiny" in str(ds.SoftwareVersions) and "3" in str(ds.SoftwareVersions)


def test_sr_and_sc_of_a_partly_refused_volume_say_how_many_frames_were_scored() -> None:
    frames = phantom_frames(3, 64, 96)
    image = decode_dicom(to_bytes(oct_dataset(frames)))
    result = volume_result((0.2, None, 0.7))
    ids = ResultIds(image.series_instance_uid, image.sop_instance_uid, MODEL)
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.Comprehensive3DSR.from_dataset(
        _roundtrip(build_sr(image.dataset, result, ids)))])
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["volume", "frame 1", "frame 3"]  # no group for frame 2
    assert [m.value for m in groups[0].get_measurements(name=FRAMES_SCORED)] == [2]
    sc = _roundtrip(build_sc(image.dataset, image.frames[2], "residual", np.zeros((64, 96), np.uint8),
                             (0, 0, 96, 64), result, ids))
    assert "frame 3 of 3" in sc.ImageComments and "2 of 3 frames scored" in sc.ImageComments


def test_result_uids_are_deterministic_per_source_and_model() -> None:
    a = ResultIds("1.2.3", "1.2.3.4", MODEL)
    assert a.sr_sop_uid == ResultIds("1.2.3", "1.2.3.4", MODEL).sr_sop_uid
    assert a.sr_sop_uid != ResultIds("1.2.3", "1.2.3.4", ModelId(name="tiny", version=4)).sr_sop_uid
    assert len({a.sr_sop_uid, a.sc_sop_uid, a.sr_series_uid, a.sc_series_uid}) == 4


def test_sc_overlay_rgb_of_max_frame() -> None:
    frames = phantom_frames(3, 64, 96)
    image = decode_dicom(to_bytes(oct_dataset(frames)))
    result = volume_result()
    heat = np.zeros((32, 48), np.uint8)  # half the box's size: stretched over it
    heat[10:20, 15:30] = 255
    ids = ResultIds(image.series_instance_uid, image.sop_instance_uid, MODEL)
    sc = build_sc(image.dataset, image.frames[1], "residual", heat, (0, 0, 96, 64), result, ids)
    ds = _roundtrip(sc)
    assert ds.StudyInstanceUID == image.study_instance_uid and ds.SOPInstanceUID == ids.sc_sop_uid
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    rgb = ds.pixel_array
    assert rgb.shape == (64, 96, 3)
    hot, cold = rgb[30, 45].astype(int), rgb[5, 5].astype(int)
    assert hot[0] > hot[2] + 50  # red-yellow where the heatmap is high
    assert abs(cold[0] - cold[2]) <= 1 and abs(int(cold[0]) - round(frames[1][5, 5])) <= 1  # plain gray elsewhere
    assert ds.SourceImageSequence[0].ReferencedFrameNumber == 2
    assert "frame 2 of 3" in ds.ImageComments and "frames scored" not in ds.ImageComments
