"""Uploaded bytes → gray pixels (H, W), with every way an upload can be bad turned into a 422.

Only the header is read before the size checks, so a decompression bomb is refused before it is expanded. The
pixels then go through `octcore.preprocess.gray_pixels`, the conversion the training reader uses: 8-bit gray stays
uint8 (v stands for v / 255), anything else becomes float32 in [0, 1]. 8-bit gray JPEGs and PNGs — the usual OCT
exports — are decoded by `torchvision.io` (libjpeg-turbo and libpng: the same pixels as PIL's, ~15 % less CPU on a
PNG, without a PIL image in between).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from octcore.preprocess import gray_pixels

# torchvision 0.29 points at torchcodec; its image decoders still ship and work. The notice its decode calls repeat is
# filtered where a serving process starts (service.logs.quiet_libraries), not here: importing changes no filter.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png
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
    """PNG/JPEG/TIFF/BMP bytes → gray (H, W), uint8 or float32 in [0, 1]. Raises a 422 `Problem` for a bad upload."""
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
            if image.mode == "L" and image.format in _TORCHVISION:
                return _decode_gray(data, _TORCHVISION[image.format])
            image.load()
            gray = gray_pixels(image)
        except Image.DecompressionBombError as e:
            raise DecompressionBomb(str(e)) from e
        except Exception as e:  # truncated or corrupt pixel data
            raise UndecodableImage(f"corrupt or truncated {image.format} data ({type(e).__name__}: {e})") from e
    if gray.dtype != np.uint8 and not np.isfinite(gray).all():
        raise UndecodableImage("pixel data holds NaN or infinity")
    return gray


_TORCHVISION = {"JPEG": decode_jpeg, "PNG": decode_png}


def _decode_gray(data: bytes, decode: Callable[..., torch.Tensor]) -> np.ndarray:
    try:
        pixels = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY)
    except RuntimeError as e:  # torchvision prefixes its C++ source location; the client needs the reason
        raise UndecodableImage(f"corrupt or truncated image data ({str(e).rsplit(', ', 1)[-1]})") from e
    return pixels[0].numpy()


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
