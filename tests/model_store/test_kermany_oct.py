"""The shipped real-scan model (model_store/kermany-oct/): a valid, verified store entry with its card, served as it
is, scoring real Kermany B-scans the same whatever their width."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from octcore.manifest import list_versions, load_scorer, resolve_version_dir
from octcore.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]
STORE, NAME = ROOT / "model_store", "kermany-oct"
KERMANY = ROOT / "tests" / "data" / "kermany"


@pytest.fixture(scope="module")
def shipped():
    return load_scorer(resolve_version_dir(STORE, NAME), "cpu")  # verifies the sha256 too


def score(shipped, image: Image.Image) -> float:
    manifest, scorer = shipped
    with torch.no_grad():
        x = torch.from_numpy(preprocess(image, manifest.preprocessing_config()))[None, None]
        return float(scorer(x)[manifest.primary_score])


def test_the_shipped_model_is_a_complete_store_entry(shipped) -> None:
    manifest, _ = shipped
    version_dir = resolve_version_dir(STORE, NAME)
    assert list_versions(STORE, NAME) and (version_dir / "model.pt").stat().st_size < 20e6
    assert manifest.primary_score == "fused" and manifest.evaluation["held_out_evidence"].startswith("none")
    cal = manifest.calibration[manifest.primary_score]
    assert cal.tail is not None and cal.volume_threshold(49) > cal.threshold
    card = (version_dir / "MODEL_CARD.md").read_text()  # beside the weights it describes
    assert "CC BY 4.0" in card and "bench/bench_real.py" in card


@pytest.mark.parametrize("name", ["NORMAL-1017237-1.jpeg", "NORMAL-1759350-1.jpeg"])
def test_a_normal_scan_scores_alike_at_512_and_1024_columns(shipped, name: str) -> None:
    """The same anatomy resampled to twice the A-scans (Spectralis writes 512-1536 columns over one field of view)
    stays within one percentile of normal of itself; the normal scans' own spread is tens of percentiles."""
    manifest, _ = shipped
    cal = manifest.calibration[manifest.primary_score]
    image = Image.open(KERMANY / name)
    assert image.size == (512, 496)
    wide = image.resize((1024, 496), Image.Resampling.BICUBIC)
    narrow, doubled = score(shipped, image), score(shipped, wide)
    assert abs(cal.percentile_of(narrow) - cal.percentile_of(doubled)) < 1.0
    assert doubled == pytest.approx(narrow, rel=0.02)
