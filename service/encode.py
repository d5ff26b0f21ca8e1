"""The decoded scan as a base64 PNG, for clients that cannot decode the upload themselves (DICOM, TIFF, 16-bit).

It keeps the upload's pixel size, so `heatmap_box` places the heatmaps on it without any scaling of its own.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def encode_preview(gray: np.ndarray) -> str:
    """Gray (H, W), uint8 or float in [0, 1] → base64 8-bit gray PNG of the same size."""
    u8 = gray if gray.dtype == np.uint8 else np.rint(np.clip(np.nan_to_num(gray), 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    # zlib level 1: an OCT B-scan is speckle; higher levels cost CPU time for a few percent of bytes.
    Image.fromarray(u8).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")
