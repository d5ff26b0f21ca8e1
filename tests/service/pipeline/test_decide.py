"""One decision rule for a B-scan and a volume (service/pipeline/decide.py), on the shipped model's calibration."""

from __future__ import annotations

import pytest
from service_helpers import ROOT

from octcore.manifest import read_manifest
from service.pipeline.decide import Decider

SHIPPED = ROOT / "model_store" / "kermany-oct" / "1"


@pytest.fixture(scope="module")
def decider() -> Decider:
    return Decider.for_model(read_manifest(SHIPPED))


def test_a_b_scan_is_a_volume_of_one(decider: Decider) -> None:
    cal = decider.calibration
    for score in (cal.threshold * 0.5, cal.threshold * 2):
        d = decider.decide([score])
        assert (d.score, d.threshold, d.max_frame, d.window) == (score, cal.threshold, 0, 1)
        assert d.is_anomalous == (score > cal.threshold)
        assert d.percentile == pytest.approx(cal.percentile_of(score))


def test_a_volume_is_decided_on_its_most_anomalous_run_against_a_threshold_for_its_length(decider: Decider) -> None:
    cal = decider.calibration
    t = cal.threshold
    scores = [0.5 * t, 0.9 * t, 1.05 * t, 0.95 * t, 0.4 * t]
    d = decider.decide(scores)
    w = min(cal.volume_window, len(scores))
    assert d.window == w and d.max_frame == 2
    best = max(sum(scores[i:i + w]) / w for i in range(len(scores) - w + 1))
    assert d.score == pytest.approx(best)
    assert d.threshold == pytest.approx(cal.volume_threshold(len(scores))) and d.threshold > t
    assert d.is_anomalous == (d.score > d.threshold)
    assert d.percentile == pytest.approx(cal.percentile_of(scores[2]))  # the most anomalous frame's
    # The same frame scores in a longer volume face a higher threshold: more normal frames, more chances.
    assert decider.decide(scores * 4).threshold > d.threshold
