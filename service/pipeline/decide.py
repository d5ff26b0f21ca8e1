"""The decision on the primary score, one rule for a B-scan and for a volume (AGGREGATION_DOC in
service/dicom/schemas.py): a volume's statistic is the highest mean over `volume_window` adjacent scores and its
threshold depends on how many there are; one B-scan is a volume of one, whose statistic is its score and whose
threshold is the B-scan threshold (`octcore.manifest.Calibration`)."""

from __future__ import annotations

from collections.abc import Sequence

from octcore.manifest import Calibration, Manifest, volume_statistic
from service.pipeline.results import Decision


class Decider:
    def __init__(self, calibration: Calibration, higher_is_anomalous: bool = True) -> None:
        self.calibration = calibration
        self.higher_is_anomalous = higher_is_anomalous

    @classmethod
    def for_model(cls, manifest: Manifest) -> Decider:
        primary = manifest.primary_score
        return cls(manifest.calibration[primary], manifest.scores[primary].higher_is_anomalous)

    def decide(self, scores: Sequence[float]) -> Decision:
        """`scores`: the primary score of each B-scan, in order (at least one)."""
        cal, higher = self.calibration, self.higher_is_anomalous
        # A lesion spans adjacent B-scans; and the most anomalous of n normal B-scans rises with n, so the
        # threshold depends on n.
        score, _ = volume_statistic(list(scores), cal.volume_window, higher)
        threshold = cal.volume_threshold(len(scores), higher)
        pick = max if higher else min
        top = pick(range(len(scores)), key=scores.__getitem__)  # the first frame wins a tie
        return Decision(score=score, threshold=threshold,
                        is_anomalous=bool(score > threshold if higher else score < threshold),
                        percentile=cal.percentile_of(scores[top]), max_frame=top,
                        window=min(cal.volume_window, len(scores)))
