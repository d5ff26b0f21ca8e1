"""octcore.resize: PIL's resampling weights, which the service's heatmap resize uses; preprocessing resizes with PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from octcore.preprocess import Preprocessing, preprocess_gray
from octcore.resize import FILTERS, taps

PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}

SHAPES = [  # (height, width, size): Kermany crops, upscaling, mixed, the same size, tiny
    (491, 509, 256), (496, 768, 256), (256, 256, 256), (100, 130, 256), (300, 200, 224), (7, 9, 64), (1, 5, 8)]


def pil_resize(x: np.ndarray, size: int, resample: str) -> np.ndarray:
    return np.asarray(Image.fromarray(x.astype(np.float32)).resize((size, size), PIL_FILTERS[resample]), np.float32)


def taps_resize(x: np.ndarray, size: int, resample: str) -> np.ndarray:
    """Separable resize with `taps`: down the columns, then along the rows."""
    ri, rw = taps(x.shape[0], size, resample)
    ci, cw = taps(x.shape[1], size, resample)
    rows = np.einsum("ok,okw->ow", rw, x.astype(np.float64)[ri])
    return np.einsum("ok,hok->ho", cw, rows[:, ci])


@pytest.mark.parametrize("resample", sorted(FILTERS))
@pytest.mark.parametrize(("h", "w", "size"), SHAPES)
def test_taps_are_pils_weights(resample: str, h: int, w: int, size: int) -> None:
    x = np.random.default_rng(h * w).random((h, w)).astype(np.float32) * 255
    np.testing.assert_allclose(taps_resize(x, size, resample), pil_resize(x, size, resample), rtol=0, atol=1e-3)


@pytest.mark.parametrize("resample", sorted(PIL_FILTERS))
def test_preprocess_resizes_with_pil_and_normalises(resample: str) -> None:
    u8 = np.random.default_rng(3).integers(0, 240, (90, 130), dtype=np.uint8)
    cfg = Preprocessing(size=48, resample=resample)
    got, _ = preprocess_gray(u8, cfg)
    want = (pil_resize(u8, 48, resample) / 255.0 - cfg.mean) / cfg.std
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_uint8_and_its_float_copy_give_the_same_input() -> None:
    """A DICOM frame arrives as v / 255 floats, a JPEG as 8-bit v: the model must see the same pixels."""
    u8 = np.random.default_rng(5).integers(0, 240, (96, 128), dtype=np.uint8)
    a, _ = preprocess_gray(u8, Preprocessing(size=64))
    b, _ = preprocess_gray(u8.astype(np.float32) / np.float32(255.0), Preprocessing(size=64))
    assert np.array_equal(a, b)
