"""Pixel AUROC and AUPRO against cases small enough to work out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octcore.preprocess import Preprocessing
from training.pixel_metrics import aupro, load_mask, pixel_auroc

# One 1×6 image: lesion regions {0} (1 pixel) and {3, 4} (2 pixels); healthy pixels 1, 2, 5.
MASK = np.array([[[1, 0, 0, 1, 1, 0]]], dtype=bool)
MAP = np.array([[[0.9, 0.8, 0.1, 0.7, 0.2, 0.3]]])


def test_pixel_auroc_by_hand() -> None:
    # Lesion 0.9, 0.7, 0.2 vs healthy 0.8, 0.1, 0.3: 3 + 2 + 1 of 9 pairs ordered right.
    assert pixel_auroc(MAP, MASK) == pytest.approx(6 / 9)


@pytest.mark.parametrize(("limit", "expected"), [
    # Walking down the values: 0.9 → PRO ½ (region 1 found) at FPR 0; 0.8 → FPR ⅓; 0.7 → PRO ¾ (half of region 2);
    # 0.3 → FPR ⅔; 0.2 → PRO 1; 0.1 → FPR 1. A staircase whose steps are ⅓ wide at heights ½, ¾, 1.
    (1.0, (0.5 + 0.75 + 1.0) / 3),
    (0.5, (0.5 / 3 + 0.75 * (0.5 - 1 / 3)) / 0.5),
    (0.3, 0.5),  # MVTec's limit: only the first step
])
def test_aupro_by_hand(limit: float, expected: float) -> None:
    assert aupro(MAP, MASK, limit) == pytest.approx(expected)


def test_aupro_weighs_regions_not_pixels() -> None:
    """A map that finds a big lesion but misses a small one gets half the AUPRO, however big the big one is."""
    mask = np.zeros((1, 20, 20), dtype=bool)
    mask[0, 2:12, 2:12] = True  # 100 pixels
    mask[0, 16, 16] = True  # 1 pixel, its own region
    found_big = np.where(mask, 0.0, -1.0)
    found_big[0, 16, 16] = -2.0  # below every healthy pixel
    assert aupro(found_big, mask) == pytest.approx(0.5)
    assert pixel_auroc(found_big, mask) > 0.98  # the pixel AUROC barely notices the missed lesion
    assert aupro(mask.astype(float), mask) == pytest.approx(1.0)
    assert aupro(-mask.astype(float), mask) == pytest.approx(0.0)


def test_regions_do_not_join_across_images() -> None:
    """Two images with a lesion pixel at the same spot are two regions: one found, one missed → PRO ½."""
    mask = np.zeros((2, 3, 3), dtype=bool)
    mask[:, 1, 1] = True
    m = np.zeros((2, 3, 3))
    m[0, 1, 1], m[1, 1, 1] = 1.0, -1.0
    assert aupro(m, mask) == pytest.approx(0.5)


def test_no_lesion_gives_nan() -> None:
    empty = np.zeros((1, 4, 4), dtype=bool)
    assert np.isnan(aupro(np.ones((1, 4, 4)), empty)) and np.isnan(pixel_auroc(np.ones((1, 4, 4)), empty))


def test_mask_follows_the_scans_margin_crop(tmp_path: Path) -> None:
    """The scan's white margin rows are cropped before resizing; the mask must be cropped with the same box."""
    scan = np.full((40, 40), 80, dtype=np.uint8)
    scan[:20] = 255  # top half is registration margin
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[20:30, :20] = 255  # upper-left quarter of what is left after the crop
    Image.fromarray(scan).save(tmp_path / "s.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    got = load_mask(tmp_path / "s.png", tmp_path / "m.png", Preprocessing(size=8))
    want = np.zeros((8, 8), dtype=bool)
    want[:4, :4] = True
    assert np.array_equal(got, want)
    assert not load_mask(tmp_path / "s.png", None, Preprocessing(size=8)).any()
