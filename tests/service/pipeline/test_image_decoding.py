"""Decoding uploads: accepted formats and modes, parity with the training reader, and every bad-upload case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_helpers import encode, gray16, kermany_files, png_with_header

from octcore.preprocess import Preprocessing, preprocess, preprocess_gray
from service.errors import DecompressionBomb, ImageTooLarge, UndecodableImage, UnsupportedImage
from service.pipeline.decode import Limits, decode_image
from training.data import load_image

LIMITS = Limits()
CFG = Preprocessing(size=64)


def scan_like(h: int = 140, w: int = 220, seed: int = 1) -> np.ndarray:
    """uint8 gray with a white top margin and white side bars, like Kermany scans."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 200, size=(h, w), dtype=np.uint8)
    a[:12] = 255
    a[:, :9] = 255
    a[:, -7:] = 255
    return a


def all_modes() -> dict[str, Image.Image]:
    g = Image.fromarray(scan_like())
    return {"L": g, "RGB": g.convert("RGB"), "RGBA": g.convert("RGBA"), "P": g.convert("RGB").convert("P"),
            "LA": g.convert("LA"), "I;16": gray16(), "1": g.convert("1")}


# Every (format, mode) pair the format can store: 8/16-bit gray, RGB, RGBA, palette, bilevel.
CASES = [(f, m) for f in ("PNG", "TIFF", "BMP") for m in all_modes() if not (f == "BMP" and m in ("LA", "I;16"))]


@pytest.mark.parametrize(("fmt", "mode"), CASES)
def test_decoded_and_preprocessed_equals_training_reader(tmp_path: Path, fmt: str, mode: str) -> None:
    image = all_modes()[mode]
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, format=fmt)
    served, _ = preprocess_gray(decode_image(path.read_bytes(), LIMITS), CFG)
    np.testing.assert_array_equal(served, load_image(path, CFG))


def test_jpeg_parity_and_sixteen_bit_precision_kept(tmp_path: Path) -> None:
    path = tmp_path / "x.jpeg"
    Image.fromarray(scan_like()).save(path, quality=90)
    with Image.open(path) as im:
        np.testing.assert_array_equal(preprocess_gray(decode_image(path.read_bytes(), LIMITS), CFG)[0],
                                      preprocess(im, CFG))
    img = gray16()
    gray = decode_image(encode(img), LIMITS)
    np.testing.assert_allclose(gray, np.asarray(img, np.float32) / 65535.0, atol=1e-7)


def test_real_kermany_scans_match_the_training_reader() -> None:
    assert kermany_files(), "tests/data/kermany holds the real sample scans"
    for path in kermany_files():
        served, geometry = preprocess_gray(decode_image(path.read_bytes(), LIMITS), CFG)
        box = geometry.box
        np.testing.assert_array_equal(served, load_image(path, CFG))
        assert box[2] - box[0] >= 8 and box[3] - box[1] >= 8


def test_garbage_empty_and_truncated_are_undecodable() -> None:
    rng = np.random.default_rng(0)
    good = encode(Image.fromarray(scan_like()), "JPEG")
    for bad in (rng.bytes(3000), b"", good[:400], encode(Image.fromarray(scan_like()))[:300], b"GIF89a" + good):
        with pytest.raises(UndecodableImage):
            decode_image(bad, LIMITS)


def test_absurd_dimensions_are_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLarge):
        decode_image(png_with_header(100_000, 10), LIMITS)
    with pytest.raises((ImageTooLarge, DecompressionBomb)):
        decode_image(png_with_header(2**31 - 1, 2**31 - 1), LIMITS)


def test_decompression_bomb_is_refused() -> None:
    # A real, valid image: 7000 x 7000 black compresses to ~50 kB but would decode to 49 M pixels.
    bomb = encode(Image.new("L", (7000, 7000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(DecompressionBomb):
        decode_image(bomb, LIMITS)
    assert decode_image(bomb, Limits(max_pixels=50_000_000)).shape == (7000, 7000)


def test_unsupported_modes_and_stacks() -> None:
    floats = encode(Image.fromarray(np.random.default_rng(0).random((40, 50), dtype=np.float32)), "TIFF")
    with pytest.raises(UnsupportedImage, match="mode 'F'"):
        decode_image(floats, LIMITS)
    frames = [Image.fromarray(scan_like(seed=i)) for i in range(3)]
    stack = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImage, match="3 frames"):
        decode_image(stack, LIMITS)
