"""Synthetic lesions (training.synthetic): drawn where the retina is, of the kind asked, reproducibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octcore.preprocess import Preprocessing, preprocess
from training.synthetic import KINDS, add_lesion, rpe_rows, synthetic_set

KERMANY = Path(__file__).resolve().parents[1] / "data" / "kermany"


@pytest.fixture(scope="module")
def normal() -> np.ndarray:
    return preprocess(Image.open(KERMANY / "NORMAL-1017237-1.jpeg"), Preprocessing(size=128))


def test_rpe_is_found_in_the_bright_band(normal: np.ndarray) -> None:
    rows = rpe_rows(normal)
    assert rows.shape == (128,)
    # each column's RPE row is among the brightest rows of that column (smoothed over a few rows)
    centre = normal[:, 32:96]
    brightest = np.argsort(centre, axis=0)[-12:]
    hits = np.mean([rows[32 + j] in range(brightest[:, j].min() - 3, brightest[:, j].max() + 4) for j in range(64)])
    assert hits > 0.8


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_a_small_region_near_the_retina(normal: np.ndarray, kind: str) -> None:
    out = add_lesion(normal, kind, np.random.default_rng(0))
    changed = np.abs(out - normal) > 0.05
    assert out.shape == normal.shape and out.dtype == normal.dtype
    assert 0 < changed.mean() < 0.06  # a lesion, not a new image
    rows, cols = np.nonzero(changed)
    rpe = rpe_rows(normal)
    assert np.all(rows <= rpe[cols] + 4)  # in or above the RPE, never in the choroid below it
    if kind == "fluid":
        assert out[changed].mean() < normal[changed].mean()  # a dark pocket
    if kind == "hyper":
        assert out[changed].mean() > normal[changed].mean()  # a bright focus


def test_the_set_is_seeded_and_cycles_the_kinds(normal: np.ndarray) -> None:
    images = np.stack([normal, normal[:, ::-1].copy()])
    a, b = synthetic_set(images, 3, seed=1), synthetic_set(images, 3, seed=1)
    assert a.shape == (6, 128, 128) and np.array_equal(a, b)
    assert not np.array_equal(a, synthetic_set(images, 3, seed=2))
    with pytest.raises(ValueError, match="unknown lesion kind"):
        add_lesion(normal, "tumour", np.random.default_rng(0))
