"""The shipped real-scan model (model_store/kermany-oct/): valid, verified store entries with their cards, served as
they are. Version 2 (the retina band, every protocol) is the newest and the default; version 1 stays unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from octcore.manifest import list_versions, load_scorer, resolve_version_dir
from octcore.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]
STORE, NAME = ROOT / "model_store", "kermany-oct"
DATA = ROOT / "tests" / "data"
# Version 1 as it shipped: its weights must never change under its number (versions are immutable).
V1_SHA256 = "60eda35afaa825559405a1aeb296825f1a25f9b5500faa2aea29799cd9763526"


@pytest.fixture(scope="module")
def shipped():
    return load_scorer(resolve_version_dir(STORE, NAME), "cpu")  # verifies the sha256 too


def score(shipped, image: Image.Image) -> float:
    manifest, scorer = shipped
    with torch.no_grad():
        x = torch.from_numpy(preprocess(image, manifest.preprocessing_config()))[None, None]
        return float(scorer(x)[manifest.primary_score])


def test_the_newest_version_is_the_retina_band_model_with_its_card(shipped) -> None:
    manifest, _ = shipped
    version_dir = resolve_version_dir(STORE, NAME)
    assert list_versions(STORE, NAME) == [1, 2] and manifest.version == 2
    assert (version_dir / "model.pt").stat().st_size < 20e6
    assert manifest.preprocessing.region == "retina" and manifest.primary_score == "nll"
    assert manifest.overlay() == "nll" and manifest.scores["nll"].map == "nll_map"
    cal = manifest.calibration[manifest.primary_score]
    assert cal.tail is not None and cal.threshold_percentile == 95 and cal.volume_threshold(49) > cal.threshold
    card = (version_dir / "MODEL_CARD.md").read_text()  # beside the weights it describes
    for needed in ("CC BY 4.0", "bench/bench_real.py", "normal_train", "768", "1536", "bootstrap", manifest.sha256):
        assert needed in card, needed
    # No paths of the machine it was built on: the manifest travels.
    assert '"/' not in (version_dir / "manifest.json").read_text()


def test_version_1_is_kept_unchanged() -> None:
    manifest, _ = load_scorer(STORE / NAME / "1", "cpu")
    assert manifest.sha256 == V1_SHA256 and manifest.preprocessing.region == "scan"
    assert json.loads((STORE / NAME / "1" / "manifest.json").read_text())["format_version"] == 2
    assert (STORE / NAME / "1" / "MODEL_CARD.md").is_file()


@pytest.mark.parametrize("name", ["CNV-154835-1.jpeg", "DME-1102486-1.jpeg", "DME-30521-11.jpeg"])
def test_scans_with_large_lesions_are_flagged(shipped, name: str) -> None:
    manifest, _ = shipped
    assert score(shipped, Image.open(DATA / "kermany" / name)) > manifest.calibration[manifest.primary_score].threshold


@pytest.mark.parametrize("name", ["NORMAL-1017237-1.jpeg", "NORMAL-1759350-1.jpeg"])
def test_a_normal_scan_stays_normal_at_512_and_1024_columns(shipped, name: str) -> None:
    """The same anatomy resampled to twice the A-scans: the band is resampled to the input's columns either way, so
    the scan stays well within normal (its percentile among the normal calibration scans under 50)."""
    manifest, _ = shipped
    cal = manifest.calibration[manifest.primary_score]
    image = Image.open(DATA / "kermany" / name)
    assert image.size == (512, 496)
    wide = image.resize((1024, 496), Image.Resampling.BICUBIC)
    for s in (score(shipped, image), score(shipped, wide)):
        assert cal.percentile_of(s) < 50
