"""Heatmap PNGs: size follows the crop box, pixel values follow the documented map_scale."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.heatmaps import encode, heatmap_size, render, render_all, to_u8


def test_size_keeps_the_crop_box_aspect_ratio() -> None:
    assert heatmap_size((0, 0, 512, 496), 64) == (64, 62)
    assert heatmap_size((10, 20, 110, 420), 64) == (16, 64)
    assert heatmap_size((0, 0, 1536, 496), 256) == (256, 83)
    assert heatmap_size((0, 0, 5, 5), 64) == (64, 64)


def test_values_are_map_over_map_scale_clipped() -> None:
    m = np.tile(np.linspace(0.0, 2.0, 64, dtype=np.float32), (64, 1))[None]  # (1, 64, 64), 0 → 2 left to right
    png = Image.open(io.BytesIO(render(m, 1.0, (0, 0, 100, 100))))
    assert png.format == "PNG" and png.mode == "L" and png.size == (64, 64)
    v = np.asarray(png)
    np.testing.assert_allclose(v[0, :20], np.rint(np.linspace(0, 2, 64)[:20] * 255), atol=2)
    assert v[:, -10:].min() == 255 and v[:, 0].max() == 0  # over map_scale saturates, zero stays black
    half = np.asarray(Image.open(io.BytesIO(render(m * 0 + 0.25, 0.5, (0, 0, 10, 10)))))
    assert np.all(half == 128)


def test_render_all_returns_base64_png_per_score() -> None:
    maps = {"residual": np.zeros((1, 32, 32), np.float32), "alm": np.ones((1, 32, 32), np.float32)}
    out = render_all(maps, {"residual": 1.0, "alm": 2.0}, (0, 0, 60, 30))
    assert set(out) == {"residual", "alm"}
    alm = Image.open(io.BytesIO(base64.b64decode(out["alm"])))
    assert alm.size == (32, 16) and np.all(np.asarray(alm) == 128)


def test_fast_png_is_lossless_and_lossy_formats_decode() -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    u8[:, :20] = np.arange(20, dtype=np.uint8) * 12  # smooth part: Sub-filter differences
    png = Image.open(io.BytesIO(encode(u8, "png")))
    assert png.format == "PNG" and png.mode == "L"
    np.testing.assert_array_equal(np.asarray(png), u8)
    flat = np.full((64, 64), 77, np.uint8)
    for fmt, name in (("webp", "WEBP"), ("jpeg", "JPEG")):
        im = Image.open(io.BytesIO(encode(flat, fmt)))
        assert im.format == name and im.size == (64, 64)
        assert np.abs(np.asarray(im.convert("L")).astype(int) - 77).max() <= 2


def test_resize_and_scale_on_the_device_match_pil_on_the_host() -> None:
    m = np.random.default_rng(1).random((64, 64), dtype=np.float32) * 3
    box = (0, 0, 90, 40)
    host = np.asarray(Image.fromarray(m).resize(heatmap_size(box, 64), Image.Resampling.BILINEAR))
    want = np.rint(np.clip(host / 2.0, 0, 1) * 255)
    got = to_u8(torch.from_numpy(m), 2.0, box).numpy()
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1
    # Batched as the engine does it: (images, S, S), one score's maps.
    both = to_u8(torch.from_numpy(np.stack([m, m * 2])), 2.0, box).numpy()
    assert both.shape == (2, *want.shape)
    assert np.abs(both[0].astype(int) - want).max() <= 1
    assert np.abs(both[1].astype(int) - np.rint(np.clip(host, 0, 1) * 255)).max() <= 1


@pytest.mark.parametrize("box", [(0, 0, 90, 40), (0, 0, 40, 90), (0, 0, 64, 63), (3, 5, 40, 40)])
def test_one_axis_resize_matches_pil_for_either_orientation(box: tuple[int, int, int, int]) -> None:
    m = np.random.default_rng(2).random((64, 64), dtype=np.float32) * 1.5
    host = np.asarray(Image.fromarray(m).resize(heatmap_size(box, 64), Image.Resampling.BILINEAR))
    want = np.rint(np.clip(host / 1.5, 0, 1) * 255)
    got = to_u8(torch.from_numpy(m), 1.5, box).numpy()
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= 1 and np.mean(got != want) < 0.01  # float rounding at .5 only


def test_nan_is_black_and_infinity_saturates() -> None:
    m = np.zeros((32, 32), np.float32)
    m[:, :4], m[:, -4:] = np.nan, np.inf
    got = to_u8(torch.from_numpy(m), 1.0, (0, 0, 32, 32)).numpy()
    assert np.all(got[:, :4] == 0) and np.all(got[:, -4:] == 255) and np.all(got[:, 8:-8] == 0)
