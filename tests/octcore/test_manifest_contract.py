"""The manifest is a strict contract: unknown or missing preprocessing fields, unknown manifest fields and a newer
format are refused with the field named; the calibration's fitted tail sets the B-scan and volume thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from octcore.manifest import FORMAT_VERSION, Calibration, ModelStoreError, TailFit, read_manifest, volume_statistic
from octcore.preprocess import Preprocessing
from training.evaluate import calibrate, fit_tail


def manifest_dict() -> dict:
    cal = calibrate(np.linspace(1.0, 2.0, 30), 95.0, None).model_dump()
    return {"format_version": FORMAT_VERSION, "name": "m", "version": 1, "sha256": "0" * 64, "torch_version": "x",
            "created": "now", "input": {"size": 128}, "preprocessing": Preprocessing(size=128).to_dict(),
            "maps": ["fused_map"], "scores": {"fused": {"description": "d", "map": "fused_map"}},
            "primary_score": "fused", "calibration": {"fused": cal}}


def write(tmp_path: Path, d: dict) -> Path:
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    return tmp_path


def test_a_complete_manifest_reads(tmp_path: Path) -> None:
    m = read_manifest(write(tmp_path, manifest_dict()))
    assert m.preprocessing_config() == Preprocessing(size=128)


def test_unknown_preprocessing_field_is_refused_by_name(tmp_path: Path) -> None:
    d = manifest_dict()
    d["preprocessing"]["clahe_clip_limit"] = 2.0
    with pytest.raises(ModelStoreError, match="clahe_clip_limit"):
        read_manifest(write(tmp_path, d))


def test_missing_preprocessing_field_is_refused_by_name(tmp_path: Path) -> None:
    d = manifest_dict()
    del d["preprocessing"]["margin_fill"]
    with pytest.raises(ModelStoreError, match="margin_fill"):
        read_manifest(write(tmp_path, d))


def test_a_preprocessing_field_of_the_wrong_type_is_refused_by_name(tmp_path: Path) -> None:
    d = manifest_dict()
    d["preprocessing"]["mean"] = "grey"
    with pytest.raises(ModelStoreError, match=r"preprocessing\.mean"):
        read_manifest(write(tmp_path, d))


def test_unknown_manifest_field_is_refused_by_name(tmp_path: Path) -> None:
    d = manifest_dict()
    d["postprocessing"] = {"smooth": 3}
    with pytest.raises(ModelStoreError, match="postprocessing"):
        read_manifest(write(tmp_path, d))


def test_a_newer_format_is_refused_before_its_fields(tmp_path: Path) -> None:
    d = manifest_dict() | {"format_version": FORMAT_VERSION + 1, "some_new_field": 1}
    with pytest.raises(ModelStoreError, match=rf"format_version {FORMAT_VERSION + 1} is newer"):
        read_manifest(write(tmp_path, d))


def test_preprocessing_from_dict_is_strict() -> None:
    full = Preprocessing().to_dict()
    assert Preprocessing.from_dict(full) == Preprocessing()
    with pytest.raises(ValueError, match=r"unknown field.*gamma"):
        Preprocessing.from_dict(full | {"gamma": 1.0})
    with pytest.raises(ValueError, match=r"lacks field.*std"):
        Preprocessing.from_dict({k: v for k, v in full.items() if k != "std"})


def test_tail_fit_family_and_quantile() -> None:
    rng = np.random.default_rng(0)
    positive = rng.lognormal(mean=0.5, sigma=0.2, size=2000)
    t = fit_tail(positive)
    assert t is not None and t.family == "lognormal"
    assert t.mu == pytest.approx(0.5, abs=0.02) and t.sigma == pytest.approx(0.2, abs=0.02)
    assert t.quantile(0.95) == pytest.approx(np.exp(0.5 + 1.6449 * t.sigma), rel=0.03)
    assert fit_tail(rng.normal(0, 1, 100)).family == "normal"  # a score that can be negative
    assert fit_tail(np.ones(10)) is None and fit_tail(np.array([1.0, 2.0])) is None


def test_threshold_is_the_fit_quantile_and_falls_back_to_the_percentile() -> None:
    values = np.random.default_rng(1).lognormal(0, 0.3, 40)
    cal = calibrate(values, 90.0, None)
    assert cal.tail is not None and cal.threshold == pytest.approx(cal.tail.quantile(0.9))
    empirical = calibrate(values, 90.0, None, fit="empirical")
    assert empirical.tail is None and empirical.threshold == pytest.approx(np.percentile(values, 90))


def test_volume_threshold_grows_with_frames_and_keeps_normal_volumes_clear() -> None:
    cal = Calibration(n=100, mean=0, std=1, percentiles=list(map(float, range(101))), threshold_percentile=95,
                      threshold=1.6449, tail=TailFit(family="normal", mu=0.0, sigma=1.0))
    assert cal.volume_threshold(1) == cal.threshold
    ts = [cal.volume_threshold(n) for n in (1, 8, 49, 128)]
    assert ts == sorted(ts) and ts[2] == pytest.approx(cal.tail.quantile(0.95 ** (1 / 49)))
    # 49 independent normal B-scans: the volume is flagged about as often as one normal B-scan (5 %).
    maxima = np.random.default_rng(2).normal(size=(20000, 49)).max(axis=1)
    assert np.mean(maxima > cal.volume_threshold(49)) == pytest.approx(0.05, abs=0.01)
    assert np.mean(maxima > cal.threshold) > 0.9  # what the B-scan threshold alone would do to normal volumes
    # a lower-when-anomalous score flags below its 5th percentile: the minimum of 49 gets a lower threshold
    low = cal.model_copy(update={"threshold_percentile": 5.0, "threshold": cal.tail.quantile(0.05)})
    assert low.volume_threshold(49, higher_is_anomalous=False) == pytest.approx(cal.tail.quantile(1 - 0.95 ** (1 / 49)))
    assert low.volume_threshold(49, higher_is_anomalous=False) < low.threshold


def test_a_window_of_adjacent_frames_keeps_normal_volumes_clear_and_finds_a_run_of_lesion_frames() -> None:
    tail = TailFit(family="lognormal", mu=0.0, sigma=0.2)
    cal = Calibration(n=100, mean=0, std=1, percentiles=list(map(float, range(101))), threshold_percentile=95,
                      threshold=tail.quantile(0.95), tail=tail, volume_window=3)
    t = cal.volume_threshold(49)
    assert t == cal.volume_threshold(49)  # seeded: a manifest always gives the same threshold
    assert cal.volume_threshold(1) == cal.threshold
    rng = np.random.default_rng(3)
    normal = np.exp(rng.normal(0.0, 0.2, size=(4000, 49)))
    stats = np.array([volume_statistic(v.tolist(), 3)[0] for v in normal])
    assert np.mean(stats > t) == pytest.approx(0.05, abs=0.015)  # flagged as often as one normal B-scan
    lesion = normal[0].copy()
    lesion[20:24] = 2.0  # four adjacent B-scans through a lesion
    stat, start = volume_statistic(lesion.tolist(), 3)
    assert stat > t and 20 <= start <= 21
    assert volume_statistic([1.0, 5.0], 3) == (3.0, 0)  # fewer frames than the window: their mean
    assert volume_statistic([3.0, 1.0, 2.0, 0.5], 2, higher_is_anomalous=False) == (1.25, 2)


def test_without_a_tail_a_volume_uses_the_b_scan_threshold() -> None:
    cal = calibrate(np.linspace(1.0, 2.0, 30), 95.0, None, fit="empirical")
    assert cal.volume_threshold(49) == cal.threshold
