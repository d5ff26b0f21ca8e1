from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from octcore.preprocess import (
    Preprocessing,
    crop_white_margins,
    fill_border_padding,
    gray_pixels,
    preprocess,
    preprocess_gray,
    to_gray,
)

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
    box = preprocess_gray(to_gray(Image.fromarray(img)), CFG)[1].box
    assert box == (30, 0, 70, 100)


def test_real_kermany_samples_preprocess() -> None:
    files = sorted(KERMANY.rglob("*.jpeg"))
    assert len(files) >= 8, "real samples missing from tests/data/kermany"
    for f in files:
        with Image.open(f) as im:
            gray = to_gray(im)
            x, geometry = preprocess_gray(gray, Preprocessing())
            x0, y0, x1, y1 = geometry.box
        assert x.shape == (256, 256) and np.isfinite(x).all()
        # Real scans carry white padding; what is kept must be the darker retina, not the padding.
        assert gray[y0:y1, x0:x1].mean() < 0.6
        assert (x1 - x0) >= 0.5 * gray.shape[1] and (y1 - y0) >= 0.5 * gray.shape[0]


# The reference divides by 255 first and resizes with PIL, which sums in double; `preprocess` resizes 0..255 units
# with the normalisation folded into float32 weights (octcore/resize.py). Resizing is linear, so the two differ by
# float rounding only: a few ulp of 1.0 (1.2e-7) in the model's [-1, 1]. 1e-6 there is 1/7800 of a gray level.
ROUNDING = 1e-6

# The pre-vectorisation implementation of the margin steps, kept verbatim as the reference the fast one must equal:
# a model exported before the change sees exactly the pixels it was trained on.
def reference_crop(gray: np.ndarray, cfg: Preprocessing) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    bright = gray > cfg.margin_threshold
    rows, cols = bright.mean(axis=1) >= cfg.margin_fraction, bright.mean(axis=0) >= cfg.margin_fraction
    keep_r, keep_c = np.flatnonzero(~rows), np.flatnonzero(~cols)
    y0, y1 = (int(keep_r[0]), int(keep_r[-1]) + 1) if keep_r.size else (0, 0)
    x0, x1 = (int(keep_c[0]), int(keep_c[-1]) + 1) if keep_c.size else (0, 0)
    if y1 - y0 < 8 or x1 - x0 < 8:
        return gray, (0, 0, gray.shape[1], gray.shape[0])
    return gray[y0:y1, x0:x1], (x0, y0, x1, y1)


def reference_fill(gray: np.ndarray, cfg: Preprocessing) -> np.ndarray:
    bright = gray > cfg.margin_threshold
    if not (bright[0].any() or bright[-1].any() or bright[:, 0].any() or bright[:, -1].any()):
        return gray
    h, w = bright.shape

    def run(mask: np.ndarray, axis: int) -> np.ndarray:
        return np.where(mask.all(axis=axis), mask.shape[axis], np.argmin(mask, axis=axis))

    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    top, bottom, left, right = run(bright, 0), run(bright[::-1], 0), run(bright, 1), run(bright[:, ::-1], 1)
    pad = (rows < top[None, :]) | (rows >= h - bottom[None, :]) | (cols < left[:, None]) | (cols >= w - right[:, None])
    for _ in range(2):
        grown = pad.copy()
        grown[1:] |= pad[:-1]
        grown[:-1] |= pad[1:]
        grown[:, 1:] |= pad[:, :-1]
        grown[:, :-1] |= pad[:, 1:]
        pad = grown
    out = gray.copy()
    out[pad] = cfg.margin_fill
    return out


def reference_preprocess(gray: np.ndarray, cfg: Preprocessing) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    cropped, box = reference_crop(gray, cfg)
    cropped = reference_fill(cropped, cfg)
    resized = Image.fromarray(np.ascontiguousarray(cropped, dtype=np.float32)).resize((cfg.size, cfg.size),
                                                                                     Image.Resampling.BILINEAR)
    return (np.asarray(resized, dtype=np.float32) - cfg.mean) / cfg.std, box


def wedged(seed: int, h: int = 90, w: int = 130) -> np.ndarray:
    """uint8 scan with white margins, saturated wedges on every edge, lone bright pixels, and a full white column."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 240, size=(h, w), dtype=np.uint8)
    a[: rng.integers(0, 6)] = 255
    a[:, : rng.integers(0, 6)] = 255
    for _ in range(4):
        edge, at, depth = rng.integers(0, 4), rng.integers(0, min(h, w)), rng.integers(1, 25)
        span = slice(at, at + rng.integers(1, 30))
        if edge == 0:
            a[:depth, span] = 255
        elif edge == 1:
            a[-depth:, span] = 255
        elif edge == 2:
            a[span, :depth] = 255
        else:
            a[span, -depth:] = 255
    a[rng.integers(0, h, 30), rng.integers(0, w, 30)] = rng.integers(240, 256, 30)  # near the threshold
    a[:, rng.integers(0, w)] = 255
    return a


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_steps_equal_the_reference(seed: int) -> None:
    u8 = wedged(seed)
    f32 = u8.astype(np.float32) / 255.0
    cfg = Preprocessing(size=48, margin_fill=[0.0, 0.1][seed % 2])
    want, want_box = reference_preprocess(f32, cfg)
    got_u8, geo_u8 = preprocess_gray(u8, cfg)
    got_f32, geo_f32 = preprocess_gray(f32, cfg)
    assert geo_u8.box == geo_f32.box == want_box
    np.testing.assert_array_equal(got_u8, got_f32)  # v and v / 255 (a JPEG and a DICOM frame): the same input
    np.testing.assert_allclose(got_u8, want, rtol=0, atol=ROUNDING)
    np.testing.assert_array_equal(fill_border_padding(f32, cfg), reference_fill(f32, cfg))


@pytest.mark.parametrize("edge", ["top", "bottom", "left", "right"])
def test_padding_at_one_edge_alone_is_painted_there(edge: str) -> None:
    """Only edges with a saturated border pixel are painted (`_border_edges`): one wedged edge at a time."""
    a = np.random.default_rng(5).integers(0, 200, size=(60, 80), dtype=np.uint8)
    wedge = {"top": (slice(0, 9), slice(20, 31)), "bottom": (slice(-12, None), slice(50, 53)),
             "left": (slice(10, 40), slice(0, 4)), "right": (slice(3, 5), slice(-30, None))}[edge]
    a[wedge] = 255
    a[30, 40] = 255  # saturated, but inside: never painted
    f32 = a.astype(np.float32) / 255.0
    got = fill_border_padding(f32, CFG)
    np.testing.assert_array_equal(got, reference_fill(f32, CFG))
    assert (got != f32).sum() > (a == 255).sum() - 1  # the wedge and its 2-px fringe
    assert got[30, 40] == f32[30, 40]


def test_training_reader_and_service_input_agree_on_real_scans() -> None:
    """`preprocess` (training, evaluation, export calibration) and `preprocess_gray` on 8-bit pixels (the service)
    give the same array, equal to the reference implementation."""
    for f in sorted(KERMANY.rglob("*.jpeg")):
        with Image.open(f) as im:
            im.load()
            want, want_box = reference_preprocess(to_gray(im), Preprocessing())
            trained = preprocess(im, Preprocessing())
            got, geometry = preprocess_gray(gray_pixels(im), Preprocessing())
        np.testing.assert_array_equal(got, trained)  # the service's input is bit for bit the training input
        np.testing.assert_allclose(got, want, rtol=0, atol=ROUNDING)
        assert geometry.box == want_box


@pytest.mark.parametrize("margins", [(0, 0, 0, 0), (17, 3, 40, 33), (1, 16, 15, 32), (60, 59, 0, 1)])
def test_crop_of_wide_margins_on_every_side_equals_the_reference(margins: tuple[int, int, int, int]) -> None:
    top, bottom, left, right = margins
    a = np.full((150, 170), 255, np.uint8)
    a[top:150 - bottom, left:170 - right] = wedged(3, 150 - top - bottom, 170 - left - right)
    a[top + 5, :] = 250  # a bright row inside the image stays: only lines from the ends are margin
    for gray in (a, a.astype(np.float32) / 255.0):
        got, box = crop_white_margins(gray, CFG)
        want, want_box = reference_crop(a.astype(np.float32) / 255.0, CFG)
        assert box == want_box
        np.testing.assert_array_equal(np.asarray(got, np.float32) / (255.0 if got.dtype == np.uint8 else 1.0), want)
