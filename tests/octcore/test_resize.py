"""octcore.resize: PIL's antialiased resize of a float image, as two sparse products, equal to PIL to float rounding."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from octcore.preprocess import Preprocessing, preprocess_gray
from octcore.resize import FILTERS, one_torch_thread, resize

PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
# float32 sums against PIL's double ones: a few ulp of the 0..255 range. 1e-6 of it is 1/3900 of a gray level.
TOLERANCE = 255 * 1e-6

SHAPES = [  # (height, width, size): Kermany crops, power-of-two widths, upscaling, mixed, the same size, tiny
    (491, 509, 256), (496, 512, 256), (496, 768, 256), (496, 1536, 256), (256, 256, 256), (100, 130, 256),
    (300, 200, 224), (60, 40, 48), (7, 9, 64), (1, 5, 8)]


def pil_resize(x: np.ndarray, size: int, resample: str) -> np.ndarray:
    return np.asarray(Image.fromarray(x.astype(np.float32)).resize((size, size), PIL_FILTERS[resample]), np.float32)


@pytest.mark.parametrize("resample", sorted(FILTERS))
@pytest.mark.parametrize(("h", "w", "size"), SHAPES)
def test_equals_pil_on_a_float_image(resample: str, h: int, w: int, size: int) -> None:
    x = np.random.default_rng(h * w + size).uniform(0, 255, (h, w)).astype(np.float32)
    got = resize(x, size, resample)
    assert got.shape == (size, size) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, pil_resize(x, size, resample), rtol=0, atol=TOLERANCE)


def test_gain_and_offset_ride_along() -> None:
    x = np.random.default_rng(1).uniform(0, 255, (120, 170)).astype(np.float32)
    got = resize(x, 64, "bilinear", gain=1 / 127.5, offset=-1.0)
    np.testing.assert_allclose(got, pil_resize(x, 64, "bilinear") / 127.5 - 1.0, rtol=0, atol=1e-6)


def test_uint8_and_its_float_copy_give_the_same_bits() -> None:
    u8 = np.random.default_rng(2).integers(0, 256, (131, 97), dtype=np.uint8)
    np.testing.assert_array_equal(resize(u8, 64), resize(u8.astype(np.float32), 64))
    view = u8[3:-4, 5:-2]  # a crop: a strided view, read in place
    np.testing.assert_array_equal(resize(view, 64), resize(np.ascontiguousarray(view), 64))


def test_a_constant_image_stays_constant() -> None:
    """The weights of each output sum to one, at every scale: flat regions (the dark vitreous) keep their level."""
    for h, w, size in SHAPES:
        np.testing.assert_allclose(resize(np.full((h, w), 200, np.uint8), size), 200.0, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("resample", sorted(PIL_FILTERS))
def test_preprocess_resizes_like_pil_with_every_filter(resample: str) -> None:
    """Nearest, which PIL computes as a lookup rather than a filter, stays with PIL; the filters go through `resize`."""
    u8 = np.random.default_rng(3).integers(0, 240, (90, 130), dtype=np.uint8)
    cfg = Preprocessing(size=48, resample=resample)
    got, _ = preprocess_gray(u8, cfg)
    want = (pil_resize(u8, 48, resample) / 255.0 - cfg.mean) / cfg.std
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_concurrent_calls_share_the_cached_weights_safely() -> None:
    """The service resizes on the event loop and in its CPU threads at once, with one cached matrix per shape."""
    images = [np.random.default_rng(i).integers(0, 256, (496, 512), dtype=np.uint8) for i in range(8)]
    serial = [resize(x, 256) for x in images]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            for got, want in zip(pool.map(lambda x: resize(x, 256), images), serial, strict=True):
                np.testing.assert_array_equal(got, want)


def test_one_torch_thread_is_scoped_to_the_block_and_the_thread() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as on a 2-core host, whatever this runner's default is
    seen: list[int] = []
    try:
        with pytest.raises(RuntimeError), one_torch_thread():
            seen.append(torch.get_num_threads())
            other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            other.start()
            other.join()
            raise RuntimeError("the count comes back even when the block fails")
        seen.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    # One thread in the block, two again after it. A thread whose first torch op falls inside the block starts with
    # one too (a new thread takes the count last set anywhere): why the engine sets its inference threads' count.
    assert seen == [1, 1, 2]
