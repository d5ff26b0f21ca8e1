"""Heatmap and preview files: the fast PNG writer is lossless, the lossy formats decode, base64 per score."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from service.encode import encode, encode_all, encode_preview


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


def test_encode_all_returns_base64_png_per_score() -> None:
    maps = {"residual": np.zeros((16, 32), np.uint8), "alm": np.full((16, 32), 128, np.uint8)}
    out = encode_all(maps)
    assert set(out) == {"residual", "alm"}
    alm = Image.open(io.BytesIO(base64.b64decode(out["alm"])))
    assert alm.size == (32, 16) and np.all(np.asarray(alm) == 128)


def test_preview_is_the_decoded_scan_in_8_bits() -> None:
    gray = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    png = Image.open(io.BytesIO(base64.b64decode(encode_preview(gray))))
    assert png.mode == "L" and png.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(png), np.rint(gray * 255).astype(np.uint8))
