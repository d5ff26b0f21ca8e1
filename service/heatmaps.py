"""Score maps → 8-bit PNG heatmaps at the scanned region's aspect ratio.

Value scale: a pixel value v (0..255) stands for map value v / 255 * map_scale, where map_scale is the manifest's
`calibration[<score>].map_scale` (a high percentile of that map on normal validation images). So 255 means "at or
above what normal retinas reach", and the same gray level means the same evidence across images and requests.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# zlib level 1: heatmaps are small and smooth; higher levels cost CPU time for a few percent of bytes.
_PNG_COMPRESS_LEVEL = 1


def heatmap_size(box: tuple[int, int, int, int], size: int) -> tuple[int, int]:
    """(width, height) with the longer side `size` and the crop box's aspect ratio."""
    w, h = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    if w >= h:
        return size, max(1, round(size * h / w))
    return max(1, round(size * w / h)), size


def render(score_map: np.ndarray, map_scale: float, box: tuple[int, int, int, int]) -> bytes:
    """One (S, S) map → PNG bytes, 8-bit gray, value = clip(map / map_scale, 0, 1) * 255."""
    m = np.asarray(score_map, dtype=np.float32).reshape(score_map.shape[-2:])
    resized = np.asarray(Image.fromarray(m).resize(heatmap_size(box, m.shape[-1]),
                                                             Image.Resampling.BILINEAR))
    scale = map_scale if map_scale > 0 else 1.0
    u8 = np.rint(np.clip(np.nan_to_num(resized / scale), 0.0, 1.0) * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def render_all(maps: dict[str, np.ndarray], scales: dict[str, float], box: tuple[int, int, int, int]) -> dict[str, str]:
    """{score name: its map} → {score name: base64 PNG}."""
    return {name: base64.b64encode(render(m, scales[name], box)).decode("ascii") for name, m in maps.items()}
