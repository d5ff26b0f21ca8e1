from __future__ import annotations

import json
from pathlib import Path

import pytest

from octcore.manifest import (
    Calibration,
    ModelStoreError,
    ScoreSpec,
    default_overlay,
    list_versions,
    load_scorer,
    read_manifest,
    resolve_version_dir,
)


def cal(values: list[float]) -> Calibration:
    return Calibration(n=101, mean=50, std=29, percentiles=values, threshold_percentile=95, threshold=values[95])


def test_percentile_of_interpolates_and_clamps() -> None:
    c = cal([float(i) for i in range(101)])
    assert c.percentile_of(-5) == 0.0
    assert c.percentile_of(1000) == 100.0
    assert c.percentile_of(42.5) == pytest.approx(42.5)


def test_percentile_of_flat_distribution() -> None:
    c = cal([1.0] * 101)
    assert c.percentile_of(1.0) == 0.0 and c.percentile_of(1.1) == 100.0


def test_latest_version_is_resolved(tmp_path: Path) -> None:
    for v in (1, 3, 2):
        d = tmp_path / "m" / str(v)
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
    (tmp_path / "m" / ".4-tmp").mkdir()  # an export in progress is not a version
    assert list_versions(tmp_path, "m") == [1, 2, 3]
    assert resolve_version_dir(tmp_path, "m").name == "3"
    with pytest.raises(ModelStoreError, match="no versions"):
        resolve_version_dir(tmp_path, "other")


def test_invalid_manifest_is_a_one_line_reason(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelStoreError, match="not a valid manifest"):
        read_manifest(tmp_path)


@pytest.mark.slow
def test_tampered_weights_are_refused(tiny_model, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_model.version_dir, d)
    manifest, _ = load_scorer(d)
    assert manifest.name == "tiny"
    with open(d / "model.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelStoreError, match="sha256"):
        load_scorer(d)


@pytest.mark.slow
def test_overlay_must_name_a_score_with_a_map(tiny_model, tmp_path: Path) -> None:
    manifest, _ = load_scorer(tiny_model.version_dir)
    assert manifest.overlay_score is not None and manifest.scores[manifest.overlay_score].map  # export set it
    unmapped = next(k for k, s in manifest.scores.items() if not s.map)
    for bad in (unmapped, "no-such-score"):
        with pytest.raises(ModelStoreError, match="overlay_score"):
            manifest.model_copy(update={"overlay_score": bad}).check_consistent()


def test_default_overlay_is_the_primary_map_else_the_preferred_map() -> None:
    mapped = {k: ScoreSpec(description=k, map=f"{k}_map") for k in ("residual", "alm", "fused")}
    scores = {**mapped, "residual_contrast": ScoreSpec(description="", map=None),
              "combined": ScoreSpec(description="", map=None)}
    assert default_overlay("alm", scores, ["fused"]) == "alm"
    assert default_overlay("combined", scores, ["fused"]) == "fused"
    assert default_overlay("combined", {k: v for k, v in scores.items() if k != "fused"}, ["fused"]) == "residual"
    assert default_overlay("combined", {"combined": scores["combined"]}, ["fused"]) is None
