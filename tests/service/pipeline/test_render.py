"""Heatmaps on the device: size follows the crop box (region scan) or the band (region retina), pixel values follow
the documented map_scale, a retina band's columns go back to the rows they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from octcore.preprocess import Geometry
from octcore.scanmap import scan_size
from service.pipeline.render import band_to_u8, to_u8


def heatmap_size(box: tuple[int, int, int, int], size: int) -> tuple[int, int]:
    return scan_size(Geometry(box), size)


def test_size_keeps_the_crop_box_aspect_ratio() -> None:
    assert heatmap_size((0, 0, 512, 496), 64) == (64, 62)
    assert heatmap_size((10, 20, 110, 420), 64) == (16, 64)
    assert heatmap_size((0, 0, 1536, 496), 256) == (256, 83)
    assert heatmap_size((0, 0, 5, 5), 64) == (64, 64)


def test_values_are_map_over_map_scale_clipped() -> None:
    m = torch.from_numpy(np.tile(np.linspace(0.0, 2.0, 64, dtype=np.float32), (64, 1)))  # 0 → 2 left to right
    v = to_u8(m, 1.0, (0, 0, 100, 100)).numpy()
    assert v.dtype == np.uint8 and v.shape == (64, 64)
    np.testing.assert_allclose(v[0, :20], np.rint(np.linspace(0, 2, 64)[:20] * 255), atol=2)
    assert v[:, -10:].min() == 255 and v[:, 0].max() == 0  # over map_scale saturates, zero stays black
    assert np.all(to_u8(m * 0 + 0.25, 0.5, (0, 0, 10, 10)).numpy() == 128)


def test_a_band_goes_back_to_the_rows_it_came_from() -> None:
    """A retina-band input: column j's band started band_top[j] rows into the box. A map that is 1 on the band's
    middle row lands on box row band_top + band_rows / 2, and the box outside the band is 0."""
    s, band_rows, box_rows = 32, 64, 128
    m = torch.zeros((1, s, s))
    m[0, s // 2] = 1.0  # the band's middle row
    band_top = torch.linspace(0, 60, s)[None]  # a tilted retina: the band lower to the right
    geometry = Geometry((0, 0, 200, box_rows), band_top[0].numpy(), band_rows)
    w, h = scan_size(geometry, s)
    assert (w, h) == (s, box_rows * s // band_rows)
    u8 = band_to_u8(m, 1.0, band_top, band_rows, h)[0].numpy()
    assert u8.shape == (h, w)
    rows_per_pixel = box_rows / h
    for j in (0, s // 2, s - 1):
        peak = int(np.argmax(u8[:, j])) * rows_per_pixel  # in box rows
        assert abs(peak - (float(band_top[0, j]) + band_rows / 2)) <= 2 * rows_per_pixel, j
        outside = [r for r in range(h) if not band_top[0, j] - 1 <= r * rows_per_pixel <= band_top[0, j] + band_rows]
        assert u8[outside, j].max() == 0, j
    flat = band_to_u8(torch.full((1, s, s), 0.25), 0.5, band_top, band_rows, h)[0].numpy()
    centre = np.rint((band_top[0].numpy() + band_rows / 2) / rows_per_pixel).astype(int)
    assert np.all(flat[centre, np.arange(s)] == 128)  # the same scale as a whole-scan map


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
