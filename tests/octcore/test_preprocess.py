from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octcore.preprocess import Preprocessing, crop_white_margins, preprocess, preprocess_gray, to_gray

KERMANY = Path(__file__).resolve().parents[1] / "data" / "kermany"
CFG = Preprocessing(size=64)


def scan(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w)) * 200).astype(np.uint8)


def test_white_margins_are_cropped_and_box_reported() -> None:
    img = np.full((100, 140), 255, np.uint8)
    img[10:90, 20:130] = scan(80, 110)
    cropped, box = crop_white_margins(to_gray(Image.fromarray(img)), CFG)
    assert box == (20, 10, 130, 90)
    assert cropped.shape == (80, 110)


def test_all_white_image_is_kept_whole() -> None:
    gray = np.ones((50, 60), np.float32)
    cropped, box = crop_white_margins(gray, CFG)
    assert cropped.shape == (50, 60) and box == (0, 0, 60, 50)


def test_output_shape_dtype_and_range() -> None:
    x = preprocess(Image.fromarray(scan()), CFG)
    assert x.shape == (64, 64) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_modes_match_grayscale(mode: str) -> None:
    gray = Image.fromarray(scan())
    converted = gray.convert(mode)
    np.testing.assert_allclose(preprocess(converted, CFG), preprocess(gray, CFG), atol=2 / 255)


def test_sixteen_bit_keeps_precision() -> None:
    base = scan().astype(np.uint16) * 257  # the same image at 16 bits
    im16 = Image.fromarray(base)
    np.testing.assert_allclose(preprocess(im16, CFG), preprocess(Image.fromarray(scan()), CFG), atol=1e-4)
    fine = to_gray(Image.fromarray(np.array([[0, 1, 2, 65535]], np.uint16)))
    assert 0 < fine[0, 1] < fine[0, 2] < 1e-4  # 8-bit truncation would have made these 0


def test_box_maps_back_to_input_pixels() -> None:
    img = np.full((100, 100), 255, np.uint8)
    img[:, 30:70] = 50
    _, box = preprocess_gray(to_gray(Image.fromarray(img)), CFG)
    assert box == (30, 0, 70, 100)


def test_real_kermany_samples_preprocess() -> None:
    files = sorted(KERMANY.rglob("*.jpeg"))
    assert len(files) >= 8, "real samples missing from tests/data/kermany"
    for f in files:
        with Image.open(f) as im:
            gray = to_gray(im)
            x, (x0, y0, x1, y1) = preprocess_gray(gray, Preprocessing())
        assert x.shape == (256, 256) and np.isfinite(x).all()
        # Real scans carry white padding; what is kept must be the darker retina, not the padding.
        assert gray[y0:y1, x0:x1].mean() < 0.6
        assert (x1 - x0) >= 0.5 * gray.shape[1] and (y1 - y0) >= 0.5 * gray.shape[0]
