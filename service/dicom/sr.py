"""The Structured Report of one scored image: a TID 1500 Imaging Measurement Report (Comprehensive 3D SR) built by
highdicom from the source dataset, so patient and study attributes are copied by the library.

Content: one measurement group for the volume (its score, threshold, percentile, most anomalous frame number, the
number of frames scored, every named score of the most anomalous frame, Normal/Abnormal decision) and one group per
scored frame (score, percentile, decision) whose measurement references that frame (ReferencedFrameNumber); a frame
the model could not read (no retina) has no group, and the count says how many were scored. The algorithm
(model name and version) is recorded as Algorithm Identification and as the observing device. Concepts without a
standard code use the private coding scheme `99OCTAD`.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.dicom.results import MANUFACTURER, ResultIds, model_label
from service.pipeline.results import VolumeResult

SCHEME = "99OCTAD"
ANOMALY_SCORE = hd.sr.CodedConcept("AS001", SCHEME, "OCT anomaly score")
THRESHOLD = hd.sr.CodedConcept("AS002", SCHEME, "Anomaly decision threshold")
PERCENTILE = hd.sr.CodedConcept("AS003", SCHEME, "Percentile among normal scans")
MAX_FRAME = hd.sr.CodedConcept("AS004", SCHEME, "Most anomalous frame number")
DECISION = hd.sr.CodedConcept("AS005", SCHEME, "Anomaly decision")
FRAMES_SCORED = hd.sr.CodedConcept("AS006", SCHEME, "Number of frames scored")
PROCEDURE = hd.sr.CodedConcept("AS100", SCHEME, "Automated OCT anomaly screening")
NO_UNITS, PERCENT = codes.UCUM.NoUnits, codes.UCUM.Percent


def named_score(name: str) -> hd.sr.CodedConcept:
    """A concept per model score (residual, alm, …): the manifest, not this file, decides which scores exist."""
    return hd.sr.CodedConcept(f"S-{name}"[:16], SCHEME, f"Anomaly score: {name}")


def build_sr(source: Dataset, result: VolumeResult, ids: ResultIds) -> hd.sr.Comprehensive3DSR:
    """SR for `result`, scored from `source`; same study, series and instance UIDs from `ids`."""
    algorithm = hd.sr.AlgorithmIdentification(name=result.model.name, version=str(result.model.version),
                                              family=codes.DCM.ArtificialIntelligence)
    ref = (str(source.SOPClassUID), str(source.SOPInstanceUID))

    def decision(anomalous: bool) -> hd.sr.QualitativeEvaluation:
        return hd.sr.QualitativeEvaluation(DECISION, codes.SCT.Abnormal if anomalous else codes.SCT.Normal)

    def on_frame(name: hd.sr.CodedConcept, value: float, unit: object, frame_number: int) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=name, value=value, unit=unit, algorithm_id=algorithm, referenced_images=[
            hd.sr.SourceImageForMeasurement(*ref, referenced_frame_numbers=[frame_number])])

    d = result.decision
    max_number = d.max_frame + 1
    volume_measurements = [
        on_frame(ANOMALY_SCORE, d.score, NO_UNITS, max_number),
        hd.sr.Measurement(name=THRESHOLD, value=d.threshold, unit=NO_UNITS, algorithm_id=algorithm),
        on_frame(PERCENTILE, d.percentile, PERCENT, max_number),
        hd.sr.Measurement(name=MAX_FRAME, value=max_number, unit=NO_UNITS),
        hd.sr.Measurement(name=FRAMES_SCORED, value=len(result.scored), unit=NO_UNITS, algorithm_id=algorithm),
        *(on_frame(named_score(k), v, NO_UNITS, max_number) for k, v in sorted(result.top.scores.items())),
    ]
    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ids.tracking_uid("volume"), identifier="volume"),
        algorithm_id=algorithm, measurements=volume_measurements,
        qualitative_evaluations=[decision(d.is_anomalous)])]
    for f in result.scored:
        n, fd = f.index + 1, f.image.decision  # type: ignore[union-attr]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=ids.tracking_uid(f"frame-{n}"),
                                                         identifier=f"frame {n}"),
            algorithm_id=algorithm,
            measurements=[on_frame(ANOMALY_SCORE, fd.score, NO_UNITS, n),
                          on_frame(PERCENTILE, fd.percentile, PERCENT, n)],
            qualitative_evaluations=[decision(fd.is_anomalous)]))
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ids.device_uid, name=model_label(result.model), manufacturer_name=MANUFACTURER,
            model_name=result.model.name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE, imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0], series_instance_uid=ids.sr_series_uid, series_number=ids.sr_series_number,
        sop_instance_uid=ids.sr_sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=f"OCT anomaly report ({model_label(result.model)})",
        software_versions=model_label(result.model))
