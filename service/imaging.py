"""Uploaded bytes → gray float32 (H, W) in [0, 1], with every way an upload can be bad turned into a 422.

Only the header is read before the size checks, so a decompression bomb is refused before it is expanded. The
pixels then go through `octcore.preprocess.to_gray`, the same conversion the training reader uses.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from octcore.preprocess import to_gray
from service.errors import DecompressionBomb, ImageTooLarge, UndecodableImage, UnsupportedImage

# 8- and 16-bit gray, RGB(A), palette (and what PIL reports for the same data in other containers).
SUPPORTED_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                             "I;16", "I;16B", "I;16L", "I;16N", "I"})
# Only these decoders run on client bytes: fewer parsers, fewer surprises.
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")


@dataclass(frozen=True)
class Limits:
    max_side: int = 8192
    max_pixels: int = 40_000_000


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """PNG/JPEG/TIFF/BMP bytes → gray float32 (H, W) in [0, 1]. Raises a 422 `Problem` for any bad upload."""
    if not data:
        raise UndecodableImage("the upload is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise DecompressionBomb(str(e)) from e
    except Exception as e:  # PIL signals "not an image" through several exception types
        raise UndecodableImage(f"not a PNG, JPEG, TIFF or BMP image ({type(e).__name__})") from e
    with image:
        w, h = image.size
        if w < 1 or h < 1 or w > limits.max_side or h > limits.max_side:
            raise ImageTooLarge(f"{w}x{h} pixels; each side must be 1..{limits.max_side} (OCT_MAX_IMAGE_SIDE)")
        if w * h > limits.max_pixels:
            raise DecompressionBomb(f"{w}x{h} = {w * h} pixels, over {limits.max_pixels} (OCT_MAX_IMAGE_PIXELS)")
        if getattr(image, "n_frames", 1) > 1:
            raise UnsupportedImage(f"{image.n_frames} frames; send one B-scan per request")
        if image.mode not in SUPPORTED_MODES:
            raise UnsupportedImage(f"pixel mode {image.mode!r}; accepted: 8/16-bit gray, RGB, RGBA, palette")
        try:
            image.load()
            gray = to_gray(image)
        except Image.DecompressionBombError as e:
            raise DecompressionBomb(str(e)) from e
        except Exception as e:  # truncated or corrupt pixel data
            raise UndecodableImage(f"corrupt or truncated {image.format} data ({type(e).__name__}: {e})") from e
    if not np.isfinite(gray).all():
        raise UndecodableImage("pixel data holds NaN or infinity")
    return gray


Decoder = Callable[[bytes, Limits], np.ndarray]

# Raw-body Content-Type → decoder. DICOM (`application/dicom`) joins with the PACS work.
DECODERS: dict[str, Decoder] = {
    "image/png": decode_image,
    "image/jpeg": decode_image,
    "image/jpg": decode_image,
    "image/tiff": decode_image,
    "image/bmp": decode_image,
    "image/x-ms-bmp": decode_image,
}


def decoder_for_upload(data: bytes) -> Decoder:
    """Decoder for a multipart file, chosen by its bytes (clients label parts unreliably)."""
    return decode_image
